"""Tests of fineserve_core.quant.formats: the numerics references of FineServe's precisions.

Every random input is drawn fresh (hypothesis draws the seeds and shapes). Error bounds asserted:

* FP8 E4M3 rounding of a value v (round to nearest-even, 3 mantissa bits, subnormal step 2^-9):
      |v − fp8(v)| ≤ max(2^-4·|v|, 2^-10)                                            (FP8_ERR)
  so an FP8 per-token activation x with scale S satisfies |x − x̂| ≤ max(2^-4·|x|, 2^-10·S).
* INT4 with FP8 scale s and group absmax a (in the quantized domain, W·pow2 for weights):
      |v − q·s| ≤ max(s/2, a − 7·s)                                                   (INT4_ERR)
  the second term is the clamp at +7 when FP8 rounded absmax/7 *down* (only possible when absmax/7
  is subnormal in FP8, < 2^-6); in FP8's normal range the bound is exactly s/2.
* GEMM references vs float64: |y − x @ Ŵᵀ| ≤ Σ_k |x_k − x̂_k|·|Ŵ_nk|  (activation quantization)
      + K·2^-24·Σ_k |x̂_k|·|Ŵ_nk|  (float32 accumulation) + output rounding.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fineserve_core.kv_format import KVFormat
from fineserve_core.quant import (
    FP8_MAX, FP8Weight, POW2_MAX_EXP, SCALE_MIN, W4Weight, WEIGHT_MIN,
    dequantize_fp8_per_token, dequantize_fp8_weight, dequantize_kv_fp8, dequantize_kv_int4,
    dequantize_w4, dequantize_w4_unscaled, fp8_linear_ref, group_size_for, pack_int4,
    quantize_fp8_per_token, quantize_fp8_weight, quantize_kv_fp8, quantize_kv_int4, quantize_q_fp8,
    quantize_w4, search_pow2, unpack_int4, w4_group_scale, w4a8_linear_ref,
)

FP8 = torch.float8_e4m3fn
SET = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SEEDS = st.integers(0, 2**31 - 1)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
EPS32 = 2.0 ** -24


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(seed: int, *shape, scale: float = 1.0, dtype=torch.float32) -> torch.Tensor:
    x = torch.randn(*shape, generator=gen(seed), dtype=torch.float64) * scale
    return x.to(dtype)


def fp8_err_bound(v: torch.Tensor) -> torch.Tensor:
    """Max |v − fp8(v)| for |v| ≤ 448, elementwise (float64)."""
    v = v.double().abs()
    return torch.maximum(v * 2.0 ** -4, torch.full_like(v, 2.0 ** -10))


def int4_err_bound(s: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    s, amax = s.double(), amax.double()
    return torch.maximum(s / 2, amax - 7 * s)


# ---------------------------------------------------------------------------------------------------
# group size, packing
# ---------------------------------------------------------------------------------------------------

def test_group_size_for():
    assert group_size_for(576) == 64          # SmolLM2 hidden = 9 × 64
    assert group_size_for(1536) == 128        # SmolLM2 intermediate
    assert group_size_for(4096) == 128
    assert group_size_for(11008) == 128
    assert group_size_for(192) == 64
    for bad in (0, 100, 96, 600):
        with pytest.raises(ValueError):
            group_size_for(bad)


def test_pack_int4_all_nibble_pairs_and_layout():
    vals = torch.arange(-8, 8, dtype=torch.int8)
    lo, hi = torch.meshgrid(vals, vals, indexing="ij")            # every (even, odd) pair: 256 bytes
    q = torch.stack([lo.reshape(-1), hi.reshape(-1)], dim=-1)     # [256, 2]
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (256, 1)
    expect = (lo.reshape(-1).to(torch.int32) & 0xF) | ((hi.reshape(-1).to(torch.int32) & 0xF) << 4)
    assert torch.equal(packed[:, 0].to(torch.int32), expect)     # even → low nibble, odd → high nibble
    assert sorted(packed[:, 0].tolist()) == list(range(256))     # a bijection onto all bytes
    # explicit spot checks of two's complement nibbles
    assert pack_int4(torch.tensor([[-8, 7]], dtype=torch.int8)).item() == 0x78
    assert pack_int4(torch.tensor([[-1, 0]], dtype=torch.int8)).item() == 0x0F
    assert pack_int4(torch.tensor([[3, -2]], dtype=torch.int8)).item() == 0xE3
    assert torch.equal(unpack_int4(packed), q)
    # unpack of every byte value
    allbytes = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(-1, 1)
    u = unpack_int4(allbytes).to(torch.int32)
    b = torch.arange(256)
    assert torch.equal(u[:, 0], ((b & 0xF) ^ 8) - 8) and torch.equal(u[:, 1], ((b >> 4) ^ 8) - 8)


@SET
@given(seed=SEEDS, lead=st.lists(st.integers(1, 5), min_size=0, max_size=3), half_k=st.integers(1, 40))
def test_pack_unpack_round_trip(seed, lead, half_k):
    q = torch.randint(-8, 8, (*lead, 2 * half_k), generator=gen(seed), dtype=torch.int8)
    p = pack_int4(q)
    assert p.shape == (*lead, half_k) and p.dtype == torch.uint8
    assert torch.equal(unpack_int4(p), q)
    assert torch.equal(pack_int4(unpack_int4(p)), p)


def test_pack_int4_rejects_bad_input():
    with pytest.raises(ValueError):
        pack_int4(torch.tensor([[8, 0]], dtype=torch.int8))
    with pytest.raises(ValueError):
        pack_int4(torch.tensor([[-9, 0]], dtype=torch.int16))
    with pytest.raises(ValueError):
        pack_int4(torch.zeros(3, 5, dtype=torch.int8))
    with pytest.raises(TypeError):
        unpack_int4(torch.zeros(3, dtype=torch.int8))


# ---------------------------------------------------------------------------------------------------
# pow2 search
# ---------------------------------------------------------------------------------------------------

def _search_pow2_bruteforce(w: torch.Tensor, g: int) -> float:
    """Independent, literal transcription of FireQ's loop (float64, Python sums)."""
    N, K = w.shape
    gwa1 = w.double().abs().reshape(N, K // g, g).amax(-1).reshape(-1).tolist()
    cands = []
    for i in range(POW2_MAX_EXP + 1):
        p = 2.0 ** i
        gwa = [a * p for a in gwa1]
        upper = sum(a - 448 for a in gwa if a > 448) / 448
        if upper > 0:
            break
        lower = math.fsum(WEIGHT_MIN - a for a in gwa if a < WEIGHT_MIN) / WEIGHT_MIN
        cands.append((lower, p))
    return min(cands)[1]


def _groups(seed, N, G, g, absmax):
    """[N, G*g] random weights whose group (n, j) has absmax exactly absmax[n][j] (float32)."""
    w = torch.rand(N, G, g, generator=gen(seed), dtype=torch.float64) * 2 - 1
    w = w / w.abs().amax(-1, keepdim=True) * torch.as_tensor(absmax, dtype=torch.float64).reshape(N, G, 1)
    return w.reshape(N, G * g).float()


def test_search_pow2_tiny_groups_gives_large_p():
    # (a) every group absmax ≈ 1e-5: p must lift 1e-5·p above weight_min = 7·2^-9 ≈ 0.01367,
    # the least p doing so is 2^11 (1e-5·2^10 = 0.0102 < 0.0137 ≤ 0.0205); larger p tie at slack 0.
    seed = torch.seed() % 2**31
    w = _groups(seed, 4, 3, 64, torch.full((4, 3), 1e-5))
    assert search_pow2(w, 64) == 2.0 ** 11
    # groups spread over 1e-5 .. 4e-5: the smallest one decides
    amax = torch.rand(4, 3, generator=gen(seed + 1), dtype=torch.float64) * 3e-5 + 1e-5
    amax[0, 0] = 1e-5
    w = _groups(seed, 4, 3, 64, amax)
    assert search_pow2(w, 64) == 2.0 ** 11 == _search_pow2_bruteforce(w, 64)
    # even tinier: 1e-7 would need 2^17 > 2^14: the search tops out at 2^14
    w = _groups(seed, 2, 2, 64, torch.full((2, 2), 1e-7))
    assert search_pow2(w, 64) == 2.0 ** 14
    # a large group caps p by the 448 limit even though tiny groups want more: 1·256 ≤ 448 < 512
    amax = torch.full((2, 2), 1e-5, dtype=torch.float64)
    amax[1, 1] = 1.0
    w = _groups(seed, 2, 2, 64, amax)
    assert search_pow2(w, 64) == 256.0 == _search_pow2_bruteforce(w, 64)


def test_search_pow2_absmax_300_gives_1():
    # (b) absmax 300: p = 2 would make it 600 > 448, so p = 1 is the only candidate even though the
    # tiny groups would prefer a large p.
    seed = torch.seed() % 2**31
    amax = torch.full((3, 4), 1e-5, dtype=torch.float64)
    amax[2, 1] = 300.0
    w = _groups(seed, 3, 4, 128, amax)
    assert search_pow2(w, 128) == 1.0 == _search_pow2_bruteforce(w, 128)
    W = quantize_w4(w)
    assert W.pow2 == 1.0 and W.group_size == 128
    # exactly 448 is allowed (the rule rejects only > 448): absmax 224 → p = 2
    amax[2, 1] = 224.0
    w = _groups(seed, 3, 4, 128, amax)
    assert search_pow2(w, 128) == 2.0
    # above 7·448 no FP8 scale can represent the weight
    with pytest.raises(ValueError):
        search_pow2(_groups(seed, 1, 1, 64, [[4000.0]]), 64)
    with pytest.raises(ValueError):
        search_pow2(torch.full((2, 64), float("nan")), 64)


def test_search_pow2_ties_pick_smallest():
    # (c) all groups ≥ weight_min already at p = 1: slack is 0 for every p up to 2^12
    # (0.1·4096 = 409.6 ≤ 448): a 13-way tie → the smallest, p = 1.
    seed = torch.seed() % 2**31
    amax = torch.rand(5, 4, generator=gen(seed), dtype=torch.float64) * 0.009 + 0.1
    w = _groups(seed, 5, 4, 64, amax)
    assert search_pow2(w, 64) == 1.0 == _search_pow2_bruteforce(w, 64)
    # a zero group has slack 1 at every p (constant), the other groups are ≥ weight_min once p ≥ 2^3
    # (0.002·8 = 0.016 ≥ 0.01367 > 0.002·4): tie among 2^3..2^14 at slack 1 → p = 8.
    amax = torch.full((2, 3), 0.002, dtype=torch.float64)
    w = _groups(seed, 2, 3, 64, amax)
    w[0, :64] = 0
    assert search_pow2(w, 64) == 8.0 == _search_pow2_bruteforce(w, 64)
    # an all-zero tensor: every p ties → 1
    assert search_pow2(torch.zeros(2, 128), 64) == 1.0


@SET
@given(seed=SEEDS, N=st.integers(1, 6), G=st.integers(1, 4), log_scale=st.floats(-7.0, 2.0))
def test_search_pow2_matches_rule(seed, N, G, log_scale):
    # groups of very different magnitudes so the search is non-trivial
    mags = 10.0 ** (torch.rand(N, G, generator=gen(seed), dtype=torch.float64) * 4 - 4 + log_scale)
    w = _groups(seed + 1, N, G, 64, mags)
    assert search_pow2(w, 64) == _search_pow2_bruteforce(w, 64)


# ---------------------------------------------------------------------------------------------------
# W4 weights
# ---------------------------------------------------------------------------------------------------

def _check_w4(w: torch.Tensor, W: W4Weight):
    N, K = w.shape
    g = W.group_size
    assert W.qweight.dtype == torch.uint8 and W.qweight.shape == (N, K // 2)
    assert W.scales.dtype == FP8 and W.scales.shape == (N, K // g)
    s = W.scales.double()
    assert bool((s >= SCALE_MIN).all()) and bool((s <= FP8_MAX).all())
    p = W.pow2
    assert p == 2.0 ** round(math.log2(p)) and 1.0 <= p <= 2.0 ** POW2_MAX_EXP
    assert p == search_pow2(w, g)
    q = unpack_int4(W.qweight)
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    # error bound in the W·p domain (exact arithmetic in float64)
    wp = (w.double() * p).reshape(N, K // g, g)
    deq = dequantize_w4_unscaled(W).double().reshape(N, K // g, g)
    err = (wp - deq).abs()
    amax = wp.abs().amax(-1, keepdim=True)
    sg = s.unsqueeze(-1)
    assert bool((err <= int4_err_bound(sg, amax) * (1 + 1e-6)).all())
    # FP8-normal groups (absmax/7 ≥ 2^-6): scale rounding ≤ 2^-4 relative → no clamp → exactly ≤ s/2
    normal = (amax / 7 >= 2.0 ** -6).expand_as(err)
    assert bool((err[normal] <= (sg.expand_as(err)[normal] / 2) * (1 + 1e-6)).all())
    # dequantize_w4 = q·s/p
    assert torch.equal(dequantize_w4(W), dequantize_w4_unscaled(W) / p)
    return (err / sg).max().item(), (err[normal] / sg.expand_as(err)[normal]).max().item() if normal.any() else 0.0


@SET
@given(seed=SEEDS, N=st.integers(1, 24), groups=st.integers(1, 6), g=st.sampled_from([64, 128]),
       log_std=st.floats(-6.0, 1.0), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_quantize_w4_error_bound(seed, N, groups, g, log_std, dtype):
    w = randn(seed, N, groups * g, scale=10.0 ** log_std, dtype=dtype)
    W = quantize_w4(w, g)
    _check_w4(w, W)


def test_quantize_w4_default_group_and_measured_error():
    seed = torch.seed() % 2**31
    w = randn(seed, 64, 576, scale=0.02)                 # SmolLM2-like: K = 576 → group 64
    W = quantize_w4(w)
    assert W.group_size == 64 and W.shape == (64, 576) and W.in_features == 576
    assert W.nbytes == 64 * 288 + 64 * 9
    worst, worst_normal = _check_w4(w, W)
    assert worst_normal <= 0.5 + 1e-6
    w = randn(seed + 1, 32, 1024, scale=1.0)             # normal-range scales everywhere
    W = quantize_w4(w)
    assert W.group_size == 128
    _, worst_normal = _check_w4(w, W)
    assert worst_normal <= 0.5 + 1e-6
    W2 = W.to("cpu")
    assert isinstance(W2, W4Weight) and torch.equal(W2.qweight, W.qweight) and W2.pow2 == W.pow2


def test_quantize_w4_deterministic_and_rejects():
    seed = torch.seed() % 2**31
    w = randn(seed, 8, 256, scale=0.05)
    a, b = quantize_w4(w), quantize_w4(w.clone())
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales.view(torch.uint8), b.scales.view(torch.uint8))
    with pytest.raises(ValueError):
        quantize_w4(torch.randn(4, 100))                  # no group size fits
    with pytest.raises(ValueError):
        quantize_w4(torch.randn(4, 128), group_size=96)   # does not divide K
    with pytest.raises(ValueError):
        quantize_w4(torch.randn(2, 4, 128))               # not 2-D


@SET
@given(seed=SEEDS, N=st.integers(1, 24), groups=st.integers(1, 6), g=st.sampled_from([64, 128]),
       log_std=st.floats(-6.0, 1.0), shift=st.floats(-1.0, 1.0))
def test_signed_scale_rule_is_never_coarser_and_keeps_the_bound(seed, N, groups, g, log_std, shift):
    w = randn(seed, N, groups * g, scale=10.0 ** log_std) + shift * 10.0 ** log_std     # skewed groups too
    a, b = quantize_w4(w, g), quantize_w4(w, g, scale_rule="signed")
    assert a.pow2 == b.pow2                                  # the pow2 search does not depend on the rule
    assert bool((b.scales.float() <= a.scales.float()).all())
    wp = (w.double() * b.pow2).reshape(N, groups, g)
    step = torch.maximum(wp.amax(-1).clamp_min(0) / 7, -wp.amin(-1).clamp_max(0) / 8)
    sb = b.scales.double()
    err = (wp - dequantize_w4_unscaled(b).double().reshape(N, groups, g)).abs()
    normal = (step >= 2.0 ** -6).unsqueeze(-1).expand_as(err)          # FP8-normal steps: exactly ≤ s/2
    assert bool((err[normal] <= (sb.unsqueeze(-1).expand_as(err)[normal] / 2) * (1 + 1e-6)).all())
    assert bool((err <= torch.maximum(sb / 2, wp.abs().amax(-1) - 7 * sb).unsqueeze(-1) * (1 + 1e-6)).all())


def test_signed_scale_rule_uses_minus_eight_and_lowers_the_error():
    c = 2.0 ** -4
    grp = torch.zeros(1, 64)
    grp[0, :16] = torch.arange(-8, 8) * c                    # exactly on the grid -8..7 of step c
    exact = quantize_w4(grp, 64, pow2=1.0, scale_rule="signed")
    assert float(exact.scales.float()) == c and torch.equal(dequantize_w4(exact), grp)
    fireq = quantize_w4(grp, 64, pow2=1.0)                   # absmax/7: step 8c/7, the grid is lost
    assert float(fireq.scales.float()) > c and not torch.equal(dequantize_w4(fireq), grp)
    w = randn(torch.seed() % 2**31, 64, 1024, scale=0.02)
    errs = [(dequantize_w4(quantize_w4(w, scale_rule=r)) - w).abs().mean() for r in ("absmax", "signed")]
    assert errs[1] < 0.97 * errs[0], errs
    with pytest.raises(ValueError, match="unknown W4 scale rule 'minmax'"):
        w4_group_scale(w.reshape(64, 8, 128), "minmax")


# ---------------------------------------------------------------------------------------------------
# FP8 activations / queries
# ---------------------------------------------------------------------------------------------------

def _check_fp8_per_row(x: torch.Tensor, xq: torch.Tensor, scale: torch.Tensor) -> float:
    assert xq.dtype == FP8 and xq.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (*x.shape[:-1], 1)
    xd = x.double()
    amax = xd.abs().amax(-1, keepdim=True)
    exp_scale = torch.where(amax > 0, (amax.float() / 448).double(), torch.ones_like(amax))
    assert torch.equal(scale.double(), exp_scale)
    xh = dequantize_fp8_per_token(xq, scale).double()
    err = (xd - xh).abs()
    bound = torch.maximum(xd.abs() * 2.0 ** -4, 2.0 ** -10 * scale.double()) * (1 + 1e-5)
    assert bool((err <= bound).all())
    # the row absmax maps to ±448 exactly (nonzero rows)
    nz = (amax > 0).squeeze(-1)
    assert bool((xq.float().abs().amax(-1)[nz] == 448).all())
    rel = (err / xd.abs().clamp_min(1e-30))[xd.abs() / scale.double() >= 2.0 ** -6]
    return rel.max().item() if rel.numel() else 0.0


@SET
@given(seed=SEEDS, lead=st.lists(st.integers(1, 6), min_size=1, max_size=3), K=st.integers(1, 300),
       log_scale=st.floats(-4.0, 4.0), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_fp8_per_token_error(seed, lead, K, log_scale, dtype):
    x = randn(seed, *lead, K, scale=10.0 ** log_scale, dtype=dtype)
    xq, s = quantize_fp8_per_token(x)
    assert _check_fp8_per_row(x, xq, s) <= 2.0 ** -4 * (1 + 1e-5)


def test_fp8_zero_row_rule():
    seed = torch.seed() % 2**31
    x = randn(seed, 4, 32)
    x[2] = 0
    xq, s = quantize_fp8_per_token(x)
    assert s[2, 0].item() == 1.0 and bool((xq[2].float() == 0).all())
    assert bool((s[[0, 1, 3]] != 1.0).all())
    _check_fp8_per_row(x, xq, s)


@SET
@given(seed=SEEDS, n=st.integers(1, 8), Hq=st.integers(1, 9), D=st.sampled_from([32, 64, 128]))
def test_quantize_q_fp8_per_token_head(seed, n, Hq, D):
    q = randn(seed, n, Hq, D, scale=3.0, dtype=torch.bfloat16)
    qq, s = quantize_q_fp8(q)
    assert s.shape == (n, Hq, 1)
    assert _check_fp8_per_row(q, qq, s) <= 2.0 ** -4 * (1 + 1e-5)
    # per head: each (token, head) row has its own scale
    assert torch.equal(s, (q.float().abs().amax(-1, keepdim=True) / 448))


# ---------------------------------------------------------------------------------------------------
# GEMM references
# ---------------------------------------------------------------------------------------------------

def _gemm_bound(x, xq, xs, wd64, y_quant64, out_dtype):
    """Bound on |y − x @ Ŵᵀ| (float64) for a reference y computed from the FP8 activation."""
    xd = x.double().reshape(-1, x.shape[-1])
    xs = xs.double().reshape(-1, 1)
    K = xd.shape[-1]
    act = torch.maximum(xd.abs() * 2.0 ** -4, 2.0 ** -10 * xs) @ wd64.abs().t()     # activation rounding
    xh = xq.double().reshape(-1, K) * xs
    acc = (K + 4) * EPS32 * (xh.abs() @ wd64.abs().t())                             # fp32 accumulation, scalings
    out = {torch.float32: EPS32, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[out_dtype]
    return act + acc + out * y_quant64.abs() * 1.01 + 1e-30


@SET
@given(seed=SEEDS, T=st.integers(1, 9), N=st.integers(1, 40), groups=st.integers(1, 5),
       g=st.sampled_from([64, 128]), log_std=st.floats(-5.0, 0.0),
       out_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       xdtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_w4a8_linear_ref_vs_float64(seed, T, N, groups, g, log_std, out_dtype, xdtype):
    K = groups * g
    w = randn(seed, N, K, scale=10.0 ** log_std)
    x = randn(seed + 1, T, K, scale=2.0, dtype=xdtype)
    W = quantize_w4(w, g)
    y = w4a8_linear_ref(x, W, out_dtype)
    assert y.dtype == out_dtype and y.shape == (T, N)
    wd64 = dequantize_w4(W).double()
    y_ref = x.double() @ wd64.t()
    xq, xs = quantize_fp8_per_token(x)
    y_q = (xq.double() * xs.double()) @ wd64.t()          # exact product of the quantized operands
    bound = _gemm_bound(x, xq, xs, wd64, y_q, out_dtype)
    assert bool(((y.double() - y_ref).abs() <= bound).all())
    # and the reference is the quantized product up to float32 accumulation / output rounding only
    tight = _gemm_bound(x, xq, xs, wd64, y_q, out_dtype) - \
        torch.maximum(x.double().abs() * 2.0 ** -4, 2.0 ** -10 * xs.double()) @ wd64.abs().t()
    assert bool(((y.double() - y_q).abs() <= tight).all())


def test_w4a8_linear_ref_batch_dims_and_measured_error():
    seed = torch.seed() % 2**31
    w = randn(seed, 96, 576, scale=0.02)
    W = quantize_w4(w)
    x = randn(seed + 1, 2, 3, 576, dtype=torch.bfloat16)
    y = w4a8_linear_ref(x, W, torch.float32)
    assert y.shape == (2, 3, 96)
    y2 = w4a8_linear_ref(x.reshape(6, 576), W, torch.float32).reshape(2, 3, 96)
    assert torch.equal(y, y2)
    assert w4a8_linear_ref(x, W).dtype == torch.bfloat16      # default out dtype = x dtype
    wd64 = dequantize_w4(W).double()
    y_ref = x.double() @ wd64.t()
    rel = ((y.double() - y_ref).norm() / y_ref.norm()).item()
    assert rel < 2.0 ** -4                                     # observed ≈ 1.3e-2 (FP8 activations)
    # fp8_weights=True: each q·s rounded to FP8 (a LUT kernel's operand) — still within 2^-4 relative
    yf = w4a8_linear_ref(x, W, torch.float32, fp8_weights=True)
    wq8 = dequantize_w4_unscaled(W).to(FP8).double() / W.pow2
    xq, xs = quantize_fp8_per_token(x)
    exp = (xq.double() * xs.double()).reshape(6, 576) @ wq8.t()
    assert torch.allclose(yf.double().reshape(6, 96), exp, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        w4a8_linear_ref(torch.randn(2, 512), W)


@SET
@given(seed=SEEDS, T=st.integers(1, 9), N=st.integers(1, 40), K=st.integers(1, 300),
       log_std=st.floats(-4.0, 1.0), out_dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_fp8_linear_ref_vs_float64(seed, T, N, K, log_std, out_dtype):
    w = randn(seed, N, K, scale=10.0 ** log_std)
    x = randn(seed + 1, T, K, scale=2.0, dtype=torch.bfloat16)
    Wf = quantize_fp8_weight(w)
    assert Wf.weight.dtype == FP8 and Wf.weight.shape == (N, K)
    assert Wf.scale.dtype == torch.float32 and Wf.scale.shape == (N,)
    # weight quantization: the per-row FP8 rule
    assert _check_fp8_per_row(w, Wf.weight, Wf.scale.unsqueeze(-1)) <= 2.0 ** -4 * (1 + 1e-5)
    y = fp8_linear_ref(x, Wf, out_dtype)
    assert y.dtype == out_dtype and y.shape == (T, N)
    wd64 = dequantize_fp8_weight(Wf).double()
    y_ref = x.double() @ wd64.t()
    xq, xs = quantize_fp8_per_token(x)
    y_q = (xq.double() * xs.double()) @ wd64.t()
    bound = _gemm_bound(x, xq, xs, wd64, y_q, out_dtype)
    assert bool(((y.double() - y_ref).abs() <= bound).all())


def test_fp8_weight_zero_row_and_to():
    seed = torch.seed() % 2**31
    w = randn(seed, 5, 64)
    w[3] = 0
    Wf = quantize_fp8_weight(w)
    assert Wf.scale[3].item() == 1.0 and bool((Wf.weight[3].float() == 0).all())
    Wc = Wf.to("cpu")
    assert isinstance(Wc, FP8Weight) and Wc.nbytes == 5 * 64 + 5 * 4
    assert torch.equal(dequantize_fp8_weight(Wc), dequantize_fp8_weight(Wf))


# ---------------------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------------------

def _check_kv_int4(x, packed, scale) -> float:
    *lead, D = x.shape
    assert packed.dtype == torch.uint8 and packed.shape == (*lead, D // 2)
    assert scale.dtype == FP8 and scale.shape == tuple(lead)
    s = scale.double()
    assert bool((s >= SCALE_MIN).all()) and bool((s <= FP8_MAX).all())
    xd = x.double()
    amax = xd.abs().amax(-1)
    # scale = max(fp8(absmax / 7), 2^-9)
    exp_s = torch.clamp_min((amax.float() / 7).to(FP8).double(), SCALE_MIN)
    assert torch.equal(s, exp_s)
    err = (xd - dequantize_kv_int4(packed, scale).double()).abs()
    assert bool((err <= int4_err_bound(s, amax).unsqueeze(-1) * (1 + 1e-6)).all())
    normal = (amax / 7 >= 2.0 ** -6).unsqueeze(-1).expand_as(err)
    ratio = err / s.unsqueeze(-1)
    assert bool((ratio[normal] <= 0.5 + 1e-6).all())              # ≤ scale/2 in FP8's normal range
    return ratio[normal].max().item() if normal.any() else 0.0


@SET
@given(seed=SEEDS, n=st.integers(1, 12), H=st.integers(1, 8), D=st.sampled_from([2, 16, 64, 128]),
       log_scale=st.floats(-3.0, 2.0), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_kv_int4_round_trip(seed, n, H, D, log_scale, dtype):
    x = randn(seed, n, H, D, scale=10.0 ** log_scale, dtype=dtype)
    packed, scale = quantize_kv_int4(x)
    _check_kv_int4(x, packed, scale)
    # any leading shape: [H, n, D] (PagedKVCache's gather layout) gives the same per-vector result
    p2, s2 = quantize_kv_int4(x.transpose(0, 1))
    assert torch.equal(p2, packed.transpose(0, 1)) and torch.equal(s2.view(torch.uint8), scale.transpose(0, 1).view(torch.uint8))
    assert torch.equal(dequantize_kv_int4(p2, s2), dequantize_kv_int4(packed, scale).transpose(0, 1))


def test_kv_int4_zero_vector():
    seed = torch.seed() % 2**31
    x = randn(seed, 3, 2, 64)
    x[1, 0] = 0
    packed, scale = quantize_kv_int4(x)
    assert scale[1, 0].float().item() == SCALE_MIN
    assert bool((packed[1, 0] == 0).all())
    _check_kv_int4(x, packed, scale)


@pytest.mark.parametrize("head_dim,heads", [(64, 3), (128, 8)])
def test_kv_int4_into_kvformat_blocks(head_dim, heads):
    seed = torch.seed() % 2**31
    fmt = KVFormat.for_model("w4a8kv4", heads, head_dim, torch.float32)
    T = fmt.tokens_per_block
    nb = 5
    # random prior contents so that stray or missing writes are detected
    region = torch.randint(0, 256, (nb * fmt.block_bytes,), generator=gen(seed), dtype=torch.int32).to(torch.uint8)
    before = region.clone()
    data, scale_v = fmt.views(region)
    assert data.shape == (nb, heads, T, head_dim // 2) and scale_v.shape == (nb, heads, T)

    n = 7
    x = randn(seed + 1, n, heads, head_dim, scale=2.0, dtype=torch.bfloat16)
    packed, s = quantize_kv_int4(x)
    blocks = torch.tensor([0, 0, 2, 4, 4, 1, 3])
    slots = torch.tensor([0, T - 1, 5, 17 % T, 1, 33 % T, T // 2])
    data[blocks, :, slots] = packed                       # as PagedKVCache.write does
    scale_v[blocks, :, slots] = s

    # read back through the views
    for i in range(n):
        b, t = int(blocks[i]), int(slots[i])
        assert torch.equal(data[b, :, t], packed[i])
        assert torch.equal(scale_v[b, :, t].view(torch.uint8), s[i].view(torch.uint8))
        got = dequantize_kv_int4(data[b, :, t], scale_v[b, :, t])
        assert torch.equal(got, dequantize_kv_int4(packed[i], s[i]))
    # and at the documented byte offsets of the raw region (head-major: [H, T, D/2] then scales [H, T])
    D2 = head_dim // 2
    touched = torch.zeros_like(region, dtype=torch.bool)
    for i in range(n):
        b, t = int(blocks[i]), int(slots[i])
        base = b * fmt.block_bytes
        for h in range(heads):
            off = base + (h * T + t) * D2
            assert torch.equal(region[off: off + D2], packed[i, h])
            touched[off: off + D2] = True
            soff = base + fmt.data_bytes + h * T + t
            assert region[soff].item() == s[i, h].view(torch.uint8).item()
            touched[soff] = True
    # nothing else changed
    assert torch.equal(region[~touched], before[~touched])
    _check_kv_int4(x, packed, s)


@SET
@given(seed=SEEDS, n=st.integers(1, 10), H=st.integers(1, 8), D=st.sampled_from([16, 64]),
       log_scale=st.floats(-3.0, 3.0))
def test_kv_fp8(seed, n, H, D, log_scale):
    x = randn(seed, n, H, D, scale=10.0 ** log_scale, dtype=torch.bfloat16)
    xq = quantize_kv_fp8(x)
    assert xq.dtype == FP8 and xq.shape == x.shape
    xd = x.double()
    clamped = xd.clamp(-448, 448)
    err = (clamped - dequantize_kv_fp8(xq).double()).abs()
    assert bool((err <= fp8_err_bound(clamped)).all())
    # saturation: beyond ±448 stays ±448, never NaN
    big = torch.tensor([1e4, -1e4, 449.0, -500.0, 448.0])
    assert dequantize_kv_fp8(quantize_kv_fp8(big)).tolist() == [448.0, -448.0, 448.0, -448.0, 448.0]
    assert dequantize_kv_fp8(xq, torch.bfloat16).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------
# devices: every quantizer is bit-identical on CUDA (when there is one) to CPU
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_device_agnostic_bit_exact(device):
    seed = torch.seed() % 2**31
    w = randn(seed, 48, 576, scale=0.02)
    x = randn(seed + 1, 5, 576, dtype=torch.bfloat16)
    kv = randn(seed + 2, 9, 3, 64)
    W = quantize_w4(w)
    Wd = quantize_w4(w.to(device))
    assert Wd.qweight.device.type == device and Wd.pow2 == W.pow2
    assert torch.equal(Wd.qweight.cpu(), W.qweight)
    assert torch.equal(Wd.scales.cpu().view(torch.uint8), W.scales.view(torch.uint8))
    xq, xs = quantize_fp8_per_token(x)
    xqd, xsd = quantize_fp8_per_token(x.to(device))
    assert torch.equal(xqd.cpu().view(torch.uint8), xq.view(torch.uint8)) and torch.equal(xsd.cpu(), xs)
    p, s = quantize_kv_int4(kv)
    pd, sd = quantize_kv_int4(kv.to(device))
    assert torch.equal(pd.cpu(), p) and torch.equal(sd.cpu().view(torch.uint8), s.view(torch.uint8))
    y = w4a8_linear_ref(x, W, torch.float32)
    yd = w4a8_linear_ref(x.to(device), W.to(device), torch.float32).cpu()
    assert torch.allclose(yd, y, rtol=1e-5, atol=1e-6)
