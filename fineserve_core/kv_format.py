"""KV block formats: how one block of one layer's K (or V) is laid out in bytes, per precision.

A block is `block_bytes` contiguous bytes inside a KV Slab region. Head-major, so a decode kernel
reads one (block, head) as one contiguous run:

    bf16     | data [H, T, D] in the model dtype (bf16 on GPU, float32 on CPU)           |
    fp8      | data [H, T, D] float8_e4m3fn (per-tensor scale 1.0, as vLLM's default)    |
    w4a8kv4  | data [H, T, D/2] uint8, two INT4 per byte (even d low nibble) | scale [H, T] fp8 e4m3 |

H = KV heads, T = tokens per block, D = head_dim. INT4 values are symmetric in [-8, 7] with one FP8
scale per (token, head) = absmax / 7 (FireQ's KV4).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fineserve_core.config import DEFAULT_TOKENS_PER_BLOCK


@dataclass(frozen=True, slots=True)
class KVFormat:
    precision: str
    num_kv_heads: int
    head_dim: int
    tokens_per_block: int
    dtype: torch.dtype = torch.bfloat16   # element type of the bf16 format (float32 on CPU references)

    @classmethod
    def for_model(cls, precision: str, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                  tokens_per_block: int | None = None) -> "KVFormat":
        if precision not in DEFAULT_TOKENS_PER_BLOCK:
            raise ValueError(f"unknown precision {precision!r}; expected one of {sorted(DEFAULT_TOKENS_PER_BLOCK)}")
        if precision == "w4a8kv4" and head_dim % 2:
            raise ValueError(f"w4a8kv4 needs an even head_dim, got {head_dim}")
        return cls(precision, num_kv_heads, head_dim, tokens_per_block or DEFAULT_TOKENS_PER_BLOCK[precision], dtype)

    @property
    def data_bytes(self) -> int:
        n = self.num_kv_heads * self.tokens_per_block * self.head_dim
        if self.precision == "bf16":
            return n * self.dtype.itemsize
        if self.precision == "fp8":
            return n
        return n // 2

    @property
    def scale_bytes(self) -> int:
        return self.num_kv_heads * self.tokens_per_block if self.precision == "w4a8kv4" else 0

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one layer's K (V is the same size)."""
        return self.data_bytes + self.scale_bytes

    def bytes_per_token(self, num_layers: int) -> int:
        """KV bytes one token costs across all layers, K and V."""
        return 2 * num_layers * self.block_bytes // self.tokens_per_block

    def views(self, region: torch.Tensor, scales: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Split a uint8 region of whole blocks into typed block views.

        `scales`: where the allocator keeps this format's scale areas out of the blocks (a KV Slab policy
        with split scales), the same layer's uint8 scale region, one slot per block id. The region's
        blocks are then `data_bytes` long. Returns (data [nb, H, T, D or D/2], scale [nb, H, T] or None);
        both alias the inputs.
        """
        split = scales is not None and self.scale_bytes > 0
        stride = self.data_bytes if split else self.block_bytes
        nb = region.numel() // stride
        blocks = region[: nb * stride].view(nb, stride)
        H, T, D = self.num_kv_heads, self.tokens_per_block, self.head_dim
        if self.precision == "bf16":
            return blocks.view(self.dtype).view(nb, H, T, D), None
        if self.precision == "fp8":
            return blocks.view(torch.float8_e4m3fn).view(nb, H, T, D), None
        data = blocks[:, : self.data_bytes].view(nb, H, T, D // 2)
        if split:
            slot = scales.numel() // nb          # a slot may be wider than ours (shared by formats)
            if slot < self.scale_bytes:
                raise ValueError(f"scale region of {scales.numel()} B has no {self.scale_bytes}-byte slot "
                                 f"for each of the {nb} blocks")
            area = scales[: nb * slot].view(nb, slot)[:, : self.scale_bytes]
        else:
            area = blocks[:, self.data_bytes:]
        return data, area.view(torch.float8_e4m3fn).view(nb, H, T)
