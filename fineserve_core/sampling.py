"""Sampling parameters (validated like vLLM/OpenAI's) and the sampler."""
from __future__ import annotations

import torch
from pydantic import Field, field_validator

from fineserve_core.config import Strict

MAX_STOP_STRINGS = 16


class SamplingParams(Strict):
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)                 # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return ()
        if isinstance(v, str):
            v = (v,)
        v = tuple(v)
        if len(v) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(v)}")
        if any(not isinstance(s, str) or not s for s in v):
            raise ValueError("stop strings must be non-empty strings")
        return v

    @property
    def greedy(self) -> bool:
        # a temperature this small overflows the logits: treat it as greedy, as vLLM does
        return self.temperature < 1e-5 or self.top_k == 1


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from one row of float32 logits."""
    if params.greedy:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < max(params.top_p, 1e-6)   # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p * keep)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def sample_batch(logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of float32 logits [B, V]: greedy rows with one batched argmax and one device→host
    copy (a per-row argmax + int() is a launch and a sync per sequence); the others row by row."""
    greedy = logits.argmax(-1).tolist() if any(p.greedy for p in params) else None
    return [greedy[i] if p.greedy else sample(logits[i], p, g)
            for i, (p, g) in enumerate(zip(params, generators))]
