"""Paged decode attention (one query token per sequence) over KV-Slab blocks, split-K (flash-decoding).

Reads K/V through the block table straight from the block views of one layer (`KVFormat.views`):
INT4 (w4a8kv4: packed nibbles + FP8 scale per token-head), FP8 (scale 1.0) or bf16/fp32. Queries are
FP8 with a per-(token, head) scale (`formats.quantize_q_fp8`, FireQ's Q8) or plain float.

Grid (batch, kv_head, split): a program serves the whole GQA group of its KV head (the group padded to
16 rows for `tl.dot`), so each K/V byte is read once per step. INT4 K is turned into FP8 in registers
(0x6400 magic number, exact) for an FP8×FP8 `tl.dot` (even/odd head-dim halves = low/high nibbles, so
the query is split the same way and nothing is shuffled); scores × q_scale × k_scale × sm_scale;
online softmax in base 2; P·V as FP16 `tl.dot` with the V scale folded into P (P·diag(s_v)·q_v).
With more than one split, partial (acc, max, sum) go to an FP32 workspace and a second small kernel
merges them (log-sum-exp).

Bytes per sequence and KV head at context L (head_dim D): INT4 2·L·(D/2 + 1), FP8 2·L·D, bf16 4·L·D.
"""
from __future__ import annotations

import math

import torch
import triton.language as tl

from kernels._common import (
    INTERPRET, cdiv, check_out, empty, int4_to_f16, jit, mma, next_pow2, nib_hi, nib_lo, to_bf16, to_f16,
    to_out,
)

__all__ = ["paged_decode_attention", "paged_decode_attention_ref", "default_splits"]

_FMT = {"bf16": 0, "fp8": 1, "w4a8kv4": 2}
LOG2E = 1.4426950408889634


# Ints that change from step to step are not specialized on (Triton would compile a variant for each
# value that is 1 or a multiple of 16, stalling a live step): the block-table width and blocks per split.
@jit(do_not_specialize=["stride_bt", "bps"])
def _decode_kernel(q_ptr, qs_ptr, kd_ptr, ks_ptr, vd_ptr, vs_ptr, bt_ptr, lens_ptr, out_ptr, wso_ptr, wsml_ptr,
                   stride_qb, stride_qh, stride_qsb, stride_bt, stride_ob, stride_oh,
                   sd_b, sd_h, sd_t, ss_b, ss_h, ss_t, qk_scale, bps, HQ,
                   GROUP: tl.constexpr, BG: tl.constexpr, D: tl.constexpr, T: tl.constexpr, FMT: tl.constexpr,
                   Q_FP8: tl.constexpr, SPLIT: tl.constexpr, OUT_BF16: tl.constexpr, ASM: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    sp = tl.program_id(2)
    kv_len = tl.load(lens_ptr + b)
    nblk = tl.cdiv(kv_len, T)
    j0 = sp * bps
    j1 = tl.minimum(j0 + bps, nblk)

    rg = tl.arange(0, BG)
    mg = rg < GROUP
    qh = h * GROUP + rg
    q_row = q_ptr + b * stride_qb + qh[:, None] * stride_qh
    if Q_FP8:
        qsc = tl.load(qs_ptr + b * stride_qsb + qh, mask=mg, other=0.0).to(tl.float32) * qk_scale
    else:
        qsc = tl.full((BG,), 1.0, tl.float32) * qk_scale
    rt = tl.arange(0, T)
    HD: tl.constexpr = D // 2
    if FMT == 2:
        rd = tl.arange(0, HD)
        q_e = tl.load(q_row + 2 * rd[None, :], mask=mg[:, None], other=0.0)
        q_o = tl.load(q_row + 2 * rd[None, :] + 1, mask=mg[:, None], other=0.0)
        if Q_FP8:       # the group is < 64 rows: Triton runs FP8 dots as FP16 mma.sync anyway, so go to FP16
            q_e = q_e.to(tl.float16)
            q_o = q_o.to(tl.float16)
        acc_e = tl.zeros((BG, HD), tl.float32)
        acc_o = tl.zeros((BG, HD), tl.float32)
        acc = acc_e
    else:
        rd = tl.arange(0, D)
        q = tl.load(q_row + rd[None, :], mask=mg[:, None], other=0.0)
        if not Q_FP8:
            if q.dtype != tl.bfloat16:
                q = to_bf16(q.to(tl.float32))
        acc = tl.zeros((BG, D), tl.float32)
        acc_e = acc
        acc_o = acc
    m_i = tl.full((BG,), float("-inf"), tl.float32)
    l_i = tl.zeros((BG,), tl.float32)

    for j in range(j0, j1):
        blk = tl.load(bt_ptr + b * stride_bt + j).to(tl.int64)
        base = blk * sd_b + h * sd_h
        tok = j * T + rt
        mt = tok < kv_len
        d_off = rt[:, None] * sd_t + rd[None, :]
        if FMT == 2:
            sbase = blk * ss_b + h * ss_h + rt * ss_t
            kb = tl.load(kd_ptr + base + d_off)
            k_sc = tl.load(ks_ptr + sbase).to(tl.float32)
            if Q_FP8:
                kl, kh = int4_to_f16(kb, ASM)
            else:
                kl = nib_lo(kb).to(q_e.dtype)
                kh = nib_hi(kb).to(q_e.dtype)
            s = mma(q_e, tl.trans(kl), None)
            s = mma(q_o, tl.trans(kh), s)
            s = s * k_sc[None, :]
        else:
            kt = tl.load(kd_ptr + base + d_off)
            if Q_FP8:
                kt = kt.to(tl.float8e4nv)
            elif kt.dtype != tl.bfloat16:
                kt = to_bf16(kt.to(tl.float32))
            s = mma(q, tl.trans(kt), None)
        s = s * qsc[:, None]
        s = tl.where(mt[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if FMT == 2:
            vb = tl.load(vd_ptr + base + d_off)
            v_sc = tl.load(vs_ptr + sbase).to(tl.float32)
            pv = to_f16(p * v_sc[None, :])
            vl, vh = int4_to_f16(vb, ASM)
            acc_e = mma(pv, vl, acc_e * alpha[:, None])
            acc_o = mma(pv, vh, acc_o * alpha[:, None])
        else:
            vt = tl.load(vd_ptr + base + d_off)
            if vt.dtype != tl.bfloat16:
                vt = to_bf16(vt.to(tl.float32))
            acc = mma(to_bf16(p), vt, acc * alpha[:, None])
        m_i = m_new

    if not SPLIT:
        inv = 1.0 / l_i
        o_row = out_ptr + b * stride_ob + qh[:, None] * stride_oh
        if FMT == 2:
            tl.store(o_row + 2 * rd[None, :], to_out(acc_e * inv[:, None], OUT_BF16), mask=mg[:, None])
            tl.store(o_row + 2 * rd[None, :] + 1, to_out(acc_o * inv[:, None], OUT_BF16), mask=mg[:, None])
        else:
            tl.store(o_row + rd[None, :], to_out(acc * inv[:, None], OUT_BF16), mask=mg[:, None])
    else:
        row = (b * HQ + qh) * tl.num_programs(2) + sp            # [BG] workspace rows, one per split
        w_row = wso_ptr + row[:, None] * D
        if FMT == 2:
            tl.store(w_row + 2 * rd[None, :], acc_e, mask=mg[:, None])
            tl.store(w_row + 2 * rd[None, :] + 1, acc_o, mask=mg[:, None])
        else:
            tl.store(w_row + rd[None, :], acc, mask=mg[:, None])
        tl.store(wsml_ptr + row * 2, m_i, mask=mg)
        tl.store(wsml_ptr + row * 2 + 1, l_i, mask=mg)


@jit(do_not_specialize=["splits"])
def _decode_reduce_kernel(wso_ptr, wsml_ptr, out_ptr, stride_ob, stride_oh, HQ, splits,
                          BS: tl.constexpr, D: tl.constexpr, OUT_BF16: tl.constexpr):
    """The splits' partials of one (sequence, query head), BS splits at a time (the split count is a
    runtime value; BS = its next power of two up to 64, variants the decode graphs' capture compiles)."""
    b = tl.program_id(0).to(tl.int64)
    hq = tl.program_id(1)
    rs = tl.arange(0, BS)
    rd = tl.arange(0, D)
    first = (b * HQ + hq) * splits
    mx = float("-inf")
    for s0 in range(0, splits, BS):
        m = tl.load(wsml_ptr + (first + s0 + rs) * 2, mask=s0 + rs < splits, other=float("-inf"))
        mx = tl.maximum(mx, tl.max(m, axis=0))
    L = 0.0
    acc = tl.zeros((D,), tl.float32)
    for s0 in range(0, splits, BS):
        ms_ = s0 + rs < splits
        row = first + s0 + rs
        m = tl.load(wsml_ptr + row * 2, mask=ms_, other=float("-inf"))
        w = tl.where(m > float("-inf"), tl.math.exp2(m - mx), 0.0)
        L += tl.sum(tl.load(wsml_ptr + row * 2 + 1, mask=ms_, other=0.0) * w, axis=0)
        part = tl.load(wso_ptr + row[:, None] * D + rd[None, :], mask=ms_[:, None], other=0.0)
        acc += tl.sum(part * w[:, None], axis=0)
    tl.store(out_ptr + b * stride_ob + hq * stride_oh + rd, to_out(acc / L, OUT_BF16))


def default_splits(batch: int, kv_heads: int, max_blocks: int, n_sm: int = 132, waves: int = 4) -> int:
    """Splits so that batch·kv_heads·splits ≈ waves × SMs programs, each split ≥ 1 block."""
    want = cdiv(waves * n_sm, max(1, batch * kv_heads))
    return max(1, min(want, max_blocks))


def paged_decode_attention(q: torch.Tensor, k_cache, v_cache, block_tables: torch.Tensor, kv_lens: torch.Tensor,
                           precision: str, sm_scale: float | None = None, q_scale: torch.Tensor | None = None,
                           out_dtype: torch.dtype = torch.bfloat16, splits: int | None = None,
                           num_warps: int = 4, num_stages: int = 3, asm: bool = True,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, D] (float, or float8_e4m3fn with q_scale [B, Hq]) → out [B, Hq, D] in out_dtype (written
    into `out` when given: any row and head strides, unit stride along D).

    k_cache / v_cache: (data, scale) block views of one layer; block_tables int32 [B, max_blocks];
    kv_lens int32 [B] (≥ 1) tokens in the cache including the current one. Three pipeline stages: the
    fastest (5–10 % over two) at every batch and context of the H100 sweep (kernels-h100-run3-sweep.json)."""
    fmt = _FMT[precision]
    kd, ks = k_cache
    vd, vs = v_cache
    B, HQ, D = q.shape
    HKV = kd.shape[1]
    T = kd.shape[2]
    group = HQ // HKV
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    q_fp8 = q.dtype == torch.float8_e4m3fn
    if q_fp8 and q_scale is None:
        raise ValueError("an FP8 query needs q_scale [B, Hq]")
    qs = q_scale.reshape(B, HQ).float() if q_fp8 else q
    if fmt != 2:
        ks = vs = kd
        ss = (0, 0, 0)
    else:
        ss = ks.stride()
    bt = block_tables.to(device=q.device, dtype=torch.int32)
    lens = kv_lens.to(device=q.device, dtype=torch.int32)
    max_blocks = bt.shape[1]
    if splits is None:
        splits = default_splits(B, HKV, max_blocks) if q.is_cuda else 1
    bps = cdiv(max_blocks, splits)
    splits = cdiv(max_blocks, bps)
    out = empty((B, HQ, D), out_dtype, q.device) if out is None else check_out(out, (B, HQ, D), out_dtype)
    if splits > 1:
        wso = empty((B * HQ * splits, D), torch.float32, q.device)
        wsml = empty((B * HQ * splits, 2), torch.float32, q.device)
    else:
        wso = wsml = out
    _decode_kernel[(B, HKV, splits)](
        q, qs, kd, ks, vd, vs, bt, lens, out, wso, wsml,
        q.stride(0), q.stride(1), qs.stride(0) if q_fp8 else 0, bt.stride(0), out.stride(0), out.stride(1),
        kd.stride(0), kd.stride(1), kd.stride(2), ss[0], ss[1], ss[2], sm_scale * LOG2E, bps, HQ,
        GROUP=group, BG=max(16, next_pow2(group)), D=D, T=T, FMT=fmt, Q_FP8=q_fp8, SPLIT=splits > 1,
        OUT_BF16=out_dtype == torch.bfloat16, ASM=asm and not INTERPRET, num_warps=num_warps,
        num_stages=num_stages)
    if splits > 1:
        _decode_reduce_kernel[(B, HQ)](wso, wsml, out, out.stride(0), out.stride(1), HQ, splits,
                                       BS=min(64, next_pow2(splits)), D=D,
                                       OUT_BF16=out_dtype == torch.bfloat16, num_warps=4)
    return out


def _gather_ref(cache, blocks: torch.Tensor, n: int, precision: str) -> torch.Tensor:
    """[H, n, D] float64 of one sequence's first n tokens (block views → dequantized)."""
    from fineserve_core.quant.formats import dequantize_kv_int4
    data, scale = cache
    H = data.shape[1]
    x = data[blocks].transpose(0, 1).reshape(H, -1, data.shape[-1])[:, :n]
    if precision == "w4a8kv4":
        s = scale[blocks].transpose(0, 1).reshape(H, -1)[:, :n]
        return dequantize_kv_int4(x, s).double()
    return x.double()


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, kv_lens, precision, sm_scale=None,
                               q_scale=None, out_dtype=torch.bfloat16, splits=None, num_warps=4,
                               num_stages=2, asm=True) -> torch.Tensor:
    """float64 reference: dequantize q (q8·scale) and the paged K/V, softmax(q·kᵀ·sm_scale)·v."""
    B, HQ, D = q.shape
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    qf = q.double() * (q_scale.reshape(B, HQ, 1).double() if q.dtype == torch.float8_e4m3fn else 1.0)
    out = torch.empty((B, HQ, D), dtype=torch.float64)
    for i in range(B):
        n = int(kv_lens[i])
        nb = -(-n // k_cache[0].shape[2])
        blocks = block_tables[i, :nb].long().to(k_cache[0].device)
        k = _gather_ref(k_cache, blocks, n, precision).cpu()
        v = _gather_ref(v_cache, blocks, n, precision).cpu()
        g = HQ // k.shape[0]
        k, v = k.repeat_interleave(g, 0), v.repeat_interleave(g, 0)
        s = torch.einsum("hd,hnd->hn", qf[i].cpu(), k) * sm_scale
        out[i] = torch.einsum("hn,hnd->hd", torch.softmax(s, -1), v)
    return out.to(device=q.device, dtype=out_dtype)
