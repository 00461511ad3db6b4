"""TTFT through Ray Serve (HTTP → proxy → ingress → worker → engine) vs the same engine in-process.

    python -m load_tests.serve_overhead --config serve_configs/prod.yaml --requests 20

Starts a private cluster and the config's app, times streamed requests with a fixed token-id prompt
and max_tokens=1 sequentially per tier, shuts Serve down, then times the same request on an
in-process Engine of each tier. Writes load_tests/results/serve-overhead-<device>.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import httpx

from fineserve_core.results import write_result


def ttft_http(base: str, model: str, prompt: list[int]) -> float:
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True, "ignore_eos": True}
    t0 = time.perf_counter()
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                return time.perf_counter() - t0
    raise RuntimeError(f"{model}: the stream ended without a token")


def ttft_engine(engine, prompt: list[int]) -> float:
    from fineserve_core.sampling import SamplingParams
    rid = f"probe-{time.monotonic_ns()}"
    t0 = time.perf_counter()
    engine.add_request(rid, prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    while not engine.step():
        pass
    t = time.perf_counter() - t0
    while engine.has_unfinished():
        engine.step()
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="serve_configs/prod.yaml")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()

    import ray
    import torch
    from ray import serve

    from app.config import AppConfig
    from app.launch import deploy, load_serve_config, start_cluster
    from fineserve_core.config import EngineConfig
    from fineserve_core.engine import Engine

    raw = load_serve_config(args.config)
    cfg = AppConfig(**raw["applications"][0]["args"])
    http = raw.get("http_options") or {}
    base = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 18000)}"
    prompt = [(7 * i + 11) % 30000 + 100 for i in range(args.prompt_tokens)]

    t0 = time.perf_counter()
    start_cluster(cfg.num_gpus, include_dashboard=False)
    deploy(raw, blocking=False)
    startup_s = time.perf_counter() - t0
    served: dict[str, list[float]] = {}
    for m in cfg.models:
        for _ in range(args.warmup):
            ttft_http(base, m.tier, prompt)
        served[m.tier] = [ttft_http(base, m.tier, prompt) for _ in range(args.requests)]
    serve.shutdown()
    ray.shutdown()
    gc.collect()

    direct: dict[str, list[float]] = {}
    for m in cfg.models:
        e = m.engine
        eng = Engine(EngineConfig(model=m.source or m.name, precision=m.precision, dtype=e.dtype, seed=e.seed,
                                  max_num_batched_tokens=e.max_num_batched_tokens, kv_cache_bytes=1 << 30))
        for _ in range(args.warmup):
            ttft_engine(eng, prompt)
        direct[m.tier] = [ttft_engine(eng, prompt) for _ in range(args.requests)]
        eng.close()
        del eng
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    rows = {}
    for tier in served:
        s, d = statistics.median(served[tier]), statistics.median(direct[tier])
        rows[tier] = {"ttft_p50_serve_ms": s * 1e3, "ttft_p50_engine_ms": d * 1e3, "overhead_ms": (s - d) * 1e3,
                      "serve_ms": [x * 1e3 for x in served[tier]], "engine_ms": [x * 1e3 for x in direct[tier]]}
    path = write_result("serve-overhead", {"config": args.config, "prompt_tokens": args.prompt_tokens,
                                           "requests": args.requests, "startup_s": startup_s, "tiers": rows})
    print(f"{'tier':28s} {'serve p50 ms':>12s} {'engine p50 ms':>13s} {'overhead ms':>11s}")
    for tier, r in rows.items():
        print(f"{tier:28s} {r['ttft_p50_serve_ms']:12.1f} {r['ttft_p50_engine_ms']:13.1f} {r['overhead_ms']:11.1f}")
    print(f"app startup {startup_s:.0f}s; wrote {path}")
    print(json.dumps({t: round(r["overhead_ms"], 2) for t, r in rows.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
