"""`fineserve` command line."""
from __future__ import annotations

import argparse
import sys
import time


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

    sv = sub.add_parser("serve", help="start a private Ray cluster on 127.0.0.1 and run a serve config")
    sv.add_argument("config", help="a serve config, e.g. serve_configs/dev.yaml")
    sv.add_argument("--dashboard-port", type=int, default=28265)
    sv.set_defaults(fn=cmd_serve)

    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:     # bad input: one clear line, no traceback
        print(f"fineserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
