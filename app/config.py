"""The application's `args` (from serve_configs/*.yaml): one strict schema, unknown keys are errors."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fineserve_core.config import Precision, Strict


class SLO(Strict):
    ttft_ms: float | None = Field(None, gt=0)    # None: scale × this model's single-request TTFT at 903 tokens
    tpot_ms: float | None = Field(None, gt=0)
    ttft_scale: float = Field(40.0, gt=0)       # FineServe's SLO_SCALE


class EngineOverrides(Strict):
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=16)
    max_model_len: int | None = Field(None, ge=16)
    tokens_per_block: int | None = Field(None, ge=1)
    seed: int = 0


class ModelDeployment(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")   # logical model name clients send in `model`
    source: str | None = None                         # known name or checkpoint directory; default: name
    precision: Precision = "bf16"
    gpu: int = Field(0, ge=0)                         # which GPU of the node (placement from config)
    gpu_fraction: float = Field(0.5, gt=0, le=1)
    replicas: int = Field(1, ge=1)
    rate: float = Field(1.0, ge=0)                    # expected requests/s: KV pool split and placement
    scheduler: Literal["saab", "fcfs"] = "saab"
    slo: SLO = SLO()
    engine: EngineOverrides = EngineOverrides()

    @property
    def tier(self) -> str:
        """`name:precision`: one precision tier of a logical model; also its KV Slab model id."""
        return f"{self.name}:{self.precision}"

    @property
    def deployment_name(self) -> str:
        return "worker-" + self.tier.replace(":", "-").replace(".", "_")


class AppConfig(Strict):
    models: list[ModelDeployment] = Field(min_length=1)
    num_gpus: int = Field(1, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    kv_cache_bytes: int | None = Field(None, gt=0)    # per GPU; default: what the GPU holds besides weights
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    namespace: str = "fineserve"

    @model_validator(mode="after")
    def _check(self):
        tiers = [m.tier for m in self.models]
        dup = {t for t in tiers if tiers.count(t) > 1}
        if dup:
            raise ValueError(f"model tiers listed twice: {sorted(dup)}")
        for m in self.models:
            if m.gpu >= self.num_gpus:
                raise ValueError(f"model {m.tier} is placed on gpu {m.gpu} but num_gpus is {self.num_gpus}")
        for g in range(self.num_gpus):
            share = sum(m.gpu_fraction for m in self.models if m.gpu == g)
            if share > 1.0 + 1e-9:
                raise ValueError(f"gpu {g} is over-committed: gpu_fraction sums to {share:.2f}")
        return self

    def on_gpu(self, gpu: int) -> list[ModelDeployment]:
        return [m for m in self.models if m.gpu == gpu]
