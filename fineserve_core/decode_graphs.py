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


def capture(fns, device, warmups: int = 1, pool=None) -> tuple[list[torch.cuda.CUDAGraph], list]:
    """A CUDA graph of each of `fns` (run in order) and what each returned while captured. They run
    `warmups` times first on a side stream, outside any capture: Triton compiles and allocates there."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmups):
            for fn in fns:
                fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graphs, outs = [], []
    for fn in fns:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            outs.append(fn())
        graphs.append(g)
    return graphs, outs


class DecodeGraphs:
    def __init__(self, model: LlamaModel, kv: PagedKVCache, max_batch: int, max_blocks: int, pad_block: int):
        self.model, self.kv = model, kv
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.max_batch, self.max_blocks, self.pad_block = max_batch, max_blocks, pad_block
        dev, T = model.device, kv.fmt.tokens_per_block
        self.T = T
        # two device buffers (int64: ids, positions, slots; int32: block tables then KV lengths), filled
        # from pinned host twins by three copies per step: pageable copies are synchronous staging, and a
        # tensor per block-table row was 64 small host ops at batch 64
        self._nbt = nbt = max_batch * max_blocks
        self._d64 = torch.zeros((3, max_batch), dtype=torch.long, device=dev)
        self._d32 = torch.zeros(nbt + max_batch, dtype=torch.int32, device=dev)
        self._h64 = torch.zeros_like(self._d64, device="cpu").pin_memory()
        self._h32 = torch.zeros_like(self._d32, device="cpu").pin_memory()
        self.ids, self.pos, self.slots = self._d64[0], self._d64[1], self._d64[2]
        self.block_tables, self.kv_lens = self._d32[:nbt].view(max_batch, max_blocks), self._d32[nbt:]
        self._copied = torch.cuda.Event()
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
        # scratch block only
        (graph,), (out,) = capture([forward], self.model.device, warmups=2)
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
        self._copied.synchronize()                        # the host buffers are free again (done long ago)
        h64, h32 = self._h64.numpy(), self._h32.numpy()
        nbt = self._nbt
        bt, lens = h32[:nbt].reshape(self.max_batch, self.max_blocks), h32[nbt:]
        h64[0, :n], h64[1, :n], h64[2, :n] = ids, pos, slots
        h64[:2, n:b] = 0
        h64[2, n:b] = self.pad_block * self.T
        bt[:b] = self.pad_block
        for i, row in enumerate(block_tables):
            bt[i, :len(row)] = row
        lens[:n] = kv_lens
        lens[n:b] = 1
        self._d64.copy_(self._h64, non_blocking=True)    # 3 x max_batch: whole (a column slice is strided)
        nb = b * self.max_blocks
        self._d32[:nb].copy_(self._h32[:nb], non_blocking=True)
        self._d32[nbt:nbt + b].copy_(self._h32[nbt:nbt + b], non_blocking=True)
        self._copied.record()
        graph, out = self.graphs[b]
        graph.replay()
        return out[:n]

    def _reset_rows(self, start: int, stop: int) -> None:
        self.ids[start:stop] = 0
        self.pos[start:stop] = 0
        self.slots[start:stop] = self.pad_block * self.T
        self.block_tables[start:stop] = self.pad_block
        self.kv_lens[start:stop] = 1
