"""Ray Serve's own per-request floor on this machine: what an empty app costs, with our app's settings.

    python -m load_tests.serve_floor [--requests 50]

Two apps with nothing inside, deployed like ours (`app.builder`'s replica env: user code on the replica
loop, requests over Serve's gRPC channel; num_cpus 0) on a private cluster on 127.0.0.1: (1) a FastAPI
ingress whose `POST /v1/completions` returns a fixed JSON, (2) the same ingress awaiting one streamed
item from a second deployment through a DeploymentHandle (our proxy → ingress → worker path with a
worker that does no work). One keep-alive httpx client, one request at a time; p50/p90 of the client
latency. Our overhead (`load_tests.serve_overhead`) can be no lower than (2) on the same machine.
Writes load_tests/results/serve-floor-<device>.json.
"""
from __future__ import annotations

import argparse
import statistics
import time

import httpx

from app.builder import INGRESS_ENV, REPLICA_ENV
from fineserve_core.results import write_result
from load_tests.serve_overhead import free_port     # importing it sets RAY_SERVE_USE_GRPC_BY_DEFAULT
BODY = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 1}


def build(hop: bool):
    from fastapi import FastAPI
    from ray import serve
    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": REPLICA_ENV}})
    class Worker:
        async def __call__(self, body: dict):
            yield {"token_ids": [7], "finish_reason": "length"}

    @serve.deployment(ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": INGRESS_ENV}})
    @serve.ingress(api)
    class Ingress:
        def __init__(self, worker=None):
            self.worker = worker.options(stream=True) if worker is not None else None

        @api.post("/v1/completions")
        async def completions(self, body: dict):
            items = [x async for x in self.worker.remote(body)] if self.worker is not None else [{"token_ids": [7]}]
            return {"id": "cmpl-0", "object": "text_completion", "choices": [{"text": "x", "index": 0,
                    "finish_reason": "length"}], "usage": {"completion_tokens": len(items)}}

    return Ingress.bind(Worker.bind()) if hop else Ingress.bind()


def measure(base: str, n: int, warmup: int) -> list[float]:
    with httpx.Client(timeout=60) as c:
        for _ in range(warmup):
            c.post(f"{base}/v1/completions", json=BODY).raise_for_status()
        out = []
        for _ in range(n):
            t = time.perf_counter()
            c.post(f"{base}/v1/completions", json=BODY).raise_for_status()
            out.append(time.perf_counter() - t)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--out", default=None, help="result path (default load_tests/results/serve-floor-<device>.json)")
    args = ap.parse_args()
    import ray
    from ray import serve

    from app.launch import start_cluster
    start_cluster(1, include_dashboard=False, metrics_port=free_port())
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    rows = {}
    for name, hop in (("ingress_only", False), ("ingress_plus_worker_hop", True)):
        serve.run(build(hop), name=name, route_prefix=f"/{name}", blocking=False)
        lat = measure(f"http://127.0.0.1:{port}/{name}", args.requests, args.warmup)
        rows[name] = {"p50_ms": statistics.median(lat) * 1e3, "p90_ms": statistics.quantiles(lat, n=10)[-1] * 1e3,
                      "latency_ms": [x * 1e3 for x in lat]}
        print(f"{name:26s} p50 {rows[name]['p50_ms']:6.2f} ms  p90 {rows[name]['p90_ms']:6.2f} ms", flush=True)
        serve.delete(name)
    serve.shutdown()
    ray.shutdown()
    path = write_result("serve-floor", {"requests": args.requests, "what": "client latency of an empty Serve app "
                                        "(non-streamed POST, keep-alive client, one request at a time)",
                                        "apps": rows}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
