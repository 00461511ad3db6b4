"""One model's view of its KV region in the KV Slab buffer: per-layer typed block views, write and gather."""
from __future__ import annotations

import torch

from fineserve_core.kv_format import KVFormat


class PagedKVCache:
    def __init__(self, fmt: KVFormat, region: torch.Tensor, scales: torch.Tensor | None = None):
        """`region` is the allocator's uint8 view [num_layers, 2, bytes]: K at [:, 0], V at [:, 1];
        `scales` the same for the scale areas when the allocator keeps them out of the blocks."""
        self.fmt = fmt
        self.k, self.v = ([fmt.views(region[layer, kv], None if scales is None else scales[layer, kv])
                           for layer in range(region.shape[0])] for kv in (0, 1))
        self._slots: torch.Tensor | None = None     # the step's slot mapping of `_offsets` (CPU write)
        self._offsets: tuple[torch.Tensor, torch.Tensor] | None = None

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [n, Hkv, D] of n new tokens at their slots (on CUDA: `kernels.kv_write`, bit-exact)."""
        if k.is_cuda:
            from kernels import kv_write
            kv_write(k, v, slots, self.k[layer], self.v[layer], self.fmt.precision)
            return
        blocks, offs = self._block_offsets(slots)
        for (data, scale), x in ((self.k[layer], k), (self.v[layer], v)):
            p = self.fmt.precision
            if p == "bf16":
                data[blocks, :, offs] = x.to(data.dtype)
            elif p == "fp8":
                from fineserve_core.quant import quantize_kv_fp8
                data[blocks, :, offs] = quantize_kv_fp8(x)
            else:
                from fineserve_core.quant import quantize_kv_int4
                packed, s = quantize_kv_int4(x)
                data[blocks, :, offs] = packed
                scale[blocks, :, offs] = s

    def _block_offsets(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots // T, slots % T), computed for the first layer of a step and reused by the others."""
        if self._slots is not slots:
            T = self.fmt.tokens_per_block
            self._slots, self._offsets = slots, (slots // T, slots % T)
        return self._offsets

    def gather(self, layer: int, block_ids: list[int], n: int, dtype: torch.dtype | None = None):
        """K and V of the first n tokens of a sequence, [Hkv, n, D], dequantized to `dtype`."""
        idx = torch.tensor(block_ids, device=self.k[layer][0].device)
        return self._read(self.k[layer], idx, n, dtype), self._read(self.v[layer], idx, n, dtype)

    def _read(self, views, idx, n, dtype):
        data, scale = views
        H = self.fmt.num_kv_heads
        x = data[idx].transpose(0, 1).reshape(H, -1, data.shape[-1])[:, :n]
        p = self.fmt.precision
        if p == "w4a8kv4":
            from fineserve_core.quant import dequantize_kv_int4
            s = scale[idx].transpose(0, 1).reshape(H, -1)[:, :n]
            x = dequantize_kv_int4(x, s)
        elif p == "fp8":
            from fineserve_core.quant import dequantize_kv_fp8
            x = dequantize_kv_fp8(x)
        return x.to(dtype or (self.fmt.dtype if p == "bf16" else torch.float32))
