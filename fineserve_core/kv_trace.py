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

import bisect
import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

from fineserve_core.kv_slab import BlockCache, KVAllocator, KVOutOfMemory, ModelKVSpec


# ShareGPT/LMSYS-like lengths: lognormal, sigma 1.0, fitted so the p95 is FineServe's 903 input /
# 631 output tokens (its placement code's LMSYS-Chat p95s, papers.md 1.5). Means before capping:
# input ~287, output ~201; medians ~174 / ~122. Caps 4096 / 2048 bind for < 0.2 % of requests.
SHAREGPT_SIGMA = 1.0
SHAREGPT_P95 = (903, 631)


def lognormal_mean_from_p95(p95: float, sigma: float) -> float:
    """Mean of the lognormal with this sigma whose 95th percentile is p95."""
    return math.exp(math.log(p95) - 1.6448536269514722 * sigma + sigma * sigma / 2)


SHAREGPT_LENGTHS = {"input_mean": lognormal_mean_from_p95(SHAREGPT_P95[0], SHAREGPT_SIGMA),
                    "output_mean": lognormal_mean_from_p95(SHAREGPT_P95[1], SHAREGPT_SIGMA),
                    "sigma": SHAREGPT_SIGMA, "max_input": 4096, "max_output": 2048}


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


def piecewise_trace(model_ids: Sequence[str], phases: Sequence[tuple[int, float | dict[str, float]]],
                    seed: int = 0, **kw) -> list[TraceRequest]:
    """Non-stationary arrivals: `phases` = [(num_steps, rate_per_step or {model: rate}), ...], run one
    after the other (each phase is a synthetic_trace with its own seed; `kw` as synthetic_trace)."""
    out: list[TraceRequest] = []
    start = 0
    for i, (steps, rates) in enumerate(phases):
        if isinstance(rates, dict):
            rates = {m: rates.get(m, 0.0) for m in model_ids}
        for r in synthetic_trace(model_ids, steps, rates, seed=seed * 1000 + i, **kw):
            out.append(TraceRequest(r.arrival_step + start, r.model_id, r.input_len, r.output_len))
        start += steps
    return out


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
    # event-driven replay: while running, cached = c0 + (t - t0) and generated = g0 + (t - t0) after
    # step t's decode; `ev` is the next step at which it needs a block or finishes.
    seq: int = -1
    t0: int = 0
    c0: int = 0
    g0: int = 0
    ev: int = -1


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
    mean_overhead_fraction: float      # slab padding / unused split-scale slots (slab policies), / buffer
    per_precision_wasted_fraction: dict[str, float]
    mean_kv_efficiency_all_steps: float
    generated_tokens: int = 0          # output tokens produced (a throughput proxy: steps are equal)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}


def _block_ops(allocator: KVAllocator, models: list[str], use_block_cache: bool):
    """alloc(model, n, near=None), free(model, ids) and the block caches (or None) of a replay: through a BlockCache per model, or
    straight to the allocator (with the `near=` hint when its policy keeps per-sequence affinity)."""
    caches = {m: BlockCache(allocator, m) for m in models} if use_block_cache else None
    hint = not caches and getattr(getattr(allocator, "policy", None), "affinity", False)

    def alloc(m: str, n: int, near: int | None = None) -> list[int]:
        if caches:
            return caches[m].alloc(n)
        return allocator.alloc(m, n, near=near) if hint and near is not None else allocator.alloc(m, n)

    def free(m: str, ids: list[int]) -> None:
        if ids:
            caches[m].free(ids) if caches else allocator.free(m, ids)

    return alloc, free, caches


def _replay_trace_stepwise(allocator: KVAllocator, trace: Sequence[TraceRequest], *, use_block_cache: bool = False,
                           max_num_seqs: int = 256, max_steps: int | None = None) -> ReplayResult:
    """replay_trace written as the plain per-step loop over every running request (the reference the
    event-driven replay_trace is tested against; ~10x slower)."""
    models = list(allocator.model_ids)
    specs = {m: allocator.spec(m) for m in models}
    alloc, free, caches = _block_ops(allocator, models, use_block_cache)

    waiting = {m: deque() for m in models}
    running: dict[str, list[_Req]] = {m: [] for m in models}
    live = {m: 0 for m in models}
    trace = sorted(trace, key=lambda r: r.arrival_step)
    nxt = 0
    completed = dropped = preemptions = failures = failure_steps = 0
    sums = {"wasted": 0.0, "eff": 0.0, "slack": 0.0, "unusable": 0.0, "overhead": 0.0}
    per_prec: dict[str, float] = {}
    eff_all, step, generated = 0.0, 0, 0

    def record(m: str) -> None:
        nonlocal failures
        rep = allocator.fragmentation(live, m)
        failures += 1
        sums["wasted"] += rep.wasted_fraction
        sums["eff"] += rep.kv_efficiency
        sums["slack"] += rep.slack_bytes / rep.buffer_bytes
        sums["unusable"] += (rep.unusable_free_bytes + rep.unusable_unformatted_bytes) / rep.buffer_bytes
        sums["overhead"] += rep.overhead_bytes / rep.buffer_bytes
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
                        r.blocks += alloc(m, need, r.blocks[-1] if r.blocks else None)
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
                generated += 1
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
                generated += 1
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
                        sums["unusable"] / n, sums["overhead"] / n, {p: v / n for p, v in per_prec.items()},
                        eff_all / max(step, 1), generated)


def replay_trace(allocator: KVAllocator, trace: Sequence[TraceRequest], *, use_block_cache: bool = False,
                 max_num_seqs: int = 256, max_steps: int | None = None) -> ReplayResult:
    """Replay `trace` (sorted by arrival) until every request finished or `max_steps`.

    Event-driven but step-for-step identical to the per-step loop the module docstring describes
    (`_replay_trace_stepwise`): a running request is only visited at the steps where it needs a new
    block or produces its last token; live-token counts in between are kept as sums.

    An allocator whose `policy.affinity` is set gets each decode block request with `near=` the
    sequence's last block (without block caches only: a cache hands out whatever it holds)."""
    models = list(allocator.model_ids)
    specs = {m: allocator.spec(m) for m in models}
    tpb = {m: specs[m].tokens_per_block for m in models}
    bpt = {m: specs[m].bytes_per_token for m in models}
    alloc, free, caches = _block_ops(allocator, models, use_block_cache)

    waiting = {m: deque() for m in models}
    run: dict[str, dict[int, _Req]] = {m: {} for m in models}      # seq -> request, ascending seq
    order: dict[str, list[int]] = {m: [] for m in models}           # running seqs, ascending
    acc = {m: 0 for m in models}                                    # sum(c0 - t0) over running requests
    events: dict[str, dict[int, list[_Req]]] = {m: {} for m in models}
    next_seq = {m: 0 for m in models}
    decoded = {m: False for m in models}                            # m's decode done in this step
    trace = sorted(trace, key=lambda r: r.arrival_step)
    nxt = 0
    completed = dropped = preemptions = failures = failure_steps = 0
    sums = {"wasted": 0.0, "eff": 0.0, "slack": 0.0, "unusable": 0.0, "overhead": 0.0}
    per_prec: dict[str, float] = {}
    eff_all, step, generated = 0.0, 0, 0

    def live_now(t: int, mid: str | None = None, rank: int = 0) -> dict[str, int]:
        """Live tokens per model at this point of step t; `mid` is in its decode loop, its `rank`
        oldest running requests have appended this step's token."""
        out = {}
        for x in models:
            n = len(run[x])
            out[x] = acc[x] + n * (t - 1) + rank if x == mid else acc[x] + n * (t if decoded[x] else t - 1)
        return out

    def record(m: str, t: int, rank: int | None = None) -> None:
        nonlocal failures
        rep = allocator.fragmentation(live_now(t, m if rank is not None else None, rank or 0), m)
        failures += 1
        sums["wasted"] += rep.wasted_fraction
        sums["eff"] += rep.kv_efficiency
        sums["slack"] += rep.slack_bytes / rep.buffer_bytes
        sums["unusable"] += (rep.unusable_free_bytes + rep.unusable_unformatted_bytes) / rep.buffer_bytes
        sums["overhead"] += rep.overhead_bytes / rep.buffer_bytes
        for p, d in rep.per_precision.items():
            per_prec[p] = per_prec.get(p, 0.0) + (d["slack_bytes"] + d["unusable_free_bytes"]) / rep.buffer_bytes

    def schedule(m: str, r: _Req) -> None:
        t_block = r.t0 + 1 + len(r.blocks) * tpb[m] - r.c0
        t_last = r.t0 + r.req.output_len - r.g0
        r.ev = min(t_block, t_last)
        events[m].setdefault(r.ev, []).append(r)

    def stop(m: str, r: _Req, t_done: int) -> None:
        """Take r off the running set; t_done = the last step whose token it appended."""
        free(m, r.blocks)
        r.blocks = []
        r.generated = r.g0 + (t_done - r.t0)
        r.cached = 0
        del run[m][r.seq]
        o = order[m]
        del o[bisect.bisect_left(o, r.seq)]
        acc[m] -= r.c0 - r.t0
        r.seq = -1

    def blocks_for(m: str, tokens: int) -> int:
        return -(-tokens // tpb[m])

    while (nxt < len(trace) or any(waiting.values()) or any(run.values())) and \
            (max_steps is None or step < max_steps):
        t = step
        while nxt < len(trace) and trace[nxt].arrival_step <= t:
            r = trace[nxt]
            nxt += 1
            if blocks_for(r.model_id, r.input_len + r.output_len) > allocator.num_blocks(r.model_id):
                dropped += 1                        # could never fit, even alone (an engine rejects it)
            else:
                waiting[r.model_id].append(_Req(r))
        for m in models:
            decoded[m] = False
        failed_this_step = False
        k = t % len(models)
        for m in models[k:] + models[:k]:           # rotate so no model always allocates first
            preempted, finished = False, 0
            due = events[m].pop(t, None)
            if due:
                rm = run[m]
                todo = sorted({r.seq: r for r in due if r.ev == t and rm.get(r.seq) is r}.items())
                for seq, r in todo:
                    if rm.get(seq) is not r:
                        continue                    # preempted as a victim earlier in this step
                    need = blocks_for(m, r.c0 + (t - r.t0)) - len(r.blocks)
                    gone = False
                    while need > 0:
                        try:
                            r.blocks += alloc(m, need, r.blocks[-1] if r.blocks else None)
                            break
                        except KVOutOfMemory:
                            record(m, t, bisect.bisect_left(order[m], seq))
                            failed_this_step = preempted = True
                            victim = rm[order[m][-1]]       # newest first, as vLLM
                            stop(m, victim, t - 1)
                            waiting[m].appendleft(victim)
                            preemptions += 1
                            if victim is r:
                                gone = True
                                break
                    if gone:
                        break                       # r was the newest: nothing after it this step
                    if r.g0 + (t - r.t0) >= r.req.output_len:
                        stop(m, r, t)
                        completed += 1
                        finished += 1
                    else:
                        schedule(m, r)
            generated += len(run[m]) + finished
            decoded[m] = True
            # prefill: admit FCFS while blocks last (vLLM admits nothing in a step that preempted)
            q = waiting[m]
            while q and not preempted and len(run[m]) < max_num_seqs:
                r = q[0]
                tokens = r.req.input_len + r.generated
                try:
                    r.blocks = alloc(m, blocks_for(m, tokens))
                except KVOutOfMemory:
                    record(m, t)
                    failed_this_step = True
                    break
                q.popleft()
                generated += 1
                r.t0, r.c0, r.g0 = t, tokens, r.generated + 1
                if r.g0 >= r.req.output_len:
                    free(m, r.blocks)
                    r.blocks = []
                    r.generated = r.g0
                    completed += 1
                    continue
                r.seq = next_seq[m]
                next_seq[m] += 1
                run[m][r.seq] = r
                order[m].append(r.seq)
                acc[m] += r.c0 - r.t0
                schedule(m, r)
        failure_steps += failed_this_step
        eff_all += sum((acc[m] + len(run[m]) * t) * bpt[m] for m in models) / allocator.buffer_bytes
        step += 1

    for m in models:                                # leave the allocator as we found it
        for r in list(run[m].values()):
            stop(m, r, step - 1)
        if caches:
            caches[m].release_all()
    n = max(failures, 1)
    return ReplayResult(type(allocator).__name__, step, completed, dropped, preemptions, failures,
                        failure_steps, sums["wasted"] / n, sums["eff"] / n, sums["slack"] / n,
                        sums["unusable"] / n, sums["overhead"] / n, {p: v / n for p, v in per_prec.items()},
                        eff_all / max(step, 1), generated)
