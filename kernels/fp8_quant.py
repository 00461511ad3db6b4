"""FP8 per-token activation quantization, alone or fused with what produces the activation.

Contract: `fineserve_core.quant.formats.quantize_fp8_per_token` (scale = absmax/448 as an exact fp32
division, 1.0 for an all-zero row; x/scale exact-rounded, clamped to ±448, RNE to e4m3). The plain
quant is bit-exact with it.

* `quant_fp8(x, group=None)`                    x [M, K] → (x8 [M, K], scale [M] fp32)
* `rmsnorm_quant_fp8(x, weight, eps, residual)`  (+residual) → RMSNorm (as `llama.RMSNorm`) → FP8
* `silu_mul_quant_fp8(gu, group)`               SiLU(gate)·up of gu [M, 2I] (gate first) → FP8
* `silu_mul(gu)`                                SiLU(gate)·up → out dtype (no quant)

`group=g` writes x8 in the W4A8 GEMM's dK order (per group of g columns: even columns, then odd;
`kernels.gemm_w4a8.deinterleave_k`); scales are unaffected. One program per row; one pass over the
row (K ≤ 32768), so each kernel reads its input once and writes 1 byte per element + 4 per row.
"""
from __future__ import annotations

import torch
import triton.language as tl

from fineserve_core.quant.formats import quantize_fp8_per_token
from kernels._common import empty, jit, next_pow2, to_bf16, to_fp8, to_out

__all__ = ["quant_fp8", "quant_fp8_ref", "rmsnorm_quant_fp8", "rmsnorm_quant_fp8_ref",
           "silu_mul_quant_fp8", "silu_mul_quant_fp8_ref", "silu_mul", "silu_mul_ref"]


@jit
def _dk_index(c, G: tl.constexpr):
    if G == 0:
        r = c
    else:
        r = (c // G) * G + (c % 2) * (G // 2) + (c % G) // 2
    return r


@jit
def _quant_store(x, c, mask, row, out_ptr, s_ptr, stride_o, G: tl.constexpr):
    amax = tl.max(tl.abs(x), axis=0)
    scale = tl.where(amax > 0, tl.math.div_rn(amax, 448.0), 1.0)
    q = to_fp8(tl.math.div_rn(x, scale))
    tl.store(out_ptr + row * stride_o + _dk_index(c, G), q, mask=mask)
    tl.store(s_ptr + row, scale)


@jit
def _quant_kernel(x_ptr, out_ptr, s_ptr, K, stride_x, stride_o, BLOCK: tl.constexpr, G: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    mask = c < K
    x = tl.load(x_ptr + row * stride_x + c, mask=mask, other=0.0).to(tl.float32)
    _quant_store(x, c, mask, row, out_ptr, s_ptr, stride_o, G)


@jit(do_not_specialize=["M"])         # the step's token count: no JIT compile per new value
def _quant_rows_kernel(x_ptr, out_ptr, s_ptr, M, K, stride_x, stride_o, R: tl.constexpr, BLOCK: tl.constexpr,
                       G: tl.constexpr):
    """R short rows per program (per-(token, head) quant of Q/K: rows of head_dim)."""
    rows = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    c = tl.arange(0, BLOCK)
    mr = rows < M
    mask = mr[:, None] & (c < K)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.where(amax > 0, tl.math.div_rn(amax, tl.full((R,), 448.0, tl.float32)), 1.0)
    q = to_fp8(tl.math.div_rn(x, tl.broadcast_to(scale[:, None], (R, BLOCK))))
    tl.store(out_ptr + rows[:, None] * stride_o + _dk_index(c, G)[None, :], q, mask=mask)
    tl.store(s_ptr + rows, scale, mask=mr)


@jit
def _rmsnorm_quant_kernel(x_ptr, w_ptr, r_ptr, rout_ptr, out_ptr, s_ptr, K, eps, stride_x, stride_r, stride_ro,
                          stride_o, BLOCK: tl.constexpr, G: tl.constexpr, HAS_RES: tl.constexpr,
                          ROUND_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    mask = c < K
    x = tl.load(x_ptr + row * stride_x + c, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        x = x + tl.load(r_ptr + row * stride_r + c, mask=mask, other=0.0).to(tl.float32)
        if ROUND_BF16:
            x = to_bf16(x).to(tl.float32)
        tl.store(rout_ptr + row * stride_ro + c, to_out(x, ROUND_BF16), mask=mask)
    ms = tl.sum(x * x, axis=0) / K
    r = tl.math.div_rn(1.0, tl.math.sqrt_rn(ms + eps))
    t = x * r
    w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
    if ROUND_BF16:
        t = to_bf16(t).to(tl.float32)
        y = to_bf16(t * w).to(tl.float32)
    else:
        y = t * w
    _quant_store(y, c, mask, row, out_ptr, s_ptr, stride_o, G)


@jit
def _silu_mul_kernel(gu_ptr, out_ptr, s_ptr, I, stride_g, stride_o, BLOCK: tl.constexpr, G: tl.constexpr,
                     QUANT: tl.constexpr, ROUND_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    mask = c < I
    g = tl.load(gu_ptr + row * stride_g + c, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_g + I + c, mask=mask, other=0.0).to(tl.float32)
    sg = g / (1.0 + tl.exp(-g))
    if QUANT:
        if ROUND_BF16:      # torch: F.silu(g) (bf16) * up (bf16) -> bf16, then quantized
            h = to_bf16(to_bf16(sg).to(tl.float32) * u).to(tl.float32)
        else:
            h = sg * u
        _quant_store(h, c, mask, row, out_ptr, s_ptr, stride_o, G)
    else:
        tl.store(out_ptr + row * stride_o + c, to_out(sg * u, ROUND_BF16), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


def _warps(block: int) -> int:
    return max(1, min(16, block // 512))


def quant_fp8(x: torch.Tensor, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] float → (x8 [M, K] float8_e4m3fn, scale [M] float32), M = prod(lead dims)."""
    x2 = _rows(x)
    M, K = x2.shape
    out = empty((M, K), torch.float8_e4m3fn, x.device)
    scale = empty((M,), torch.float32, x.device)
    if M:
        B = next_pow2(K)
        if B <= 1024:       # short rows (Q/K heads): many rows per program
            R = 4096 // B
            _quant_rows_kernel[(-(-M // R),)](x2, out, scale, M, K, x2.stride(0), out.stride(0), R=R, BLOCK=B,
                                              G=group or 0, num_warps=4)
        else:
            _quant_kernel[(M,)](x2, out, scale, K, x2.stride(0), out.stride(0), BLOCK=B, G=group or 0,
                                num_warps=_warps(B))
    return out, scale


def quant_fp8_ref(x: torch.Tensor, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    from kernels.gemm_w4a8 import deinterleave_k
    x8, s = quantize_fp8_per_token(x.reshape(-1, x.shape[-1]))
    if group:
        x8 = deinterleave_k(x8, group)
    return x8, s.reshape(-1)


def rmsnorm_quant_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                      group: int | None = None):
    """RMSNorm (llama.RMSNorm's rounding: x·rsqrt(mean x² + eps) rounded to x.dtype, × weight in x.dtype)
    then FP8 per token. With `residual`, x := x + residual first (rounded to x.dtype) and that sum is
    returned too: (x8, scale) or (x8, scale, new_residual)."""
    x2 = _rows(x)
    M, K = x2.shape
    out = empty((M, K), torch.float8_e4m3fn, x.device)
    scale = empty((M,), torch.float32, x.device)
    has_res = residual is not None
    r2 = _rows(residual) if has_res else x2
    rout = empty(x2.shape, x2.dtype, x2.device) if has_res else x2
    B = next_pow2(K)
    if M:
        _rmsnorm_quant_kernel[(M,)](x2, weight, r2, rout, out, scale, K, float(eps), x2.stride(0), r2.stride(0),
                                    rout.stride(0), out.stride(0), BLOCK=B, G=group or 0, HAS_RES=has_res,
                                    ROUND_BF16=x.dtype == torch.bfloat16, num_warps=_warps(B))
    if has_res:
        return out, scale, rout.reshape(x.shape)
    return out, scale


def rmsnorm_quant_fp8_ref(x, weight, eps, residual=None, group=None):
    if residual is not None:
        x = x + residual
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = weight.to(x.dtype) * xf.to(x.dtype)
    x8, s = quant_fp8_ref(y, group)
    return (x8, s, x) if residual is not None else (x8, s)


def silu_mul_quant_fp8(gu: torch.Tensor, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """gu [M, 2I] (gate | up) → FP8 of SiLU(gate)·up (rounded as torch does in gu's dtype), scale [M]."""
    g2 = _rows(gu)
    M, I2 = g2.shape
    inter = I2 // 2
    out = empty((M, inter), torch.float8_e4m3fn, gu.device)
    scale = empty((M,), torch.float32, gu.device)
    B = next_pow2(inter)
    if M:
        _silu_mul_kernel[(M,)](g2, out, scale, inter, g2.stride(0), out.stride(0), BLOCK=B, G=group or 0,
                               QUANT=True, ROUND_BF16=gu.dtype == torch.bfloat16, num_warps=_warps(B))
    return out, scale


def silu_mul_quant_fp8_ref(gu, group=None):
    g, u = gu.chunk(2, dim=-1)
    return quant_fp8_ref(torch.nn.functional.silu(g) * u, group)


def silu_mul(gu: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """gu [M, 2I] → SiLU(gate)·up [M, I] in gu's dtype (fp32 math, one rounding)."""
    g2 = _rows(gu)
    M, I2 = g2.shape
    inter = I2 // 2
    if out is None:
        out = empty((M, inter), gu.dtype, gu.device)
    B = next_pow2(inter)
    if M:
        _silu_mul_kernel[(M,)](g2, out, out, inter, g2.stride(0), out.stride(0), BLOCK=B, G=0, QUANT=False,
                               ROUND_BF16=out.dtype == torch.bfloat16, num_warps=_warps(B))
    return out


def silu_mul_ref(gu, out=None):
    g, u = gu.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(g) * u).to(gu.dtype)
