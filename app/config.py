"""The application's `args` (from serve_configs/*.yaml): one strict schema, unknown keys are errors."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from fineserve_core.config import Precision, Strict
from fineserve_core.kv_slab import SERVE_SLAB_POLICY

LocalQueue = Literal["saab", "saab-online", "fcfs"]     # a model's queue under policy fineserve


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
    cuda_graphs: bool = True                     # decode steps (and, below, prompt steps) replay CUDA graphs
    graph_max_tokens: int = Field(2048, ge=0)    # prompt steps up to this many tokens: piecewise graphs (0: off)


class ModelDeployment(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")   # logical model name clients send in `model`
    source: str | None = None                         # known name or checkpoint directory; default: name
    precision: Precision = "bf16"
    gpu: int = Field(0, ge=0)                         # which GPU of the node (placement from config)
    gpu_fraction: float = Field(0.5, gt=0, le=1)
    replicas: int = Field(1, ge=1)
    rate: float = Field(1.0, ge=0)                    # expected requests/s: KV pool split and placement
    scheduler: LocalQueue = "saab"
    slo: SLO = SLO()
    engine: EngineOverrides = EngineOverrides()
    # overload control per replica (Serve deployment options): requests in flight on one replica, and
    # requests waiting in each caller's router for a replica; past both, the caller gets 429 + Retry-After
    max_ongoing_requests: int | None = Field(None, ge=1)      # None: 4 x engine.max_num_seqs
    max_queued_requests: int | None = Field(None, ge=-1)      # None: 4 x engine.max_num_seqs; -1: unbounded

    @property
    def ongoing_limit(self) -> int:
        return self.max_ongoing_requests or 4 * self.engine.max_num_seqs

    @field_validator("max_queued_requests")
    @classmethod
    def _queued(cls, q):
        if q == 0:
            raise ValueError("max_queued_requests must be -1 (unbounded) or >= 1")
        return q

    @property
    def queued_limit(self) -> int:
        return 4 * self.engine.max_num_seqs if self.max_queued_requests is None else self.max_queued_requests

    @property
    def tier(self) -> str:
        """`name:precision`: one precision tier of a logical model; also its KV Slab model id."""
        return f"{self.name}:{self.precision}"

    @property
    def deployment_name(self) -> str:
        return "worker-" + self.tier.replace(":", "-").replace(".", "_")


class IngressOptions(Strict):
    """The HTTP front: limits and how it answers when a worker is overloaded or fails."""
    max_ongoing_requests: int = Field(1000, ge=1)       # per ingress replica
    max_queued_requests: int = Field(1000, ge=1)        # waiting at the proxy; past it: 429 + Retry-After
    max_request_bytes: int = Field(4 << 20, ge=1024)    # larger bodies: 413
    retry_after_s: int = Field(1, ge=0)                 # the Retry-After of our 429s and 503s
    # a request whose replica died before any of its output reached the client is sent again
    # (to the restarted or another replica) up to this many times; a started stream gets an error event
    replica_failure_retries: int = Field(2, ge=0)
    first_output_timeout_s: float = Field(300.0, gt=0)  # queueing + prefill; past it: 429 (overload)
    stall_timeout_s: float = Field(120.0, gt=0)         # between two outputs of one request; past it: 503


class AutoscaleOptions(Strict):
    """The controller's replica sizing from measured rates (app/controller.py). It applies replica counts
    through Serve's external scaler API, so the app must be deployed with `external_scaler_enabled: true`."""
    enabled: bool = False
    tick_s: float = Field(1.0, gt=0)                 # how often rates are checked for a shift
    period_s: float = Field(30.0, gt=0)              # re-plan at least this often
    window_s: float = Field(10.0, gt=0)              # rates are measured over this window
    rate_shift: float = Field(0.5, gt=0)             # re-plan at once when a tier's rate moved by this fraction
    min_rate_delta: float = Field(0.5, ge=0)         # ... and by at least this many requests/s
    downscale_delay_s: float = Field(15.0, ge=0)     # fewer replicas only once plans asked for it this long
    max_replicas: int = Field(8, ge=1)               # per tier
    # also apply the plan's co-location: move a tier (live, `Controller.move`) to the GPU the placement
    # puts it on, once plans have asked for that move `move_delay_s` in a row; one move at a time
    moves: bool = False
    move_delay_s: float = Field(30.0, ge=0)
    memory_per_gpu_gib: float | None = Field(None, gt=0)   # None: the GPU's memory (CPU: 16 GiB)
    cost_device: str = "auto"                        # cost table tag (cpu, h100); auto: from the device


class AppConfig(Strict):
    models: list[ModelDeployment] = Field(min_length=1)
    num_gpus: int = Field(1, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    kv_cache_bytes: int | None = Field(None, gt=0)    # per GPU; default: what the GPU holds besides weights
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    namespace: str = "fineserve"
    # KV memory + local queue policy of every GPU (the baselines run on the same engine and kernels):
    #   fineserve  KV Slab (`slab_policy`) + each model's `scheduler` (SAAB by default)
    #   static     StaticPartitionAllocator, regions ∝ rate x KV bytes/token (MuxServe/vLLM-like) + FCFS
    #   prism      one shared pool of precision-unaware 2 MiB pages (padded slabs) + Prism's queue
    policy: Literal["fineserve", "static", "prism"] = "fineserve"
    # the KV Slab variant under policy fineserve (`fineserve_core.kv_slab.SLAB_POLICIES`): by default
    # FineServe's slabs over power-of-two blocks, INT4 KV scales in slots of their own (SERVE_SLAB_POLICY);
    # "faithful" is FineServe's code (slabs of 2 x lcm of the block sizes, scales inside the blocks)
    slab_policy: str = SERVE_SLAB_POLICY
    ingress: IngressOptions = IngressOptions()
    # a request naming the logical model goes to its best tier; "overflow": when that tier's replica
    # predicts a TTFT SLO miss (SAAB's linear model), the next tier serves it instead of the queue
    tiering: Literal["overflow", "off"] = "overflow"
    autoscale: AutoscaleOptions = AutoscaleOptions()
    # Optional bearer API keys for /v1/*: the name of an environment variable holding comma-separated
    # keys and/or a file with one key per line (blank lines and #-comments skipped). The keys are read
    # where the app is built and only their SHA-256 digests reach the ingress; they are never logged.
    api_keys_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    api_keys_file: str | None = None

    @field_validator("slab_policy")
    @classmethod
    def _known_slab_policy(cls, v: str) -> str:
        from fineserve_core.kv_slab import SLAB_POLICIES
        if v not in SLAB_POLICIES:
            raise ValueError(f"unknown slab_policy {v!r}; known: {sorted(SLAB_POLICIES)}")
        return v

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

    def scheduler_of(self, m: ModelDeployment) -> str:
        """The local queue policy a model's engine runs under this app's `policy`."""
        return {"static": "fcfs", "prism": "prism"}.get(self.policy, m.scheduler)

    def on_gpu(self, gpu: int) -> list[ModelDeployment]:
        return [m for m in self.models if m.gpu == gpu]
