"""Numeric formats of FineServe's precisions: the torch references the Triton kernels are tested against.

Pure torch, device-agnostic (CPU and CUDA), no Ray. Spec: `research/papers.md` §2.3 (FireQ's
quantization math) and `DESIGN.md` ("Decisions": group size, precisions). Every function here is
deterministic; the conventions below are part of the contract a kernel must reproduce.

Conventions (all of them, everywhere in this file)
--------------------------------------------------
* Arithmetic is float32: inputs of any float dtype are first upcast (exactly for bf16/fp16/fp32).
* Rounding to integers is `torch.round`: round half to even (as Triton's `rint` / PTX `cvt.rni`).
* A cast to FP8 E4M3 (`torch.float8_e4m3fn`, max 448, min subnormal 2^-9, 3 mantissa bits) rounds to
  nearest-even. Values are always clamped to [-448, 448] *before* the cast (torch's CUDA cast does
  not saturate), so no NaN is produced from finite inputs.
* "s = absmax / c" is the float32 division `absmax / c` (not a multiplication by 1/c), and a value
  is quantized with the float32 division `x / s` (not `x * (1/s)`).
* Absmax reductions are `amax(abs(.))`: order-independent, hence bit-identical on CPU and CUDA. All
  quantizers are elementwise after that, so they are bit-identical across devices too. The matmul
  references (`w4a8_linear_ref`, `fp8_linear_ref`) accumulate in float32 with `torch.matmul`; they are
  deterministic on one device but may differ across devices in the last bits of the accumulation
  (and on CUDA they assume TF32 is off, which is torch's default for matmul).

Formats
-------
* INT4 packing (`pack_int4`): two's-complement nibbles, element 2j in the LOW nibble and element
  2j+1 in the HIGH nibble of byte j (little-nibble first, as FireQ's packing and `kv_format.py`).
* W4 weights (`W4Weight`, FireQ's SCALED_I4F8_F8): symmetric INT4 in [-8, 7], per-group along K
  (group 128, or 64 where 128 does not divide K), FP8 E4M3 group scales floored at 2^-9, and a
  per-tensor power of two `pow2` that the weights are multiplied by before quantizing so that small
  groups' scales do not underflow FP8. W ≈ q · s / pow2. The group scale is FireQ's absmax / 7 by
  default; `scale_rule="signed"` (beyond FireQ, same format) takes max(max⁺ / 7, −min⁻ / 8), the
  finest step at which no element clamps, so a group whose largest magnitude is negative also uses -8.
* A8 activations: FP8 E4M3, dynamic per token (per row), float32 scale = absmax / 448.
* FP8 weights (`FP8Weight`, precision `fp8`): FP8 E4M3 per output channel, float32 scale = absmax/448.
* KV4: symmetric INT4 per (token, head) over head_dim, FP8 E4M3 scale = absmax / 7 floored at 2^-9,
  round to nearest (FireQ's pseudo-quant path; its Triton kernel truncates, we do not).
* KV8 (precision `fp8`): FP8 E4M3 with per-tensor scale 1.0, saturating at ±448.
* Q8: FP8 E4M3 queries, per token per head, float32 scale = absmax / 448.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "FP8_DTYPE", "FP8_MAX", "FP8_MIN_SUBNORMAL", "INT4_MIN", "INT4_MAX", "SCALE_MIN", "WEIGHT_MIN",
    "POW2_MAX_EXP",
    "group_size_for", "pack_int4", "unpack_int4",
    "W4_SCALE_RULES", "W4Weight", "search_pow2", "w4_group_scale", "quantize_w4", "dequantize_w4", "dequantize_w4_unscaled",
    "quantize_fp8_per_token", "dequantize_fp8_per_token", "w4a8_linear_ref",
    "FP8Weight", "quantize_fp8_weight", "dequantize_fp8_weight", "fp8_linear_ref",
    "quantize_kv_int4", "dequantize_kv_int4", "quantize_kv_fp8", "dequantize_kv_fp8",
    "quantize_q_fp8",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0                      # largest finite float8_e4m3fn
FP8_MIN_SUBNORMAL = 2.0 ** -9        # smallest positive float8_e4m3fn (subnormal)
INT4_MIN, INT4_MAX = -8, 7
SCALE_MIN = FP8_MIN_SUBNORMAL        # FireQ's `smallest_scale` = 2^-6 / 8: floor of every FP8 INT4 scale
WEIGHT_MIN = SCALE_MIN * INT4_MAX    # 7·2^-9: a group whose absmax is below this gets a floored scale
POW2_MAX_EXP = 14                    # the per-tensor scale is searched over 2^0 .. 2^14


def _check_float(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")


def _to_fp8(x: torch.Tensor) -> torch.Tensor:
    """float32 → float8_e4m3fn: clamp to ±448, then round to nearest-even."""
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _int4_scale_fp8(absmax: torch.Tensor) -> torch.Tensor:
    """FireQ's INT4 scale: fp8_e4m3(absmax / 7) floored at 2^-9, returned as float8_e4m3fn.

    `absmax` is float32. absmax/7 above 448 saturates to 448 (never reached by the pow2-scaled
    weights, whose group absmax is ≤ 448; a KV head vector would need absmax > 3136).
    """
    return _int4_step_fp8(absmax / INT4_MAX)


def _int4_step_fp8(step: torch.Tensor) -> torch.Tensor:
    """fp8_e4m3(step) floored at 2^-9, as float8_e4m3fn (`step` float32)."""
    return torch.clamp_min(_to_fp8(step).float(), SCALE_MIN).to(FP8_DTYPE)


def _quantize_int4_grouped(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q = clamp(round(x / scale), -8, 7) as int8; x float32 [..., G, g], scale float32 [..., G, 1]."""
    return torch.round(x / scale).clamp_(INT4_MIN, INT4_MAX).to(torch.int8)


# ---------------------------------------------------------------------------------------------------
# Group size and INT4 packing
# ---------------------------------------------------------------------------------------------------

def group_size_for(K: int) -> int:
    """Quantization group size along K: 128 if K % 128 == 0, else 64 (SmolLM2's 576 = 9 × 64).

    Raises ValueError if neither divides K.
    """
    K = int(K)
    if K > 0 and K % 128 == 0:
        return 128
    if K > 0 and K % 64 == 0:
        return 64
    raise ValueError(f"K={K} is not a positive multiple of 64 or 128: no INT4 group size fits")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in [-8, 7] two per byte: int8 [..., K] → uint8 [..., K/2].

    Byte layout (little-nibble first, two's complement nibbles):

        packed[..., j] = (q[..., 2j] & 0xF) | ((q[..., 2j+1] & 0xF) << 4)

    i.e. element 2j in bits 0-3 (LOW nibble) and element 2j+1 in bits 4-7 (HIGH nibble); a nibble
    holds the 4-bit two's complement of the value (-8 → 0x8, -1 → 0xF, 7 → 0x7). K must be even.
    Raises ValueError on values outside [-8, 7] (they would not survive the round trip).
    """
    if q.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        raise TypeError(f"pack_int4 wants an integer tensor, got {q.dtype}")
    if q.dim() == 0 or q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got shape {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < INT4_MIN or int(q.max()) > INT4_MAX):
        raise ValueError("pack_int4: values must lie in [-8, 7]")
    q = q.to(torch.int16)
    lo = (q[..., 0::2] & 0xF)
    hi = (q[..., 1::2] & 0xF)
    return (lo | (hi << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: uint8 [..., K/2] → int8 [..., K] in [-8, 7] (see its layout)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 wants uint8, got {packed.dtype}")
    p = packed.to(torch.int16)
    nib = torch.stack((p & 0xF, p >> 4), dim=-1)          # [..., K/2, 2]: (low, high)
    nib = torch.where(nib >= 8, nib - 16, nib)            # two's complement sign extension
    return nib.reshape(*packed.shape[:-1], packed.shape[-1] * 2).to(torch.int8)


# ---------------------------------------------------------------------------------------------------
# W4 weights (INT4, FP8 group scales, per-tensor power of two)
# ---------------------------------------------------------------------------------------------------

@dataclass(slots=True)
class W4Weight:
    """FireQ W4 weight of a linear layer y = x Wᵀ with W [N, K] (N out, K in features).

    qweight: uint8 [N, K/2]  INT4 q in [-8, 7], `pack_int4` layout along K.
    scales:  float8_e4m3fn [N, K/group_size]  per-group scale s (≥ 2^-9), of the pow2-scaled weight.
    group_size: int          group length along K.
    pow2:    float           per-tensor power of two p in 2^0..2^14.
    Dequantized: W ≈ q · s / p (per element, s of its group).
    """
    qweight: torch.Tensor
    scales: torch.Tensor
    group_size: int
    pow2: float

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * 2

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weights and group scales (pow2 is a Python float)."""
        return self.qweight.numel() * self.qweight.element_size() + self.scales.numel() * self.scales.element_size()

    def to(self, device) -> "W4Weight":
        return W4Weight(self.qweight.to(device), self.scales.to(device), self.group_size, self.pow2)


def _check_weight(w: torch.Tensor, group_size: int | None) -> int:
    _check_float(w, "w")
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(w.shape)}")
    K = w.shape[1]
    g = group_size_for(K) if group_size is None else int(group_size)
    if g <= 0 or g % 2 or K % g:
        raise ValueError(f"group_size {g} must be even and divide K={K}")
    return g


def _group_absmax(w: torch.Tensor, g: int) -> torch.Tensor:
    """float32 [N, K/g]: absmax of each group of g consecutive elements along K."""
    N, K = w.shape
    return w.float().abs().reshape(N, K // g, g).amax(dim=-1)


def search_pow2(w: torch.Tensor, group_size: int | None = None) -> float:
    """FireQ's per-tensor power-of-two search (`PseudoQuantLinearScaled_I4F8_F8`), exactly.

    With gwa(p) = group absmax of W·p (groups of `group_size` along K, default `group_size_for(K)`):

        for i in 0..14:  p = 2^i
            if any gwa(p) > 448: stop (this p and all larger are not candidates)
            slack(p) = Σ_{gwa(p) < weight_min} (weight_min - gwa(p)) / weight_min,  weight_min = 7·2^-9
        return the candidate p with the least slack; ties → the smallest p.

    slack measures how far groups fall below the smallest magnitude whose FP8 scale absmax/7 does not
    underflow the 2^-9 floor. Since p is a power of two, gwa(p) = p·gwa(1) exactly. The sum is
    computed with `math.fsum` (exactly rounded) on float64 terms, so the choice, ties included, is
    the same on every device. FireQ's code also clamps W at +448 (upper side only) first; that is a
    no-op for real weights and is not done here. Raises ValueError if W is not finite or if its
    absmax exceeds 7·448 = 3136 (no FP8 group scale could represent it; FireQ fails there too since
    even p = 1 is then rejected — we accept 448 < absmax ≤ 3136 with p = 1).
    """
    g = _check_weight(w, group_size)
    gwa = _group_absmax(w, g)
    gmax = float(gwa.max()) if gwa.numel() else 0.0
    if not math.isfinite(gmax):
        raise ValueError("search_pow2: weight has non-finite values")
    if gmax > INT4_MAX * FP8_MAX:
        raise ValueError(f"search_pow2: weight absmax {gmax} > 3136 cannot be represented with FP8 scales")
    # Groups below weight_min at p = 1 are the only ones that can ever be below it (p ≥ 1).
    small = gwa[gwa < WEIGHT_MIN].to(device="cpu", dtype=torch.float64)
    candidates: list[tuple[float, float]] = []
    for i in range(POW2_MAX_EXP + 1):
        p = 2.0 ** i
        if gmax * p > FP8_MAX:      # exact: gmax is a float32 value, p a power of two
            break
        v = small * p
        terms = (WEIGHT_MIN - v[v < WEIGHT_MIN]).tolist()
        candidates.append((math.fsum(terms) / WEIGHT_MIN, p))
    if not candidates:               # 448 < absmax ≤ 3136: only p = 1 can work
        return 1.0
    return min(candidates)[1]        # least slack, then smallest p


#: How a W4 group's scale is chosen (`w4_group_scale`); the format and the kernels are the same for both.
W4_SCALE_RULES = ("absmax", "signed")


def w4_group_scale(groups: torch.Tensor, rule: str = "absmax") -> torch.Tensor:
    """FP8 scale [...] of each group of float32 `groups` [..., g].

    "absmax" (FireQ): max(fp8_e4m3(absmax / 7), 2^-9). "signed" (beyond FireQ): the step
    max(max⁺ / 7, −min⁻ / 8) (max⁺ = max(max, 0), min⁻ = min(min, 0)), then the same FP8 cast and
    floor: never coarser than absmax / 7, and before the FP8 rounding no element clamps. It wins
    because the code −8 is otherwise used only by rounding: on SmolLM2-135M's full FireQ w4a8kv4 the
    held-out PPL drops 39.3 → 36.7 (load_tests/results/fireq-tune-smollm2-135m.json).
    """
    if rule == "absmax":
        return _int4_scale_fp8(groups.abs().amax(dim=-1))
    if rule == "signed":
        step = torch.maximum(groups.amax(dim=-1).clamp_min(0) / INT4_MAX,
                             groups.amin(dim=-1).clamp_max(0) / INT4_MIN)
        return _int4_step_fp8(step)
    raise ValueError(f"unknown W4 scale rule {rule!r}; expected one of {W4_SCALE_RULES}")


def quantize_w4(w: torch.Tensor, group_size: int | None = None, pow2: float | None = None,
                scale_rule: str = "absmax") -> W4Weight:
    """Quantize a weight [N, K] (any float dtype) to FireQ W4 (INT4, FP8 group scales, pow2).

    `pow2` fixes the per-tensor power of two instead of searching it (None, the default: search);
    pow2=1.0 gives plain RTN with FP8 group scales (the ablation without the per-tensor scale).
    `scale_rule` picks the group scale (`w4_group_scale`; FireQ's "absmax" by default).

        p   = search_pow2(w, group_size)                         (group_size default group_size_for(K))
        Wp  = float32(w) · p                                     (exact)
        s   = max(fp8_e4m3(absmax_group(Wp) / 7), 2^-9)          FP8, round to nearest-even ("absmax")
        q   = clamp(round(Wp / s), -8, 7)                        round half to even

    Error (per element, Wp domain): |Wp − q·s| ≤ s/2 unless clamped; with s rounded down from
    absmax/7 the clamp can add up to absmax − 7s. For groups whose absmax/7 ≥ 2^-6 (FP8 normal range)
    the rounding is ≤ 2^-4 relative, so absmax/s ≤ 7.4375 and the bound is exactly s/2; "signed" has
    max⁺/s ≤ 7.4375 and −min⁻/s ≤ 8.5 there, so the same bound.
    """
    g = _check_weight(w, group_size)
    if pow2 is None:
        p = search_pow2(w, g)
    else:
        p = float(pow2)
        if p <= 0 or math.frexp(p)[0] != 0.5:
            raise ValueError(f"pow2 must be a positive power of two, got {pow2}")
    N, K = w.shape
    wp = (w.float() * p).reshape(N, K // g, g)
    s8 = w4_group_scale(wp, scale_rule)                            # [N, K/g] fp8
    q = _quantize_int4_grouped(wp, s8.float().unsqueeze(-1)).reshape(N, K)
    return W4Weight(pack_int4(q), s8, g, p)


def dequantize_w4_unscaled(w: W4Weight) -> torch.Tensor:
    """float32 [N, K] = q · s (exact in float32), without the 1/pow2: the operand of the W4A8 GEMM."""
    q = unpack_int4(w.qweight).float()
    return q * w.scales.float().repeat_interleave(w.group_size, dim=1)


def dequantize_w4(w: W4Weight) -> torch.Tensor:
    """float32 [N, K] = q · s / pow2 (exact in float32 barring underflow: pow2 is a power of two)."""
    return dequantize_w4_unscaled(w) / w.pow2


# ---------------------------------------------------------------------------------------------------
# FP8 activations, W4A8 reference GEMM
# ---------------------------------------------------------------------------------------------------

def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic FP8 E4M3 quantization per row (per token): x [..., K] → (x_fp8 [..., K], scale [..., 1]).

        scale = absmax_row(float32(x)) / 448     (float32; 1.0 for an all-zero row)
        x_fp8 = fp8_e4m3(clamp(float32(x) / scale, -448, 448))     round to nearest-even

    Dequantized x̂ = float32(x_fp8) · scale. Error per element: |x − x̂| ≤ 2^-4·|x| in FP8's normal
    range (|x|/scale ≥ 2^-6), else ≤ 2^-10·scale (subnormal spacing 2^-9); plus float32 rounding.
    """
    _check_float(x, "x")
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return _to_fp8(xf / scale), scale


def dequantize_fp8_per_token(x_fp8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 x̂ = float32(x_fp8) · scale (scale broadcast along the last dimension)."""
    return x_fp8.float() * scale


#: The engine's W4A8 GEMM has two numerics, by the rows (tokens) of the call: up to this many (decode
#: steps, short prompts) q·s enters the MMA exactly; above it the GEMM unpacks the weights to FP8 once
#: and runs cuBLAS FP8, which rounds each q·s to e4m3 (FireQ's LUT numerics, ``fp8_weights=True``
#: below) — exact group scales would cost the FP8 speed (kernels/NOTES.md, session 7). `kernels.tuned`
#: dispatches on this number and the CPU forward (`linear.W4A8Linear`) mirrors it, so both engines
#: compute one function.
W4_EXACT_MAX_ROWS = 128


def w4a8_linear_ref(x: torch.Tensor, w: W4Weight, out_dtype: torch.dtype | None = None,
                    *, fp8_weights: bool = False) -> torch.Tensor:
    """Reference W4A8 GEMM: x [..., K] (any float dtype) × W4 [N, K] → [..., N] in out_dtype (default x.dtype).

        x_fp8, x_scale = quantize_fp8_per_token(x)
        acc = float32(x_fp8) @ (q · s)ᵀ               float32 matmul (q·s exact in float32)
        y   = (acc · x_scale) / pow2                   float32 (the /pow2 is exact), then cast

    fp8_weights=True instead rounds each q·s to FP8 E4M3 before the matmul, as a kernel that
    dequantizes INT4 → FP8 (FireQ's LUT / Triton fallback) computes; q·s has up to 7 significant bits,
    so this differs from the default by ≤ 2^-4 relative per weight (more in the subnormal range).
    """
    _check_float(x, "x")
    if x.shape[-1] != w.in_features:
        raise ValueError(f"x has K={x.shape[-1]}, weight has K={w.in_features}")
    out_dtype = out_dtype or x.dtype
    x_fp8, x_scale = quantize_fp8_per_token(x)
    wd = dequantize_w4_unscaled(w)
    if fp8_weights:
        wd = _to_fp8(wd).float()
    acc = torch.matmul(x_fp8.float(), wd.t())
    return ((acc * x_scale) / w.pow2).to(out_dtype)


# ---------------------------------------------------------------------------------------------------
# FP8 weights (precision `fp8`, W8A8)
# ---------------------------------------------------------------------------------------------------

@dataclass(slots=True)
class FP8Weight:
    """FP8 E4M3 weight, per output channel: W ≈ float32(weight) · scale[:, None].

    weight: float8_e4m3fn [N, K];  scale: float32 [N] = absmax_row / 448 (1.0 for an all-zero row).
    """
    weight: torch.Tensor
    scale: torch.Tensor

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size() + self.scale.numel() * self.scale.element_size()

    def to(self, device) -> "FP8Weight":
        return FP8Weight(self.weight.to(device), self.scale.to(device))


def quantize_fp8_weight(w: torch.Tensor) -> FP8Weight:
    """W [N, K] → FP8Weight: per output channel (row) the same rule as `quantize_fp8_per_token`."""
    _check_float(w, "w")
    if w.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(w.shape)}")
    wq, scale = quantize_fp8_per_token(w)
    return FP8Weight(wq, scale.squeeze(-1))


def dequantize_fp8_weight(w: FP8Weight) -> torch.Tensor:
    """float32 [N, K] = float32(weight) · scale[:, None]."""
    return w.weight.float() * w.scale.unsqueeze(-1)


def fp8_linear_ref(x: torch.Tensor, w: FP8Weight, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reference W8A8 FP8 GEMM: x [..., K] × FP8Weight [N, K] → [..., N] in out_dtype (default x.dtype).

        x_fp8, x_scale = quantize_fp8_per_token(x)
        y = ((float32(x_fp8) @ float32(weight)ᵀ) · x_scale) · scale[None, :]     float32, then cast
    """
    _check_float(x, "x")
    if x.shape[-1] != w.in_features:
        raise ValueError(f"x has K={x.shape[-1]}, weight has K={w.in_features}")
    out_dtype = out_dtype or x.dtype
    x_fp8, x_scale = quantize_fp8_per_token(x)
    acc = torch.matmul(x_fp8.float(), w.weight.float().t())
    return ((acc * x_scale) * w.scale).to(out_dtype)


# ---------------------------------------------------------------------------------------------------
# KV cache and queries
# ---------------------------------------------------------------------------------------------------

def quantize_kv_int4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """INT4 KV per (token, head): x [..., D] (e.g. [n, H, D]) → (packed uint8 [..., D/2], scale fp8 [...]).

        scale = max(fp8_e4m3(absmax_D(float32(x)) / 7), 2^-9)     (an all-zero vector gets 2^-9)
        q     = clamp(round(float32(x) / scale), -8, 7)            round half to even
        packed = pack_int4(q)                                      even d in the LOW nibble

    This is the byte layout of a `KVFormat("w4a8kv4")` block: data[b, h, t, :] = packed[i, h],
    scale[b, h, t] = scale[i, h]. Error: |x − q·scale| ≤ scale/2 whenever absmax/7 ≥ 2^-6 (FP8
    normal range); below that the scale can round down and the clamp adds up to absmax − 7·scale.
    """
    _check_float(x, "x")
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"quantize_kv_int4 needs an even last dimension, got shape {tuple(x.shape)}")
    xf = x.float()
    s8 = _int4_scale_fp8(xf.abs().amax(dim=-1))
    q = _quantize_int4_grouped(xf, s8.float().unsqueeze(-1))
    return pack_int4(q), s8


def dequantize_kv_int4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 [..., D] = unpack_int4(packed) · scale[..., None]; packed [..., D/2], scale [...] (fp8)."""
    return unpack_int4(packed).float() * scale.float().unsqueeze(-1)


def quantize_kv_fp8(x: torch.Tensor) -> torch.Tensor:
    """FP8 KV (precision `fp8`, per-tensor scale 1.0): fp8_e4m3(clamp(float32(x), -448, 448))."""
    _check_float(x, "x")
    return _to_fp8(x.float())


def dequantize_kv_fp8(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """FP8 KV → `dtype` (scale 1.0: a plain cast)."""
    return x.to(dtype)


def quantize_q_fp8(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 queries per token per head: q [..., Hq, D] → (q_fp8 [..., Hq, D], scale float32 [..., Hq, 1]).

    The rule of `quantize_fp8_per_token` applied over D: scale = absmax / 448 (1.0 if all zero).
    """
    return quantize_fp8_per_token(q)
