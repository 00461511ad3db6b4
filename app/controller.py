"""Controller: the global scheduler's home, a detached named actor in the app's namespace.

It applies the placement written in the config: one GpuSlabManager per GPU, sized once from the config
(KV buffer = what the GPU holds besides the weights of the models placed on it). With `autoscale`
enabled it also sizes every tier: workers report their counts and load each second (`report`), a
thread re-plans every `period_s` and at once when a tier's rate shifts, through the real placement
(app/autoscaler.py), and applies replica counts with Serve's external scaler API (the app is deployed
with `external_scaler_enabled: true`). Serve starts a new replica before it counts, and stops a removed
one gracefully (its in-flight requests finish); the slab manager reclaims the blocks of a replica that
is gone. Every decision is kept with its reason (`decisions()`, GET /v1/fineserve/placement) and logged.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque

import ray

from app.autoscaler import CPU_MEMORY_PER_GPU, Autoscaler, RateMeter
from app.config import AppConfig, ModelDeployment
from app.slab_manager import GpuSlabManager
from fineserve_core.cost_model import CostModel
from fineserve_core.kv_format import KVFormat
from fineserve_core.kv_slab import ModelKVSpec
from fineserve_core.model_source import resolve_model

CONTROLLER_NAME = "fineserve-controller"
CPU_KV_BYTES = 512 << 20
WEIGHT_BYTES_PER_PARAM = {"bf16": 2.0, "fp8": 1.0, "w4a8kv4": 0.5 + 1 / 64}   # INT4 + one FP8 scale per 64
ACTIVATION_RESERVE = 2 << 30                                                   # per model, on GPU
log = logging.getLogger("ray.serve")


def _dtype(app: AppConfig, m: ModelDeployment, cuda: bool):
    import torch
    if m.engine.dtype != "auto":
        return getattr(torch, m.engine.dtype)
    return torch.bfloat16 if cuda else torch.float32


def model_kv_spec(app: AppConfig, m: ModelDeployment, cuda: bool) -> ModelKVSpec:
    c = resolve_model(m.source or m.name).config
    fmt = KVFormat.for_model(m.precision, c.num_kv_heads, c.head_dim, _dtype(app, m, cuda), m.engine.tokens_per_block)
    return ModelKVSpec.from_format(m.tier, fmt, c.num_layers, m.rate, m.engine.max_num_batched_tokens)


def weight_bytes(m: ModelDeployment) -> int:
    c = resolve_model(m.source or m.name).config
    per_layer = (c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
                 + c.num_heads * c.head_dim * c.hidden_size + 3 * c.hidden_size * c.intermediate_size)
    head = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2) * 2     # bf16 embeddings
    return int(c.num_layers * per_layer * WEIGHT_BYTES_PER_PARAM[m.precision] + head)


@ray.remote(num_cpus=0)
class Controller:
    def __init__(self):
        self.cfg: AppConfig | None = None
        self.managers: dict[int, ray.actor.ActorHandle] = {}
        self.history: deque[dict] = deque(maxlen=2000)
        self.lock = threading.Lock()              # report() and configure() vs the planning thread
        self.meter: RateMeter | None = None
        self.scaler: Autoscaler | None = None
        self.replicas: dict[str, int] = {}        # tier -> replica count asked of Serve
        self.apps: dict[str, str] = {}            # tier -> Serve application (from the workers' reports)
        self.last_plan, self.planned_rates = 0.0, {}
        threading.Thread(target=self._loop, name="fineserve-autoscale", daemon=True).start()

    def _decide(self, d: dict) -> None:
        d = {"time": time.time(), **d}
        self.history.append(d)
        log.info("fineserve controller: %s", d)

    def configure(self, app: dict, pinned: bool) -> dict:
        """Apply a config: (re)create the per-GPU slab managers when the model set changed."""
        cfg = AppConfig(**app)
        if self.cfg == cfg and self.managers:
            return self.placement()
        if self.cfg is None and self._adopt(cfg, pinned):
            self._init_scaling()
            return self.placement()
        for h in self.managers.values():
            ray.kill(h)
        self.cfg, self.managers = cfg, {}
        cuda = self._cuda()
        from app.worker import slab_manager_name
        for gpu in range(cfg.num_gpus):
            # pinned: only the models placed here; otherwise Ray may put any model on any GPU
            models = cfg.on_gpu(gpu) if pinned else cfg.models
            if not models:
                continue
            _kill_named(slab_manager_name(gpu), cfg.namespace)    # left by an earlier controller
            specs = [model_kv_spec(cfg, m, cuda) for m in models]
            kv = self._kv_bytes(cfg, cfg.on_gpu(gpu), cuda, gpu)
            self.managers[gpu] = GpuSlabManagerActor.options(
                name=slab_manager_name(gpu), namespace=cfg.namespace, lifetime="detached",
            ).remote(gpu, specs, kv, f"cuda:{gpu}" if cuda else "cpu", cfg.policy)
            self._decide({"gpu": gpu, "models": [m.tier for m in cfg.on_gpu(gpu)], "kv_bytes": kv,
                          "reason": "placement from config"})
        ray.get([h.stats.remote() for h in self.managers.values()])   # wait until every buffer exists
        self._init_scaling()
        return self.placement()

    def _init_scaling(self) -> None:
        cfg, a = self.cfg, self.cfg.autoscale
        with self.lock:
            self.replicas = {m.tier: m.replicas for m in cfg.models}
            self.meter, self.scaler = RateMeter(a.window_s), None
            self.last_plan, self.planned_rates = time.monotonic(), {}
            if not a.enabled:
                return
            cuda = self._cuda()
            device = a.cost_device if a.cost_device != "auto" else "h100" if cuda else "cpu"
            if a.memory_per_gpu_gib:
                mem = a.memory_per_gpu_gib * (1 << 30)
            elif cuda:
                import torch
                mem = torch.cuda.get_device_properties(0).total_memory
            else:
                mem = CPU_MEMORY_PER_GPU
            self.scaler = Autoscaler(cfg, CostModel.default(device), mem)
        self._decide({"reason": f"autoscaling on: cost table {device!r}, {mem / (1 << 30):.0f} GiB per GPU, "
                                f"re-plan every {a.period_s:g}s or on a rate shift of {a.rate_shift:.0%} "
                                f"(>= {a.min_rate_delta:g} req/s) over a {a.window_s:g}s window"})

    def _adopt(self, cfg: AppConfig, pinned: bool) -> bool:
        """A controller rebuilt after a crash (or a restart by Ray) adopts the slab managers that outlived
        it (they are detached, and the workers' KV lives in their buffers), if they hold this config's
        models. Returns False when there is nothing (or something else) to adopt."""
        from app.worker import slab_manager_name
        found = {}
        for gpu in range(cfg.num_gpus):
            models = cfg.on_gpu(gpu) if pinned else cfg.models
            if not models:
                continue
            try:
                h = ray.get_actor(slab_manager_name(gpu), namespace=cfg.namespace)
                stats = ray.get(h.stats.remote(), timeout=30)
            except (ValueError, ray.exceptions.RayError):
                return False
            if set(stats.get("models", {})) != {m.tier for m in models}:
                return False
            found[gpu] = h
        if not found:
            return False
        self.cfg, self.managers = cfg, found
        self._decide({"gpus": sorted(found), "reason": "adopted the live slab managers after a controller restart"})
        return True

    def _cuda(self) -> bool:
        if self.cfg.device != "auto":
            return self.cfg.device == "cuda"
        import torch
        return torch.cuda.is_available()

    def _kv_bytes(self, cfg: AppConfig, models: list[ModelDeployment], cuda: bool, gpu: int) -> int:
        if cfg.kv_cache_bytes:
            return cfg.kv_cache_bytes
        if not cuda:
            return CPU_KV_BYTES
        import torch
        total = torch.cuda.get_device_properties(gpu).total_memory
        used = sum(weight_bytes(m) * m.replicas + ACTIVATION_RESERVE * m.replicas for m in models)
        kv = int(total * cfg.gpu_memory_utilization) - used
        if kv <= 0:
            raise ValueError(f"gpu {gpu}: the weights of {[m.tier for m in models]} leave no room for a KV buffer")
        return kv

    def placement(self) -> dict:
        with self.lock:
            return {"gpus": {g: [m.tier for m in self.cfg.on_gpu(g)] for g in range(self.cfg.num_gpus)},
                    "replicas": dict(self.replicas), "autoscale": self.scaler is not None,
                    "load": self._loads(), "decisions": list(self.history)}

    def decisions(self) -> list[dict]:
        return list(self.history)

    def loads(self) -> dict:
        """Per tier: rate, overflow rate, SLO attainment, lengths, running/waiting, KV blocks in use."""
        with self.lock:
            return self._loads()

    def _loads(self) -> dict:
        if self.meter is None:
            return {}
        from dataclasses import asdict
        return {t: asdict(v) for t, v in self.meter.loads(list(self.replicas), time.monotonic()).items()}

    # ---- dynamic sizing ---------------------------------------------------------------------------
    def report(self, tier: str, replica: str, stats: dict) -> None:
        """A worker replica's cumulative counts and current load (once a second)."""
        with self.lock:
            if self.meter is not None and tier in self.replicas:
                self.meter.add(tier, replica, stats, time.monotonic())
                self.apps[tier] = stats.get("app", self.apps.get(tier))

    def _loop(self) -> None:
        while True:
            tick = self.cfg.autoscale.tick_s if self.cfg else 1.0
            time.sleep(tick)
            try:
                self._tick()
            except Exception:                 # keep planning; the traceback is in the controller log
                log.exception("fineserve controller: planning failed")

    def _tick(self) -> None:
        with self.lock:
            if self.scaler is None:
                return
            a, now = self.cfg.autoscale, time.monotonic()
            loads = self.meter.loads(list(self.replicas), now)
            trigger = "period" if now - self.last_plan >= a.period_s else None
            for tier, load in loads.items():
                r0 = self.planned_rates.get(tier, 0.0)
                if trigger is None and abs(load.rate - r0) >= max(a.min_rate_delta, a.rate_shift * r0):
                    trigger = f"rate shift of {tier}: {r0:.2f} -> {load.rate:.2f} req/s"
            held = any(now - t >= a.downscale_delay_s for t in self.scaler.down_since.values())
            if trigger is None and held:
                trigger = "a held scale-down is due"
            if trigger is None:
                return
            self.last_plan, self.planned_rates = now, {t: v.rate for t, v in loads.items()}
            decisions = self.scaler.plan(loads, dict(self.replicas), now)
        for d in decisions:
            if d.apply:
                ok, err = self._apply(d.tier, d.target)
                if not ok:
                    self.scaler.down_since.pop(d.tier, None)     # a failed scale-down waits its delay again
                self._decide({"tier": d.tier, "from": d.current, "to": d.target, "applied": ok, "trigger": trigger,
                              "reason": d.reason + ("" if ok else f"; NOT applied: {err}")})
            elif d.target != d.current and self.scaler.down_since.get(d.tier) == now:
                self._decide({"tier": d.tier, "from": d.current, "to": d.target, "applied": False,
                              "trigger": trigger, "reason": d.reason})      # a hold, logged when it starts

    def _apply(self, tier: str, n: int) -> tuple[bool, str]:
        """Ask Serve for `n` replicas of a tier (external scaler API)."""
        from ray.serve._private.common import DeploymentID
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
        app = self.apps.get(tier)
        if app is None:
            return False, "no worker of this tier has reported its Serve application yet"
        m = next(m for m in self.cfg.models if m.tier == tier)
        try:
            serve_ctl = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
            ray.get(serve_ctl.update_deployment_replicas.remote(DeploymentID(m.deployment_name, app), n), timeout=30)
        except Exception as e:                # e.g. ExternalScalerDisabledError: say so in the decision
            return False, f"{type(e).__name__}: {e}"
        with self.lock:
            self.replicas[tier] = n
        return True, ""

    def kv_stats(self) -> dict:
        return {g: ray.get(h.stats.remote()) for g, h in self.managers.items()}


def _kill_named(name: str, namespace: str, wait_s: float = 10.0) -> None:
    """Kill a named actor if it exists and wait until its name is free again."""
    try:
        h = ray.get_actor(name, namespace=namespace)
    except ValueError:
        return
    ray.kill(h)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:
            return
        time.sleep(0.1)


GpuSlabManagerActor = ray.remote(num_cpus=0, max_concurrency=16)(GpuSlabManager)
