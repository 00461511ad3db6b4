"""Prefill attention: causal, GQA, variable-length sequences (cu_seqlens), FP8 Q/K/V or bf16.

FP8 variant (FireQ's "FP8FP8FmhaFwd" numerics, in Triton): Q and K are FP8 E4M3 per (token, head)
(`formats.quantize_q_fp8`'s rule), V is FP8 with one scale per KV head (absmax over the prompt / 448)
stored **transposed** (token-contiguous, [Hkv, D, T]) so that P·V is an FP8 `tl.dot` with a K-major B
operand (Hopper's FP8 wgmma needs it; the Triton tutorial does the same). S = (q8·k8ᵀ)·s_q·s_k·scale,
online softmax in base 2 with the max kept in raw score units (one FMA per score for the exponent), P
lifted by 2^8 before its FP8 cast (P ≤ 1: this moves P's small values out of e4m3's subnormal range;
the row sum carries the same factor, so it cancels). bf16 variant: the same loop with bf16 operands.
Default tile BM = BN = 128, 8 warps, 2 stages (the H100 sweeps of kernels/NOTES.md, session 7; TMA
descriptor loads and Triton's Hopper warp specialization measured no faster there).

Grid (query block, query head, sequence), longest query blocks first; the blocks strictly below the
diagonal run without masks, the diagonal ones with the causal mask. Flops (causal) ≈ 2·S²·D per head
and sequence (half of 4·S²·D).
"""
from __future__ import annotations

import math

import torch
import triton.language as tl

from kernels._common import cdiv, check_out, empty, jit, mma, to_bf16, to_fp8, to_out

__all__ = ["prefill_attention", "prefill_attention_ref", "quant_qk_fp8", "quant_v_fp8_t", "quant_v_fp8_t_ref",
           "v_layout", "v_from_store"]

LOG2E = 1.4426950408889634


@jit
def _attn_block(acc, l_i, m_i, q, qsc, n0, rm, rn, rd, start, vstart, L, hk, k_ptr, v_ptr, ks_ptr,
                sk_t, sk_h, sv_t, sv_h, sv_d, sks_t, sks_h, FP8: tl.constexpr, MASK: tl.constexpr):
    """One key block. The running max m_i is kept in raw units (q·kᵀ, × the k scale for FP8): the row factor
    qsc (× log2 e) is positive, so the max commutes with it, and one FMA per score then gives the exponent
    (FA-style). P_LOG2 lifts P by 2^8 before its FP8 cast (out of e4m3's subnormals); l_i carries the same
    factor, so it cancels in acc / l_i."""
    cols = n0 + rn
    mn = cols < L
    tok = start + cols
    vtok = vstart + cols
    if MASK:
        k = tl.load(k_ptr + tok[:, None] * sk_t + hk * sk_h + rd[None, :], mask=mn[:, None], other=0.0)
    else:
        k = tl.load(k_ptr + tok[:, None] * sk_t + hk * sk_h + rd[None, :])
    s = mma(q, tl.trans(k), None)
    if FP8:
        if MASK:
            ksc = tl.load(ks_ptr + tok * sks_t + hk * sks_h, mask=mn, other=0.0)
        else:
            ksc = tl.load(ks_ptr + tok * sks_t + hk * sks_h)
        s = s * ksc[None, :]
    if MASK:
        s = tl.where((cols[None, :] <= rm[:, None]) & mn[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.math.exp2((m_i - m_new) * qsc)
    P_LOG2: tl.constexpr = 8.0 if FP8 else 0.0
    p = tl.math.exp2(s * qsc[:, None] - (m_new * qsc - P_LOG2)[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v_ptrs = v_ptr + vtok[:, None] * sv_t + hk * sv_h + rd[None, :] * sv_d
    if MASK:
        v = tl.load(v_ptrs, mask=mn[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    if FP8:
        acc = mma(to_fp8(p), v, acc * alpha[:, None])
    else:
        acc = mma(to_bf16(p), v, acc * alpha[:, None])
    return acc, l_i, m_new


# not specialized on: the query-block count and the k-scale head stride (= the step's token count)
# change from step to step; a new specialization would be a JIT compile inside a live step
@jit(do_not_specialize=["NUM_M", "sks_h"])
def _prefill_kernel(q_ptr, k_ptr, v_ptr, qs_ptr, ks_ptr, vs_ptr, cu_ptr, vst_ptr, out_ptr,
                    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sv_d, sqs_t, sks_t, sks_h, so_t, so_h, qk_scale, NUM_M,
                    GROUP: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    FP8: tl.constexpr, OUT_BF16: tl.constexpr, V_STARTS: tl.constexpr):
    pid_m = NUM_M - 1 - tl.program_id(0)
    hq = tl.program_id(1)
    b = tl.program_id(2)
    start = tl.load(cu_ptr + b).to(tl.int64)
    L = (tl.load(cu_ptr + b + 1) - tl.load(cu_ptr + b)).to(tl.int32)
    m0 = pid_m * BM
    if V_STARTS:        # V stored with every sequence starting at a multiple of 16 tokens: 16-byte loads
        vstart = tl.multiple_of(tl.load(vst_ptr + b).to(tl.int64), 16)
    else:
        vstart = start
    if m0 < L:
        hk = hq // GROUP
        rm = m0 + tl.arange(0, BM)
        rn = tl.arange(0, BN)
        rd = tl.arange(0, D)
        mm = rm < L
        q = tl.load(q_ptr + (start + rm)[:, None] * sq_t + hq * sq_h + rd[None, :], mask=mm[:, None], other=0.0)
        if FP8:
            qsc = tl.load(qs_ptr + (start + rm) * sqs_t + hq, mask=mm, other=0.0) * qk_scale
        else:
            qsc = tl.full((BM,), 1.0, tl.float32) * qk_scale
        m_i = tl.full((BM,), float("-inf"), tl.float32)
        l_i = tl.zeros((BM,), tl.float32)
        acc = tl.zeros((BM, D), tl.float32)
        for n0 in range(0, m0, BN):
            acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, qsc, n0, rm, rn, rd, start, vstart, L, hk, k_ptr, v_ptr,
                                        ks_ptr, sk_t, sk_h, sv_t, sv_h, sv_d, sks_t, sks_h, FP8, False)
        for n0 in range(m0, tl.minimum(m0 + BM, L), BN):
            acc, l_i, m_i = _attn_block(acc, l_i, m_i, q, qsc, n0, rm, rn, rd, start, vstart, L, hk, k_ptr, v_ptr,
                                        ks_ptr, sk_t, sk_h, sv_t, sv_h, sv_d, sks_t, sks_h, FP8, True)
        if FP8:
            fin = tl.load(vs_ptr + hk) / l_i
        else:
            fin = 1.0 / l_i
        o = acc * fin[:, None]
        tl.store(out_ptr + (start + rm)[:, None] * so_t + hq * so_h + rd[None, :], to_out(o, OUT_BF16),
                 mask=mm[:, None])


@jit
def _quant_v_t_kernel(v_ptr, amax_ptr, vs_ptr, cu_ptr, vst_ptr, out_ptr, sv_t, sv_h, so_h, so_d, D: tl.constexpr,
                      BT: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    # the head's scale from its absmax, as `_v_scale` computes it (exact division; 1 for an all-zero head)
    amax = tl.load(amax_ptr + h).to(tl.float32)
    s = tl.where(amax > 0, tl.math.div_rn(amax, 448.0), 1.0)
    if (pid == 0) & (b == 0):
        tl.store(vs_ptr + h, s)
    start = tl.load(cu_ptr + b)
    L = tl.load(cu_ptr + b + 1) - start
    vstart = tl.load(vst_ptr + b)
    i = pid * BT + tl.arange(0, BT)
    rd = tl.arange(0, D)
    mt = i < L
    v = tl.load(v_ptr + (start + i)[:, None].to(tl.int64) * sv_t + h * sv_h + rd[None, :], mask=mt[:, None],
                other=0.0).to(tl.float32)
    q = to_fp8(tl.math.div_rn(v, tl.full((BT, D), 1.0, tl.float32) * s))
    tl.store(out_ptr + h * so_h + rd[None, :] * so_d + (vstart + i)[:, None], q, mask=mt[:, None])


def v_layout(seq_lens: list[int]) -> tuple[list[int], int]:
    """Token offsets of each sequence in the FP8 V store (multiples of 16) and its padded length."""
    starts, t = [], 0
    for n in seq_lens:
        starts.append(t)
        t += cdiv(int(n), 16) * 16
    return starts, max(16, t)


def quant_qk_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H, D] → (x8 [T, H, D], scale [T, H]) per (token, head) (`formats.quantize_q_fp8`)."""
    from kernels.fp8_quant import quant_fp8
    T, H, D = x.shape
    x8, s = quant_fp8(x.reshape(T * H, D))
    return x8.view(T, H, D), s.view(T, H)


def _v_scale(v: torch.Tensor) -> torch.Tensor:
    """Per KV head absmax / 448, an exact division (a 448 *tensor*: torch on CUDA turns division by a
    Python scalar into a multiplication by its reciprocal)."""
    amax = v.float().abs().amax(dim=(0, 2))
    return torch.where(amax > 0, amax / torch.full_like(amax, 448.0), torch.ones_like(amax))


def quant_v_fp8_t(v: torch.Tensor, cu_seqlens: torch.Tensor, v_starts: torch.Tensor, t_pad: int,
                  max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """v [T, Hkv, D] → (FP8 store [Hkv, D, t_pad] token-contiguous, scale [Hkv]). Sequence b's tokens sit
    at columns v_starts[b] + i (`v_layout`: multiples of 16, so the kernel's V loads are 16-byte)."""
    T, H, D = v.shape
    store = empty((H, D, t_pad), torch.float8_e4m3fn, v.device)
    BT = 64
    B = cu_seqlens.numel() - 1
    if not (T and B):
        return store, _v_scale(v)
    # the scale is computed in the kernel from the per-head absmax (2 ops here, not `_v_scale`'s 8: this
    # runs once per layer of every step with a prompt, on the host's critical path)
    amax = v.abs().amax(dim=(0, 2))
    vs = empty((H,), torch.float32, v.device)
    _quant_v_t_kernel[(cdiv(max_seqlen, BT), H, B)](v, amax, vs, cu_seqlens, v_starts, store, v.stride(0),
                                                   v.stride(1), store.stride(0), store.stride(1), D=D, BT=BT,
                                                   num_warps=4)
    return store, vs


def v_from_store(store: torch.Tensor, cu_seqlens, v_starts) -> torch.Tensor:
    """[T, Hkv, D] view-order copy of the tokens of a V store (reference side)."""
    cu = [int(c) for c in cu_seqlens]
    st = [int(c) for c in v_starts]
    parts = [store[:, :, st[b]:st[b] + cu[b + 1] - cu[b]] for b in range(len(cu) - 1)]
    return torch.cat(parts, dim=2).permute(2, 0, 1)


def quant_v_fp8_t_ref(v: torch.Tensor):
    """(FP8 v [T, Hkv, D], scale [Hkv]) of `quant_v_fp8_t`, in token order."""
    vs = _v_scale(v)
    from fineserve_core.quant.formats import _to_fp8
    return _to_fp8(v.float() / vs[None, :, None]), vs


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                      sm_scale: float | None = None, q_scale: torch.Tensor | None = None,
                      k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                      v_starts: torch.Tensor | None = None,
                      out_dtype: torch.dtype = torch.bfloat16, BM: int = 128, BN: int = 128,
                      num_warps: int = 8, num_stages: int = 2, out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of each sequence over itself (into `out` when given, unit stride along D).
    q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens int32 [B+1].
    FP8 when q is float8_e4m3fn: then q_scale [T, Hq], k_scale [T, Hkv] (any strides; [Hkv, T]-contiguous
    is the fast one), v_scale [Hkv] (`quant_qk_fp8`, `quant_v_fp8_t`). With `v_starts`, v is the
    token-contiguous FP8 store [Hkv, D, T_pad] of `quant_v_fp8_t`; otherwise v is [T, Hkv, D], any strides."""
    T, HQ, D = q.shape
    HKV = k.shape[1]
    fp8 = q.dtype == torch.float8_e4m3fn
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    out = empty((T, HQ, D), out_dtype, q.device) if out is None else check_out(out, (T, HQ, D), out_dtype)
    B = cu_seqlens.numel() - 1
    if B == 0 or T == 0:
        return out
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    if fp8:
        qs, ks, vs = q_scale.float(), k_scale.float(), v_scale.float()
        if qs.stride(-1) != 1:
            qs = qs.contiguous()
    else:
        qs = ks = vs = q
    if fp8 and BN < 32:
        raise ValueError("FP8 P·V needs BN >= 32 (the K of an FP8 tl.dot)")
    num_m = cdiv(max_seqlen, BM)
    if v_starts is not None:
        sv = (v.stride(2), v.stride(0), v.stride(1))          # store [H, D, T]: (token, head, dim) strides
        vst = v_starts.to(device=q.device, dtype=torch.int32)
    else:
        sv = (v.stride(0), v.stride(1), v.stride(2))
        vst = cu
    _prefill_kernel[(num_m, HQ, B)](
        q, k, v, qs, ks, vs, cu, vst, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), sv[0], sv[1], sv[2],
        qs.stride(0) if fp8 else 0, ks.stride(0) if fp8 else 0, ks.stride(1) if fp8 else 0,
        out.stride(0), out.stride(1), sm_scale * LOG2E, num_m,
        GROUP=HQ // HKV, D=D, BM=BM, BN=BN, FP8=fp8, OUT_BF16=out_dtype == torch.bfloat16,
        V_STARTS=v_starts is not None, num_warps=num_warps, num_stages=num_stages)
    return out


def prefill_attention_ref(q, k, v, cu_seqlens, max_seqlen=None, sm_scale=None, q_scale=None, k_scale=None,
                          v_scale=None, out_dtype=torch.bfloat16, **_unused) -> torch.Tensor:
    """float64 reference (dequantized inputs, exact softmax)."""
    T, HQ, D = q.shape
    HKV = k.shape[1]
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    if q.dtype == torch.float8_e4m3fn:
        qf = q.double() * q_scale.double()[..., None]
        kf = k.double() * k_scale.double()[..., None]
        vf = v.double() * v_scale.double()[None, :, None]
    else:
        qf, kf, vf = q.double(), k.double(), v.double()
    out = torch.zeros((T, HQ, D), dtype=torch.float64, device=q.device)
    cu = cu_seqlens.tolist()
    for b in range(len(cu) - 1):
        s0, s1 = cu[b], cu[b + 1]
        L = s1 - s0
        if L == 0:
            continue
        qq = qf[s0:s1].transpose(0, 1)                                        # [Hq, L, D]
        kk = kf[s0:s1].transpose(0, 1).repeat_interleave(HQ // HKV, 0)
        vv = vf[s0:s1].transpose(0, 1).repeat_interleave(HQ // HKV, 0)
        s = qq @ kk.transpose(1, 2) * sm_scale
        mask = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~mask, float("-inf"))
        out[s0:s1] = (torch.softmax(s, -1) @ vv).transpose(0, 1)
    return out.to(out_dtype)
