"""W4A8 GEMM (FireQ INT4 g128 weights × FP8 per-token activations → BF16) and the FP8 linear.

Numerics contract: `fineserve_core.quant.formats.w4a8_linear_ref` (and `fp8_linear_ref`).

Layouts
-------
* Weights stay exactly as `W4Weight` stores them (`qweight` uint8 [N, K/2], element 2j in the low
  nibble, 2j+1 in the high nibble): no second copy of the packed weights. The only derived tensor is
  the group scales transposed to [K/g, N] (1/64 of the weight bytes, cached per weight) so that a
  tile's scale load is coalesced.
* Activations in FP8 are handed to these kernels in **group-deinterleaved** K order ("dK"): inside
  each group of g columns, the even columns first, then the odd ones (x[:, gG + 2i + c] sits at
  gG + c·g/2 + i). One packed weight byte then feeds the two halves of a group: its low nibbles
  multiply the first half, its high nibbles the second, with no shuffle in registers. The FP8 quant
  kernels (`kernels.fp8_quant`) write this order for free (same bytes, other addresses).

Paths
-----
* ``triton``: one kernel. Per group: load [BN, g/2] packed bytes, INT4 → FP16 by the 0x6400 magic
  number → FP8 (exact: −8..7 are e4m3 values; `asm` picks an inline-PTX variant: f16x2
  arithmetic, or the e4m3 subnormal codes of v · 2^-9, whose 2^9 the epilogue takes),
  two `tl.dot` FP8×FP8 → FP32 of K = g/2, then × the group scale (FP32, exact as the reference's
  q·s), accumulate. Epilogue × x_scale / pow2, optional +residual, or SiLU(gate)·up (gate rows
  [0, I), up rows [I, 2I) of one fused weight, one launch).
  Split-K for small M: partials in an FP32 workspace, the last CTA of a tile (atomic ticket) sums
  them in a fixed order and runs the epilogue (one launch, deterministic). SWAP_AB computes outᵀ =
  W·xᵀ so the weight is the MMA's M side (FireQ's trick for small M). GPI groups of K per loop
  iteration. `f16`: INT4 → FP16 × the group scale (q·s is exact in FP16), FP16 MMA accumulating all
  of K in FP32 — no per-group rescale; measured slower on the H100 (kernels/NOTES.md), kept as a
  swept candidate.
* ``two_step``: unpack INT4 → FP8 (q·s rounded to e4m3: `w4a8_linear_ref(..., fp8_weights=True)`,
  FireQ's LUT numerics) once per GEMM into a [N, K] FP8 buffer, then cuBLAS FP8
  (`torch._scaled_mm`, row-wise scales x_scale ⊗ 1/pow2). Memory bound unpack + compute bound GEMM:
  the large-M path.

`w4a8_gemm(x, w, out_dtype)` (the seam `fineserve_core.linear` calls) quantizes x and dispatches by M
through `kernels.tuned` (measured on the H100; see kernels/NOTES.md).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import triton.language as tl

from fineserve_core.quant.formats import (
    FP8Weight, W4Weight, fp8_linear_ref, w4a8_linear_ref,
)
from kernels._common import (
    INTERPRET, cdiv, empty, int4_to_f16, int4_to_fp8, jit, mma, nib_hi, nib_lo, to_fp8, to_out,
)

__all__ = [
    "GemmConfig", "w4a8_gemm", "w4a8_gemm_ref", "w4a8_gemm_fp8", "w4a8_gate_up_silu", "w4a8_gate_up_silu_ref",
    "unpack_w4_fp8", "unpack_w4_fp8_ref", "fp8_gemm", "fp8_gemm_fp8", "fp8_gemm_ref", "deinterleave_k", "scales_t",
]


@dataclass(frozen=True)
class GemmConfig:
    path: str = "triton"          # "triton" | "two_step"
    BM: int = 16
    BN: int = 64
    SPLIT_K: int = 1
    SWAP_AB: bool = False
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 4
    asm: int = 0                  # INT4→FP8 by inline PTX (GPU only; the interpreter runs the pure twin):
                                  # 1 (True) f16x2 arithmetic, 2 e4m3 subnormal codes
    acc_k: int = 32               # FP8 products per full-FP32 add (32: every wgmma k-step; 0: a whole group)
    f16: bool = False             # FP16 MMA on q·s (INT4→FP16, group scale folded in: exact) and x8→FP16, FP32
                                  # accumulation over all of K: no per-group rescale of the accumulator
    GPI: int = 1                  # groups of K per loop iteration

    def key(self) -> str:
        if self.path == "two_step":
            return "two_step"
        return (f"tri_bm{self.BM}_bn{self.BN}_sk{self.SPLIT_K}_{'swap' if self.SWAP_AB else 'noswap'}"
                f"_w{self.num_warps}_s{self.num_stages}" + ("_asm" if self.asm else "")
                + ("_sub" if self.asm == 2 else "") + ("_f16" if self.f16 else "")
                + (f"_gpi{self.GPI}" if self.GPI > 1 else "") + ("" if self.acc_k == 32 else f"_acc{self.acc_k}"))


# ---------------------------------------------------------------------------------------------------
# Derived layouts
# ---------------------------------------------------------------------------------------------------

def deinterleave_k(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [..., K] → the dK order (per group: even columns, then odd columns). Torch reference of what
    the quant kernels write with `group=`."""
    K = x.shape[-1]
    g = group_size
    y = x.reshape(*x.shape[:-1], K // g, g // 2, 2).transpose(-1, -2)
    return y.reshape(*x.shape[:-1], K)


_SCALES_T: dict[int, tuple] = {}


def scales_t(w: W4Weight) -> torch.Tensor:
    """Group scales transposed to [K/g, N] (contiguous), cached per `scales` tensor object (dropped with it)."""
    s = w.scales
    hit = _SCALES_T.get(id(s))
    if hit is not None and hit[0]() is s and hit[1].device == s.device and s._version == hit[2]:
        return hit[1]
    t = s.t().contiguous()
    key = id(s)
    _SCALES_T[key] = (weakref.ref(s, lambda _r, k=key: _SCALES_T.pop(k, None)), t, s._version)
    return t


# ---------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------

@jit
def _group_dot(acc, x_ptrs, w_ptrs, st_ptr, g, rn, mask_m, mask_n, N, ok,
               G: tl.constexpr, SWAP_AB: tl.constexpr, ASM: tl.constexpr, F16: tl.constexpr,
               ACC_K: tl.constexpr):
    """acc += group g's products. `ok` False (a padded iteration past the split's last group) loads zeros."""
    H: tl.constexpr = G // 2
    xa = tl.load(x_ptrs + g * G, mask=mask_m[:, None] & ok, other=0.0)
    xb = tl.load(x_ptrs + g * G + H, mask=mask_m[:, None] & ok, other=0.0)
    wb = tl.load(w_ptrs + g * H, mask=mask_n[:, None] & ok, other=0)
    if F16:
        # q·s is exact in FP16 (≤ 7 significant bits, 2^-9 ≤ |q·s| ≤ 3584): the group scale goes into the
        # weights and the tensor core accumulates whole K in FP32 — no per-group FP32 rescale of acc.
        s = tl.load(st_ptr + g * N + rn, mask=mask_n & ok, other=0.0).to(tl.float16)
        wl, wh = int4_to_f16(wb, ASM)
        wl = wl * s[:, None]
        wh = wh * s[:, None]
        xa = xa.to(tl.float16)
        xb = xb.to(tl.float16)
        if SWAP_AB:
            acc = mma(wl, tl.trans(xa), acc)
            acc = mma(wh, tl.trans(xb), acc)
        else:
            acc = mma(xa, tl.trans(wl), acc)
            acc = mma(xb, tl.trans(wh), acc)
    else:
        s = tl.load(st_ptr + g * N + rn, mask=mask_n & ok, other=0.0).to(tl.float32)
        wl, wh = int4_to_fp8(wb, ASM)
        # FP8 products: full-FP32 accumulation after every ACC_K of them (32: every wgmma k-step; None: the
        # tensor core's reduced-precision accumulator runs over the group, then the FP32 add; over the
        # whole K, Triton's sm_90 default, ≈4e-3 relative error was seen)
        if SWAP_AB:
            part = mma(wl, tl.trans(xa), None, ACC_K)
            part = mma(wh, tl.trans(xb), part, ACC_K)
            acc += part * s[:, None]
        else:
            part = mma(xa, tl.trans(wl), None, ACC_K)
            part = mma(xb, tl.trans(wh), part, ACC_K)
            acc += part * s[None, :]
    return acc


@jit
def _w4a8_epilogue(acc, acc2, rm, rn, mask_m, mask_n, xs_ptr, out_ptr, res_ptr, stride_om, stride_rm, inv_p,
                   SWAP_AB: tl.constexpr, EPI: tl.constexpr, OUT_BF16: tl.constexpr):
    xs = tl.load(xs_ptr + rm, mask=mask_m, other=0.0)
    if SWAP_AB:
        sc = xs[None, :] * inv_p
        mask = mask_n[:, None] & mask_m[None, :]
        o_off = rm[None, :] * stride_om + rn[:, None]
        r_off = rm[None, :] * stride_rm + rn[:, None]
    else:
        sc = xs[:, None] * inv_p
        mask = mask_m[:, None] & mask_n[None, :]
        o_off = rm[:, None] * stride_om + rn[None, :]
        r_off = rm[:, None] * stride_rm + rn[None, :]
    y = acc * sc
    if EPI == 1:
        y += tl.load(res_ptr + r_off, mask=mask, other=0.0).to(tl.float32)
    if EPI == 2:
        u = acc2 * sc
        y = y / (1.0 + tl.exp(-y)) * u
    tl.store(out_ptr + o_off, to_out(y, OUT_BF16), mask=mask)


@jit
def _w4a8_kernel(x_ptr, xs_ptr, w_ptr, st_ptr, out_ptr, res_ptr, ws_ptr, cnt_ptr,
                 M, N, K, N_OUT, stride_xm, stride_om, stride_rm, inv_p,
                 G: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SPLIT_K: tl.constexpr,
                 SWAP_AB: tl.constexpr, EPI: tl.constexpr, GROUP_M: tl.constexpr, OUT_BF16: tl.constexpr,
                 ASM: tl.constexpr, F16: tl.constexpr, GPI: tl.constexpr, ACC_K: tl.constexpr):
    """out[M, N_OUT] = epilogue(x8 · (q·s)ᵀ).  EPI 0: ×x_scale/pow2; 1: +residual; 2: SiLU(gate)·up, where
    the weight has N = 2·N_OUT rows (gate rows first). x8 is in dK order (module doc)."""
    H: tl.constexpr = G // 2
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N_OUT, BN)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    gsz = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % gsz
    pid_n = (pid % in_group) // gsz

    KG = K // G
    g_per = tl.cdiv(KG, SPLIT_K)
    g0 = pid_k * g_per
    g1 = tl.minimum(g0 + g_per, KG)

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rh = tl.arange(0, H)
    mask_m = rm < M
    mask_n = rn < N_OUT
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rh[None, :]
    w_ptrs = w_ptr + rn[:, None] * (K // 2) + rh[None, :]
    if SWAP_AB:
        acc = tl.zeros((BN, BM), tl.float32)
    else:
        acc = tl.zeros((BM, BN), tl.float32)
    acc2 = acc
    for gb in range(g0, g1, GPI):          # GPI groups per iteration: more weight bytes in flight per stage
        for j in tl.static_range(GPI):
            g = gb + j
            acc = _group_dot(acc, x_ptrs, w_ptrs, st_ptr, g, rn, mask_m, mask_n, N, g < g1, G, SWAP_AB, ASM, F16,
                             ACC_K)
            if EPI == 2:
                acc2 = _group_dot(acc2, x_ptrs, w_ptrs + N_OUT * (K // 2), st_ptr + N_OUT, g, rn, mask_m, mask_n,
                                  N, g < g1, G, SWAP_AB, ASM, F16, ACC_K)

    if SPLIT_K == 1:
        _w4a8_epilogue(acc, acc2, rm, rn, mask_m, mask_n, xs_ptr, out_ptr, res_ptr, stride_om, stride_rm, inv_p,
                       SWAP_AB, EPI, OUT_BF16)
    else:
        if SWAP_AB:
            w_off = rm[None, :] * N_OUT + rn[:, None]
            wmask = mask_n[:, None] & mask_m[None, :]
        else:
            w_off = rm[:, None] * N_OUT + rn[None, :]
            wmask = mask_m[:, None] & mask_n[None, :]
        MN = M * N_OUT
        tl.store(ws_ptr + pid_k * MN + w_off, acc, mask=wmask)
        if EPI == 2:
            tl.store(ws_ptr + (SPLIT_K + pid_k) * MN + w_off, acc2, mask=wmask)
        tl.debug_barrier()
        ticket = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:
            acc = tl.zeros_like(acc)
            acc2 = tl.zeros_like(acc)
            for k in range(SPLIT_K):
                acc += tl.load(ws_ptr + k * MN + w_off, mask=wmask, other=0.0, cache_modifier=".cg")
                if EPI == 2:
                    acc2 += tl.load(ws_ptr + (SPLIT_K + k) * MN + w_off, mask=wmask, other=0.0,
                                    cache_modifier=".cg")
            _w4a8_epilogue(acc, acc2, rm, rn, mask_m, mask_n, xs_ptr, out_ptr, res_ptr, stride_om, stride_rm,
                           inv_p, SWAP_AB, EPI, OUT_BF16)
            tl.atomic_xchg(cnt_ptr + pid, 0)


@jit
def _unpack_kernel(w_ptr, st_ptr, out_ptr, N, K, G: tl.constexpr, BN: tl.constexpr, GB: tl.constexpr):
    """out[N, K] fp8 (dK order) = fp8(q · s) for GB groups × BN rows per program."""
    H: tl.constexpr = G // 2
    pid_n = tl.program_id(0)
    pid_g = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    rh = tl.arange(0, H)
    mask_n = rn < N
    for gi in tl.static_range(GB):
        g = pid_g * GB + gi
        wb = tl.load(w_ptr + rn[:, None] * (K // 2) + g * H + rh[None, :], mask=mask_n[:, None], other=0)
        s = tl.load(st_ptr + g * N + rn, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        o = out_ptr + rn[:, None] * K + g * G + rh[None, :]
        tl.store(o, to_fp8(nib_lo(wb) * s), mask=mask_n[:, None])
        tl.store(o + H, to_fp8(nib_hi(wb) * s), mask=mask_n[:, None])


# ---------------------------------------------------------------------------------------------------
# Wrappers
# ---------------------------------------------------------------------------------------------------

_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    c = _COUNTERS.get(device)
    if c is None or c.numel() < n:
        c = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = c
    return c


def _check(x8: torch.Tensor, xs: torch.Tensor, w: W4Weight):
    if x8.dtype != torch.float8_e4m3fn or x8.dim() != 2 or x8.stride(-1) != 1:
        raise ValueError("x8 must be a 2-D float8_e4m3fn tensor with unit stride along K")
    if x8.shape[1] != w.in_features:
        raise ValueError(f"x has K={x8.shape[1]}, weight has K={w.in_features}")
    if w.qweight.stride(-1) != 1 or w.qweight.stride(0) != w.in_features // 2:
        raise ValueError("qweight must be contiguous [N, K/2]")


def _launch_triton(x8, xs, w: W4Weight, out, epi: int, residual, cfg: GemmConfig):
    M, K = x8.shape
    N = w.out_features
    n_out = out.shape[1]
    xs = xs.reshape(-1).float()
    st = scales_t(w)
    BN = cfg.BN
    tiles = cdiv(M, cfg.BM) * cdiv(n_out, BN)
    split = max(1, min(cfg.SPLIT_K, K // w.group_size))
    if split > 1:
        ws = empty(((2 if epi == 2 else 1) * split * M * n_out,), torch.float32, x8.device)
        cnt = _counters(x8.device, tiles)
    else:
        ws = cnt = xs  # unused
    res = residual if residual is not None else out
    grid = (tiles, split)
    asm = 0 if INTERPRET else (min(int(cfg.asm), 1) if cfg.f16 else int(cfg.asm))   # f16: one PTX variant
    inv_p = (512.0 if asm == 2 else 1.0) / w.pow2      # subnormal codes carry v · 2^-9
    _w4a8_kernel[grid](x8, xs, w.qweight, st, out, res, ws, cnt,
                       M, N, K, n_out, x8.stride(0), out.stride(0), res.stride(0), inv_p,
                       G=w.group_size, BM=cfg.BM, BN=BN, SPLIT_K=split, SWAP_AB=cfg.SWAP_AB, EPI=epi,
                       GROUP_M=cfg.GROUP_M, OUT_BF16=out.dtype == torch.bfloat16, ASM=asm,
                       F16=cfg.f16, GPI=cfg.GPI, ACC_K=cfg.acc_k or None, num_warps=cfg.num_warps,
                       num_stages=cfg.num_stages)
    return out



def unpack_w4_fp8(w: W4Weight, out: torch.Tensor | None = None, BN: int = 64, GB: int = 4) -> torch.Tensor:
    """FP8 [N, K] in dK order = fp8_e4m3(q · s) (no 1/pow2), Triton."""
    N, K = w.shape
    G = w.group_size
    KG = K // G
    while KG % GB:
        GB //= 2
    if out is None:
        out = empty((N, K), torch.float8_e4m3fn, w.device)
    _unpack_kernel[(cdiv(N, BN), KG // GB)](w.qweight, scales_t(w), out, N, K, G=G, BN=BN, GB=GB, num_warps=4)
    return out


def unpack_w4_fp8_ref(w: W4Weight) -> torch.Tensor:
    from fineserve_core.quant.formats import _to_fp8, dequantize_w4_unscaled
    return deinterleave_k(_to_fp8(dequantize_w4_unscaled(w)), w.group_size)


def _scaled_mm_rowwise(x8, xs, w8, col_scale: torch.Tensor, out_dtype) -> torch.Tensor:
    """(x8 · w8ᵀ) · xs[:, None] · col_scale[None, :] in out_dtype; cuBLAS FP8 on CUDA, float32 on CPU."""
    M, N = x8.shape[0], w8.shape[0]
    if x8.is_cuda:      # cuBLASLt row-wise scaling produces bf16 only
        y = torch._scaled_mm(x8, w8.t(), scale_a=xs.reshape(M, 1).float(),
                             scale_b=col_scale.reshape(1, N).float(), out_dtype=torch.bfloat16)
        return y if out_dtype == torch.bfloat16 else y.to(out_dtype)
    acc = x8.float() @ w8.float().t()
    return (acc * xs.reshape(M, 1) * col_scale.reshape(1, N)).to(out_dtype)


_COL_SCALES: dict = {}


def _inv_pow2_row(w: W4Weight, device) -> torch.Tensor:
    """[N] float32 filled with 1/pow2 (the cuBLAS column scale), cached per (N, pow2, device)."""
    key = (w.out_features, float(w.pow2), str(device))
    t = _COL_SCALES.get(key)
    if t is None:
        t = torch.full((w.out_features,), 1.0 / w.pow2, dtype=torch.float32, device=device)
        _COL_SCALES[key] = t
    return t


def _launch_two_step(x8, xs, w: W4Weight, out, epi, residual, out_dtype):
    """Unpack once (FP8 [N, K], memory bound) + cuBLAS FP8. cuBLAS writes its own output tensor: it is
    returned as is (copying it into `out` would be one more pass over M·N, 0.6 ms at M=16384, N=28672)."""
    w8 = unpack_w4_fp8(w)
    y = _scaled_mm_rowwise(x8, xs, w8, _inv_pow2_row(w, x8.device), out_dtype)
    if epi == 2:
        from kernels.fp8_quant import silu_mul
        return silu_mul(y, out=out)
    if epi == 1:
        y += residual
    if out is not None:
        out.copy_(y)
        return out
    return y


def _pick(M: int, N: int, K: int, epi: int, config: GemmConfig | None) -> GemmConfig:
    if config is not None:
        return config
    from kernels.tuned import gemm_config
    return gemm_config(M, N, K, epi)


def w4a8_gemm_fp8(x8: torch.Tensor, xs: torch.Tensor, w: W4Weight, out_dtype=torch.bfloat16, *,
                  residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
                  config: GemmConfig | None = None) -> torch.Tensor:
    """y [M, N] = (x8 · (q·s)ᵀ) · xs / pow2 (+ residual). x8 fp8 [M, K] in dK order, xs float32 [M] or [M, 1]."""
    _check(x8, xs, w)
    M = x8.shape[0]
    N = w.out_features
    epi = 1 if residual is not None else 0
    cfg = _pick(M, N, w.in_features, epi, config)
    if cfg.path == "two_step":
        return _launch_two_step(x8, xs, w, out, epi, residual, out_dtype)
    if out is None:
        out = empty((M, N), out_dtype, x8.device)
    return _launch_triton(x8, xs, w, out, epi, residual, cfg)


def w4a8_gate_up_silu(x8: torch.Tensor, xs: torch.Tensor, w: W4Weight, out_dtype=torch.bfloat16, *,
                      out: torch.Tensor | None = None, config: GemmConfig | None = None) -> torch.Tensor:
    """h [M, I] = SiLU(gate) · up of the fused gate_up weight [2I, K] (gate rows first), one launch."""
    _check(x8, xs, w)
    M = x8.shape[0]
    inter = w.out_features // 2
    if out is None:
        out = empty((M, inter), out_dtype, x8.device)
    cfg = _pick(M, inter, w.in_features, 2, config)
    if cfg.path == "two_step":
        return _launch_two_step(x8, xs, w, out, 2, None, out_dtype)
    return _launch_triton(x8, xs, w, out, 2, None, cfg)


def w4a8_gemm(x: torch.Tensor, w: W4Weight, out_dtype: torch.dtype | None = None, *,
              residual: torch.Tensor | None = None, config: GemmConfig | None = None) -> torch.Tensor:
    """The seam `fineserve_core.linear` calls: x [..., K] float → [..., N] (`w4a8_linear_ref`'s signature)."""
    from kernels.fp8_quant import quant_fp8
    out_dtype = out_dtype or x.dtype
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    x8, xs = quant_fp8(x2, group=w.group_size)
    r2 = residual.reshape(-1, w.out_features) if residual is not None else None
    y = w4a8_gemm_fp8(x8, xs, w, out_dtype, residual=r2, config=config)
    return y.reshape(*lead, w.out_features)


def w4a8_gemm_ref(x: torch.Tensor, w: W4Weight, out_dtype: torch.dtype | None = None, *,
                  residual: torch.Tensor | None = None, config: GemmConfig | None = None,
                  fp8_weights: bool = False) -> torch.Tensor:
    """Reference of `w4a8_gemm` (formats.w4a8_linear_ref, + residual)."""
    y = w4a8_linear_ref(x, w, torch.float32, fp8_weights=fp8_weights)
    if residual is not None:
        y = y + residual.float()
    return y.to(out_dtype or x.dtype)


def w4a8_gate_up_silu_ref(x: torch.Tensor, w: W4Weight, out_dtype=torch.bfloat16, *,
                          fp8_weights: bool = False) -> torch.Tensor:
    y = w4a8_linear_ref(x, w, torch.float32, fp8_weights=fp8_weights)
    g, u = y.chunk(2, dim=-1)
    return (torch.nn.functional.silu(g) * u).to(out_dtype)


# ---------------------------------------------------------------------------------------------------
# FP8 linear (precision fp8): our quant + cuBLAS FP8
# ---------------------------------------------------------------------------------------------------

def fp8_gemm(x: torch.Tensor, w: FP8Weight, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`fp8_linear_ref`'s signature: Triton per-token quant + torch._scaled_mm (row-wise scales)."""
    from kernels.fp8_quant import quant_fp8
    out_dtype = out_dtype or x.dtype
    lead = x.shape[:-1]
    x8, xs = quant_fp8(x.reshape(-1, x.shape[-1]))
    y = _scaled_mm_rowwise(x8, xs, w.weight, w.scale, out_dtype)
    return y.reshape(*lead, w.out_features)


def fp8_gemm_fp8(x8: torch.Tensor, xs: torch.Tensor, w: FP8Weight, out_dtype=torch.bfloat16) -> torch.Tensor:
    """`fp8_gemm` on activations already quantized (e.g. by `rmsnorm_quant_fp8`): x8 fp8 [M, K], xs [M]."""
    if x8.dtype != torch.float8_e4m3fn or x8.dim() != 2:
        raise ValueError("x8 must be a 2-D float8_e4m3fn tensor")
    return _scaled_mm_rowwise(x8, xs, w.weight, w.scale, out_dtype)


def fp8_gemm_ref(x: torch.Tensor, w: FP8Weight, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    return fp8_linear_ref(x, w, out_dtype)

