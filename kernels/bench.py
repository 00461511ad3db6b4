"""H100 benchmark of every kernel against its baseline, in one run: `python -m kernels.bench` or
`fineserve bench-kernels`. Writes JSON (device, versions, date, command, ceilings, median µs, TB/s,
TF/s) to --out (default load_tests/results/kernels-h100.json) and prints a short table last.

Timing: each measured callable is captured R times in one CUDA graph (launch gaps out, as the engine's
decode graphs), rotating over enough input copies that the bytes touched per replay exceed the 50 MB
L2 twice; the graph is replayed N times with CUDA events; the figure is the median replay / R. Inputs
are random (never zeros). Baselines run in the same process, same graph method.

Sections: ceilings, gemm (cuBLAS bf16, torch._scaled_mm FP8, ours at M ∈ {1..16384}, Llama-2-7B and
Llama-3-8B projections), ffn, attn_prefill (SDPA bf16 vs ours FP8/bf16), attn_decode (SDPA bf16
contiguous vs ours INT4/FP8/bf16 paged), misc (quant, RMSNorm+quant, SiLU·mul+quant, KV write).
--sweep additionally times candidate configs per regime and reports the fastest (what `kernels.tuned`
commits); --select makes the run dispatch by its own sweep winners.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import replace

import torch
import torch.nn.functional as F

L2_BYTES = 50 * 2 ** 20
MODELS = {
    "llama-2-7b": dict(hidden=4096, inter=11008, heads=32, kv_heads=32, head_dim=128),
    "llama-3-8b": dict(hidden=4096, inter=14336, heads=32, kv_heads=8, head_dim=128),
}
GEMM_M = [1, 16, 64, 256, 1024, 4096, 16384]
CEIL = {"copy_TBps": 3.0, "bf16_TFps": 722.0, "fp8_TFps": 1281.0}      # DESIGN.md, replaced by this run's
PREFILL_B = 16
MISC = dict(M=16384, H=4096, inter=14336, kv_tokens=16 * 1024, kv_heads=8, head_dim=128)
DEV = "cuda"          # --smoke: "cpu" (interpreter, tiny shapes, one untimed call each: checks the plumbing)


def _log(*a):
    print(*a, flush=True)


def proj_shapes(cfg, with_gate: bool = False):
    """The runner's fused projections [N, K]; with_gate adds the unfused gate (DESIGN.md's 11008×4096
    reference shape for the M=16 target). Only the fused ones enter the per-layer sums."""
    h, d = cfg["hidden"], cfg["head_dim"]
    out = {"qkv": ((cfg["heads"] + 2 * cfg["kv_heads"]) * d, h), "o": (h, cfg["heads"] * d),
           "gate_up": (2 * cfg["inter"], h), "down": (h, cfg["inter"])}
    if with_gate:
        out["gate"] = (cfg["inter"], h)
    return out


# ------------------------------------------------------------------------------------------- timing

def time_fn(fns, est_us: float | None = None, replays: int = 10, min_graph_us: float = 2000.0) -> dict:
    """Median µs per call of the callables (rotated) through a CUDA graph; plain events if capture fails."""
    if callable(fns):
        fns = [fns]
    if DEV == "cpu":
        t0 = time.perf_counter()
        for f in fns:
            f()
        us = (time.perf_counter() - t0) * 1e6 / len(fns)
        return {"us": us, "us_min": us, "us_max": us, "reps": 1, "mode": "cpu-smoke"}
    for f in fns:                       # compile / warm up
        f()
    torch.cuda.synchronize()
    if est_us is None:
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for i in range(3):
            fns[i % len(fns)]()
        e1.record()
        e1.synchronize()
        est_us = max(1.0, e0.elapsed_time(e1) * 1e3 / 3)
    reps = int(max(len(fns), min(400, math.ceil(min_graph_us / est_us))))
    reps = int(math.ceil(reps / len(fns)) * len(fns))
    mode = "graph"
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(reps):
                fns[i % len(fns)]()
        run = g.replay
    except Exception as e:  # noqa: BLE001
        mode = f"events ({type(e).__name__})"
        torch.cuda.synchronize()

        def run():
            for i in range(reps):
                fns[i % len(fns)]()
    run()
    torch.cuda.synchronize()
    ts = []
    for _ in range(replays):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        run()
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1) * 1e3 / reps)
    ts.sort()
    return {"us": statistics.median(ts), "us_min": ts[0], "us_max": ts[-1], "reps": reps, "mode": mode}


def copies_for(nbytes: int, cap: int = 8) -> int:
    return int(max(1, min(cap, math.ceil(2 * L2_BYTES / max(1, nbytes)))))


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------- inputs

def rand_w4(N, K, dev, g=128):
    from fineserve_core.quant.formats import W4Weight
    q = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=dev)
    s = (torch.rand(N, K // g, device=dev) * 0.05 + 0.005).to(torch.float8_e4m3fn)
    return W4Weight(q, s, g, 16.0)


def rand_fp8(*shape, dev, scale=1.0):
    return (torch.randn(*shape, device=dev) * scale).clamp(-448, 448).to(torch.float8_e4m3fn)


# ------------------------------------------------------------------------------------------- sections

def sec_ceilings(res):
    dev = DEV
    n = 256 * 2 ** 20                                    # 1 GiB of bf16... 512 MiB here
    a = torch.randn(n, device=dev, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    t = time_fn(lambda: b.copy_(a), replays=10)
    copy = 2 * a.numel() * 2 / (t["us"] * 1e-6) / 1e12
    x = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    t2 = time_fn(lambda: x @ y, replays=10)
    bf = 2 * 8192 ** 3 / (t2["us"] * 1e-6) / 1e12
    x8, y8 = x.to(torch.float8_e4m3fn), y.to(torch.float8_e4m3fn)
    one = torch.ones((), device=dev)
    t3 = time_fn(lambda: torch._scaled_mm(x8, y8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                 replays=10)
    f8 = 2 * 8192 ** 3 / (t3["us"] * 1e-6) / 1e12
    res["ceilings"] = {"copy_TBps": copy, "bf16_TFps": bf, "fp8_TFps": f8, "design_md": dict(CEIL)}
    CEIL.update(copy_TBps=copy, bf16_TFps=bf, fp8_TFps=f8)
    _log(f"ceilings: copy {copy:.2f} TB/s, bf16 {bf:.0f} TF/s, fp8 {f8:.0f} TF/s")
    del a, b, x, y, x8, y8


def unpack_twins(M: int, epi: int):
    """The committed table's tile for M with the other INT4→FP8 unpacks (f16x2, subnormal codes)
    and FP32 promotion per wgmma k-step or per group (kernels/NOTES.md, sessions 11-12)."""
    from kernels.tuned import gemm_config
    # every split the table gives this M (plain, wide-N and long-K shapes), so each shape meets its own tile
    bases = {gemm_config(M, n, k, epi) for n, k in ((4096, 4096), (16384, 4096), (4096, 8192))}
    return [replace(c, asm=m, acc_k=a) for c in sorted(bases, key=lambda c: c.SPLIT_K)
            if c.path == "triton" and not c.f16 for m, a in ((1, 32), (2, 32), (1, 0), (2, 0))
            if (m, a) != (int(c.asm), c.acc_k)]


def gemm_candidates(M: int, epi: int):
    return _gemm_candidates(M, epi) + unpack_twins(M, epi)


def _gemm_candidates(M: int, epi: int):
    from kernels.gemm_w4a8 import GemmConfig as C
    if M <= 64:
        bm = 16 if M <= 16 else 64
        # FP16 MMA on q·s (scale folded): no per-group rescale of the accumulator; GPI groups per iteration
        fold = [C(BM=b, BN=bn, SPLIT_K=sk, SWAP_AB=True, asm=True, f16=True, GPI=gpi)
                for b in ({bm, 32} if 16 < M <= 32 else {bm}) for bn in (64, 128) for sk in (2, 4, 8) for gpi in (1, 2, 4)]
        if epi == 2:
            out = [C(BM=bm, BN=64, SPLIT_K=sk, SWAP_AB=True, asm=True) for sk in (2, 4, 8)]
            out += [C(BM=bm, BN=32, SPLIT_K=sk, SWAP_AB=True, asm=True) for sk in (4, 8)]
            return out + [c for c in fold if c.BN == 64]
        if bm == 16:
            out = [C(BM=16, BN=bn, SPLIT_K=sk, SWAP_AB=True, asm=True) for bn in (32, 64, 128) for sk in (4, 8, 16)]
            out += [C(BM=16, BN=64, SPLIT_K=sk, SWAP_AB=True, asm=True, GPI=2) for sk in (4, 8)]
            return out + fold
        out = [C(BM=64, BN=bn, SPLIT_K=sk, SWAP_AB=True, asm=True) for bn in (64, 128) for sk in (2, 4, 8)]
        out += [C(BM=64, BN=64, SPLIT_K=sk, SWAP_AB=True, asm=True, num_stages=3, GPI=gpi) for sk in (2, 4)
                for gpi in (1, 2)]
        out += [C(BM=32, BN=64, SPLIT_K=sk, SWAP_AB=True, asm=True) for sk in (4, 8)]
        # ncu (kernels/NOTES.md): 138 registers cap the M = 64 tile at 3 CTAs per SM, and down (K = 14336)
        # at split 4 launches 0.65 waves — more split, 32-row tiles, fewer stages (none won)
        out += [C(BM=bm_, BN=64, SPLIT_K=sk, SWAP_AB=True, asm=True, num_stages=ns, GPI=2)
                for bm_, sk, ns in ((64, 8, 3), (64, 4, 2), (64, 8, 2), (32, 4, 3), (32, 8, 3))]
        return out + fold + [replace(c, num_stages=3) for c in fold if c.GPI == 1]
    if M <= 1024:
        # steps carrying short prompts: 64/128-token tiles on either side of the wgmma, split 1-2
        tiles = [C(BM=bm, BN=bn, SPLIT_K=sk, SWAP_AB=swap, num_warps=w, num_stages=3, asm=True)
                 for swap in (True, False) for bm in (64, 128) for bn in ((64, 128) if swap else (64, 128, 256))
                 for sk in (1, 2) for w in (4, 8)]
        return [C("two_step")] + tiles
    return [C("two_step"), C(BM=128, BN=128, SWAP_AB=True, num_warps=8, num_stages=3, asm=True)]


def _select(sweep: list[dict], M: int):
    """The candidate with the least geometric-mean slowdown vs each shape's fastest, at this M."""
    rows = [r for r in sweep if r["M"] == M and r.get("ok", True)]
    shapes = {(r["N"], r["K"]) for r in rows}
    best = {sh: min(r["us"] for r in rows if (r["N"], r["K"]) == sh) for sh in shapes}
    score: dict[str, list[float]] = {}
    for r in rows:
        score.setdefault(r["cfg"], []).append(math.log(r["us"] / best[(r["N"], r["K"])]))
    full = {k: sum(v) / len(v) for k, v in score.items() if len(v) == len(shapes)}
    if not full:
        return None, None
    k = min(full, key=full.get)
    return k, math.exp(full[k])


def sec_gemm(res, args):
    from fineserve_core.quant.formats import _to_fp8, dequantize_w4_unscaled
    from kernels.fp8_quant import quant_fp8
    from kernels.gemm_w4a8 import GemmConfig, _scaled_mm_rowwise, w4a8_gemm_fp8
    from kernels.tuned import gemm_config
    dev = DEV
    rows = res.setdefault("gemm", [])
    sweep = res.setdefault("gemm_sweep", [])
    ms = args.gemm_m
    shapes = []
    for model in args.models:
        for pname, (N, K) in proj_shapes(MODELS[model], with_gate=model == "llama-2-7b").items():
            shapes.append((model, pname, N, K))
    selected = res.setdefault("gemm_selected", {})

    def weights(N, K):
        wb = N * K // 2 + N * K // 128
        return [rand_w4(N, K, dev) for _ in range(copies_for(wb))]

    # phase A: sweep candidates on the sweep model's projections
    if args.sweep:
        swept = set()
        for model, pname, N, K in shapes:
            if model != args.sweep_model or (N, K) in swept:
                continue
            swept.add((N, K))
            W4 = weights(N, K)
            for M in ms:
                x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
                x8, xs = quant_fp8(x, group=128)
                yref = w4a8_gemm_fp8(x8, xs, W4[0], config=GemmConfig(BM=16 if M <= 16 else 64, BN=64)).float()
                for cfg in gemm_candidates(M, 0):
                    try:
                        err = rel(w4a8_gemm_fp8(x8, xs, W4[0], config=cfg).float(), yref)
                        tt = time_fn([lambda w=w, c=cfg: w4a8_gemm_fp8(x8, xs, w, config=c) for w in W4])["us"]
                    except Exception as e:  # noqa: BLE001
                        _log(f"  cand {cfg.key()} failed: {type(e).__name__}: {str(e)[:300]}")
                        continue
                    ok = err < (1e-1 if cfg.path == "two_step" else 1e-2)
                    sweep.append({"N": N, "K": K, "M": M, "cfg": cfg.key(), "us": tt, "relerr": err, "ok": ok})
                    if not ok:
                        _log(f"  cand {cfg.key()} WRONG: relerr {err:.2e}")
                rs = sorted((r for r in sweep if r["M"] == M and r["N"] == N and r["K"] == K and r["ok"]),
                            key=lambda r: r["us"])
                _log(f"sweep {pname:7s} N={N:5d} K={K:5d} M={M:5d}: " +
                     "  ".join(f"{r['cfg']} {r['us']:.1f}" for r in rs[:3]))
                del x, x8
            del W4
            torch.cuda.empty_cache()
        for M in ms:
            k, slow = _select(sweep, M)
            if k:
                selected[str(M)] = {"cfg": k, "geomean_vs_best": slow}
                _log(f"selected M={M}: {k} (geomean x{slow:.3f} of per-shape best)")
        _flush(res, args)

    # phase B: baselines and ours, all shapes
    seen = set()
    for model, pname, N, K in shapes:
        if (N, K) in seen:
            continue
        seen.add((N, K))
        W4 = weights(N, K)
        Wb = [torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies_for(N * K * 2))]
        W8 = [rand_fp8(N, K, dev=dev) for _ in range(copies_for(N * K))]
        wsc = torch.rand(1, N, device=dev) * 0.01 + 0.001
        for M in ms:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            x8, xs = quant_fp8(x, group=128)
            x8n, xsn = quant_fp8(x)
            xsn2 = xsn.view(M, 1)
            flops = 2 * M * N * K
            r = {"model": model, "proj": pname, "M": M, "N": N, "K": K}
            r["bf16_us"] = time_fn([lambda w=w: F.linear(x, w) for w in Wb])["us"]
            r["fp8_us"] = time_fn([lambda w=w: _scaled_mm_rowwise(x8n, xsn2, w, wsc, torch.bfloat16)
                                   for w in W8])["us"]
            if args.select and str(M) in selected:
                cfg = parse_cfg(selected[str(M)]["cfg"])
            else:
                cfg = gemm_config(M, N, K, 0)
            r["ours_us"], r["ours_cfg"] = time_fn([lambda w=w: w4a8_gemm_fp8(x8, xs, w, config=cfg) for w in W4])["us"], cfg.key()
            if M in (16, 4096):          # correctness at this shape: the same FP8 math in float32 torch
                w = W4[0]
                y = w4a8_gemm_fp8(x8, xs, w, config=cfg).float()
                wd = dequantize_w4_unscaled(w)
                if cfg.path == "two_step":
                    wd = _to_fp8(wd).float()
                ref = (x8n.float() @ wd.t()) * xsn2 / w.pow2
                r["relerr"] = rel(y, ref)
                del wd, ref, y
            wb = N * K // 2 + N * K // 128
            r["ours_TBps"] = (wb + M * K + M * N * 2) / (r["ours_us"] * 1e-6) / 1e12
            r["bf16_TBps"] = (N * K * 2 + M * K * 2 + M * N * 2) / (r["bf16_us"] * 1e-6) / 1e12
            for kk in ("ours", "bf16", "fp8"):
                r[f"{kk}_TFps"] = flops / (r[f"{kk}_us"] * 1e-6) / 1e12
            r["x_bf16"] = r["bf16_us"] / r["ours_us"]
            r["x_fp8"] = r["fp8_us"] / r["ours_us"]
            rows.append(r)
            _log(f"gemm {model:10s} {pname:7s} M={M:5d} N={N:5d} K={K:5d}: bf16 {r['bf16_us']:8.1f}  "
                 f"fp8 {r['fp8_us']:8.1f}  ours {r['ours_us']:8.1f} ({r['ours_cfg']}) x{r['x_bf16']:.2f} bf16"
                 + (f"  err {r['relerr']:.1e}" if 'relerr' in r else ""))
            del x, x8, x8n
        del W4, Wb, W8
        torch.cuda.empty_cache()
        _flush(res, args)


def sec_ffn(res, args):
    from kernels.ffn import w4a8_ffn
    from kernels.fp8_quant import quant_fp8
    from kernels.gemm_w4a8 import w4a8_gate_up_silu
    dev = DEV
    rows = res.setdefault("ffn", [])
    sweep = res.setdefault("gate_up_sweep", [])
    for model in args.models:
        cfgm = MODELS[model]
        H, inter = cfgm["hidden"], cfgm["inter"]
        ngu = copies_for(3 * inter * H // 2)
        Wgu = [rand_w4(2 * inter, H, dev) for _ in range(ngu)]
        Wd = [rand_w4(H, inter, dev) for _ in range(ngu)]
        Bgu = torch.randn(2 * inter, H, device=dev, dtype=torch.bfloat16) * 0.02
        Bd = torch.randn(H, inter, device=dev, dtype=torch.bfloat16) * 0.02
        for M in args.ffn_m:
            x = torch.randn(M, H, device=dev, dtype=torch.bfloat16)
            res_ = torch.randn(M, H, device=dev, dtype=torch.bfloat16)

            def torch_ffn():
                gu = F.linear(x, Bgu)
                g, u = gu.chunk(2, dim=-1)
                return F.linear(F.silu(g) * u, Bd) + res_
            r = {"model": model, "M": M, "hidden": H, "inter": inter}
            r["bf16_us"] = time_fn(torch_ffn)["us"]
            gu_cfg = None
            if args.sweep and M <= 64:
                x8, xs = quant_fp8(x, group=128)
                best = None
                from kernels.gemm_w4a8 import GemmConfig
                href = w4a8_gate_up_silu(x8, xs, Wgu[0], config=GemmConfig(BM=16 if M <= 16 else 64, BN=64)).float()
                for cfg in gemm_candidates(M, 2):
                    try:
                        err = rel(w4a8_gate_up_silu(x8, xs, Wgu[0], config=cfg).float(), href)
                        tt = time_fn([lambda w=w, c=cfg: w4a8_gate_up_silu(x8, xs, w, config=c) for w in Wgu])["us"]
                    except Exception as e:  # noqa: BLE001
                        _log(f"  gate_up cand {cfg.key()} failed: {type(e).__name__}: {str(e)[:300]}")
                        continue
                    sweep.append({"model": model, "M": M, "cfg": cfg.key(), "us": tt, "relerr": err})
                    if not err < 1e-2:
                        _log(f"  gate_up cand {cfg.key()} WRONG: relerr {err:.2e}")
                        continue
                    if best is None or tt < best[1]:
                        best = (cfg, tt)
                r["gate_up_best"] = best[0].key()
                if args.select:
                    gu_cfg = best[0]
            down_cfg = None
            if args.select and str(M) in res.get("gemm_selected", {}):
                down_cfg = parse_cfg(res["gemm_selected"][str(M)]["cfg"])
            t = time_fn([lambda a=a, b=b: w4a8_ffn(x, a, b, residual=res_, gate_up_config=gu_cfg,
                                                   down_config=down_cfg) for a, b in zip(Wgu, Wd)])
            r["ours_us"] = t["us"]
            r["x_bf16"] = r["bf16_us"] / r["ours_us"]
            fl = 3 * 2 * M * H * inter
            r["ours_TFps"] = fl / (r["ours_us"] * 1e-6) / 1e12
            r["bf16_TFps"] = fl / (r["bf16_us"] * 1e-6) / 1e12
            rows.append(r)
            _log(f"ffn  {model:10s} M={M:5d}: torch bf16 {r['bf16_us']:8.1f}  ours {r['ours_us']:8.1f}  x{r['x_bf16']:.2f}")
        del Wgu, Wd, Bgu, Bd
        torch.cuda.empty_cache()
        _flush(res, args)


def parse_cfg(key: str):
    from kernels.gemm_w4a8 import GemmConfig
    if key == "two_step":
        return GemmConfig("two_step")
    p = key.split("_")
    return GemmConfig("triton", BM=int(p[1][2:]), BN=int(p[2][2:]), SPLIT_K=int(p[3][2:]), SWAP_AB=p[4] == "swap",
                      num_warps=int(p[5][1:]), num_stages=int(p[6][1:]),
                      asm=2 if "sub" in p[7:] else int("asm" in p[7:]),
                      acc_k=next((int(t[3:]) for t in p[7:] if t.startswith("acc")), 32), f16="f16" in p[7:],
                      GPI=next((int(t[3:]) for t in p[7:] if t.startswith("gpi")), 1))


def sec_attn_prefill(res, args):
    from kernels.attn_prefill import (
        prefill_attention, prefill_attention_ref, quant_qk_fp8, quant_v_fp8_t, v_from_store, v_layout,
    )
    dev = DEV
    rows = res.setdefault("attn_prefill", [])
    cfgm = MODELS["llama-3-8b"]
    HQ, HKV, D = cfgm["heads"], cfgm["kv_heads"], cfgm["head_dim"]
    B = PREFILL_B
    cands = [dict(BM=128, BN=64, num_warps=8, num_stages=3), dict(BM=128, BN=128, num_warps=8, num_stages=3),
             dict(BM=128, BN=128, num_warps=8, num_stages=2), dict(BM=64, BN=128, num_warps=4, num_stages=2),
             dict(BM=64, BN=64, num_warps=4, num_stages=3)]
    best_cfg = cands[2]         # the kernel's default tile
    for S in args.prefill_s:
        T = B * S
        q = torch.randn(B, S, HQ, D, device=dev, dtype=torch.bfloat16)
        k = torch.randn(B, S, HKV, D, device=dev, dtype=torch.bfloat16)
        v = torch.randn(B, S, HKV, D, device=dev, dtype=torch.bfloat16)
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        flops = 4 * B * HQ * S * S * D / 2
        r = {"B": B, "S": S, "Hq": HQ, "Hkv": HKV, "D": D}
        try:
            r["sdpa_gqa_us"] = time_fn(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True,
                                                                             enable_gqa=True))["us"]
        except Exception as e:  # noqa: BLE001
            r["sdpa_gqa_err"] = str(e)[:200]
        ke = kt.repeat_interleave(HQ // HKV, 1).contiguous()
        ve = vt.repeat_interleave(HQ // HKV, 1).contiguous()
        qc = qt.contiguous()
        r["sdpa_expanded_us"] = time_fn(lambda: F.scaled_dot_product_attention(qc, ke, ve, is_causal=True))["us"]
        del ke, ve, qc
        r["sdpa_us"] = min(r.get("sdpa_gqa_us", 1e30), r["sdpa_expanded_us"])
        qf, kf, vf = q.view(T, HQ, D), k.view(T, HKV, D), v.view(T, HKV, D)
        cu = torch.arange(0, T + 1, S, device=dev, dtype=torch.int32)
        starts, t_pad = v_layout([S] * B)
        vst = torch.tensor(starts, dtype=torch.int32, device=dev)
        tq = time_fn(lambda: (quant_qk_fp8(qf), quant_qk_fp8(kf), quant_v_fp8_t(vf, cu, vst, t_pad, S)))
        r["quant_qkv_us"] = tq["us"]
        r["quant_qkv_bytes"] = T * (HQ + 2 * HKV) * D * 3
        q8, qs = quant_qk_fp8(qf)
        k8, ks = quant_qk_fp8(kf)
        ks = ks.t().contiguous().t()          # [T, Hkv] view of [Hkv, T] storage: contiguous per head
        v8, vs = quant_v_fp8_t(vf, cu, vst, t_pad, S)
        if args.sweep:
            best = None
            for c in cands:
                try:
                    tt = time_fn(lambda c=c: prefill_attention(q8, k8, v8, cu, S, q_scale=qs, k_scale=ks, v_scale=vs,
                                                               v_starts=vst, **c))["us"]
                except Exception as e:  # noqa: BLE001
                    _log(f"  prefill cand {c} failed: {type(e).__name__}: {str(e)[:300]}")
                    continue
                r.setdefault("sweep", []).append({**c, "us": tt})
                if best is None or tt < best[1]:
                    best = (c, tt)
            if best:
                best_cfg = best[0]
        r["cfg"] = best_cfg
        r["fp8_us"] = time_fn(lambda: prefill_attention(q8, k8, v8, cu, S, q_scale=qs, k_scale=ks, v_scale=vs,
                                                        v_starts=vst, **best_cfg))["us"]
        try:
            r["bf16_us"] = time_fn(lambda: prefill_attention(qf, kf, vf, cu, S, **best_cfg))["us"]
        except Exception as e:  # noqa: BLE001
            r["bf16_err"] = str(e)[:300]
        for key in ("sdpa", "fp8", "bf16"):
            if f"{key}_us" in r:
                r[f"{key}_TFps"] = flops / (r[f"{key}_us"] * 1e-6) / 1e12
        r["x_sdpa_fp8"] = r["sdpa_us"] / r["fp8_us"]
        if S == args.prefill_s[0]:        # correctness on 2 sequences against float64 (dequantized inputs)
            n2 = 2 * S
            o = prefill_attention(q8[:n2], k8[:n2], v8, cu[:3], S, q_scale=qs[:n2], k_scale=ks[:n2],
                                  v_scale=vs, v_starts=vst[:2], **best_cfg)
            G = HQ // HKV                 # query heads 0..G-1 read KV head 0
            vlog = v_from_store(v8, cu[:3].tolist(), starts[:2])
            ref = prefill_attention_ref(q8[:n2, :G], k8[:n2, :1], vlog[:, :1], cu[:3].cpu(), q_scale=qs[:n2, :G],
                                        k_scale=ks[:n2, :1], v_scale=vs[:1], out_dtype=torch.float64)
            r["relerr_fp8_vs_f64"] = rel(o[:, :G].float().cpu(), ref.cpu())
            sd = F.scaled_dot_product_attention(qt[:2], kt[:2], vt[:2], is_causal=True, enable_gqa=True)
            r["relerr_fp8_vs_sdpa_bf16"] = rel(o.float().view(2, S, HQ, D).transpose(1, 2), sd.float())
        rows.append(r)
        _log(f"prefill S={S}: sdpa bf16 {r['sdpa_us']:9.1f} ({r['sdpa_TFps']:.0f} TF/s)  ours fp8 {r['fp8_us']:9.1f} "
             f"({r['fp8_TFps']:.0f} TF/s) x{r['x_sdpa_fp8']:.2f}  ours bf16 {r.get('bf16_us', float('nan')):9.1f}  "
             f"quant {r['quant_qkv_us']:.1f}  cfg {best_cfg}")
        del q, k, v, qt, kt, vt, q8, k8, v8
        torch.cuda.empty_cache()
        _flush(res, args)


def _paged_cache(precision, B, ctx, HKV, D, dev, gen):
    from fineserve_core.kv_format import KVFormat
    fmt = KVFormat.for_model(precision, HKV, D, torch.bfloat16)
    T = fmt.tokens_per_block
    nblk = B * math.ceil(ctx / T)
    region = torch.randint(0, 256, (2, nblk * fmt.block_bytes), dtype=torch.uint8, device=dev, generator=gen)
    kc, vc = fmt.views(region[0]), fmt.views(region[1])
    for data, scale in (kc, vc):
        if precision == "w4a8kv4":
            scale.copy_((torch.rand(scale.shape, device=dev, generator=gen) * 0.2 + 0.02).to(torch.float8_e4m3fn))
        elif precision == "fp8":
            data.copy_(torch.randn(data.shape, device=dev, generator=gen).to(torch.float8_e4m3fn))
        else:
            data.copy_(torch.randn(data.shape, device=dev, generator=gen).to(data.dtype))
    bt = torch.randperm(nblk, device=dev, generator=gen).view(B, -1).int()
    return fmt, region, kc, vc, bt


def sec_attn_decode(res, args):
    from fineserve_core.quant.formats import quantize_q_fp8
    from kernels.attn_decode import default_splits, paged_decode_attention, paged_decode_attention_ref
    dev = DEV
    gen = torch.Generator(device=dev).manual_seed(1234)
    rows = res.setdefault("attn_decode", [])
    cfgm = MODELS["llama-3-8b"]
    HQ, HKV, D = cfgm["heads"], cfgm["kv_heads"], cfgm["head_dim"]
    for ctx in args.decode_ctx:
        for B in args.decode_b:
            r = {"B": B, "ctx": ctx, "Hq": HQ, "Hkv": HKV, "D": D}
            q = torch.randn(B, HQ, 1, D, device=dev, dtype=torch.bfloat16)
            k = torch.randn(B, HKV, ctx, D, device=dev, dtype=torch.bfloat16)
            v = torch.randn(B, HKV, ctx, D, device=dev, dtype=torch.bfloat16)
            nc = copies_for(k.numel() * 4, cap=4)
            ks_ = [k] + [torch.randn_like(k) for _ in range(nc - 1)]
            vs_ = [v] + [torch.randn_like(v) for _ in range(nc - 1)]
            r["sdpa_us"] = time_fn([lambda a=a, b=b: F.scaled_dot_product_attention(q, a, b, enable_gqa=True)
                                    for a, b in zip(ks_, vs_)])["us"]
            bytes_bf16 = 2 * B * HKV * ctx * D * 2
            r["sdpa_TBps"] = bytes_bf16 / (r["sdpa_us"] * 1e-6) / 1e12
            del ks_, vs_, k, v
            q2 = q.view(B, HQ, D)
            q8, qs = quantize_q_fp8(q2)
            qs = qs.view(B, HQ)
            lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
            precs = ["w4a8kv4"] + (["fp8", "bf16"] if (B, ctx) in ((64, 4096),) else [])
            for prec in precs:
                fmt, region, kc, vc, bt = _paged_cache(prec, B, ctx, HKV, D, dev, gen)
                nb = copies_for(region.numel(), cap=4)
                regs = [(kc, vc, bt)]
                for _ in range(nb - 1):
                    f2, rg2, kc2, vc2, bt2 = _paged_cache(prec, B, ctx, HKV, D, dev, gen)
                    regs.append((kc2, vc2, bt2))
                qq, qsc = (q8, qs) if prec != "bf16" else (q2, None)
                splits0 = default_splits(B, HKV, bt.shape[1])
                cands = [dict(num_warps=4, num_stages=2, splits=splits0)]
                if args.sweep and prec == "w4a8kv4":
                    cands += [dict(num_warps=4, num_stages=2, splits=splits0, asm=False),
                              dict(num_warps=4, num_stages=3, splits=splits0),
                              dict(num_warps=4, num_stages=4, splits=splits0),
                              dict(num_warps=8, num_stages=3, splits=splits0),
                              dict(num_warps=4, num_stages=3, splits=splits0 * 2)]
                best = None
                for c in cands:
                    try:
                        tt = time_fn([lambda a=a, b=b, t=t, c=c: paged_decode_attention(qq, a, b, t, lens, prec,
                                                                                     q_scale=qsc, **c)
                                      for a, b, t in regs])["us"]
                    except Exception as e:  # noqa: BLE001
                        _log(f"  decode cand {c} failed: {type(e).__name__}: {str(e)[:300]}")
                        continue
                    r.setdefault(f"{prec}_sweep", []).append({**c, "us": tt})
                    if best is None or tt < best[1]:
                        best = (c, tt)
                if best is None:
                    raise RuntimeError(f"every decode candidate failed for {prec}")
                bpt = fmt.block_bytes * 2 // fmt.tokens_per_block          # K+V bytes per token (all heads)
                nbytes = B * ctx * bpt
                r[f"{prec}_us"] = best[1]
                r[f"{prec}_cfg"] = best[0]
                r[f"{prec}_TBps"] = nbytes / (best[1] * 1e-6) / 1e12
                r[f"{prec}_x_sdpa"] = r["sdpa_us"] / best[1]
                if B == args.decode_b[0] and ctx == args.decode_ctx[0] or (B, ctx) == (64, 4096):
                    o = paged_decode_attention(qq, kc, vc, bt, lens, prec, q_scale=qsc, **best[0])
                    nchk = min(B, 2)
                    ref = paged_decode_attention_ref(qq[:nchk], kc, vc, bt[:nchk], lens[:nchk], prec,
                                                     q_scale=qsc[:nchk] if qsc is not None else None,
                                                     out_dtype=torch.float64)
                    r[f"{prec}_relerr"] = rel(o[:nchk].float().cpu(), ref.cpu())
                del regs, region, kc, vc, bt
                torch.cuda.empty_cache()
            rows.append(r)
            _log(f"decode B={B:3d} ctx={ctx:6d}: sdpa bf16 {r['sdpa_us']:8.1f} ({r['sdpa_TBps']:.2f} TB/s)  int4 paged "
                 f"{r['w4a8kv4_us']:8.1f} ({r['w4a8kv4_TBps']:.2f} TB/s) x{r['w4a8kv4_x_sdpa']:.2f}  "
                 f"cfg {r['w4a8kv4_cfg']}" + (f"  fp8 {r['fp8_us']:.1f} bf16 {r['bf16_us']:.1f}" if 'fp8_us' in r else ""))
            _flush(res, args)


def sec_misc(res, args):
    from fineserve_core.kv_format import KVFormat
    from kernels.fp8_quant import quant_fp8, rmsnorm_quant_fp8, silu_mul_quant_fp8
    from kernels.kv_store import kv_write
    dev = DEV
    rows = res.setdefault("misc", [])
    M, H, inter = MISC["M"], MISC["H"], MISC["inter"]
    x = torch.randn(M, H, device=dev, dtype=torch.bfloat16)
    r0 = torch.randn(M, H, device=dev, dtype=torch.bfloat16)
    w = torch.randn(H, device=dev, dtype=torch.bfloat16)
    gu = torch.randn(M, 2 * inter, device=dev, dtype=torch.bfloat16)

    def add(name, t, nbytes):
        rows.append({"name": name, "us": t["us"], "TBps": nbytes / (t["us"] * 1e-6) / 1e12})
        _log(f"misc {name:28s} {t['us']:9.1f} us  {rows[-1]['TBps']:.2f} TB/s")
    add(f"quant_fp8 {M}x{H}", time_fn(lambda: quant_fp8(x, group=128)), M * H * 3 + M * 4)
    add(f"rmsnorm+res+quant {M}x{H}", time_fn(lambda: rmsnorm_quant_fp8(x, w, 1e-5, residual=r0, group=128)),
        M * H * (2 + 2 + 2 + 1) + M * 4)

    def torch_rms():
        y = x + r0
        yf = y.float()
        return w * (yf * torch.rsqrt(yf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    add("torch rmsnorm+res (bf16 out)", time_fn(torch_rms), M * H * 8)
    add(f"silu_mul_quant {M}x{inter}", time_fn(lambda: silu_mul_quant_fp8(gu, group=128)), M * inter * 5 + M * 4)
    add("torch silu*mul (bf16 out)", time_fn(lambda: F.silu(gu[:, :inter]) * gu[:, inter:]), M * inter * 6)
    del x, r0, gu
    HKV, D = MISC["kv_heads"], MISC["head_dim"]
    n = MISC["kv_tokens"]
    fmt = KVFormat.for_model("w4a8kv4", HKV, D, torch.bfloat16)
    nblk = n // fmt.tokens_per_block
    region = torch.zeros((2, nblk * fmt.block_bytes), dtype=torch.uint8, device=dev)
    k = torch.randn(n, HKV, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(n, HKV, D, device=dev, dtype=torch.bfloat16)
    slots = torch.randperm(n, device=dev)
    kc, vc = fmt.views(region[0]), fmt.views(region[1])
    add(f"kv_write int4 {n} tok x {HKV} heads", time_fn(lambda: kv_write(k, v, slots, kc, vc, "w4a8kv4")),
        2 * n * HKV * (D * 2 + D // 2 + 1))
    for prec in ("fp8", "bf16"):
        fmt2 = KVFormat.for_model(prec, HKV, D, torch.bfloat16)
        nb2 = n // fmt2.tokens_per_block
        reg2 = torch.zeros((2, nb2 * fmt2.block_bytes), dtype=torch.uint8, device=dev)
        a, b = fmt2.views(reg2[0]), fmt2.views(reg2[1])
        add(f"kv_write {prec} {n} tok x {HKV} heads", time_fn(lambda a=a, b=b, p=prec: kv_write(k, v, slots, a, b, p)),
            2 * n * HKV * D * (2 + (1 if prec == "fp8" else 2)))
    _flush(res, args)


# ------------------------------------------------------------------------------------------- driver

def _flush(res, args):
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1, default=str)


def summary(res) -> str:
    lines = ["", "=== summary (median us; ratios = baseline / ours) ==="]
    c = res.get("ceilings")
    if c:
        lines.append(f"ceilings: copy {c['copy_TBps']:.2f} TB/s  bf16 {c['bf16_TFps']:.0f} TF/s  fp8 {c['fp8_TFps']:.0f} TF/s")
    g = res.get("gemm", [])
    for model in MODELS:
        for M in GEMM_M:
            rs = [r for r in g if r["model"] == model and r["M"] == M and r["proj"] != "gate"]
            if not rs:
                continue
            b = sum(r["bf16_us"] for r in rs)
            f8 = sum(r["fp8_us"] for r in rs)
            o = sum(r["ours_us"] for r in rs)
            lines.append(f"gemm {model} M={M:5d} (sum of {len(rs)} projs): bf16 {b:8.1f} fp8 {f8:8.1f} ours {o:8.1f}"
                         f"  x{b / o:.2f} vs bf16, x{f8 / o:.2f} vs fp8")
    for r in g:
        if r["M"] in (16, 16384) and r["proj"] in ("gate_up", "gate"):
            lines.append(f"  {r['model']} gate_up M={r['M']}: x{r['x_bf16']:.2f} vs bf16 ({r['ours_cfg']}, "
                         f"{r['ours_TBps']:.2f} TB/s, {r['ours_TFps']:.0f} TF/s)")
    for r in res.get("ffn", []):
        lines.append(f"ffn {r['model']} M={r['M']}: torch bf16 {r['bf16_us']:.1f} ours {r['ours_us']:.1f} x{r['x_bf16']:.2f}")
    for r in res.get("attn_prefill", []):
        lines.append(f"prefill S={r['S']}: sdpa {r['sdpa_us']:.0f} ({r['sdpa_TFps']:.0f} TF/s) fp8 {r['fp8_us']:.0f} "
                     f"({r['fp8_TFps']:.0f} TF/s) x{r['x_sdpa_fp8']:.2f}")
    for r in res.get("attn_decode", []):
        lines.append(f"decode B={r['B']} ctx={r['ctx']}: sdpa {r['sdpa_us']:.1f} int4 {r['w4a8kv4_us']:.1f} "
                     f"x{r['w4a8kv4_x_sdpa']:.2f} ({r['w4a8kv4_TBps']:.2f} TB/s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fineserve bench-kernels", description=__doc__.split("\n")[0])
    p.add_argument("--out", help="results JSON (default load_tests/results/kernels-h100.json; with --smoke "
                                 "a temporary file, so a plumbing check never replaces measured results)")
    p.add_argument("--sections", default="ceilings,gemm,ffn,attn_prefill,attn_decode,misc")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--gemm-m", default=",".join(map(str, GEMM_M)))
    p.add_argument("--ffn-m", default="16,16384")
    p.add_argument("--prefill-s", default="1024,2048,4096")
    p.add_argument("--decode-b", default="1,16,64")
    p.add_argument("--decode-ctx", default="1024,4096,16384")
    p.add_argument("--sweep", action="store_true", help="time candidate configs too")
    p.add_argument("--select", action="store_true", help="dispatch by this run's sweep winners")
    p.add_argument("--sweep-model", default="llama-3-8b", help="the model whose projections the GEMM sweep times")
    p.add_argument("--smoke", action="store_true", help="CPU plumbing check: interpreter, tiny shapes, no timing")
    args = p.parse_args(argv)
    args.models = args.models.split(",")
    args.gemm_m = [int(v) for v in args.gemm_m.split(",")]
    args.ffn_m = [int(v) for v in args.ffn_m.split(",")]
    args.prefill_s = [int(v) for v in args.prefill_s.split(",")]
    args.decode_b = [int(v) for v in args.decode_b.split(",")]
    args.decode_ctx = [int(v) for v in args.decode_ctx.split(",")]
    global DEV, PREFILL_B
    if args.out is None:
        args.out = (os.path.join(tempfile.mkdtemp(prefix="bench-smoke-"), "kernels-smoke.json") if args.smoke
                    else "load_tests/results/kernels-h100.json")
    if args.smoke:
        DEV = "cpu"
        MODELS.clear()
        MODELS.update({"tiny-a": dict(hidden=256, inter=384, heads=4, kv_heads=4, head_dim=64),
                       "tiny-b": dict(hidden=256, inter=256, heads=4, kv_heads=2, head_dim=64)})
        MODELS["llama-3-8b"] = MODELS["tiny-b"]
        args.models = ["tiny-a", "llama-3-8b"]
        args.sweep_model = "llama-3-8b"
        args.gemm_m, args.ffn_m, args.prefill_s = [1, 300], [3, 300], [80]
        args.decode_b, args.decode_ctx = [2], [130]
        PREFILL_B = 2
        MISC.update(M=5, H=256, inter=384, kv_tokens=128, kv_heads=2, head_dim=64)
        args.sections = args.sections.replace("ceilings,", "")
    elif not torch.cuda.is_available():
        print("bench-kernels needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton
    on_gpu = DEV == "cuda"
    res = {"device": torch.cuda.get_device_name(0) if on_gpu else "cpu (smoke)",
           "sm_count": torch.cuda.get_device_properties(0).multi_processor_count if on_gpu else 0,
           "versions": {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                        "python": sys.version.split()[0]},
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(sys.argv), "timing": "CUDA graph of R calls, median of 10 replays / R; inputs "
           "rotated to exceed 2x L2", "errors": []}
    try:
        import subprocess
        res["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem",
                                        "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.time()
    if not on_gpu:
        res.pop("driver", None)
    for sec in args.sections.split(","):
        fn = globals()[f"sec_{sec}"]
        ts = time.time()
        try:
            fn(res, args) if sec != "ceilings" else fn(res)
        except Exception as e:  # noqa: BLE001
            res["errors"].append({"section": sec, "error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()[-2000:]})
            _log(f"section {sec} FAILED: {type(e).__name__}: {e}")
            traceback.print_exc()
        res.setdefault("section_s", {})[sec] = time.time() - ts
        _flush(res, args)
    res["total_s"] = time.time() - t0
    _flush(res, args)
    print(summary(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
