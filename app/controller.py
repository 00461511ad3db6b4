"""Controller: the global scheduler's home, a detached named actor in the app's namespace.

It applies the placement written in the config: one GpuSlabManager per GPU, sized once from the config
(KV buffer = what the GPU holds besides the weights of the models placed on it). With `autoscale`
enabled it also sizes every tier: workers report their counts and load each second (`report`), a
thread re-plans every `period_s` and at once when a tier's rate shifts, through the real placement
(app/autoscaler.py), and applies replica counts with Serve's external scaler API (the app is deployed
with `external_scaler_enabled: true`). Serve starts a new replica before it counts, and stops a removed
one gracefully (its in-flight requests finish); the slab manager reclaims the blocks of a replica that
is gone. `move(tier, gpu)` re-places a tier live: new replicas on the target GPU first, then the old ones
drain, then the old GPU's slab manager frees their blocks; with `autoscale.moves` the plans call it too,
for a tier the placement puts on another GPU (`Autoscaler.colocation`). Every decision is kept with its
reason (`decisions()`, GET /v1/fineserve/placement) and logged.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque

import ray

from app.autoscaler import CPU_MEMORY_PER_GPU, Autoscaler, RateMeter
from app.config import AppConfig, ModelDeployment
from app.slab_manager import LOAD_TIMEOUT_S, GpuSlabManager
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


def model_kv_spec(app: AppConfig, m: ModelDeployment, cuda: bool, placed: bool = True) -> ModelKVSpec:
    """`placed` False: a model that may join this GPU later, known to its slab manager without a share
    of the pools (rate 0)."""
    c = resolve_model(m.source or m.name).config
    fmt = KVFormat.for_model(m.precision, c.num_kv_heads, c.head_dim, _dtype(app, m, cuda), m.engine.tokens_per_block)
    return ModelKVSpec.from_format(m.tier, fmt, c.num_layers, m.rate if placed else 0.0,
                                   m.engine.max_num_batched_tokens)


def manager_models(cfg: AppConfig, gpu: int, pinned: bool) -> list[ModelDeployment]:
    """The models a GPU's slab manager holds KV for. With the slab policies: every model of the config, so
    the slab size fits them all and any of them can move here later without re-carving (DESIGN.md); the
    pools are sized by the rates of those placed here. A static partition carves a region per model once:
    only those placed here. Unpinned, Ray may put any model on any GPU: all of them."""
    if pinned and cfg.policy == "static":
        return cfg.on_gpu(gpu)
    return cfg.models


def weight_bytes(m: ModelDeployment) -> int:
    c = resolve_model(m.source or m.name).config
    per_layer = (c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
                 + c.num_heads * c.head_dim * c.hidden_size + 3 * c.hidden_size * c.intermediate_size)
    head = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2) * 2     # bf16 embeddings
    return int(c.num_layers * per_layer * WEIGHT_BYTES_PER_PARAM[m.precision] + head)


@ray.remote(num_cpus=0)
class Controller:
    def __init__(self):
        self.cfg: AppConfig | None = None         # the live placement: a model's `gpu` follows its moves
        self.configured: AppConfig | None = None  # the config as given to configure()
        self.pinned = False
        self.managers: dict[int, ray.actor.ActorHandle] = {}
        self.history: deque[dict] = deque(maxlen=2000)
        self.lock = threading.Lock()              # report() and configure() vs the planning thread
        self.meter: RateMeter | None = None
        self.scaler: Autoscaler | None = None
        self.replicas: dict[str, int] = {}        # tier -> replica count asked of Serve
        self.apps: dict[str, str] = {}            # tier -> Serve application (from the workers' reports)
        self.last_plan, self.planned_rates = 0.0, {}
        self.moving: dict[str, dict] = {}         # tier -> {"from": gpu, "to": gpu} while it moves
        self.serve_lock = threading.Lock()        # one change of Serve's targets at a time (scaling, moves)
        threading.Thread(target=self._loop, name="fineserve-autoscale", daemon=True).start()

    def _decide(self, d: dict) -> None:
        d = {"time": time.time(), **d}
        self.history.append(d)
        log.info("fineserve controller: %s", d)

    def configure(self, app: dict, pinned: bool) -> dict:
        """Apply a config: (re)create the per-GPU slab managers when the model set changed."""
        cfg = AppConfig(**app)
        self.pinned = pinned
        if self.configured == cfg and self.managers:
            self._set_cfg(cfg)        # the app is deployed again as configured: every tier where the config says
            return self.placement()
        if self.cfg is None and self._adopt(cfg, pinned):
            self._init_scaling()
            return self.placement()
        for h in self.managers.values():
            ray.kill(h)
        self.cfg = self.configured = cfg
        self.managers = {}
        cuda = self._cuda()
        from app.worker import slab_manager_name
        for gpu in range(cfg.num_gpus):
            models = manager_models(cfg, gpu, pinned)
            if not models:
                continue
            _kill_named(slab_manager_name(gpu), cfg.namespace)    # left by an earlier controller
            specs = [model_kv_spec(cfg, m, cuda, placed=not pinned or m.gpu == gpu) for m in models]
            kv = self._kv_bytes(cfg, cfg.on_gpu(gpu), cuda, gpu)
            self.managers[gpu] = GpuSlabManagerActor.options(
                name=slab_manager_name(gpu), namespace=cfg.namespace, lifetime="detached",
            ).remote(gpu, specs, kv, f"cuda:{gpu}" if cuda else "cpu", cfg.policy, cfg.slab_policy)
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
            models = manager_models(cfg, gpu, pinned)
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
        self.cfg = self.configured = cfg
        self.managers = found
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
                    "moving": dict(self.moving), "load": self._loads(), "decisions": list(self.history)}

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
            if trigger is None and a.moves and any(now - t >= a.move_delay_s for t in self.scaler.move_since.values()):
                trigger = "a held move is due"
            if trigger is None:
                return
            self.last_plan, self.planned_rates = now, {t: v.rate for t, v in loads.items()}
            decisions = self.scaler.plan(loads, dict(self.replicas), now)
            moves = self.scaler.colocation(now, set(self.apps)) if a.moves and not self.moving else []
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
        for mv in moves:                      # the plan's co-location, one move at a time
            if self.move(mv.tier, mv.gpu, f"plan ({trigger}): {mv.reason}")["accepted"]:
                break
            self.scaler.move_since.pop((mv.tier, mv.gpu), None)     # refused: asked again only after the delay

    def _apply(self, tier: str, n: int) -> tuple[bool, str]:
        """Ask Serve for `n` replicas of a tier (external scaler API)."""
        from ray.serve._private.common import DeploymentID
        app = self.apps.get(tier)
        if app is None:
            return False, "no worker of this tier has reported its Serve application yet"
        m = next(m for m in self.cfg.models if m.tier == tier)
        try:
            with self.serve_lock:
                ray.get(_serve_controller().update_deployment_replicas.remote(
                    DeploymentID(m.deployment_name, app), n), timeout=30)
        except Exception as e:                # e.g. ExternalScalerDisabledError: say so in the decision
            return False, f"{type(e).__name__}: {e}"
        with self.lock:
            self.replicas[tier] = n
        return True, ""

    # ---- live re-placement ------------------------------------------------------------------------
    def move(self, tier: str, gpu: int, reason: str = "operator request") -> dict:
        """Move a tier's replicas to GPU `gpu` without losing a request. Serve starts the new replicas,
        pinned to the target GPU, before it stops the old ones; an old replica then drains (its in-flight
        requests finish) and exits, and the old GPU's slab manager takes its blocks back. Returns at once
        ({"accepted": bool, "reason": str}); each step is a decision (`decisions()`) as it happens."""
        with self.lock:
            why_not = self._cannot_move(tier, gpu)
            if why_not is None:
                m = next(m for m in self.cfg.models if m.tier == tier)
                self.moving[tier] = {"from": m.gpu, "to": gpu}
        if why_not is not None:
            self._decide({"tier": tier, "to_gpu": gpu, "step": "refused", "reason": f"{reason}; not moved: {why_not}"})
            return {"accepted": False, "reason": why_not}
        threading.Thread(target=self._move, args=(m, gpu, self.apps[tier], reason), name=f"move-{tier}",
                         daemon=True).start()
        return {"accepted": True, "reason": reason}

    def _cannot_move(self, tier: str, gpu: int) -> str | None:
        m = next((m for m in self.cfg.models if m.tier == tier), None)
        if m is None:
            return f"unknown tier {tier!r}; known: {[m.tier for m in self.cfg.models]}"
        if not 0 <= gpu < self.cfg.num_gpus:
            return f"no GPU {gpu} (num_gpus {self.cfg.num_gpus})"
        if m.gpu == gpu:
            return f"{tier} already runs on GPU {gpu}"
        if tier in self.moving:
            return f"{tier} is moving already"
        if not self.pinned:
            return "the cluster has no fineserve_gpu_<i> resources: Ray, not the placement, picks each replica's GPU"
        if self.cfg.policy == "static":
            return f"a static partition has no KV region for {tier} on GPU {gpu} (regions are carved once)"
        if tier not in self.apps:
            return "no replica of this tier has reported its Serve application yet"
        n = self.replicas[tier]
        share = n * m.gpu_fraction + sum(self.replicas[o.tier] * o.gpu_fraction for o in self.cfg.on_gpu(gpu))
        if share > 1.0 + 1e-9:
            return f"GPU {gpu} has no room: its tiers and {n} x {tier} would take {share:.2f} of it"
        if self._cuda():
            need = n * (weight_bytes(m) + ACTIVATION_RESERVE)
            room = self._weight_room(gpu)
            if need > room:
                return (f"GPU {gpu} has {room / (1 << 30):.1f} GiB outside its KV buffer and the weights of its "
                        f"tiers; {n} x {tier} need {need / (1 << 30):.1f} GiB")
        return None

    def _weight_room(self, gpu: int) -> int:
        """Bytes of a GPU neither its KV buffer (sized once, from the config) nor its tiers' weights take."""
        import torch
        total = int(torch.cuda.get_device_properties(gpu).total_memory * self.cfg.gpu_memory_utilization)
        kv = self._kv_bytes(self.configured, self.configured.on_gpu(gpu), True, gpu)
        weights = sum(self.replicas[o.tier] * (weight_bytes(o) + ACTIVATION_RESERVE) for o in self.cfg.on_gpu(gpu))
        return total - kv - weights

    def _move(self, m: ModelDeployment, dst: int, app: str, why: str) -> None:
        tier, src, dep = m.tier, m.gpu, m.deployment_name

        def step(name: str, reason: str, **kw) -> None:
            self._decide({"tier": tier, "from_gpu": src, "to_gpu": dst, "step": name, **kw, "reason": reason})

        t0, redeployed, started = time.time(), False, False
        try:
            old = {r["replica_id"] for r in self._serve_deployment(app, dep)["replicas"]}
            with self.serve_lock:
                drain_s = self._redeploy(app, m, dst)
            redeployed = True
            self._set_gpu(tier, dst)
            step("move", f"{why}: Serve starts {tier} on GPU {dst} and stops its {len(old)} replica(s) on GPU "
                         f"{src} only once the new ones run")

            serving = [len(old)]        # the fewest old replicas seen running while the new ones started

            def new_running():
                d = self._serve_deployment(app, dep)
                new = [r["replica_id"] for r in d["replicas"] if r["replica_id"] not in old and r["state"] == "RUNNING"]
                if len(new) >= d["target_num_replicas"]:
                    return new, [r for r in d["replicas"] if r["replica_id"] in old]
                running_old = sum(r["replica_id"] in old and r["state"] == "RUNNING" for r in d["replicas"])
                serving[0] = min(serving[0], running_old)
            new, present = _until(new_running, LOAD_TIMEOUT_S, f"the replicas of {tier} on GPU {dst} to run")
            started, t_new = True, time.time()
            with self.lock:     # the old replicas' last reports (once a second)
                in_flight = sum(c.get("running", 0) + c.get("waiting", 0)
                                for (t, r), (c, _) in self.meter.last.items() if t == tier and r in old)
            mgr = self.managers[src]
            held = sum(o["blocks"] for o in ray.get(mgr.owners.remote()).values() if o["model"] == tier)
            step("new replica running", f"{len(new)} replica(s) of {tier} run on GPU {dst} (at least {serving[0]} "
                 f"old one(s) served meanwhile); the {len(present)} old one(s) on GPU {src} "
                 f"({', '.join(r['state'] for r in present) or 'none'}) are stopped gracefully: they take no new "
                 f"requests and drain their {in_flight} in flight", new_replicas=new, old_serving_min=serving[0],
                 old_replicas_present=len(present), old_in_flight=in_flight)

            _until(lambda: not any(r["replica_id"] in old for r in self._serve_deployment(app, dep)["replicas"]),
                   drain_s + 30, f"the old replicas of {tier} to drain")
            step("old drained", f"the old replica(s) on GPU {src} stopped {time.time() - t_new:.1f}s after the new "
                                f"ones ran (Serve stops a replica once its in-flight requests finish, or after "
                                f"graceful_shutdown_timeout_s = {drain_s:g}s)")

            def gone() -> bool:
                # a replica that exits gracefully gives its blocks back itself; the manager drops the dead
                # owner (and frees what it still held, after a crash) when it reaps: at once here
                ray.get(mgr.reap.remote())
                return not any(o["model"] == tier for o in ray.get(mgr.owners.remote()).values())
            _until(gone, 60, f"GPU {src}'s slab manager to reclaim the blocks of {tier}")
            reaped = ray.get(mgr.reclaimed_blocks.remote(tier, t0))
            left = ray.get(mgr.num_allocated_blocks.remote(tier))
            step("slabs freed", f"the old replica(s) of {tier} held {held} KV blocks on GPU {src} when they began "
                                f"to drain; {left} remain allocated there; " + (
                                    f"{reaped} were reclaimed from a replica that died holding them" if reaped
                                    else "they gave them back as they exited"),
                 held_blocks=held, reaped_blocks=reaped, allocated_after=left)
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
            if redeployed and not started:
                # the new replicas never ran, so the old ones still serve (Serve stops them only after): go back
                try:
                    with self.serve_lock:
                        self._redeploy(app, m, src)
                    self._set_gpu(tier, src)
                    reason += f"; moved back to GPU {src}"
                except Exception as e2:
                    reason += f"; moving back failed too: {type(e2).__name__}: {e2}"
            step("failed", reason)
        finally:
            with self.lock:
                self.moving.pop(tier, None)

    def _set_gpu(self, tier: str, gpu: int) -> None:
        self._set_cfg(self.cfg.model_copy(update={"models": [
            m.model_copy(update={"gpu": gpu}) if m.tier == tier else m for m in self.cfg.models]}))

    def _set_cfg(self, cfg: AppConfig) -> None:
        with self.lock:
            self.cfg = cfg
            if self.scaler is not None:
                self.scaler.cfg = cfg          # its GPU shares follow the live placement

    def _serve_deployment(self, app: str, dep: str) -> dict:
        """Serve's view of one deployment: its replicas (replica_id, state, ...) and target_num_replicas."""
        d = ray.get(_serve_controller().get_serve_instance_details.remote(), timeout=30)
        return {"replicas": [], **d["applications"][app]["deployments"][dep]}

    def _redeploy(self, app: str, m: ModelDeployment, gpu: int) -> float:
        """Give Serve the running app again with one change: tier `m` pinned to `gpu`. Every deployment keeps
        its version, options and current replica count, so Serve leaves the others alone; for this one new
        actor options make a new version, which Serve rolls out. max_surge_percent 100: a new replica starts
        and passes its health check before an old one is stopped (ray/serve/_private/deployment_state.py,
        `_surge_replicas_to_stop`); the old one then shuts down gracefully (replica.py: it waits for its
        ongoing requests, up to graceful_shutdown_timeout_s, which is returned). A later serve.run replaces
        all of this."""
        from ray import cloudpickle
        from ray.serve._private.config import ReplicaConfig
        from ray.serve.generated.serve_pb2 import ApplicationArgs, DeploymentArgs
        from app.builder import gpu_resource        # here: app.builder imports this module
        ctl = _serve_controller()
        details = ray.get(ctl.get_serve_instance_details.remote(), timeout=30)["applications"][app]["deployments"]
        targets = {name: d["target_num_replicas"] for name, d in details.items()}
        args = []
        for dep_id, (info, _) in ray.get(ctl.list_deployments_internal.remote(), timeout=30).items():
            if dep_id.app_name != app:
                continue
            dc, rc = info.deployment_config, info.replica_config
            dc.version, dc.num_replicas = info.version, targets[dep_id.name]
            if dep_id.name == m.deployment_name:
                dc.max_surge_percent, drain_s = 100, dc.graceful_shutdown_timeout_s
                res = {k: v for k, v in rc.ray_actor_options.get("resources", {}).items()
                       if not k.startswith("fineserve_gpu_")}
                opts = {**rc.ray_actor_options, "resources": {**res, gpu_resource(gpu): m.gpu_fraction}}
                model, app_args, pinned = rc.init_args     # ModelWorker(model, app, pinned) maps GPU model["gpu"]
                rc = ReplicaConfig(rc.deployment_def_name, rc.serialized_deployment_def,
                                   cloudpickle.dumps(({**model, "gpu": gpu}, app_args, pinned)),
                                   rc.serialized_init_kwargs, opts)
            a = DeploymentArgs(deployment_name=dep_id.name, deployment_config=dc.to_proto_bytes(),
                               replica_config=rc.to_proto_bytes(), deployer_job_id=info.deployer_job_id,
                               ingress=info.ingress)
            if info.route_prefix is not None:
                a.route_prefix = info.route_prefix
            args.append(a.SerializeToString())
        scaler = ray.get(ctl.get_external_scaler_enabled.remote(app), timeout=30)
        ray.get(ctl.deploy_applications.remote(
            {app: args}, {app: ApplicationArgs(external_scaler_enabled=scaler).SerializeToString()}), timeout=60)
        return drain_s

    def kv_stats(self) -> dict:
        return {g: ray.get(h.stats.remote()) for g, h in self.managers.items()}


def _serve_controller():
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
    return ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)


def _until(pred, timeout_s: float, what: str):
    """Poll `pred` until it returns something truthy (returned), or TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while not (v := pred()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f}s for {what}")
        time.sleep(0.5)
    return v


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
