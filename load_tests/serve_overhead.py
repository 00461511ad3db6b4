"""Serving overhead of Ray Serve (HTTP → proxy → ingress → worker → engine) for one request at a time.

    python -m load_tests.serve_overhead --config serve_configs/prod.yaml --requests 20
    python -m load_tests.serve_overhead --config serve_configs/dev.yaml --prompt-tokens 16 --tiny   # CPU

Starts a private cluster (free ports on 127.0.0.1, so it never meets another cluster) and the config's
app, and sends each tier a fixed token-id prompt with max_tokens=1, one request at a time, over HTTP (one
keep-alive client, as OpenAI clients hold one: a client per request costs ~20 ms of TLS-context setup on
the client's side, which is not serving overhead), both streamed and not, and straight to the tier's
worker through a deployment handle (no proxy, no ingress). The headline is per request: client latency
minus the TTFT the replica's engine measured for that very request (the `x-fineserve-engine-ttft-ms`
header; the handle's last item), so the engine's own run-to-run noise (a host-bound prefill varies by
10 ms between runs) cancels. For reference it also times the same request on an in-process Engine of
each tier after Serve is gone, with as many torch threads as a Ray worker process gets. `--tiny` serves
every tier from a 2-layer random-weight Llama (SmolLM2's config family and tokenizer), so on a CPU the
model's few ms do not drown the overhead. Writes load_tests/results/serve-overhead-<device>.json.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from fineserve_core.results import write_result

# this driver's handle probe routes to the worker as the ingress does (app/builder.py INGRESS_ENV); Serve
# reads it when ray.serve is imported, so before that
os.environ.setdefault("RAY_SERVE_USE_GRPC_BY_DEFAULT", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_checkpoint(root: Path) -> str:
    """A local HF directory: SmolLM2's config cut to 2 layers of width 128, seeded random bf16 weights."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from fineserve_core.model_source import expected_weight_shapes, load_llama_config, resolve_model
    real = Path(resolve_model("smollm2-135m").path)
    root.mkdir(parents=True, exist_ok=True)
    for f in real.iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, root / f.name)
    c = json.loads((real / "config.json").read_text())
    c.update(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32)
    (root / "config.json").write_text(json.dumps(c, indent=1))
    g = torch.Generator().manual_seed(0)
    save_file({n: (torch.randn(s, generator=g) * 0.05 if len(s) > 1 else torch.ones(s)).to(torch.bfloat16)
               for n, s in expected_weight_shapes(load_llama_config(root)).items()}, str(root / "model.safetensors"))
    return str(root)


def ttft_http(client: httpx.Client, base: str, model: str, prompt: list[int]) -> float:
    """Streamed: seconds to the first SSE chunk, as a client times TTFT."""
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True, "ignore_eos": True}
    t0 = time.perf_counter()
    with client.stream("POST", base + "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                return time.perf_counter() - t0
    raise RuntimeError(f"{model}: the stream ended without a token")


def latency_http(client: httpx.Client, base: str, model: str, prompt: list[int]) -> tuple[float, float]:
    """Not streamed (max_tokens=1, so the answer is the first token): client latency and the replica
    engine's TTFT for the same request, both in seconds."""
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, "ignore_eos": True}
    t0 = time.perf_counter()
    r = client.post(base + "/v1/completions", json=body)
    t = time.perf_counter() - t0
    r.raise_for_status()
    return t, float(r.headers["x-fineserve-engine-ttft-ms"]) / 1e3


async def ttft_handle(handle, prompt: list[int]) -> tuple[float, float]:
    """Driver -> worker replica through a streaming DeploymentHandle: the worker hop without proxy and
    ingress. Also returns the TTFT the replica's engine measured itself (add_request -> first token)."""
    req = {"request_id": f"probe-{time.monotonic_ns()}", "params": {"max_tokens": 1, "temperature": 0.0,
           "ignore_eos": True}, "arrival": time.time(), "overflow": False, "prompt": prompt}
    t0 = time.perf_counter()
    async for item in handle.generate.remote(req):
        if "error" in item:
            raise RuntimeError(f"worker refused the probe: {item['error']}")
        return time.perf_counter() - t0, item["metrics"]["ttft"]
    raise RuntimeError("the worker stream ended without a token")


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


def _torch_threads() -> int:
    import torch
    return torch.get_num_threads()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="serve_configs/prod.yaml")
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="serve every tier from a 2-layer random-weight Llama")
    ap.add_argument("--out", default=None, help="result path (default load_tests/results/serve-overhead-<device>.json)")
    ap.add_argument("--note", default="", help="stored in the result, e.g. what else shared the machine")
    args = ap.parse_args()

    import ray
    import torch
    from ray import serve

    from app.config import AppConfig
    from app.launch import deploy, load_serve_config, start_cluster
    from fineserve_core.config import EngineConfig
    from fineserve_core.engine import Engine

    raw = load_serve_config(args.config)
    if args.tiny:
        tiny_dir = tempfile.TemporaryDirectory(prefix="fineserve-tiny-")     # removed when the run exits
        src = tiny_checkpoint(Path(tiny_dir.name) / "tiny-llama")
        for m in raw["applications"][0]["args"]["models"]:
            m["source"] = src
    cfg = AppConfig(**raw["applications"][0]["args"])
    port = free_port()
    raw["http_options"] = {**(raw.get("http_options") or {}), "host": "127.0.0.1", "port": port}
    base = f"http://127.0.0.1:{port}"
    prompt = [(7 * i + 11) % 30000 + 100 for i in range(args.prompt_tokens)]

    t0 = time.perf_counter()
    start_cluster(cfg.num_gpus, include_dashboard=False, metrics_port=free_port())
    deploy(raw, blocking=False)
    startup_s = time.perf_counter() - t0
    streamed: dict[str, list[float]] = {}
    http: dict[str, list[tuple[float, float]]] = {}       # (client latency, replica engine TTFT)
    handled: dict[str, list[tuple[float, float]]] = {}
    client = httpx.Client(timeout=300)

    async def probe_handles():
        # from one running event loop, as the ingress calls (Serve's throughput mode has no sync router)
        for m in cfg.models:
            handle = serve.get_deployment_handle(m.deployment_name, raw["applications"][0].get("name", "default"))
            handle = handle.options(stream=True)
            for _ in range(args.warmup):
                await ttft_handle(handle, prompt)
            handled[m.tier] = [await ttft_handle(handle, prompt) for _ in range(args.requests)]
        await serve.shutdown_async()            # its handles live on this loop

    for m in cfg.models:
        for _ in range(args.warmup):
            ttft_http(client, base, m.tier, prompt)
            latency_http(client, base, m.tier, prompt)
        streamed[m.tier] = [ttft_http(client, base, m.tier, prompt) for _ in range(args.requests)]
        http[m.tier] = [latency_http(client, base, m.tier, prompt) for _ in range(args.requests)]
    client.close()
    worker_threads = ray.get(ray.remote(num_cpus=0)(_torch_threads).remote())
    asyncio.run(probe_handles())
    ray.shutdown()
    gc.collect()

    if not torch.cuda.is_available():
        torch.set_num_threads(worker_threads)      # CPU: the same compute as inside a replica
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

    def p50(xs) -> float:
        return statistics.median(xs) * 1e3

    rows = {}
    for tier in streamed:
        over = [t - e for t, e in http[tier]]            # proxy + ingress + worker hop, request by request
        hop = [t - e for t, e in handled[tier]]          # the worker hop alone
        rows[tier] = {"overhead_ms": p50(over), "worker_hop_ms": p50(hop), "proxy_ingress_ms": p50(over) - p50(hop),
                      "ttft_p50_stream_ms": p50(streamed[tier]), "latency_p50_http_ms": p50([t for t, _ in http[tier]]),
                      "ttft_p50_replica_engine_ms": p50([e for _, e in http[tier]]),
                      "ttft_p50_handle_ms": p50([t for t, _ in handled[tier]]), "ttft_p50_engine_ms": p50(direct[tier]),
                      "stream_vs_in_process_ms": p50(streamed[tier]) - p50(direct[tier]),
                      "overhead_p90_ms": statistics.quantiles(over, n=10)[-1] * 1e3,
                      "stream_ms": [x * 1e3 for x in streamed[tier]],
                      "http_ms": [[t * 1e3, e * 1e3] for t, e in http[tier]],
                      "handle_ms": [[t * 1e3, e * 1e3] for t, e in handled[tier]],
                      "engine_ms": [x * 1e3 for x in direct[tier]]}
    path = write_result("serve-overhead", {"config": args.config, "prompt_tokens": args.prompt_tokens,
                                           "requests": args.requests, "startup_s": startup_s, "note": args.note,
                                           "worker_torch_threads": worker_threads, "tiny": args.tiny,
                                           "overhead": "per request: client latency - the replica engine's TTFT "
                                                       "for that request (p50 over requests)",
                                           "tiers": rows}, args.out)
    print(f"{'tier':26s} {'overhead p50':>12s} {'worker hop':>10s} {'proxy+ingress':>13s} {'stream TTFT':>11s} "
          f"{'engine in replica':>17s} {'in-process':>10s}   (ms)")
    for tier, r in rows.items():
        print(f"{tier:26s} {r['overhead_ms']:12.1f} {r['worker_hop_ms']:10.1f} {r['proxy_ingress_ms']:13.1f} "
              f"{r['ttft_p50_stream_ms']:11.1f} {r['ttft_p50_replica_engine_ms']:17.1f} {r['ttft_p50_engine_ms']:10.1f}")
    print(f"app startup {startup_s:.0f}s; wrote {path}")
    print(json.dumps({t: round(r["overhead_ms"], 2) for t, r in rows.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
