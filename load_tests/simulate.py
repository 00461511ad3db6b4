"""Discrete-event cluster simulator: placement x KV allocator x local scheduler at scales we cannot run.

    python -m load_tests.simulate --scenario muxserve-32            # full sweep (~5 min on 2 CPUs)
    python -m load_tests.simulate --scenario fineserve-16
    python -m load_tests.simulate --scenario muxserve-32 --quick    # a few runs (< 15 s)
    python -m load_tests.simulate --scenario muxserve-32 --alphas 0.9 --rotate 1   # popularity shifting

What is real and what is modelled:
  * REAL (imported, not copied): the placement (`fineserve_core.placement.place`), the engine's
    Scheduler (continuous batching, chunked prefill under max_num_batched_tokens, recompute
    preemption, SAAB or FCFS admission; its clock is the simulated clock), the KV allocators
    (`KVSlabManager` one per GPU, `StaticPartitionAllocator`, `BlockCache` in front of each replica)
    on a device="meta" buffer of the size the plan leaves for KV, and the workload generator
    (`load_tests.workload`).
  * MODELLED: the model forward pass. A step's duration comes from the cost model
    (`CostProfile.step_time(prefill tokens, decoding sequences)`: the forward pass over all tokens or
    the decode step, whichever is longer) for the replica's model, precision and TP. Tokens are
    placeholders; a sequence finishes after its sampled output length (ignore_eos).
  * GPU sharing: MPS-like processor sharing. Replicas on a GPU run their steps concurrently and share
    it evenly: a step's duration is its cost-model time x the number of replicas running a step on
    the busiest of its GPUs (itself included), counted when it starts (a fluid approximation: a step
    is not re-stretched when others start or stop during it). Work-conserving for one-GPU replicas; a
    TP replica moves at the pace of its most crowded GPU (all-reduce stragglers). Overlap gains of a
    memory-bound decode next to a compute-bound prefill are not modelled, for any policy.
  * TP: the KV of a TP replica is allocated on every GPU of its group (the same number of blocks on
    each, `_MeshAllocator`); its cost entry is its TP's.
  * DP: a request goes to the model's replica with the fewest outstanding requests.
  * Timeouts: a request still waiting in a queue `timeout_s` after its arrival (FineServe's server
    timeout, 30 s; a preempted one too) is aborted, an SLO miss; a request longer than its replica's
    whole KV capacity is rejected (the engine's 413), also a miss. A run is cut `drain_limit_s` after
    the last arrival (KV deadlocks between formats/replicas are possible); what is left counts as aborted
    (`unfinished_at_cut`).

Policies (placement + KV + queue; same engine/scheduler code for all):
  fineserve  slab-aware placement + KV Slab (the app's layout, kv_slab.SERVE_SLAB_POLICY: slabs of
             the lcm of the data blocks on that GPU, INT4 KV scales in slots of their own; when the
             lcm makes slabs too coarse for the buffer, "padded" slabs, counted in the results;
             `placement.slab_layout`, which placement checks for every GPU it fills) + SAAB
             with the plan's ttft_per_token, max_num_seqs 256 ("fineserve-cap": slo_max_bs, FineServe's code;
             "fineserve-online": SAAB's slope from each replica's recent steps, `scheduler.py` saab-online).
  static     memory-balanced placement at the base TP + a fixed KV region per replica proportional
             to its placement memory + FCFS, max_num_seqs 256.
  prism      KVPR placement + elastic KV in 2 MiB pages from one shared pool per GPU (KVSlabManager
             with 2 MiB "padded" slabs: precision-unaware pages) + Prism's cumulative-deadline queue
             (`fineserve_core.scheduler.PrismScheduler`, also the app's `policy: prism`).

Metrics (FineServe 1.7, DESIGN.md): SLO attainment = share of requests with TTFT < TTFT SLO, dropped
/ aborted / rejected ones counted as misses (the headline, request-weighted over models); TTFT+TPOT
attainment (also TPOT <= TPOT SLO); token throughput = output tokens / span; goodput; p50/p90/p99
TTFT, TPOT, e2e over completed requests.

Scenarios (costs: `fineserve_core/cost_tables/h100-measured.json`, our engine measured on one H100 at
TP 1, the shapes whose weights fit it; every other entry (TP > 1, 65B/70B in bf16/fp8) from
`h100-roofline.json`, a roofline ESTIMATE calibrated on that measured table; `cost_estimated` in the
results lists them):
  muxserve-32   MuxServe's end-to-end setup (benchmark/end_to_end/bench_end_to_end_muxserve.py):
                19 LLaMA models (12 x 7B, 4 x 13B, 2 x 30B, 1 x 65B, in that order) on 4 nodes x 8
                GPUs (H100 80 GB here; A100 in MuxServe), rate_i = 40 x scale x (i+1)^-alpha in list
                order, alpha in {0.7, 0.9, 1.3, 1.7, 2.1}, Poisson, ShareGPT-like lengths. Precisions
                cycle bf16, fp8, w4a8kv4 over the list (MuxServe is all fp16; `--precisions bf16`).
  fineserve-16  FineServe's scale (16 H100s, 2 x 8); its workload is not published, so ours: the
                shapes of its profiled models, 9 x Llama-3-8B (3 per precision), 2 x Qwen3-32B (bf16,
                fp8), 1 x Llama-3-70B (fp8), rates (i+1)^-0.9 with max 20 x scale, scale 1-32.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import heapq

import torch

from fineserve_core.config import PRECISIONS
from fineserve_core.cost_model import CostModel
from fineserve_core.kv_slab import BlockCache, KVOutOfMemory, ModelKVSpec, StaticPartitionAllocator
from fineserve_core.placement import ClusterSpec, ModelSpec, Plan, PlacementConfig, place, slab_layout
from fineserve_core.sampling import SamplingParams
from fineserve_core.scheduler import PrismScheduler, Scheduler
from fineserve_core.sequence import Sequence as Seq
from load_tests.report import percentile, rate_at
from load_tests.workload import LengthSampler, Request, generate, power_law_rates, rotate_period

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------------
# KV of a TP replica spans its GPUs
# ---------------------------------------------------------------------------------------------------

class _MeshAllocator:
    """The allocator a TP replica's BlockCache sees: every alloc takes the same number of blocks on
    each GPU of the group (all or nothing); the first GPU's ids name them."""

    def __init__(self, allocators: list):
        self.allocators = allocators
        self._others: dict[int, list[int]] = {}

    def spec(self, model_id: str) -> ModelKVSpec:
        return self.allocators[0].spec(model_id)

    def alloc(self, model_id: str, n: int) -> list[int]:
        got: list[list[int]] = []
        try:
            for a in self.allocators:
                got.append(a.alloc(model_id, n))
        except KVOutOfMemory:
            for a, ids in zip(self.allocators, got):
                a.free(model_id, ids)
            raise
        for i, b in enumerate(got[0]):
            self._others[b] = [g[i] for g in got[1:]]
        return got[0]

    def free(self, model_id: str, ids) -> None:
        ids = list(ids)
        others = [self._others.pop(b) for b in ids]
        self.allocators[0].free(model_id, ids)
        for k, a in enumerate(self.allocators[1:]):
            a.free(model_id, [o[k] for o in others])

    def num_free_blocks(self, model_id: str) -> int:
        return min(a.num_free_blocks(model_id) for a in self.allocators)

    def num_blocks(self, model_id: str) -> int:
        return min(a.num_blocks(model_id) for a in self.allocators)


# ---------------------------------------------------------------------------------------------------
# The simulator
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SimConfig:
    timeout_s: float = 30.0                # FineServe's server timeout
    max_num_batched_tokens: int = 2048     # also each replica's KV reservation (PlacementConfig.min_kv_tokens)
    retry_s: float = 0.01                  # a replica blocked on KV memory tries again after this
    timeout_scan_s: float = 0.5
    drain_limit_s: float = 600.0           # simulated seconds after the last arrival before a run is cut
    local_policy: str | None = None        # the replicas' queue instead of the plan's ("saab-online")


IDLE, RUNNING, BLOCKED = range(3)
_PARAMS = SamplingParams(max_tokens=4096, temperature=0.0, ignore_eos=True)


class _Replica:
    __slots__ = ("rid", "model", "gpus", "profile", "sched", "alloc", "state", "slo", "tpot_slo",
                 "targets", "last_scan", "outstanding", "capacity_tokens")

    def __init__(self, rid, model, gpus, profile, sched, alloc, slo, tpot_slo, capacity_tokens):
        self.rid, self.model, self.gpus, self.profile, self.sched, self.alloc = rid, model, gpus, profile, sched, alloc
        self.state, self.slo, self.tpot_slo = IDLE, slo, tpot_slo
        self.targets: dict[str, int] = {}                    # request id -> output length
        self.last_scan, self.outstanding, self.capacity_tokens = 0.0, 0, capacity_tokens


@dataclass
class RequestRecord:
    model: str
    arrival: float
    status: str                            # ok | dropped | aborted | rejected | unplaced
    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None
    output_tokens: int = 0
    slo: float = 0.0
    tpot_slo: float = 0.0


class Simulator:
    """One run: a plan, a workload, the cost model; `run()` returns the metrics dict."""

    def __init__(self, plan: Plan, specs: Sequence[ModelSpec], cost: CostModel, requests: Sequence[Request],
                 cfg: SimConfig = SimConfig()):
        self.plan, self.cost, self.requests, self.cfg = plan, cost, list(requests), cfg
        self.specs = {s.name: s for s in specs}
        self.now = 0.0
        self._events: list = []
        self._seq = 0
        self.records: list[RequestRecord] = []
        self.slab_fallbacks: list[int] = []          # GPUs whose served slabs did not fit: "padded"
        self.gpu_active: dict[int, int] = {}
        self.gpu_replicas: dict[int, list[_Replica]] = {}
        self.replicas: dict[str, list[_Replica]] = {m: [] for m in plan.models}
        self.busy_time: dict[int, float] = {}
        self._build()

    # ---- setup ------------------------------------------------------------------------------------
    def _kv_spec(self, spec: ModelSpec, rid: str, tp: int, rate: float) -> ModelKVSpec:
        return spec.kv_spec(rid, tp, rate, self.cfg.max_num_batched_tokens)

    def _build(self) -> None:
        plan = self.plan
        per_gpu: dict[int, list[tuple[ModelSpec, object]]] = {}
        for mp in plan.models.values():
            for r in mp.replicas:
                for g in r.gpus:
                    per_gpu.setdefault(g, []).append((self.specs[mp.name], r))
        allocators: dict[int, object] = {}
        for g, tenants in per_gpu.items():
            nbytes = int(next(x for x in plan.gpus if x.gpu == g).kv_buffer_bytes)
            buf = torch.empty(nbytes, dtype=torch.uint8, device="meta")
            if plan.kv_policy == "static":
                kvs = [self._kv_spec(s, r.replica_id, r.tp, 1.0) for s, r in tenants]
                mins = [k.min_blocks * k.bytes_per_block for k in kvs]
                spare = max(0, nbytes - sum(mins) - len(kvs) * max(k.bytes_per_block for k in kvs))
                want = [m + spare * r.kv_share[g] for m, (_, r) in zip(mins, tenants)]
                # StaticPartitionAllocator's "demand" share is rate x bytes/token: encode the wanted bytes
                kvs = [replace(k, rate=w / k.bytes_per_token) for k, w in zip(kvs, want)]
                allocators[g] = StaticPartitionAllocator(buf, kvs, share="demand")
            else:               # KV Slab (fineserve) or elastic pages (prism): the layout placement checked
                kvs = [self._kv_spec(s, r.replica_id, r.tp, r.rate) for s, r in tenants]
                try:
                    allocators[g], i = slab_layout(plan.kv_policy, buf, kvs)
                except ValueError as e:
                    raise ValueError(f"GPU {g}: {e} (placement checked this layout with "
                                     "PlacementConfig.min_kv_tokens per replica; this run reserves "
                                     f"{self.cfg.max_num_batched_tokens})") from e
                if i:
                    self.slab_fallbacks.append(g)
        for g in range(plan.cluster.num_gpus):
            self.gpu_active[g], self.gpu_replicas[g], self.busy_time[g] = 0, [], 0.0
        for mp in plan.models.values():
            spec = self.specs[mp.name]
            for r in mp.replicas:
                if not r.gpus:
                    continue
                allocs = [allocators[g] for g in r.gpus]
                alloc = allocs[0] if len(allocs) == 1 else _MeshAllocator(allocs)
                kspec = alloc.spec(r.replica_id)
                cache = BlockCache(alloc, r.replica_id)
                prof = self.cost.profile(spec.cost_key, spec.precision, r.tp)
                kw = dict(clock=self._clock)
                if plan.local_policy == "prism":
                    sched = PrismScheduler(cache, kspec.tokens_per_block, mp.max_num_seqs,
                                           self.cfg.max_num_batched_tokens, ttft_per_token=mp.ttft_per_token, **kw)
                else:
                    sched = Scheduler(cache, kspec.tokens_per_block, mp.max_num_seqs, self.cfg.max_num_batched_tokens,
                                      self.cfg.local_policy or plan.local_policy, mp.ttft_per_token, **kw)
                cap = alloc.num_blocks(r.replica_id) * kspec.tokens_per_block
                rep = _Replica(r.replica_id, mp.name, tuple(r.gpus), prof, sched, alloc, mp.slo_ttft, mp.slo_tpot, cap)
                self.replicas[mp.name].append(rep)
                for g in r.gpus:
                    self.gpu_replicas[g].append(rep)

    def _clock(self) -> float:
        return self.now

    # ---- events -----------------------------------------------------------------------------------
    def _push(self, t: float, kind: int, payload) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, kind, payload))

    def run(self) -> dict:
        t0 = time.perf_counter()
        for q in self.requests:
            self._push(q.arrival, 0, q)
        ev = self._events
        horizon = max((q.arrival for q in self.requests), default=0.0) + self.cfg.drain_limit_s
        while ev:
            t, _, kind, payload = heapq.heappop(ev)
            if t > horizon:                      # a stuck replica (KV deadlock): end the run
                break
            self.now = t
            if kind == 0:
                self._arrival(payload)
            elif kind == 1:
                self._step_end(*payload)
            else:
                rep = payload
                if rep.state == BLOCKED:
                    rep.state = IDLE                 # _start re-arms the retry if still blocked
                    self._wake(rep)
        self.wall_s = time.perf_counter() - t0
        self.unfinished = 0
        for rs in self.replicas.values():
            for rep in rs:
                for seq in list(rep.sched.waiting) + list(rep.sched.running):
                    self.unfinished += 1
                    self._finish_seq(rep, seq, "aborted")
        return self.metrics()

    def _arrival(self, q: Request) -> None:
        mp = self.plan.models.get(q.model)
        reps = self.replicas.get(q.model) or []
        slo = mp.slo_ttft if mp else 0.0
        tpot_slo = mp.slo_tpot if mp else 0.0
        if not reps:
            self.records.append(RequestRecord(q.model, q.arrival, "unplaced", slo=slo, tpot_slo=tpot_slo))
            return
        rep = min(reps, key=lambda r: r.outstanding)
        if q.input_len + q.output_len > rep.capacity_tokens:
            self.records.append(RequestRecord(q.model, q.arrival, "rejected", slo=slo, tpot_slo=tpot_slo))
            return
        rid = str(q.rid)
        deadline = self.now + slo if self.plan.local_policy != "fcfs" else None
        seq = Seq(rid, [0] * q.input_len, _PARAMS, arrival=self.now, deadline=deadline)
        rep.targets[rid] = q.output_len
        rep.outstanding += 1
        rep.sched.add(seq)
        self._wake(rep)

    def _wake(self, rep: _Replica) -> None:
        if rep.state != RUNNING and rep.sched.has_work():
            self._start(rep)

    def _finish_seq(self, rep: _Replica, seq: Seq, status: str) -> None:
        rep.targets.pop(seq.request_id)
        rep.outstanding -= 1
        m = seq.metrics() if status == "ok" else {}
        self.records.append(RequestRecord(rep.model, seq.arrival, status, m.get("ttft"), m.get("tpot"), m.get("e2e"),
                                          len(seq.output_ids) if status == "ok" else 0, rep.slo, rep.tpot_slo))

    def _start(self, rep: _Replica) -> None:
        sch, now = rep.sched, self.now
        if now - rep.last_scan >= self.cfg.timeout_scan_s:
            rep.last_scan = now
            for s in [s for s in sch.waiting if now - s.arrival > self.cfg.timeout_s]:
                sch.finish(s)
                self._finish_seq(rep, s, "aborted")
        batch = sch.schedule()
        if sch.dropped:
            for s in sch.dropped:
                self._finish_seq(rep, s, "dropped")
            sch.dropped.clear()
        if not batch:
            if sch.has_work():                   # waiting, but no KV blocks now: retry later
                if rep.state != BLOCKED:
                    rep.state = BLOCKED
                    self._push(now + self.cfg.retry_s, 2, rep)
            else:
                rep.state = IDLE
            return
        pre = dec = 0
        for s, n in batch:
            if n == 1 and s.num_computed == len(s.prompt_ids) + len(s.output_ids) - 1 and s.output_ids:
                dec += 1
            else:
                pre += n
        cost = rep.profile.step_time(pre, dec)
        # processor sharing (MPS): the step is stretched by the number of replicas running on the
        # busiest of its GPUs, itself included
        share = 1
        for g in rep.gpus:
            self.gpu_active[g] += 1
            share = max(share, self.gpu_active[g])
        dur = cost * share
        if pre:
            sch.observe(pre + dec, dur)
        for g in rep.gpus:
            self.busy_time[g] += cost
        rep.state = RUNNING
        self._push(now + dur, 1, (rep, batch))

    def _step_end(self, rep: _Replica, batch) -> None:
        now, sch, targets = self.now, rep.sched, rep.targets
        for s, n in batch:
            c = s.num_computed + n
            s.num_computed = c
            out = s.output_ids
            if c == len(s.prompt_ids) + len(out):
                out.append(0)
                if s.first_token_time is None:
                    s.first_token_time = now
                if len(out) >= targets[s.request_id]:
                    s.finish_time, s.finish_reason = now, "length"
                    sch.finish(s)
                    self._finish_seq(rep, s, "ok")
        rep.state = IDLE
        for g in rep.gpus:
            self.gpu_active[g] -= 1
        self._wake(rep)
        # memory may have been freed: replicas blocked on these GPUs try again
        for g in rep.gpus:
            for other in self.gpu_replicas[g]:
                if other.state == BLOCKED:
                    self._wake(other)

    # ---- metrics ----------------------------------------------------------------------------------
    def metrics(self) -> dict:
        return summarize_records(self.records, self.requests, extra={
            "sim_wall_s": round(getattr(self, "wall_s", 0.0), 2), "slab_fallback_gpus": self.slab_fallbacks,
            "gpu_busy_fraction_mean": round(statistics.mean(
                self.busy_time[g] / max(1e-9, self.now) for g in self.busy_time if self.gpu_replicas[g])
                if any(self.gpu_replicas.values()) else 0.0, 3),
            "preemptions": sum(r.sched.num_preemptions for rs in self.replicas.values() for r in rs),
            "unfinished_at_cut": getattr(self, "unfinished", 0)})


def summarize_records(records: Sequence[RequestRecord], requests: Sequence[Request], extra: dict | None = None) -> dict:
    n = len(records)
    ok = [r for r in records if r.status == "ok"]
    att = [r for r in ok if r.ttft is not None and r.ttft < r.slo]
    att2 = [r for r in att if r.tpot is None or r.tpot <= r.tpot_slo]
    span = (max((r.arrival + r.e2e for r in ok), default=0.0) - min((q.arrival for q in requests), default=0.0)) or 1.0
    duration = max((q.arrival for q in requests), default=0.0) or 1.0
    status = {}
    for r in records:
        status[r.status] = status.get(r.status, 0) + 1
    per_model = {}
    for m in sorted({r.model for r in records}):
        rs = [r for r in records if r.model == m]
        a = sum(1 for r in rs if r.status == "ok" and r.ttft is not None and r.ttft < r.slo)
        per_model[m] = {"requests": len(rs), "attainment": round(a / len(rs), 4),
                        "dropped": sum(r.status != "ok" for r in rs)}
    ttft = [r.ttft for r in ok if r.ttft is not None]
    tpot = [r.tpot for r in ok if r.tpot is not None]
    e2e = [r.e2e for r in ok if r.e2e is not None]
    out = {"requests": n, "status": status,
           "slo_attainment": round(len(att) / n, 4) if n else None,
           "slo_attainment_ttft_tpot": round(len(att2) / n, 4) if n else None,
           "token_throughput": round(sum(r.output_tokens for r in ok) / span, 1),
           "goodput_rps": round(len(att) / duration, 3),
           "request_throughput": round(len(ok) / span, 3),
           **{f"ttft_p{int(q * 100)}": percentile(ttft, q) for q in (0.5, 0.9, 0.99)},
           **{f"tpot_p{int(q * 100)}": percentile(tpot, q) for q in (0.5, 0.9, 0.99)},
           **{f"e2e_p{int(q * 100)}": percentile(e2e, q) for q in (0.5, 0.9, 0.99)},
           "per_model": per_model}
    for k, v in list(out.items()):
        if isinstance(v, float) and k.split("_")[0] in ("ttft", "tpot", "e2e"):
            out[k] = round(v, 4)
    if extra:
        out.update(extra)
    return out


def simulate(policy: str, specs: Sequence[ModelSpec], cluster: ClusterSpec, cost: CostModel,
             requests: Sequence[Request], pcfg: PlacementConfig = PlacementConfig(),
             scfg: SimConfig = SimConfig()) -> tuple[Plan, dict]:
    """Place with `policy`, then simulate the workload on that plan."""
    plan = place(policy, specs, cluster, cost, pcfg)
    return plan, Simulator(plan, specs, cost, requests, scfg).run()


# ---------------------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scenario:
    name: str
    cluster: ClusterSpec
    shapes: tuple[str, ...]
    precisions: tuple[str, ...]
    max_rate: float
    alphas: tuple[float, ...]
    scales: tuple[float, ...]
    duration: float                        # seconds of arrivals per run (then the queues drain)
    note: str = ""

    def specs(self, alpha: float, scale: float) -> list[ModelSpec]:
        rates = power_law_rates(len(self.shapes), alpha, max_rate=self.max_rate * scale)
        return [ModelSpec(f"m{i:02d}-{s.replace('-shape', '')}-{p}", s, p, r)
                for i, (s, p, r) in enumerate(zip(self.shapes, self.precisions, rates))]


def _cycle(n: int, precisions: Sequence[str]) -> tuple[str, ...]:
    return tuple(precisions[i % len(precisions)] for i in range(n))


MUX_SHAPES = ("llama-2-7b-shape",) * 12 + ("llama-2-13b-shape",) * 4 + ("llama-30b-shape",) * 2 + ("llama-65b-shape",)
FS16_SHAPES = ("llama-3-8b-shape",) * 9 + ("qwen3-32b-shape",) * 2 + ("llama-3-70b-shape",)


def scenario(name: str, precisions: str = "mixed") -> Scenario:
    if name == "muxserve-32":
        precs = _cycle(len(MUX_SHAPES), PRECISIONS if precisions == "mixed" else (precisions,))
        return Scenario(name, ClusterSpec(4, 8), MUX_SHAPES, precs, 40.0, (0.7, 0.9, 1.3, 1.7, 2.1),
                        (1.0, 2.0, 4.0, 6.0, 8.0), 8.0,
                        "MuxServe's 19 LLaMA models on 4x8 GPUs; rates 40 x scale x (i+1)^-alpha")
    if name == "fineserve-16":
        precs = _cycle(9, PRECISIONS if precisions == "mixed" else (precisions,)) + \
            (("bf16", "fp8", "fp8") if precisions == "mixed" else (precisions,) * 3)
        return Scenario(name, ClusterSpec(2, 8), FS16_SHAPES, precs, 20.0, (0.9,),
                        (1.0, 2.0, 4.0, 6.0, 8.0, 12.0, 16.0, 20.0, 24.0, 32.0), 8.0,
                        "16 H100s; FineServe's profiled shapes (its workload is not published)")
    raise ValueError(f"unknown scenario {name!r} (muxserve-32, fineserve-16)")


POLICY_ORDER = ("fineserve", "static", "prism", "fineserve-cap", "fineserve-online")
DEFAULT_POLICIES = POLICY_ORDER[:3]
#: policy name -> (placement policy, PlacementConfig, SimConfig); "fineserve-cap" is FineServe with the
#: engine's max_num_seqs = slo_max_bs, as FineServe's code has it, instead of 256 (an ablation of that one
#: rule); "fineserve-online" is FineServe with SAAB's TTFT slope from each replica's recent steps
VARIANTS = {"fineserve": ("fineserve", PlacementConfig(), SimConfig()),
            "static": ("static", PlacementConfig(), SimConfig()),
            "prism": ("prism", PlacementConfig(), SimConfig()),
            "fineserve-cap": ("fineserve", PlacementConfig(cap_at_slo_max_bs=True), SimConfig()),
            "fineserve-online": ("fineserve", PlacementConfig(), SimConfig(local_policy="saab-online"))}


def _one(args) -> dict:
    sc, alpha, scale, policy, seed, duration, rotate = args
    specs = sc.specs(alpha, scale)
    cost = _COST or CostModel.default("h100")
    reqs = generate({s.name: s.rate for s in specs}, duration, seed=seed, rotate=rotate)
    pol, pcfg, scfg = VARIANTS[policy]
    plan, m = simulate(pol, specs, sc.cluster, cost, reqs, pcfg, scfg)
    m.pop("per_model", None)
    return {"alpha": alpha, "scale": scale, "policy": policy, "total_rate": round(sum(s.rate for s in specs), 3),
            "requests_generated": len(reqs),
            "gpus_used": sum(g.used for g in plan.gpus), "unplaced": plan.unplaced, **m}


_COST: CostModel | None = None


def _init_worker():
    global _COST
    torch.set_num_threads(1)
    _COST = CostModel.default("h100")


def rate_at_attainment(rows: list[dict], policy: str, alpha: float, target: float = 0.5) -> float | None:
    """The rate scale (linearly interpolated) at which `policy`'s attainment first falls below target."""
    return rate_at(((r["scale"], r["slo_attainment"]) for r in rows if r["policy"] == policy and r["alpha"] == alpha),
                   target)


def attainment_at(rows: list[dict], policy: str, alpha: float, scale: float) -> float | None:
    pts = sorted((r["scale"], r["slo_attainment"]) for r in rows if r["policy"] == policy and r["alpha"] == alpha)
    if not pts:
        return None
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if scale <= xs[0]:
        return ys[0]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= scale <= x1:
            return y0 + (y1 - y0) * (scale - x0) / (x1 - x0)
    return ys[-1]


def headline(rows: list[dict], alphas: Sequence[float]) -> list[dict]:
    """Per alpha: the rate scale where static reaches 50 % attainment, each policy's attainment there
    and its ratio to static's (at most 2 by construction); and the scale where each policy itself falls
    to 50 %, as a ratio to static's (FineServe's "x times the rate" figure; `_at_least` when the policy
    never fell below 50 % in the sweep: its largest scale over static's)."""
    out = []
    for a in alphas:
        s = rate_at_attainment(rows, "static", a)
        d = {"alpha": a, "static_50pct_scale": None if s is None else round(s, 3)}
        if s is not None:
            st = attainment_at(rows, "static", a, s) or 0.5
            for p in POLICY_ORDER:
                v = attainment_at(rows, p, a, s)
                if v is None:
                    continue
                d[f"{p}_attainment"] = round(v, 4)
                if p != "static":
                    d[f"{p}_vs_static"] = round(v / st, 2)
        for p in (p for p in POLICY_ORDER if p != "static" and any(r["policy"] == p for r in rows)):
            fs = rate_at_attainment(rows, p, a)
            d[f"{p}_50pct_scale"] = None if fs is None else round(fs, 3)
            if s is not None and fs is not None:
                d[f"{p}_vs_static_rate"] = round(fs / s, 2)
            elif s is not None:
                top = max(r["scale"] for r in rows if r["policy"] == p and r["alpha"] == a)
                d[f"{p}_vs_static_rate_at_least"] = round(top / s, 2)
        out.append(d)
    return out


def plot(rows: list[dict], sc: Scenario, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    alphas = sorted({r["alpha"] for r in rows})
    fig, axes = plt.subplots(1, len(alphas), figsize=(max(5.0, 3.6 * len(alphas)), 3.3), squeeze=False, sharey=True)
    for ax, a in zip(axes[0], alphas):
        for p, style in zip(POLICY_ORDER, ("o-", "s--", "^:", "x-.")):
            pts = sorted((r["scale"], r["slo_attainment"]) for r in rows if r["alpha"] == a and r["policy"] == p)
            if pts:
                ax.plot([x for x, _ in pts], [y * 100 for _, y in pts], style, label=p)
        ax.axhline(50, color="grey", lw=0.5)
        ax.set_title(f"alpha {a}")
        ax.set_xlabel(f"rate scale (x {sc.max_rate:g} req/s max)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("TTFT SLO attainment (%)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{sc.name}, simulated: H100 costs measured at TP 1,\nroofline ESTIMATES beyond", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _merge(rows: list[dict], path: str, scenario_name: str, precisions: str, duration: float, seed: int,
           rotate: float | None) -> tuple[list[dict], dict]:
    """This run's rows plus the earlier file's rows it did not redo, and the earlier payload."""
    import json
    old = json.loads(Path(path).read_text())
    want = (scenario_name, precisions, duration, seed, rotate)
    have = (old.get("scenario"), old.get("precisions"), old.get("duration_s"), old.get("seed"), old.get("rotate_s"))
    if have != want:
        raise ValueError(f"--merge {path}: (scenario, precisions, duration, seed, rotate) {have} differ from "
                         f"this run's {want}")
    key = lambda r: (r["alpha"], r["scale"], r["policy"])     # noqa: E731
    mine = {key(r) for r in rows}
    merged = rows + [r for r in old["rows"] if key(r) not in mine and r["policy"] in POLICY_ORDER]
    return sorted(merged, key=lambda r: (r["alpha"], r["scale"], POLICY_ORDER.index(r["policy"]))), old


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m load_tests.simulate", description=__doc__.split("\n")[0])
    ap.add_argument("--scenario", default="muxserve-32", choices=["muxserve-32", "fineserve-16"])
    ap.add_argument("--quick", action="store_true", help="a few short runs (tests, < 15 s)")
    ap.add_argument("--precisions", default="mixed", choices=["mixed", *PRECISIONS])
    ap.add_argument("--alphas", type=float, nargs="+")
    ap.add_argument("--scales", type=float, nargs="+")
    ap.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES), choices=list(POLICY_ORDER))
    ap.add_argument("--duration", type=float, help="seconds of arrivals per run (default 8, quick 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rotate", type=rotate_period, help="seconds between rotations of the models' rates (the popular "
                                                 "model changes; placement still sees the mean rates)")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", help="results JSON (default load_tests/results/simulate-<scenario>[-quick].json)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--merge", help="an earlier results JSON of this scenario (same precisions, duration, seed): "
                                    "its rows join this run's in the table, headline and plot (this run's win)")
    args = ap.parse_args(argv)
    from fineserve_core.results import write_result
    sc = scenario(args.scenario, args.precisions)
    alphas = tuple(args.alphas or ((sc.alphas[1] if len(sc.alphas) > 1 else sc.alphas[0],) if args.quick else sc.alphas))
    scales = tuple(args.scales or ((1.0, 6.0) if args.quick else sc.scales))
    duration = args.duration or (1.0 if args.quick else sc.duration)
    jobs = [(sc, a, s, p, args.seed, duration, args.rotate) for a in alphas for s in scales for p in args.policies]
    t0 = time.perf_counter()
    if args.workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(args.workers, initializer=_init_worker) as ex:
            rows = list(ex.map(_one, sorted(jobs, key=lambda j: -j[2])))   # heavy runs first
    else:
        _init_worker()
        rows = [_one(j) for j in jobs]
    rows.sort(key=lambda r: (r["alpha"], r["scale"], POLICY_ORDER.index(r["policy"])))
    wall = time.perf_counter() - t0
    old = {}
    if args.merge:
        rows, old = _merge(rows, args.merge, sc.name, args.precisions, duration, args.seed, args.rotate)
        alphas = tuple(sorted({r["alpha"] for r in rows}))
        scales = tuple(sorted({r["scale"] for r in rows}))
    cost = CostModel.default("h100")
    specs = sc.specs(alphas[0], 1.0)
    plans = {**old.get("plans_at_scale_1", {}),
             **{p: place(VARIANTS[p][0], specs, sc.cluster, cost, VARIANTS[p][1]).to_dict() for p in args.policies}}
    policies = [p for p in POLICY_ORDER if p in plans]
    used = {(s.cost_key, s.precision) for a in alphas for s in sc.specs(a, 1.0)}
    cost_used = [d for d in cost.describe() if (d["model"], d["precision"]) in used]
    head = headline(rows, alphas)
    payload = {"scenario": sc.name, "note": sc.note, "quick": args.quick, "cluster": vars(sc.cluster) | {},
               "models": [{"name": s.name, "shape": s.shape, "precision": s.precision} for s in specs],
               "precisions": args.precisions, "alphas": alphas, "scales": scales, "duration_s": duration,
               "seed": args.seed, "rotate_s": args.rotate, "policies": policies, "wall_s": round(wall, 1),
               "workload": {"arrivals": "Poisson", "lengths": LengthSampler().describe(),
                            "rates": f"{sc.max_rate:g} x scale x (i+1)^-alpha in model order"
                                     + (f", rotating one model on every {args.rotate:g} s" if args.rotate else "")},
               "sim_config": vars(SimConfig()), "placement_config": vars(PlacementConfig()),
               "cost_tables": [str(p.name) for p in sorted((Path(__file__).resolve().parent.parent / "fineserve_core"
                                                            / "cost_tables").glob("h100-*.json"))],
               "cost_estimated": sorted({f"{d['model']} {d['precision']} tp{d['tp']}" for d in cost_used if d["estimate"]}),
               "cost_entries_used": cost_used,
               "merged_from": args.merge, "headline": head, "rows": rows, "plans_at_scale_1": plans}
    name = (f"simulate-{sc.name}" + ("" if args.precisions == "mixed" else f"-{args.precisions}")
            + (f"-rotate{args.rotate:g}" if args.rotate else "") + ("-quick" if args.quick else ""))
    out = write_result(name, payload, args.out or RESULTS_DIR / f"{name}.json")
    print(f"{'alpha':>5} {'scale':>5} {'rate':>7} {'policy':<10}{'attain':>7}{'+tpot':>7}{'tok/s':>9}{'ttft p50':>9}"
          f"{'p99':>8}{'drop':>6}{'GPUs':>5}{'wall':>6}")
    for r in rows:
        st = r["status"]
        print(f"{r['alpha']:>5} {r['scale']:>5} {r['total_rate']:>7.1f} {r['policy']:<10}{r['slo_attainment'] * 100:>6.1f}%"
              f"{r['slo_attainment_ttft_tpot'] * 100:>6.1f}%{r['token_throughput']:>9.0f}"
              f"{(r['ttft_p50'] or 0):>9.3f}{(r['ttft_p99'] or 0):>8.2f}{r['requests'] - st.get('ok', 0):>6}"
              f"{r['gpus_used']:>5}{r['sim_wall_s']:>6.1f}")
    for h in head:
        print("headline:", h)
    if not args.no_plot:
        png = plot(rows, sc, out.with_suffix(".png"))
        print(f"[wrote {out} and {png} in {wall:.1f}s]", file=sys.stderr)
    else:
        print(f"[wrote {out} in {wall:.1f}s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
