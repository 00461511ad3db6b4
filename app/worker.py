"""ModelWorker: one Serve replica hosting one model tier's engine on a fraction of a GPU."""
from __future__ import annotations

import os
import threading
import time

import ray
from ray import serve
from ray.serve.metrics import Counter, Gauge, Histogram

from app.config import AppConfig, ModelDeployment
from app.controller import CONTROLLER_NAME
from app.grpc_bind import bind_to_node_ip
from app.slab_manager import RemoteAllocator
from fineserve_core.async_engine import AsyncEngine
from fineserve_core.config import EngineConfig
from fineserve_core.engine import Engine, RequestError
from fineserve_core.sampling import SamplingParams

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60]
SLO_LEN = 903   # FineServe: TTFT SLO = scale x single-request TTFT at the p95 LMSYS input length


def slab_manager_name(gpu: int) -> str:
    return f"fineserve-slab-gpu{gpu}"


def physical_gpu(planned: int, pinned: bool) -> int:
    """The GPU this replica runs on: the planned one when per-GPU resources pin it, else Ray's choice."""
    if pinned:
        return planned
    ids = ray.get_gpu_ids()
    return int(ids[0]) if ids else planned


class ModelWorker:
    def __init__(self, model: dict, app: dict, pinned: bool):
        bind_to_node_ip()
        self.cfg, app_cfg = ModelDeployment(**model), AppConfig(**app)
        self.gpu = physical_gpu(self.cfg.gpu, pinned)
        device = app_cfg.device
        if device == "auto":
            import torch
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":
            device = f"cuda:{self.gpu}"   # CUDA_VISIBLE_DEVICES is left alone: indices are physical
        manager = ray.get_actor(slab_manager_name(self.gpu), namespace=app_cfg.namespace)
        e = self.cfg.engine
        ecfg = EngineConfig(model=self.cfg.source or self.cfg.name, precision=self.cfg.precision, dtype=e.dtype,
                            device=device, max_num_seqs=e.max_num_seqs, max_num_batched_tokens=e.max_num_batched_tokens,
                            max_model_len=e.max_model_len, tokens_per_block=e.tokens_per_block, seed=e.seed,
                            cuda_graphs=e.cuda_graphs, graph_max_tokens=e.graph_max_tokens,
                            scheduler=app_cfg.scheduler_of(self.cfg))
        ray.get(manager.begin_load.remote(self.cfg.tier))       # one model loads on a GPU at a time
        try:
            # the manager tracks this replica's blocks by its actor id and frees them if it dies; a dead
            # predecessor's blocks are reclaimed now, before this replica needs the room
            ctx = ray.get_runtime_context()
            owner = ctx.get_actor_id()
            ray.get(manager.register_owner.remote(self.cfg.tier, owner, ctx.current_actor))
            ray.get(manager.reap.remote(timeout_s=2.0, skip=owner))
            engine = Engine(ecfg, allocator=RemoteAllocator(manager, owner), model_id=self.cfg.tier)
            tpt = engine.measure_ttft_per_token()
        finally:
            manager.end_load.remote(self.cfg.tier)
        self.manager = manager
        engine.scheduler.ttft_per_token = tpt
        self.ttft_slo = (self.cfg.slo.ttft_ms / 1e3 if self.cfg.slo.ttft_ms
                         else self.cfg.slo.ttft_scale * tpt * SLO_LEN)
        self.tpot_slo = self.cfg.slo.tpot_ms / 1e3 if self.cfg.slo.tpot_ms else None
        self.engine, self.aengine = engine, AsyncEngine(engine)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        tags = {"model": self.cfg.tier}
        self.m_ttft = Histogram("fineserve_ttft_seconds", "time to first token", LATENCY_BUCKETS, tag_keys=("model",))
        self.m_tpot = Histogram("fineserve_tpot_seconds", "time per output token", LATENCY_BUCKETS, tag_keys=("model",))
        self.m_e2e = Histogram("fineserve_e2e_seconds", "request latency", LATENCY_BUCKETS, tag_keys=("model",))
        self.m_req = Counter("fineserve_requests", "finished requests by outcome", tag_keys=("model", "outcome"))
        self.m_tok = Counter("fineserve_generation_tokens", "generated tokens", tag_keys=("model",))
        self.m_running = Gauge("fineserve_num_running", "sequences running", tag_keys=("model",))
        self.m_waiting = Gauge("fineserve_num_waiting", "sequences waiting", tag_keys=("model",))
        self.m_kv = Gauge("fineserve_kv_blocks", "KV blocks of this replica by state", tag_keys=("model", "state"))
        for m in (self.m_ttft, self.m_tpot, self.m_e2e, self.m_req, self.m_tok, self.m_running, self.m_waiting, self.m_kv):
            m.set_default_tags(dict(tags))          # Serve adds its own tags to the dict it gets
        self.started = time.time()
        # cumulative counts the controller turns into rates (it keeps the deltas, so replicas may come and go)
        self.counts = dict.fromkeys(("arrivals", "overflowed", "finished", "slo_met", "dropped", "prompt_tokens",
                                     "requested_tokens", "output_tokens"), 0)
        self.unstarted_tokens = 0          # prompt tokens of this replica's requests without a first token yet
        self.namespace, self.controller, self.last_report = app_cfg.namespace, None, None
        self.app_name = serve.get_replica_context().app_name
        threading.Thread(target=self._publish, name="worker-metrics", daemon=True).start()

    def _publish(self) -> None:
        """Gauges and the manager's live-token count, once a second (reads engine state without a lock:
        a slightly stale number is fine for metrics)."""
        while self.aengine.error is None:
            e = self.engine
            running = list(e.scheduler.running)
            self.m_running.set(len(running))
            self.m_waiting.set(len(e.scheduler.waiting))
            self.m_kv.set(e.blocks.num_in_use, tags={"state": "in_use"})
            self.m_kv.set(e.blocks.num_cached, tags={"state": "cached"})
            self.manager.report_live_tokens.remote(self.cfg.tier, sum(s.num_computed for s in running))
            self._report(running)
            time.sleep(1.0)

    def _report(self, running: list) -> None:
        """Counts and load to the controller (the global scheduler sizes tiers from them)."""
        try:
            if self.last_report is not None and ray.wait([self.last_report], timeout=0)[0]:
                ray.get(self.last_report)          # raises when the controller died: look it up again
            if self.controller is None:
                self.controller = ray.get_actor(CONTROLLER_NAME, namespace=self.namespace)
            self.last_report = self.controller.report.remote(self.cfg.tier, self.replica_id, {
                **self.counts, "app": self.app_name, "running": len(running),
                "waiting": len(self.engine.scheduler.waiting), "kv_blocks_in_use": self.engine.blocks.num_in_use,
                "ttft_slo_s": self.ttft_slo})
        except (ValueError, ray.exceptions.RayError):     # no controller (yet, or restarting): next second
            self.controller = self.last_report = None

    def predicted_ttft(self, num_tokens: int, waited: float) -> float:
        """SAAB's linear TTFT model for a new request of `num_tokens` on this replica: every prompt token
        not yet prefilled here (requests not yet started) and one token per running decode come first."""
        s = self.engine.scheduler
        return waited + s.ttft_slope() * (self.unstarted_tokens + len(s.running) + num_tokens)

    def info(self) -> dict:
        e = self.engine
        return {"tier": self.cfg.tier, "name": self.cfg.name, "precision": self.cfg.precision, "gpu": self.gpu,
                "pid": os.getpid(), "replica": self.replica_id, "device": str(e.device), "dtype": str(e.dtype),
                "max_model_len": e.max_model_len, "ttft_slo_s": self.ttft_slo, "tpot_slo_s": self.tpot_slo,
                "ttft_per_token_s": e.scheduler.ttft_slope(), "kv_blocks_in_use": e.blocks.num_in_use,
                "kv_blocks_cached": e.blocks.num_cached, "running": len(e.scheduler.running),
                "waiting": len(e.scheduler.waiting), "created": self.started,
                "kv_buffer": e.allocator.handle_desc, "kv_buffer_bytes": e.allocator.buffer_bytes}

    def _prompt(self, req: dict):
        if req.get("messages") is not None:
            tok = self.engine.tokenizer
            if tok is None or not tok.chat_template:
                raise RequestError(f"model {self.cfg.name} has no chat template")
            try:
                return tok.apply_chat_template(req["messages"], add_generation_prompt=True, tokenize=False)
            except Exception as e:       # a template that rejects the message list (roles, order)
                raise RequestError(f"messages do not fit the chat template: {e}") from None
        return req["prompt"]

    async def generate(self, req: dict):
        """Stream dicts: {token_ids, text, finished, finish_reason, prompt_tokens, completion_tokens}, or
        one {"error": {...}} item when the request is refused."""
        rid = req["request_id"]
        self.counts["arrivals"] += 1
        try:
            params = SamplingParams(**req["params"])
            prompt = self._prompt(req)
            tok = self.engine.tokenizer          # without one the engine refuses a text prompt (400)
            n = len(prompt) if isinstance(prompt, list) else len(tok.encode(prompt)) if tok else 0
        except (RequestError, ValueError) as e:
            yield {"error": {"status": 400, "message": str(e)}}
            return
        waited = max(0.0, time.time() - req.get("arrival", time.time()))
        if req.get("overflow"):
            # the caller has a next tier: refuse now rather than queue into a predicted SLO miss
            predicted = self.predicted_ttft(n, waited)
            if predicted > self.ttft_slo:
                self.counts["overflowed"] += 1
                yield {"error": {"status": 429, "overflow": True, "predicted_ttft_s": predicted, "message": (
                    f"{self.cfg.tier}: predicted TTFT {predicted:.3f}s exceeds the SLO {self.ttft_slo:.3f}s")}}
                return
        deadline = time.monotonic() - waited + self.ttft_slo
        self.counts["prompt_tokens"] += n
        self.counts["requested_tokens"] += params.max_tokens
        self.unstarted_tokens += n
        started = False
        try:
            async for out in self.aengine.generate(rid, prompt, params, deadline):
                if not started:
                    started, self.unstarted_tokens = True, self.unstarted_tokens - n
                if out.finish_reason == "dropped":
                    self.counts["dropped"] += 1
                    self.m_req.inc(tags={"outcome": "dropped"})
                    yield {"error": {"status": 429, "message": (
                        f"{self.cfg.tier} cannot start this request within its TTFT SLO of "
                        f"{self.ttft_slo:.2f}s at the current load; retry later"), "retry_after": 1}}
                    return
                item = {"token_ids": out.new_token_ids, "text": out.delta_text, "finished": out.finished,
                        "finish_reason": out.finish_reason, "prompt_tokens": out.prompt_tokens,
                        "completion_tokens": out.completion_tokens}
                if out.finished:
                    self._record(out)
                    item["metrics"] = out.metrics      # the engine's own timings: callers can split latency
                yield item
        except (RequestError, ValueError) as e:
            yield {"error": {"status": 400, "message": str(e)}}
        finally:
            if not started:
                self.unstarted_tokens -= n

    def _record(self, out) -> None:
        m = out.metrics or {}
        if m.get("ttft") is not None:
            self.m_ttft.observe(m["ttft"])
        if m.get("tpot") is not None:
            self.m_tpot.observe(m["tpot"])
        if m.get("e2e") is not None:
            self.m_e2e.observe(m["e2e"])
        met = m.get("ttft") is not None and m["ttft"] <= self.ttft_slo
        self.counts["finished"] += 1
        self.counts["slo_met"] += met
        self.counts["output_tokens"] += out.completion_tokens
        self.m_req.inc(tags={"outcome": "slo_met" if met else "slo_missed"})
        self.m_tok.inc(out.completion_tokens)

    def record_autoscaling_stats(self) -> dict:
        e = self.engine
        return {"running": float(len(e.scheduler.running)), "waiting": float(len(e.scheduler.waiting)),
                "kv_blocks_in_use": float(e.blocks.num_in_use)}

    def check_health(self) -> None:
        if self.aengine.error is not None:
            raise RuntimeError(f"engine failed: {self.aengine.error!r}")

    def __del__(self):
        aengine = getattr(self, "aengine", None)
        if aengine is not None:
            aengine.shutdown()
