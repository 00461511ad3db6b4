"""CUDA graphs for decode steps.

On the H100 a decode step of the 8B shapes is bound by the host: 820–1,800 kernel launches and their
Python cost 47 ms for 6–15 ms of GPU work (load_tests/results/engine-h100.json). So the forward of a
decode-only batch is captured once per batch-size bucket and replayed: one launch per step.

Everything a captured forward reads lives in static buffers (token ids, positions, KV slots, block
tables padded to the model's longest context, KV lengths); a batch is copied in and padded to its
bucket with rows that write into one scratch KV block of their own and attend over it. The attention
metadata that `attention._cuda_attention` builds from Python lists for an eager step is handed in
ready-made (`AttnBatch.cache`), so nothing in the captured region reads the host.
"""
from __future__ import annotations

import torch

from fineserve_core.attention import AttnBatch, _CudaMeta
from fineserve_core.llama import LlamaModel
from fineserve_core.paged_kv import PagedKVCache

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class DecodeGraphs:
    def __init__(self, model: LlamaModel, kv: PagedKVCache, max_batch: int, max_blocks: int, pad_block: int):
        self.model, self.kv = model, kv
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.max_batch, self.max_blocks, self.pad_block = max_batch, max_blocks, pad_block
        dev, T = model.device, kv.fmt.tokens_per_block
        self.T = T
        self.ids = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.pos = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.slots = torch.full((max_batch,), pad_block * T, dtype=torch.long, device=dev)
        self.block_tables = torch.full((max_batch, max_blocks), pad_block, dtype=torch.int32, device=dev)
        self.kv_lens = torch.ones(max_batch, dtype=torch.int32, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def _batch(self, b: int) -> AttnBatch:
        """The batch a captured forward sees: its kernel metadata points at the static buffers."""
        batch = AttnBatch([1] * b, [1] * b, [[self.pad_block]] * b, self.slots[:b])
        meta = _CudaMeta(list(range(b)), [], [], block_tables=self.block_tables[:b], kv_lens=self.kv_lens[:b])
        batch.cache[("cuda_meta", True)] = batch.cache[("cuda_meta", False)] = meta
        return batch

    def _capture(self, b: int) -> None:
        batch = self._batch(b)

        def forward():
            return self.model(self.ids[:b], self.pos[:b], batch, self.kv)
        # the padding rows' values are in place for every row here: warm-up and capture write into the
        # scratch block only (Triton compiles and autotunes in the warm-up, outside the capture)
        side = torch.cuda.Stream(self.model.device)
        side.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                forward()
        torch.cuda.current_stream(self.model.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = forward()
        self.graphs[b] = (graph, out)

    def capture_all(self) -> None:
        """Every bucket now, at load, so that no request pays for a capture."""
        for b in reversed(self.buckets):
            self._reset_rows(0, self.max_batch)
            self._capture(b)

    @torch.inference_mode()
    def run(self, ids: list[int], pos: list[int], slots: list[int], block_tables: list[list[int]],
            kv_lens: list[int]) -> torch.Tensor:
        """Hidden states [n, hidden] of a decode-only batch of n ≤ max_batch rows."""
        n = len(ids)
        b = self.bucket(n)
        host = torch.full((3, b), 0, dtype=torch.long)
        host[0, :n], host[1, :n], host[2, :n] = torch.tensor(ids), torch.tensor(pos), torch.tensor(slots)
        host[2, n:] = self.pad_block * self.T
        bt = torch.full((b, self.max_blocks), self.pad_block, dtype=torch.int32)
        for i, row in enumerate(block_tables):
            bt[i, :len(row)] = torch.tensor(row, dtype=torch.int32)
        lens = torch.ones(b, dtype=torch.int32)
        lens[:n] = torch.tensor(kv_lens, dtype=torch.int32)
        self.ids[:b].copy_(host[0], non_blocking=True)
        self.pos[:b].copy_(host[1], non_blocking=True)
        self.slots[:b].copy_(host[2], non_blocking=True)
        self.block_tables[:b].copy_(bt, non_blocking=True)
        self.kv_lens[:b].copy_(lens, non_blocking=True)
        graph, out = self.graphs[b]
        graph.replay()
        return out[:n]

    def _reset_rows(self, start: int, stop: int) -> None:
        self.ids[start:stop] = 0
        self.pos[start:stop] = 0
        self.slots[start:stop] = self.pad_block * self.T
        self.block_tables[start:stop] = self.pad_block
        self.kv_lens[start:stop] = 1
