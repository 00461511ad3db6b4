"""FireQ's float transforms (smoothing, pre-/post-RoPE scaling) and the quantized linears, on CPU.

Every test draws fresh random inputs (a new seed per run, shown on failure); nothing is zeros.
"""
import os

import pytest
import torch

from fineserve_core.attention import AttnBatch
from fineserve_core.config import LlamaConfig
from fineserve_core.kv_format import KVFormat
from fineserve_core.linear import DenseLinear, FP8Linear, W4A8Linear, linear_from_tensors, make_linear, quantized_tensors
from fineserve_core.llama import Attention, Rotary, apply_rotary
from fineserve_core.paged_kv import PagedKVCache
from fineserve_core.quant import fireq
from fineserve_core.quant.formats import (
    W4_EXACT_MAX_ROWS, fp8_linear_ref, quantize_fp8_weight, quantize_w4, w4a8_linear_ref,
)

CFG = LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=192, num_layers=1, num_heads=4,
                  num_kv_heads=2, head_dim=32, rope_theta=10000.0)


@pytest.fixture
def gen():
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    return g


def rand(g, *shape, scale=1.0, dtype=torch.float64):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def layer_weights(g, cfg=CFG, dtype=torch.float64, k_outliers=True):
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    w = {
        "input_layernorm.weight": 1 + 0.1 * rand(g, h, dtype=dtype),
        "self_attn.q_proj.weight": rand(g, cfg.num_heads * d, h, scale=h ** -0.5, dtype=dtype),
        "self_attn.k_proj.weight": rand(g, cfg.num_kv_heads * d, h, scale=h ** -0.5, dtype=dtype),
        "self_attn.v_proj.weight": rand(g, cfg.num_kv_heads * d, h, scale=h ** -0.5, dtype=dtype),
        "self_attn.o_proj.weight": rand(g, h, cfg.num_heads * d, scale=(cfg.num_heads * d) ** -0.5, dtype=dtype),
        "post_attention_layernorm.weight": 1 + 0.1 * rand(g, h, dtype=dtype),
        "mlp.gate_proj.weight": rand(g, i, h, scale=h ** -0.5, dtype=dtype),
        "mlp.up_proj.weight": rand(g, i, h, scale=h ** -0.5, dtype=dtype),
        "mlp.down_proj.weight": rand(g, h, i, scale=i ** -0.5, dtype=dtype),
    }
    # uneven input-channel magnitudes (what smoothing equalizes) and K outlier channels (what the RoPE
    # scalings tame), as in real models
    w["mlp.gate_proj.weight"] *= torch.exp(rand(g, h, dtype=dtype))
    w["mlp.down_proj.weight"] *= torch.exp(rand(g, i, dtype=dtype))
    if k_outliers:
        k = w["self_attn.k_proj.weight"].view(cfg.num_kv_heads, d, h)
        k[:, 3] *= 12
        k[:, 3 + d // 2] *= 9
        k[1, 10] *= 20
    return w


def test_smoothing_leaves_float_layer_unchanged(gen):
    w = layer_weights(gen)
    x = rand(gen, 2, 24, CFG.hidden_size)
    ref = fireq.layer_forward(x, w, CFG)
    ws = fireq.apply_smoothing(w, c_ug=0.0096, c_d=0.015, v_mul=0.9)
    got = fireq.layer_forward(x, ws, CFG)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10, msg=f"seed {gen.initial_seed()}")
    # γ was divided by λ_j = c_ug / mean_i |W_ij| over gate|up, and gate's columns multiplied by it
    lam = 0.0096 / torch.cat([w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"]]).abs().mean(0)
    torch.testing.assert_close(w["post_attention_layernorm.weight"] / ws["post_attention_layernorm.weight"], lam,
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(ws["mlp.gate_proj.weight"], w["mlp.gate_proj.weight"] * lam, rtol=1e-12, atol=0)
    # down's input columns are equalized to mean |W_ij| = c_d
    torch.testing.assert_close(ws["mlp.down_proj.weight"].abs().mean(0),
                               torch.full((CFG.intermediate_size,), 0.015, dtype=torch.float64), rtol=1e-12, atol=0)
    assert not torch.equal(ws["mlp.up_proj.weight"], w["mlp.up_proj.weight"])


def _scores(w, x, cfg, n_pos):
    """q·kᵀ after RoPE for every query head against its KV head: [Hq, L, L] float64."""
    L = x.shape[0]
    q = (x @ w["self_attn.q_proj.weight"].t()).view(L, cfg.num_heads, cfg.head_dim)
    k = (x @ w["self_attn.k_proj.weight"].t()).view(L, cfg.num_kv_heads, cfg.head_dim)
    cos, sin = Rotary(cfg, "cpu")(n_pos, q.dtype)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    k = k.repeat_interleave(cfg.num_heads // cfg.num_kv_heads, 1)
    return torch.einsum("qhd,khd->hqk", q, k), k


def test_pre_rope_scaling_leaves_qk_unchanged_float64(gen):
    w = layer_weights(gen)
    x = rand(gen, 40, CFG.hidden_size)
    pos = torch.randint(0, 4000, (40,), generator=gen)
    ref, k_ref = _scores(w, x, CFG, pos)
    k_pre = (x @ w["self_attn.k_proj.weight"].t()).view(40, CFG.num_kv_heads, CFG.head_dim)
    half = CFG.head_dim // 2
    pair_max = (k_pre[..., :half] ** 2 + k_pre[..., half:] ** 2).sqrt().amax(0)
    n = fireq.pre_rope_scales(pair_max, alpha=8.0)
    assert torch.equal(n[:, :half], n[:, half:])                     # same factor on each RoPE pair
    ws = fireq.apply_pre_rope(w, n, CFG.num_heads)
    got, k_got = _scores(ws, x, CFG, pos)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10, msg=f"seed {gen.initial_seed()}")
    # every K pair magnitude is now <= alpha (before and after RoPE, which rotates pairs)
    k_new = (x @ ws["self_attn.k_proj.weight"].t()).view(40, CFG.num_kv_heads, CFG.head_dim)
    assert float((k_new[..., :half] ** 2 + k_new[..., half:] ** 2).sqrt().max()) <= 8.0 + 1e-9
    # after RoPE each element is bounded by its pair's magnitude, up to the float32 RoPE table's rounding
    # (cos² + sin² = 1 ± 1e-7): a seed once gave 8.00000017
    assert float(k_got.abs().max()) <= 8.0 * (1 + 1e-6)


def test_post_rope_scales_pick_topk_and_partners(gen):
    d = CFG.head_dim
    m = rand(gen, 2, d).abs() + 0.1
    m[0, 5] = 50.0
    m[1, d - 1] = 40.0
    s, t = fireq.post_rope_scales(m, beta=8.0, top_k=1)
    assert t.sum(1).tolist() == [2, 2]
    assert t[0, 5] and t[0, 5 + d // 2] and t[1, d - 1] and t[1, d // 2 - 1]
    torch.testing.assert_close(s[t], 8.0 / m[t])
    assert torch.all(s[~t] == 1)
    n = fireq.pre_rope_scales(rand(gen, 2, d // 2).abs() + 0.5, alpha=8.0)
    nc = fireq.combine_rope_scales(n, t)
    assert torch.all(nc[t] == 1) and torch.equal(nc[~t], n[~t])


def _attention(cfg, w, k_post_scale, kv_precision, x, dtype=torch.float64):
    qkv = DenseLinear(torch.cat([w["self_attn.q_proj.weight"], w["self_attn.k_proj.weight"],
                                 w["self_attn.v_proj.weight"]]), dtype)
    # attention over the K/V read back from the cache (as decodes read it): the KV format's error shows
    attn = Attention(cfg, 0, qkv, DenseLinear(w["self_attn.o_proj.weight"], dtype), k_post_scale=k_post_scale,
                     fresh_prefill=False)
    fmt = KVFormat.for_model(kv_precision, cfg.num_kv_heads, cfg.head_dim, dtype, tokens_per_block=16)
    n = x.shape[0]
    nb = -(-n // 16)
    kv = PagedKVCache(fmt, torch.zeros(1, 2, nb * fmt.block_bytes, dtype=torch.uint8))
    batch = AttnBatch([n], [n], [list(range(nb))], torch.arange(n))
    return attn(x.to(dtype), Rotary(cfg, "cpu")(torch.arange(n), dtype), batch, kv)


def test_post_rope_scaling_leaves_attention_unchanged_up_to_quantization(gen):
    w = layer_weights(gen)
    x = rand(gen, 48, CFG.hidden_size)
    _, k_post = _scores(w, x, CFG, torch.arange(48))                  # what the runner's K is after RoPE
    s, t = fireq.post_rope_scales(k_post[:, ::CFG.num_heads // CFG.num_kv_heads].abs().amax(0), beta=8.0, top_k=2)
    assert torch.any(s != 1)
    ref = _attention(CFG, w, None, "bf16", x)
    # in float64 with a float KV cache the online scaling is exact up to rounding
    torch.testing.assert_close(_attention(CFG, w, s, "bf16", x), ref, rtol=1e-10, atol=1e-10,
                               msg=f"seed {gen.initial_seed()}")
    # with the INT4 KV cache both differ from float only by quantization error, and the scaling
    # (which tames the K outlier channels before the per-(token, head) INT4 scale) reduces it
    err_plain = (_attention(CFG, w, None, "w4a8kv4", x) - ref).norm() / ref.norm()
    err_scaled = (_attention(CFG, w, s, "w4a8kv4", x) - ref).norm() / ref.norm()
    # (measured over seeds: plain 0.28–0.42, scaled 0.15–0.19; the rest is mostly V's INT4 error)
    assert err_scaled < 0.25, f"seed {gen.initial_seed()}: {err_scaled}"
    assert err_scaled < 0.7 * err_plain, f"seed {gen.initial_seed()}: {err_scaled} vs {err_plain}"


def test_full_transform_leaves_float_layer_unchanged(gen):
    """Smoothing + pre-RoPE + post-RoPE (applied online as the runner does) keep the float64 layer."""
    w = layer_weights(gen)
    x = rand(gen, 2, 32, CFG.hidden_size)
    ref = fireq.layer_forward(x, w, CFG)
    stats = fireq.k_stats(x, w, CFG)
    wt, s = fireq.transform_layer(w, stats, CFG, fireq.FireQConfig(top_k=3))
    assert s is not None
    got = fireq.layer_forward(x, wt, CFG, k_post_scale=s)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9, msg=f"seed {gen.initial_seed()}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linears_match_references(gen, dtype):
    wf = rand(gen, 96, 192, scale=0.05, dtype=torch.float32)
    x = rand(gen, 7, 192, scale=2.0, dtype=dtype)
    lin = make_linear("w4a8kv4", wf, dtype)
    assert isinstance(lin, W4A8Linear) and lin.group_size == 64
    ref = w4a8_linear_ref(x, quantize_w4(wf))
    assert torch.equal(lin(x), ref)                                 # same numerics as the reference
    assert torch.equal(lin(x), ref)                                 # and again from the cached weight
    f8 = make_linear("fp8", wf, dtype)
    assert isinstance(f8, FP8Linear)
    assert torch.equal(f8(x), fp8_linear_ref(x, quantize_fp8_weight(wf)))
    # the packed tensors are the source of truth: rebuilding from them gives the same layer
    for m, p in ((lin, "w4a8kv4"), (f8, "fp8")):
        again = linear_from_tensors(p, quantized_tensors(m))
        assert torch.equal(again(x), m(x))
    # act_quant=False (ablation): float activations times the same dequantized weight
    nq = make_linear("w4a8kv4", wf, dtype, act_quant=False, pow2=False)
    assert nq.pow2_value == 1.0
    wd = nq.cached_weight()
    torch.testing.assert_close(nq(x).float(), (x.float() @ wd.t()).to(dtype).float())


def test_w4a8_linear_rows_pick_the_numerics_of_the_cuda_path(gen):
    """Up to W4_EXACT_MAX_ROWS rows the CPU forward keeps q·s exact (the Triton GEMM), above it each q·s is
    rounded to FP8 (the unpack + cuBLAS FP8 GEMM), and `kernels.tuned` switches at the same row count."""
    from kernels.tuned import gemm_config
    wf = rand(gen, 64, 256, scale=0.05, dtype=torch.float32)
    lin = make_linear("w4a8kv4", wf, torch.float32)
    w = quantize_w4(wf)
    for rows, fp8w in ((W4_EXACT_MAX_ROWS, False), (W4_EXACT_MAX_ROWS + 1, True)):
        x = rand(gen, rows, 256, scale=2.0, dtype=torch.float32)
        assert torch.equal(lin(x), w4a8_linear_ref(x, w, fp8_weights=fp8w))
        assert not torch.equal(lin(x), w4a8_linear_ref(x, w, fp8_weights=not fp8w))
        for N, K in ((6144, 4096), (28672, 4096), (4096, 14336)):     # every projection shape: no row split
            for epi in (0, 1):
                assert (gemm_config(rows, N, K, epi).path == "two_step") == fp8w


def test_gptq_keeps_the_format_and_beats_rtn_on_the_layer_output(gen):
    """GPTQ (opt-in, beyond FireQ) writes the same W4 format and lowers ‖XWᵀ − XŴᵀ‖ versus RTN."""
    from fineserve_core.quant.formats import dequantize_w4, search_pow2, unpack_int4
    K, N = 192, 80
    mix = rand(gen, K, K, scale=K ** -0.5, dtype=torch.float32) + torch.eye(K)
    x = rand(gen, 512, K, dtype=torch.float32) @ mix                   # correlated inputs, like activations
    w = rand(gen, N, K, scale=0.05, dtype=torch.float32)
    q = fireq.gptq_w4(w, x.double().t() @ x.double())
    assert q.group_size == 64 and q.scales.dtype == torch.float8_e4m3fn and q.qweight.dtype == torch.uint8
    assert q.pow2 == search_pow2(w) and int(unpack_int4(q.qweight).abs().max()) <= 8
    assert float(q.scales.float().min()) >= 2 ** -9
    rtn = quantize_w4(w)
    ref = x @ w.t()
    e_gptq = (x @ dequantize_w4(q).t() - ref).norm()
    e_rtn = (x @ dequantize_w4(rtn).t() - ref).norm()
    assert e_gptq < 0.9 * e_rtn, f"seed {gen.initial_seed()}: gptq {e_gptq} vs rtn {e_rtn}"


def test_w4_scale_rule_is_validated():
    assert fireq.FireQConfig(w4_scale="signed").w4_scale == "signed"
    with pytest.raises(ValueError, match="w4_scale must be one of"):
        fireq.FireQConfig(w4_scale="mse")
    with pytest.raises(ValueError, match="INT4 weights"):
        fireq.FireQConfig.for_precision("fp8", w4_scale="signed")


def test_ablation_ladder_rungs_add_one_technique_each():
    from fineserve_core.eval_ppl import LADDER, rung_settings
    seen = []
    for rung, _ in LADDER[2:]:
        precision, fq, rt, kv = rung_settings(rung)
        assert precision == "w4a8kv4"
        seen.append((rt.act_fp8, kv == "w4a8kv4" and rt.q_fp8, fq.pow2, fq.smoothing, fq.pre_rope, fq.post_rope,
                     fq.w4_scale == "signed", fq.gptq))
    for a, b in zip(seen, seen[1:]):                  # each rung switches exactly one more thing on
        assert sum(y and not x for x, y in zip(a, b)) == 1 and all(y for x, y in zip(a, b) if x)
    assert seen[0] == (False,) * 8 and seen[-1] == (True,) * 8
    assert rung_settings("bf16")[0] == "bf16" and rung_settings("fp8")[3] == "fp8"


def test_merge_ladders_orders_rows_and_refuses_mismatched_parts():
    import math
    from fineserve_core.eval_ppl import merge_ladders
    common = {"model": "m", "text": "t", "eval_text": "e", "max_tokens": 2048, "prefill_kv": "cache", "fireq": {"alpha": 8.0},
              "calibration": {"tokens": 8192}, "note": "n"}

    def row(rung, window, nll):
        return {"rung": rung, "window": window, "nll": nll, "ppl": math.exp(nll)}
    a = {**common, "command": "fineserve a", "rows": [row("+kv4", 1024, 3.5), row("bf16", 1024, 3.0)]}
    b = {**common, "command": "fineserve b", "rows": [row("w4-rtn", 1024, 3.25)]}
    m = merge_ladders([b, a])
    assert [r["rung"] for r in m["rows"]] == ["bf16", "w4-rtn", "+kv4"]
    assert [r["vs_bf16_pct"] for r in m["rows"]] == [0.0, round(100 * math.expm1(0.25), 2), round(100 * math.expm1(0.5), 2)]
    assert [p["command"] for p in m["parts"]] == ["fineserve b", "fineserve a"]
    with pytest.raises(ValueError, match="max_tokens"):
        merge_ladders([a, {**b, "max_tokens": 4096}])
    with pytest.raises(ValueError, match="overlap"):
        merge_ladders([a, {**common, "rows": [row("bf16", 1024, 3.1)]}])
