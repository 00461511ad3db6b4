"""Piecewise CUDA graphs for steps that carry prompt tokens (prefills and mixed prefill + decode steps).

Such a step cannot replay a decode graph: its attention depends on how its tokens split into sequences.
Everything else in a layer is row-wise (norms, projections, RoPE, the KV write, the MLP), so that is
captured per token bucket and attention alone runs eagerly between the pieces (vLLM's piecewise graphs):

    piece 0      embedding, RoPE tables, layer 0 up to attention
    piece i      layer i-1 from its attention output on, layer i up to attention
    piece L      the last layer from its attention output on, the final norm

The pieces talk through static buffers (tokens, RoPE tables, q/k/v, residual, attention output) sized
for the largest bucket; a step is copied in padded to its bucket, and its padding rows write their KV
into the engine's scratch block and are never attended. Eagerly, a step with a 256-token prompt beside
64 decodes took 76 ms on the H100 for 18 ms of GPU work (≈1,300 launches and their Python; llama-3-8b
shape, w4a8kv4; load_tests/results/engine-h100-mixed.json), and every step of a loaded server is such
a step.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from fineserve_core.attention import AttnBatch
from fineserve_core.decode_graphs import capture
from fineserve_core.llama import LlamaModel
from fineserve_core.paged_kv import PagedKVCache

BUCKETS = (16, 32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)


class StepGraphs:
    def __init__(self, model: LlamaModel, kv: PagedKVCache, max_tokens: int, pad_block: int):
        """`max_tokens`: the largest step replayed (larger ones run eagerly); `pad_block`: a KV block held
        for padding rows. On a CPU the pieces run as plain calls (no capture): the tests' way in."""
        self.model, self.kv = model, kv
        self.buckets = [b for b in BUCKETS if b < max_tokens] + [max_tokens]
        self.max_tokens, self.pad_slot = max_tokens, pad_block * kv.fmt.tokens_per_block
        cfg, dev, dt = model.cfg, model.device, model.dtype
        self.cuda = dev.type == "cuda"
        self._d64 = torch.zeros((3, max_tokens), dtype=torch.long, device=dev)   # ids, positions, slots
        self._h64 = torch.zeros((3, max_tokens), dtype=torch.long)
        if self.cuda:
            self._h64 = self._h64.pin_memory()
            self._copied = torch.cuda.Event()
        self.ids, self.pos, self.slots = self._d64
        z = lambda *shape: torch.zeros(shape, dtype=dt, device=dev)   # noqa: E731
        self.cos, self.sin = z(max_tokens, 1, cfg.head_dim), z(max_tokens, 1, cfg.head_dim)
        # q and k heads side by side as in the fused projection: attention quantizes both in one launch
        self.qk = z(max_tokens, cfg.num_heads + cfg.num_kv_heads, cfg.head_dim)
        self.q, self.k = self.qk[:, :cfg.num_heads], self.qk[:, cfg.num_heads:]
        self.v = z(max_tokens, cfg.num_kv_heads, cfg.head_dim)
        self.res, self.o = z(max_tokens, cfg.hidden_size), z(max_tokens, cfg.num_heads * cfg.head_dim)
        # per bucket: the pieces, each a graph replay (or, on a CPU, the call itself: the last returns the
        # hidden states), and the captured last piece's output
        self.pieces: dict[int, list[Callable[[], torch.Tensor | None]]] = {}
        self.out: dict[int, torch.Tensor] = {}
        self._reset()

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def _piece(self, b: int, i: int) -> Callable[[], torch.Tensor | None]:
        m, layers = self.model, self.model.layers

        def run():
            if i == 0:
                x, res = F.embedding(self.ids[:b], m.embed_tokens), None
                cos, sin = m.rotary(self.pos[:b], x.dtype)
                self.cos[:b].copy_(cos)
                self.sin[:b].copy_(sin)
            else:
                x, res = layers[i - 1].post(self.o[:b], self.res[:b])
            if i == len(layers):
                return m.norm(x, res)[0]
            q, k, v, res = layers[i].pre(x, res, (self.cos[:b], self.sin[:b]), self.slots[:b], self.kv)
            for buf, t in ((self.q, q), (self.k, k), (self.v, v), (self.res, res)):
                buf[:b].copy_(t)
            return None
        return run

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Every bucket now, at load (one memory pool for all pieces: they never run concurrently)."""
        n = len(self.model.layers) + 1
        if not self.cuda:
            self.pieces = {b: [self._piece(b, i) for i in range(n)] for b in self.buckets}
            return
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):
            graphs, outs = capture([self._piece(b, i) for i in range(n)], self.model.device, pool=pool)
            self.out[b] = outs[-1]
            self.pieces[b] = [g.replay for g in graphs]
        self._reset()

    def _reset(self) -> None:
        """Padding everywhere: the warm-ups and captures only ever write the scratch block."""
        self._d64[:2] = 0
        self._d64[2] = self.pad_slot

    @torch.inference_mode()
    def run(self, ids: list[int], pos: list[int], slots: list[int], q_lens: list[int], kv_lens: list[int],
            block_tables: list[list[int]]) -> torch.Tensor:
        """Hidden states [n, hidden] of a step of n ≤ max_tokens tokens (sequences in batch order)."""
        n = len(ids)
        b = self.bucket(n)
        if self.cuda:
            self._copied.synchronize()                   # the pinned buffer is free again (long ago)
        h = self._h64.numpy()
        h[0, :n], h[1, :n], h[2, :n] = ids, pos, slots
        h[:2, n:b] = 0
        h[2, n:b] = self.pad_slot
        self._d64.copy_(self._h64, non_blocking=True)
        if self.cuda:
            self._copied.record()
        batch = AttnBatch(q_lens, kv_lens, block_tables, self.slots[:n])
        pieces = self.pieces[b]
        pieces[0]()
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.attend(self.q[:n], self.k[:n], self.v[:n], batch, self.kv, out=self.o[:n])
            last = pieces[i + 1]()
        return (self.out[b] if last is None else last)[:n]
