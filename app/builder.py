"""Serve application builder: `import_path: app.builder:build_app` with our AppConfig as `args`."""
from __future__ import annotations

import logging

import ray
from ray import serve

from app.auth import load_key_digests
from app.config import AppConfig
from app.controller import CONTROLLER_NAME, Controller
from app.ingress import Ingress
from app.worker import ModelWorker

log = logging.getLogger("ray.serve")
# A worker replica Serve stops (scale-down, re-placement) drains first: it takes no new requests and exits
# once its in-flight ones finish, checked every DRAIN_POLL_S. Generations can run for minutes; Serve's
# default of 20 s before it kills the replica would cut them.
DRAIN_TIMEOUT_S, DRAIN_POLL_S = 600.0, 0.5
# Serve's request path, per replica (measured in load_tests/serve_overhead.py): user code on the replica's
# own event loop (no hop to a second thread), and the ingress's router on its event loop sending to the
# workers over Serve's direct gRPC channel instead of Ray actor calls
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
INGRESS_ENV = {**REPLICA_ENV, "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


def gpu_resource(gpu: int) -> str:
    """Per-GPU custom resource: what lets the placement choose co-location (fractional num_gpus alone is
    first-fit and model-blind)."""
    return f"fineserve_gpu_{gpu}"


def build_app(args: dict):
    cfg = AppConfig(**args)
    # read the API keys here, where the operator's environment is; only their digests go on (never logged)
    key_digests = load_key_digests(cfg.api_keys_env, cfg.api_keys_file)
    have = ray.cluster_resources()
    pinned = all(have.get(gpu_resource(g), 0) >= 1 for g in range(cfg.num_gpus))
    if not pinned:
        log.warning("fineserve: the cluster has no %s resources, so Ray's first-fit decides which GPU each "
                    "model lands on; start it with `fineserve serve` (or RAY_OVERRIDE_RESOURCES) to apply the "
                    "placement", [gpu_resource(g) for g in range(cfg.num_gpus)])
    # restarted by Ray if its process dies; serving never waits on it (workers talk to the slab managers)
    controller = Controller.options(name=CONTROLLER_NAME, namespace=cfg.namespace, lifetime="detached",
                                    get_if_exists=True, max_restarts=-1).remote()
    ray.get(controller.configure.remote(cfg.model_dump(), pinned))
    workers = {}
    for m in cfg.models:
        opts = {"num_gpus": m.gpu_fraction, "num_cpus": 0,
                # indices stay physical, so the CUDA IPC handle of the GPU's KV buffer opens as is
                "runtime_env": {"env_vars": {**REPLICA_ENV, "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}}}
        if pinned:
            opts["resources"] = {gpu_resource(m.gpu): m.gpu_fraction}
        # bounded queues: a burst past max_ongoing + max_queued is refused at once (BackPressureError in
        # the ingress -> 429 + Retry-After) instead of queueing without limit
        dep = serve.deployment(ModelWorker).options(
            name=m.deployment_name, num_replicas=m.replicas, ray_actor_options=opts,
            max_ongoing_requests=m.ongoing_limit, max_queued_requests=m.queued_limit,
            backpressure_config={"status_code": 429, "retry_after_s": cfg.ingress.retry_after_s},
            health_check_period_s=5, graceful_shutdown_timeout_s=DRAIN_TIMEOUT_S,
            graceful_shutdown_wait_loop_s=DRAIN_POLL_S)
        workers[m.tier] = dep.bind(m.model_dump(), cfg.model_dump(), pinned)
    ing = cfg.ingress
    ingress = serve.deployment(Ingress).options(
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": INGRESS_ENV}},
        max_ongoing_requests=ing.max_ongoing_requests,
        max_queued_requests=ing.max_queued_requests,
        backpressure_config={"status_code": 429, "retry_after_s": ing.retry_after_s})
    return ingress.bind(workers, cfg.model_dump(), key_digests)
