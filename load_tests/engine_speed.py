"""Engine-level speed on CUDA (issue 4): prefill tok/s at bs16 × 1024 and decode tok/s at batch 1/16/64,
context 1024, per precision, for a random-weight shape preset, through `Engine.step` (scheduler, Triton
kernels, CUDA graphs, sampling: everything a served request pays). `--mixed N`: also steps that carry a
new N-token prompt beside the decodes, as a loaded server's do. Also the GPU-vs-CPU logits check
(`load_tests.gpu_vs_cpu`). Writes load_tests/results/engine-<device>.json.

    python -m load_tests.engine_speed [--model llama-3-8b-shape] [--precisions bf16,fp8,w4a8kv4] [--mixed 256]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch


def _ids(gen: torch.Generator, vocab: int, n: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=gen).tolist()


def _timed_steps(eng, n: int) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        eng.step()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def _profile_steps(run, n: int, label: str) -> dict:
    """Where a step's time goes over `run(n)` (n steps, returns seconds): GPU kernel time vs wall
    (launch/CPU bound when kernels ≪ wall)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        sec = run(n)
    ev = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in ev) / n
    top_gpu = sorted(ev, key=lambda e: -e.self_device_time_total)[:12]
    top_cpu = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:12]
    out = {"wall_ms_per_step": sec / n * 1e3, "gpu_kernel_ms_per_step": gpu_us / 1e3, **_gpu_timeline(prof, n),
           "launches_per_step": sum(e.count for e in ev if e.self_device_time_total > 0) / n,
           "top_gpu": [(e.key[:60], e.self_device_time_total / n, e.count / n) for e in top_gpu],
           "top_cpu": [(e.key[:60], e.self_cpu_time_total / n, e.count / n) for e in top_cpu]}
    print(f"  profile {label}: wall {out['wall_ms_per_step']:.1f} ms/step, "
          f"GPU kernels {out['gpu_kernel_ms_per_step']:.1f} ms/step (busy {out['gpu_busy_ms_per_step']:.1f}, gaps < 20 us {out['short_gaps_ms_per_step']:.1f}, "
          f"longer idle {out['long_idle_ms_per_step']:.1f}), {out['launches_per_step']:.0f} kernels/step", flush=True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
    return out


def _gpu_timeline(prof, n: int) -> dict:
    """Per step, from the trace's kernel/memcpy intervals: time the GPU is busy, idle in short gaps
    (< 20 us: launch-to-launch bubbles, also inside a replayed graph) and idle longer (the host working)."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    iv = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e)
    busy = short = long_ = 0.0
    end = iv[0][0] if iv else 0.0
    for s, e in iv:
        if s > end:
            if s - end < 20:
                short += s - end
            else:
                long_ += s - end
        busy += max(0.0, e - max(s, end))
        end = max(end, e)
    return {"gpu_busy_ms_per_step": busy / n / 1e3, "short_gaps_ms_per_step": short / n / 1e3,
            "long_idle_ms_per_step": long_ / n / 1e3}


def _mixed_steps(eng, B: int, args, gen, V: int) -> dict:
    """Steps of B running decodes plus one new `args.mixed`-token prompt each (max_tokens 1, so it leaves
    after its prefill): what a served model's steps look like while requests keep arriving."""
    from fineserve_core.sampling import SamplingParams
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    steps_ms: list[float] = []

    def run(n: int, tag: str) -> float:
        steps_ms.clear()
        torch.cuda.synchronize()
        t0 = t = time.perf_counter()
        for i in range(n):
            eng.add_request(f"m{B}-{tag}{i}", _ids(gen, V, args.mixed), one)
            eng.step()
            torch.cuda.synchronize()
            steps_ms.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
        return time.perf_counter() - t0
    from kernels._common import JitLog
    with JitLog() as jit:
        run(args.warmup_steps, "w")
        warm = {"warmup_steps_ms": [round(x, 2) for x in steps_ms], "jit_compiles_warmup": jit.take()}
        sec = run(args.decode_steps, "t")
        out = {"prefill_tokens": args.mixed, "step_ms": sec / args.decode_steps * 1e3,
               "step_ms_median": statistics.median(steps_ms), "step_ms_max": max(steps_ms),
               "steps_ms": [round(x, 2) for x in steps_ms], "jit_compiles": jit.take(), **warm}
    if args.profile and B in args.profile:
        out.update(_profile_steps(lambda n: run(n, "p"), 3, f"mixed B={B}"))
    return out


def bench_precision(model: str, precision: str, args) -> dict:
    from fineserve_core.config import EngineConfig
    from fineserve_core.engine import Engine
    from fineserve_core.sampling import SamplingParams
    t0 = time.perf_counter()
    # the mixed steps run the decodes on (and add one prompt at a time beside them)
    extra = args.warmup_steps + args.decode_steps + 3 if args.mixed else 0
    eng = Engine(EngineConfig(model=model, precision=precision, device="cuda",
                              max_num_seqs=max(args.decode_batch) + bool(args.mixed),
                              max_num_batched_tokens=args.prefill_batch * args.ctx, kv_cache_bytes=args.kv_gib << 30,
                              max_model_len=args.ctx + args.decode_steps + extra + 64,
                              cuda_graphs=not args.no_cuda_graphs, graph_max_tokens=args.graph_max_tokens))
    torch.cuda.synchronize()
    res = {"precision": precision, "load_s": round(time.perf_counter() - t0, 1),
           "weights_gib": round(torch.cuda.memory_allocated() / 2**30 - args.kv_gib, 2)}
    gen = torch.Generator().manual_seed(0)
    V = eng.source.config.vocab_size
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    # prefill: prefill_batch prompts of ctx tokens, all in one step (max_num_batched_tokens)
    times = []
    for r in range(args.repeats + 1):
        for i in range(args.prefill_batch):
            eng.add_request(f"p{r}-{i}", _ids(gen, V, args.ctx), one)
        torch.cuda.synchronize()
        t = time.perf_counter()
        steps = 0
        while eng.has_unfinished():
            eng.step()
            steps += 1
        torch.cuda.synchronize()
        if r:                                              # the first round warms up (compiles, allocates)
            times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    res["prefill"] = {"batch": args.prefill_batch, "prompt_len": args.ctx, "steps": steps, "median_s": sec,
                      "times_s": times, "tok_per_s": args.prefill_batch * args.ctx / sec}
    print(f"{precision} prefill {args.prefill_batch}x{args.ctx}: {sec * 1e3:.1f} ms, "
          f"{res['prefill']['tok_per_s']:.0f} tok/s", flush=True)

    # decode: B sequences at context ctx, steps timed after every prompt has its first token
    res["decode"] = []
    for B in args.decode_batch:
        sp = SamplingParams(max_tokens=args.decode_steps + args.warmup_steps + extra + 8, temperature=0.0,
                            ignore_eos=True)
        seqs = [eng.add_request(f"d{B}-{i}", _ids(gen, V, args.ctx), sp) for i in range(B)]
        while any(not s.output_ids for s in seqs):
            eng.step()
        _timed_steps(eng, args.warmup_steps)
        sec = _timed_steps(eng, args.decode_steps)
        if args.profile and B in args.profile:
            res.setdefault("decode_profile", {})[B] = _profile_steps(lambda n: _timed_steps(eng, n), 3, f"B={B}")
        assert all(len(s.output_ids) >= args.warmup_steps + args.decode_steps for s in seqs)
        row = {"batch": B, "context": args.ctx, "steps": args.decode_steps, "step_ms": sec / args.decode_steps * 1e3,
               "tok_per_s": B * args.decode_steps / sec}
        if args.mixed:
            row["mixed"] = _mixed_steps(eng, B, args, gen, V)
        res["decode"].append(row)
        print(f"{precision} decode B={B} ctx={args.ctx}: {row['step_ms']:.2f} ms/step, {row['tok_per_s']:.0f} tok/s"
              + (f"; with a {args.mixed}-token prefill in each step {row['mixed']['step_ms']:.2f} ms/step"
                 if args.mixed else ""), flush=True)
        for s in seqs:
            eng.abort(s.request_id)
    eng.close()
    del eng
    gc.collect()
    torch.cuda.empty_cache()
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="llama-3-8b-shape")
    p.add_argument("--precisions", default="bf16,fp8,w4a8kv4")
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--prefill-batch", type=int, default=16)
    p.add_argument("--decode-batch", default="1,16,64")
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--warmup-steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kv-gib", type=int, default=12)
    p.add_argument("--no-cuda-graphs", action="store_true", help="eager decode steps (the engine replays graphs)")
    p.add_argument("--no-logits-check", action="store_true")
    p.add_argument("--logits-only", action="store_true", help="only the GPU-vs-CPU logits check")
    p.add_argument("--graph-max-tokens", type=int, default=2048,
                   help="steps with prompt tokens up to this size replay piecewise graphs; 0: eager")
    p.add_argument("--mixed", type=int, default=0,
                   help="also time decode steps that each carry one new prompt of this many tokens")
    p.add_argument("--profile", default="", help="decode batch sizes to profile (torch.profiler), e.g. 16")
    p.add_argument("--out", help="results JSON (default load_tests/results/engine-<device>.json)")
    args = p.parse_args(argv)
    args.decode_batch = [int(b) for b in args.decode_batch.split(",")]
    args.profile = [int(b) for b in args.profile.split(",") if b]
    if not torch.cuda.is_available():
        print("engine_speed needs a CUDA GPU", file=sys.stderr)
        return 2
    from fineserve_core.results import write_result
    payload = {"model": args.model, "config": {k: v for k, v in vars(args).items() if k != "out"},
               "timing": "wall clock around Engine.step with cuda.synchronize; prefill: median of repeats after one "
                         "warm-up round; decode: steps after warm-up steps", "precisions": [], "errors": []}
    for prec in [] if args.logits_only else args.precisions.split(","):
        try:
            payload["precisions"].append(bench_precision(args.model, prec, args))
        except Exception as e:  # noqa: BLE001 - record and go on with the next precision
            import traceback
            traceback.print_exc()
            payload["errors"].append({"precision": prec, "error": f"{type(e).__name__}: {e}"})
        write_result("engine", payload, args.out)
    by = {r["precision"]: r for r in payload["precisions"]}
    if "bf16" in by and "w4a8kv4" in by:
        payload["w4a8kv4_vs_bf16"] = {
            "prefill": by["w4a8kv4"]["prefill"]["tok_per_s"] / by["bf16"]["prefill"]["tok_per_s"],
            **{f"decode_b{a['batch']}": a["tok_per_s"] / b["tok_per_s"]
               for a, b in zip(by["w4a8kv4"]["decode"], by["bf16"]["decode"])}}
    if not args.no_logits_check:
        from load_tests.gpu_vs_cpu import compare
        payload["logits_gpu_vs_cpu"] = {"model": "smollm2-135m-shape (seed 0, bf16-rounded random weights)",
                                        "relerr": "GPU bf16 vs CPU bf16", "floor": "CPU fp32 vs CPU bf16"}
        for prec in args.precisions.split(","):
            try:
                r = payload["logits_gpu_vs_cpu"][prec] = compare(prec)
                print("logits", prec, r, flush=True)
            except Exception as e:  # noqa: BLE001
                payload["errors"].append({"logits": prec, "error": f"{type(e).__name__}: {e}"})
    path = write_result("engine", payload, args.out)
    print(f"[wrote {path}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
