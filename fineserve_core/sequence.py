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
    prefix_offset: int = 0                   # incremental detokenization window over output_ids:
    read_offset: int = 0                     # text up to read_offset is in `text`, decoded from prefix_offset
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


def new_text(tokenizer, seq: Sequence, final: bool) -> str:
    """Text that `seq`'s latest output token adds (incremental detokenization). Decodes a short window, not
    the whole output (that was O(length) per token: 14.8 ms per step at batch 64 by the 512th token,
    0.26 ms this way; `python -m load_tests.detok_speed`).
    The window starts where the text was last complete, so tokenizers that strip a leading space or split
    a UTF-8 character across tokens decode it the same way twice; an incomplete character (U+FFFD at the
    end) waits for the next token unless the request ends here."""
    if tokenizer is None:
        return ""
    ids = seq.output_ids
    fast = getattr(tokenizer, "backend_tokenizer", None)        # the Rust tokenizer, without transformers' wrapper

    def dec(a: int, b: int) -> str:
        if fast is not None:
            return fast.decode(ids[a:b], skip_special_tokens=True)
        return tokenizer.decode(ids[a:b], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    prefix = dec(seq.prefix_offset, seq.read_offset)
    full = dec(seq.prefix_offset, len(ids))
    if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
        return ""
    seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
    return full[len(prefix):]
