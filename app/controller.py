"""Controller: the global scheduler's home, a detached named actor in the app's namespace.

Today it applies the placement written in the config: it creates one GpuSlabManager per GPU, sized
once from the config (KV buffer = what the GPU holds besides the weights of the models placed on it),
and reports what it did. The global-scheduler issue makes the placement dynamic.
"""
from __future__ import annotations

import logging
import time

import ray

from app.config import AppConfig, ModelDeployment
from app.slab_manager import GpuSlabManager
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
        self.decisions: list[dict] = []

    def configure(self, app: dict, pinned: bool) -> dict:
        """Apply a config: (re)create the per-GPU slab managers when the model set changed."""
        cfg = AppConfig(**app)
        if self.cfg == cfg and self.managers:
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
            specs = [model_kv_spec(cfg, m, cuda) for m in models]
            kv = self._kv_bytes(cfg, cfg.on_gpu(gpu), cuda, gpu)
            self.managers[gpu] = GpuSlabManagerActor.options(
                name=slab_manager_name(gpu), namespace=cfg.namespace, lifetime="detached",
            ).remote(gpu, specs, kv, f"cuda:{gpu}" if cuda else "cpu")
            self.decisions.append({"time": time.time(), "gpu": gpu, "models": [m.tier for m in cfg.on_gpu(gpu)],
                                   "kv_bytes": kv, "reason": "placement from config"})
        ray.get([h.stats.remote() for h in self.managers.values()])   # wait until every buffer exists
        log.info("fineserve controller: %s", self.decisions[-cfg.num_gpus:])
        return self.placement()

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
        return {"gpus": {g: [m.tier for m in self.cfg.on_gpu(g)] for g in range(self.cfg.num_gpus)},
                "decisions": self.decisions}

    def kv_stats(self) -> dict:
        return {g: ray.get(h.stats.remote()) for g, h in self.managers.items()}


GpuSlabManagerActor = ray.remote(num_cpus=0, max_concurrency=16)(GpuSlabManager)
