"""Continuous batching: each step mixes decodes and (chunked) prefills under a token budget.

Running sequences go first (a decode needs one token; an unfinished prefill continues with its next
chunk); then waiting ones are admitted in queue order while the budget, `max_num_seqs` and KV blocks
allow. When a running sequence cannot get a block, the newest running sequence is preempted by
recompute: its blocks are freed and it re-prefills later, so no output token ever changes.

Admission policy: `fcfs` (queue order) or `saab`, FineServe's SLO-aware adaptive batching: with a
linear TTFT model (seconds per batched token), a request that would miss its TTFT deadline even if
admitted alone now is dropped (reported to the client, counted as an SLO miss); of the rest, the
longest are held back until every admitted request is predicted to meet its deadline. `saab-online`:
the same rule with the TTFT model's slope taken from the replica's own recent steps (seconds per batched
token over the last steps that carried prompt tokens, never below the profiled slope), so that a GPU
shared with other models, whose steps stretch under their load, is not assumed idle. `prism`
(`PrismScheduler`): Prism's queue, the baseline's local policy.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Callable

from fineserve_core.kv_slab import BlockCache, KVOutOfMemory
from fineserve_core.sequence import Sequence, Status

ONLINE_STEPS = 16        # saab-online: how many recent prompt-carrying steps its TTFT slope averages


class Scheduler:
    def __init__(self, blocks: BlockCache, tokens_per_block: int, max_num_seqs: int, max_num_batched_tokens: int,
                 policy: str = "fcfs", ttft_per_token: float = 0.0,
                 clock: Callable[[], float] = time.monotonic):
        if policy not in ("fcfs", "saab", "saab-online"):
            raise ValueError(f"unknown scheduling policy {policy!r} (fcfs, saab or saab-online)")
        self.blocks, self.T = blocks, tokens_per_block
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.policy, self.ttft_per_token = policy, ttft_per_token
        self.clock = clock                       # SAAB's "now"; a simulator passes its simulated clock
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.dropped: list[Sequence] = []        # SAAB drops since the engine last collected them
        self.num_preemptions = 0
        self._steps: deque[tuple[int, float]] = deque(maxlen=ONLINE_STEPS)   # saab-online: (tokens, seconds)

    def observe(self, tokens: int, seconds: float) -> None:
        """A step that carried prompt tokens ran `tokens` batched tokens in `seconds` (wall or simulated)."""
        if self.policy == "saab-online" and tokens > 0:
            self._steps.append((tokens, seconds))

    def ttft_slope(self) -> float:
        """Seconds per batched token of SAAB's TTFT model: the profiled slope, or the recent steps' if higher."""
        if not self._steps:
            return self.ttft_per_token
        return max(self.ttft_per_token, sum(t for _, t in self._steps) / sum(n for n, _ in self._steps))

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """Pick (sequence, number of new tokens) for the next step and make sure their blocks exist."""
        budget, batch = self.max_num_batched_tokens, []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(len(seq) - seq.num_computed, budget)
            while not self._grow(seq, seq.num_computed + n):
                victim = self.running.pop()
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                batch.append((seq, n))
                budget -= n
                i += 1
        for seq in self._admissible():
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            n = min(len(seq) - seq.num_computed, budget)
            if not self._grow(seq, seq.num_computed + n):
                break
            self.waiting.remove(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        return batch

    def _admissible(self) -> list[Sequence]:
        """Waiting sequences that may start now, in queue order."""
        if self.policy == "fcfs" or not self.waiting:
            return list(self.waiting)
        now, tpt = self.clock(), self.ttft_slope()
        batched = sum(len(s) - s.num_computed for s in self.running)   # a decode counts one token
        slo = [s for s in self.waiting if s.deadline is not None and s.first_token_time is None]
        for s in slo:
            if now + tpt * (batched + len(s) - s.num_computed) >= s.deadline:   # hopeless even alone
                self.waiting.remove(s)
                self._release(s)
                s.status = Status.FINISHED
                self.dropped.append(s)
        keep = [s for s in slo if not s.finished]
        while keep:
            total = batched + sum(len(s) - s.num_computed for s in keep)
            if all(now + tpt * total < s.deadline for s in keep):
                break
            keep.remove(max(keep, key=lambda s: len(s) - s.num_computed))
        held = {id(s) for s in slo} - {id(s) for s in keep}
        return [s for s in self.waiting if id(s) not in held]

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        need = -(-num_tokens // self.T) - len(seq.block_ids)
        if need > 0:
            try:
                seq.block_ids += self.blocks.alloc(need)
            except KVOutOfMemory:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence wherever it is and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = Status.FINISHED

    def _release(self, seq: Sequence) -> None:
        if seq.block_ids:
            self.blocks.free(seq.block_ids)
            seq.block_ids = []


class PrismScheduler(Scheduler):
    """Prism's queue as FineServe's code has it ("prism" local policy): like SAAB, hopeless requests
    are dropped; then requests are taken in queue order and each is admitted only if its predicted
    TTFT, now + ttft_per_token x (tokens batched + cumulative input of the admitted requests before it
    and itself), meets its deadline (per-request prediction instead of SAAB's joint one)."""

    def __init__(self, *a, **kw):
        kw["policy"] = "saab"                    # the base class validates the name; _admissible is ours
        super().__init__(*a, **kw)
        self.policy = "prism"

    def _admissible(self) -> list[Sequence]:
        if not self.waiting:
            return []
        now, tpt = self.clock(), self.ttft_per_token
        batched = sum(len(s) - s.num_computed for s in self.running)
        out, total = [], batched
        for s in list(self.waiting):
            if s.deadline is None or s.first_token_time is not None:
                out.append(s)
                continue
            need = len(s) - s.num_computed
            if now + tpt * (batched + need) >= s.deadline:       # hopeless even alone: drop
                self.waiting.remove(s)
                self._release(s)
                s.status = Status.FINISHED
                self.dropped.append(s)
                continue
            if now + tpt * (total + need) < s.deadline:
                out.append(s)
                total += need
        return out


def make_scheduler(policy: str, blocks: BlockCache, tokens_per_block: int, max_num_seqs: int,
                   max_num_batched_tokens: int, **kw) -> Scheduler:
    """The local scheduler of a policy name: fcfs | saab | saab-online | prism."""
    if policy == "prism":
        return PrismScheduler(blocks, tokens_per_block, max_num_seqs, max_num_batched_tokens, **kw)
    return Scheduler(blocks, tokens_per_block, max_num_seqs, max_num_batched_tokens, policy, **kw)
