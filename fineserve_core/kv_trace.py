"""Replay a request trace against a KV allocator and measure fragmentation (DESIGN.md's KV metric).

The replay is a block-level model of continuous batching, one engine per model, all stepping together:
each step every running request appends one token's KV (a new block when it crosses a block boundary),
then waiting requests are admitted FCFS if their prompt's blocks can be allocated. When a running
request cannot get a block the engine preempts its newest request (vLLM's recompute preemption: free
its blocks, requeue it at the front; on readmission it prefills prompt + tokens generated so far).
Each failed block request evaluates `allocator.fragmentation(live_tokens, failing_model)`; the result
averages over those failures. Timing is in steps, not seconds: only memory is modelled.
"""
from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

from fineserve_core.kv_slab import BlockCache, KVAllocator, KVOutOfMemory, ModelKVSpec


@dataclass(frozen=True, slots=True)
class TraceRequest:
    arrival_step: int
    model_id: str
    input_len: int
    output_len: int


def synthetic_trace(model_ids: Sequence[str], num_steps: int, rate_per_step: float | dict[str, float],
                    seed: int = 0, input_mean: float = 300.0, output_mean: float = 250.0,
                    sigma: float = 1.0, max_input: int = 2048, max_output: int = 1024,
                    cv: float = 1.0) -> list[TraceRequest]:
    """Arrivals per model interleaved by time: Gamma inter-arrival gaps with coefficient of variation
    `cv` (1 = Poisson, > 1 bursty). Lognormal lengths with the given means before capping (ShareGPT-like
    heavy tails; sigma = 1 gives a median of ~0.6 x mean)."""
    rng = random.Random(seed)
    rates = rate_per_step if isinstance(rate_per_step, dict) else {m: rate_per_step for m in model_ids}

    def length(mean: float, cap: int) -> int:
        mu = math.log(mean) - sigma * sigma / 2                      # E[lognormal] = mean
        return max(1, min(cap, round(rng.lognormvariate(mu, sigma))))

    shape = 1.0 / (cv * cv)

    def gap(rate: float) -> float:
        return rng.gammavariate(shape, 1.0 / (rate * shape))

    events: list[tuple[float, str]] = []
    for m in model_ids:
        t = gap(rates[m]) if rates[m] > 0 else num_steps
        while t < num_steps:
            events.append((t, m))
            t += gap(rates[m])
    events.sort()
    return [TraceRequest(int(t), m, length(input_mean, max_input), length(output_mean, max_output))
            for t, m in events]


def mean_kv_demand_bytes(trace: Sequence[TraceRequest], specs: Sequence[ModelKVSpec], num_steps: int) -> float:
    """Time-averaged live KV bytes if every request ran without waiting (Little's law on the trace):
    a request holds input + k tokens during its k-th decode step."""
    by_id = {s.model_id: s for s in specs}
    total = 0.0
    for r in trace:
        token_steps = r.output_len * r.input_len + r.output_len * (r.output_len - 1) / 2
        total += token_steps * by_id[r.model_id].bytes_per_token
    return total / num_steps


@dataclass(slots=True, eq=False)
class _Req:
    req: TraceRequest
    generated: int = 0                 # output tokens produced so far
    cached: int = 0                    # tokens whose KV is in the cache
    blocks: list[int] = field(default_factory=list)


@dataclass(slots=True)
class ReplayResult:
    allocator: str
    steps: int
    completed: int
    dropped: int                       # requests larger than the model's whole capacity
    preemptions: int
    failures: int                      # failed block requests (= fragmentation samples)
    failure_steps: int                 # steps with at least one failure
    mean_wasted_fraction: float        # averaged over failures
    mean_kv_efficiency: float          # live-token bytes / buffer, averaged over failures
    mean_slack_fraction: float
    mean_unusable_fraction: float      # unusable_free + unusable_unformatted, / buffer
    per_precision_wasted_fraction: dict[str, float]
    mean_kv_efficiency_all_steps: float

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}


def replay_trace(allocator: KVAllocator, trace: Sequence[TraceRequest], *, use_block_cache: bool = False,
                 max_num_seqs: int = 256, max_steps: int | None = None) -> ReplayResult:
    """Replay `trace` (sorted by arrival) until every request finished or `max_steps`."""
    models = list(allocator.model_ids)
    specs = {m: allocator.spec(m) for m in models}
    caches = {m: BlockCache(allocator, m) for m in models} if use_block_cache else None

    def alloc(m: str, n: int) -> list[int]:
        return caches[m].alloc(n) if caches else allocator.alloc(m, n)

    def free(m: str, ids: list[int]) -> None:
        if ids:
            caches[m].free(ids) if caches else allocator.free(m, ids)

    waiting = {m: deque() for m in models}
    running: dict[str, list[_Req]] = {m: [] for m in models}
    live = {m: 0 for m in models}
    trace = sorted(trace, key=lambda r: r.arrival_step)
    nxt = 0
    completed = dropped = preemptions = failures = failure_steps = 0
    sums = {"wasted": 0.0, "eff": 0.0, "slack": 0.0, "unusable": 0.0}
    per_prec: dict[str, float] = {}
    eff_all, step = 0.0, 0

    def record(m: str) -> None:
        nonlocal failures
        rep = allocator.fragmentation(live, m)
        failures += 1
        sums["wasted"] += rep.wasted_fraction
        sums["eff"] += rep.kv_efficiency
        sums["slack"] += rep.slack_bytes / rep.buffer_bytes
        sums["unusable"] += (rep.unusable_free_bytes + rep.unusable_unformatted_bytes) / rep.buffer_bytes
        for p, d in rep.per_precision.items():
            per_prec[p] = per_prec.get(p, 0.0) + (d["slack_bytes"] + d["unusable_free_bytes"]) / rep.buffer_bytes

    def release(m: str, r: _Req) -> None:
        free(m, r.blocks)
        r.blocks = []
        live[m] -= r.cached
        r.cached = 0

    def blocks_for(m: str, tokens: int) -> int:
        return -(-tokens // specs[m].tokens_per_block)

    while (nxt < len(trace) or any(waiting.values()) or any(running.values())) and \
            (max_steps is None or step < max_steps):
        while nxt < len(trace) and trace[nxt].arrival_step <= step:
            r = trace[nxt]
            nxt += 1
            if blocks_for(r.model_id, r.input_len + r.output_len) > allocator.num_blocks(r.model_id):
                dropped += 1                        # could never fit, even alone (an engine rejects it)
            else:
                waiting[r.model_id].append(_Req(r))
        failed_this_step = False
        k = step % len(models)
        for m in models[k:] + models[:k]:           # rotate so no model always allocates first
            run, preempted = running[m], False
            i = 0
            while i < len(run):                     # decode: append the last token's KV
                r = run[i]
                need = blocks_for(m, r.cached + 1) - len(r.blocks)
                if need > 0:
                    try:
                        r.blocks += alloc(m, need)
                    except KVOutOfMemory:
                        record(m)
                        failed_this_step = preempted = True
                        victim = run.pop()          # newest first, as vLLM
                        release(m, victim)
                        waiting[m].appendleft(victim)
                        preemptions += 1
                        continue                    # retry r (or stop if r itself was the victim)
                r.cached += 1
                live[m] += 1
                r.generated += 1
                if r.generated >= r.req.output_len:
                    release(m, r)
                    run.pop(i)
                    completed += 1
                else:
                    i += 1
            # prefill: admit FCFS while blocks last (vLLM admits nothing in a step that preempted)
            q = waiting[m]
            while q and not preempted and len(run) < max_num_seqs:
                r = q[0]
                tokens = r.req.input_len + r.generated
                try:
                    r.blocks = alloc(m, blocks_for(m, tokens))
                except KVOutOfMemory:
                    record(m)
                    failed_this_step = True
                    break
                q.popleft()
                r.cached = tokens
                live[m] += tokens
                r.generated += 1
                if r.generated >= r.req.output_len:
                    release(m, r)
                    completed += 1
                else:
                    run.append(r)
        failure_steps += failed_this_step
        eff_all += sum(live[m] * specs[m].bytes_per_token for m in models) / allocator.buffer_bytes
        step += 1

    for m in models:                                # leave the allocator as we found it
        for r in running[m]:
            release(m, r)
        if caches:
            caches[m].release_all()
    n = max(failures, 1)
    return ReplayResult(type(allocator).__name__, step, completed, dropped, preemptions, failures,
                        failure_steps, sums["wasted"] / n, sums["eff"] / n, sums["slack"] / n,
                        sums["unusable"] / n, {p: v / n for p, v in per_prec.items()},
                        eff_all / max(step, 1))
