"""Paged attention, torch reference: each sequence attends over its blocks in the KV Slab region.

One call serves a flat batch that mixes prefill chunks (many query tokens) and decodes (one token):
query token i of a sequence sits at position kv_len - q_len + i and sees keys at positions <= its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fineserve_core.paged_kv import PagedKVCache


@dataclass(slots=True)
class AttnBatch:
    q_lens: list[int]              # new tokens per sequence, in batch order
    kv_lens: list[int]             # tokens in the cache per sequence after this step
    block_tables: list[list[int]]  # block ids per sequence
    slot_mapping: torch.Tensor     # [num_tokens] slot = block_id * tokens_per_block + offset


def paged_attention(q: torch.Tensor, kv: PagedKVCache, layer: int, batch: AttnBatch) -> torch.Tensor:
    """q [T, Hq, D] -> out [T, Hq, D] in q's dtype."""
    out = torch.empty_like(q)
    group = q.shape[1] // kv.fmt.num_kv_heads
    start = 0
    for q_len, kv_len, blocks in zip(batch.q_lens, batch.kv_lens, batch.block_tables):
        k, v = kv.gather(layer, blocks, kv_len, q.dtype)             # [Hkv, kv_len, D]
        qs = q[start:start + q_len].transpose(0, 1)                  # [Hq, q_len, D]
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        if q_len == kv_len:
            o = F.scaled_dot_product_attention(qs, k, v, is_causal=True)
        else:
            pos_q = torch.arange(kv_len - q_len, kv_len, device=q.device)[:, None]
            mask = pos_q >= torch.arange(kv_len, device=q.device)[None, :]
            o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask)
        out[start:start + q_len] = o.transpose(0, 1)
        start += q_len
    return out
