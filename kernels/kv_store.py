"""KV write: new tokens' K and V into their KV-Slab blocks, for the three block formats.

Contract: `fineserve_core.paged_kv.PagedKVCache.write` with the layouts of `fineserve_core.kv_format`
(head-major blocks: data [nb, H, T, D] bf16/fp8 or [nb, H, T, D/2] uint8 + scale [nb, H, T] fp8), and
the quantizers of `fineserve_core.quant.formats` (`quantize_kv_int4`: per (token, head) absmax/7 FP8
scale floored at 2^-9, round half to even, even d in the low nibble; `quantize_kv_fp8`: saturating
cast). Bit-exact with the reference.

One program per token writes all of its KV heads, K and V: it reads 2·H·D inputs and writes
2·H·(D/2 + 1) bytes (int4), 2·H·D (fp8) or 2·H·D·2 (bf16). Slots < 0 are skipped (padding).
"""
from __future__ import annotations

import torch
import triton.language as tl

from kernels._common import int4_scale, jit, next_pow2, quant_int4, to_fp8, to_out

__all__ = ["kv_write", "kv_write_ref"]

_FMT = {"bf16": 0, "fp8": 1, "w4a8kv4": 2}


@jit
def _write_one(x_ptr, stride_xt, stride_xh, tok, data_ptr, scale_ptr, blk, off,
               sd_b, sd_h, sd_t, ss_b, ss_h, ss_t, H, D: tl.constexpr, BH: tl.constexpr, FMT: tl.constexpr,
               OUT_BF16: tl.constexpr):
    rh = tl.arange(0, BH)
    mh = rh < H
    base = x_ptr + tok * stride_xt + rh[:, None] * stride_xh
    dst = data_ptr + blk * sd_b + off * sd_t + rh[:, None] * sd_h
    if FMT == 2:
        HD: tl.constexpr = D // 2
        j = tl.arange(0, HD)
        xe = tl.load(base + 2 * j[None, :], mask=mh[:, None], other=0.0).to(tl.float32)
        xo = tl.load(base + 2 * j[None, :] + 1, mask=mh[:, None], other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(xe), axis=1), tl.max(tl.abs(xo), axis=1))
        s = int4_scale(amax)
        qe = quant_int4(xe, s[:, None])
        qo = quant_int4(xo, s[:, None])
        b = ((qe & 0xF) | ((qo & 0xF) << 4)).to(tl.uint8)
        tl.store(dst + j[None, :], b, mask=mh[:, None])
        tl.store(scale_ptr + blk * ss_b + off * ss_t + rh * ss_h, s.to(tl.float8e4nv), mask=mh)
    else:
        d = tl.arange(0, D)
        x = tl.load(base + d[None, :], mask=mh[:, None], other=0.0).to(tl.float32)
        if FMT == 1:
            tl.store(dst + d[None, :], to_fp8(x), mask=mh[:, None])
        else:
            tl.store(dst + d[None, :], to_out(x, OUT_BF16), mask=mh[:, None])


@jit
def _kv_write_kernel(k_ptr, v_ptr, slot_ptr, kd_ptr, ks_ptr, vd_ptr, vs_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     sd_b, sd_h, sd_t, ss_b, ss_h, ss_t, H, T,
                     D: tl.constexpr, BH: tl.constexpr, FMT: tl.constexpr, OUT_BF16: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot >= 0:
        blk = slot // T
        off = slot % T
        _write_one(k_ptr, stride_kt, stride_kh, tok, kd_ptr, ks_ptr, blk, off, sd_b, sd_h, sd_t, ss_b, ss_h, ss_t,
                   H, D, BH, FMT, OUT_BF16)
        _write_one(v_ptr, stride_vt, stride_vh, tok, vd_ptr, vs_ptr, blk, off, sd_b, sd_h, sd_t, ss_b, ss_h, ss_t,
                   H, D, BH, FMT, OUT_BF16)


def kv_write(k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             k_cache: tuple[torch.Tensor, torch.Tensor | None], v_cache: tuple[torch.Tensor, torch.Tensor | None],
             precision: str) -> None:
    """Write k, v [n, H, D] at `slot_mapping` [n] (slot = block·T + offset) into the block views
    `(data, scale)` of one layer (`KVFormat.views`, i.e. `PagedKVCache.k[layer]` / `.v[layer]`)."""
    fmt = _FMT[precision]
    kd, ks = k_cache
    vd, vs = v_cache
    n, H, D = k.shape
    if n == 0:
        return
    # k and v have their own token/head strides (views of the fused qkv output need no copy)
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    if kd.stride() != vd.stride() or (ks is not None and ks.stride() != vs.stride()):
        raise ValueError("K and V block views must share strides")
    T = kd.shape[2]
    if fmt == 2:
        ss = ks.stride()
    else:
        ks = vs = kd
        ss = (0, 0, 0)
    slots = slot_mapping.to(device=k.device)
    _kv_write_kernel[(n,)](k, v, slots, kd, ks, vd, vs, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                           kd.stride(0), kd.stride(1), kd.stride(2), ss[0], ss[1], ss[2], H, T,
                           D=D, BH=next_pow2(H), FMT=fmt, OUT_BF16=kd.dtype == torch.bfloat16,
                           num_warps=4 if H * D >= 1024 else 1)


def kv_write_ref(k, v, slot_mapping, k_cache, v_cache, precision: str) -> None:
    """`PagedKVCache.write`'s body on the two block views (torch)."""
    from fineserve_core.quant.formats import quantize_kv_fp8, quantize_kv_int4
    T = k_cache[0].shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].to(k_cache[0].device).long()
    blocks, offs = slots // T, slots % T
    for (data, scale), x in ((k_cache, k[keep]), (v_cache, v[keep])):
        if precision == "bf16":
            data[blocks, :, offs] = x.to(data.dtype)
        elif precision == "fp8":
            data[blocks, :, offs] = quantize_kv_fp8(x)
        else:
            packed, s = quantize_kv_int4(x)
            data[blocks, :, offs] = packed
            scale[blocks, :, offs] = s
