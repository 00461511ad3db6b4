"""Configuration models. Strict pydantic: an unknown or mistyped key is an error, never ignored."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Precision = Literal["bf16", "fp8", "w4a8kv4"]
PRECISIONS: tuple[str, ...] = ("bf16", "fp8", "w4a8kv4")
# Tokens per KV block, FineServe's defaults (w4a8kv4 blocks carry their scale area inside the block).
DEFAULT_TOKENS_PER_BLOCK = {"bf16": 32, "fp8": 32, "w4a8kv4": 64}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LlamaConfig(Strict):
    """Shape of a Llama-family decoder (SmolLM2, Llama-2/3, Qwen2-like without biases)."""
    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None          # HF dict, e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @model_validator(mode="after")
    def _check(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        return self


class EngineConfig(Strict):
    """One model replica's engine."""
    model: str                                   # a known name (smollm2-135m, llama-3-8b-shape, ...) or a directory
    precision: Precision = "bf16"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"   # auto: bf16 on CUDA, fp32 on CPU
    device: str = "auto"
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=16)
    max_model_len: int | None = Field(None, ge=16)   # default: min(model's max positions, 4096)
    tokens_per_block: int | None = Field(None, ge=1)
    kv_cache_bytes: int | None = Field(None, gt=0)   # private KV buffer size when no shared allocator is given
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    seed: int = 0                                    # random weights of shape presets
    scheduler: Literal["fcfs", "saab", "saab-online", "prism"] = "fcfs"   # prism: the Prism baseline's queue
    ttft_per_token: float = Field(0.0, ge=0.0)       # SAAB's TTFT model: seconds of prefill per batched token
    cuda_graphs: bool = True                         # decode steps replay CUDA graphs (CUDA only)
    # steps with prompt tokens, up to this many tokens, replay piecewise graphs (`step_graphs`); 0: eager
    graph_max_tokens: int = Field(2048, ge=0)
