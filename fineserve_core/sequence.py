"""A request inside the engine: its tokens, KV blocks, progress and timings."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from fineserve_core.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    deadline: float | None = None            # TTFT deadline (SLO-aware scheduling)
    output_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_computed: int = 0                    # tokens whose K/V are in the cache
    status: Status = Status.WAITING
    first_token_time: float | None = None
    finish_time: float | None = None
    finish_reason: str | None = None         # "stop" | "length" | "abort" | "error"
    text: str = ""                           # detokenized output, cut at a stop string
    num_emitted: int = 0                     # characters of `text` already streamed
    num_preemptions: int = 0
    generator: torch.Generator | None = None

    def __post_init__(self):
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def metrics(self) -> dict:
        """TTFT, TPOT and e2e in seconds (None until known)."""
        ttft = self.first_token_time - self.arrival if self.first_token_time else None
        e2e = self.finish_time - self.arrival if self.finish_time else None
        n = len(self.output_ids)
        tpot = (self.finish_time - self.first_token_time) / (n - 1) if self.finish_time and self.first_token_time and n > 1 else None
        return {"ttft": ttft, "tpot": tpot, "e2e": e2e, "prompt_tokens": len(self.prompt_ids),
                "completion_tokens": n, "preemptions": self.num_preemptions}
