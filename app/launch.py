"""`fineserve serve CONFIG`: a private Ray cluster on 127.0.0.1 with per-GPU resources, then the app.

`serve run CONFIG` works too on a cluster you started yourself; this launcher adds what makes the
config's placement binding (one `fineserve_gpu_<i>` resource per GPU), logical GPUs when the machine
has none, its own temp dir and non-default ports, so it never joins or disturbs another cluster.
"""
from __future__ import annotations

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")   # every Ray listener on 127.0.0.1
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import signal
import sys
import tempfile
import threading
import time

import yaml


def load_serve_config(path: str) -> dict:
    from ray.serve.schema import ServeDeploySchema
    with open(path) as f:
        raw = yaml.safe_load(f)
    ServeDeploySchema.model_validate(raw)            # Serve's own schema first, then ours in build_app
    if len(raw.get("applications", [])) != 1:
        raise ValueError(f"{path}: expected exactly one application")
    return raw


def start_cluster(num_gpus: int, dashboard_port: int = 28265, temp_dir: str | None = None,
                  metrics_port: int = 28080, include_dashboard: bool = True):
    """Private local Ray cluster: logical GPUs when there are no real ones, per-GPU resources, and
    Prometheus metrics on 127.0.0.1:`metrics_port`."""
    import ray
    import torch
    from app.builder import gpu_resource
    # the proxy's router reads this where the cluster starts: requests reach the ingress over Serve's
    # gRPC channel, not Ray actor calls (3-4 ms less per request; load_tests/serve_overhead.py)
    os.environ.setdefault("RAY_SERVE_USE_GRPC_BY_DEFAULT", "1")
    physical = torch.cuda.device_count()
    gpus = physical or num_gpus
    temp_dir = temp_dir or tempfile.mkdtemp(prefix="fineserve-ray-")
    ray.init(address="local", num_gpus=gpus, resources={gpu_resource(g): 1.0 for g in range(gpus)},
             namespace="serve", _temp_dir=temp_dir, include_dashboard=include_dashboard,
             dashboard_host="127.0.0.1", dashboard_port=dashboard_port, _metrics_export_port=metrics_port,
             logging_level="WARNING")
    return temp_dir


def deploy(raw: dict, blocking: bool = True, logging_config: dict | None = None) -> None:
    from ray import serve
    from app.builder import build_app
    app = raw["applications"][0]
    http = raw.get("http_options") or {}
    serve.start(http_options={"host": http.get("host", "127.0.0.1"), "port": http.get("port", 18000)})
    t0 = time.perf_counter()
    serve.run(build_app(app.get("args") or {}), name=app.get("name", "default"),
              route_prefix=app.get("route_prefix", "/"), blocking=False,
              external_scaler_enabled=app.get("external_scaler_enabled", False),   # the controller's autoscaling
              logging_config=logging_config)
    url = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 18000)}{app.get('route_prefix', '/')}"
    print(f"fineserve: app {app.get('name')!r} is ready at {url} ({time.perf_counter() - t0:.0f}s); "
          f"try: curl {url.rstrip('/')}/v1/models", flush=True)
    if blocking:
        stop = threading.Event()
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, lambda *_: stop.set())
        stop.wait()
        serve.shutdown()


def main(config: str, dashboard_port: int = 28265) -> int:
    raw = load_serve_config(config)
    from app.config import AppConfig
    cfg = AppConfig(**(raw["applications"][0].get("args") or {}))
    t0 = time.perf_counter()
    temp = start_cluster(cfg.num_gpus, dashboard_port)
    print(f"fineserve: Ray cluster up in {time.perf_counter() - t0:.0f}s (temp dir {temp}, dashboard "
          f"http://127.0.0.1:{dashboard_port})", flush=True)
    deploy(raw)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
