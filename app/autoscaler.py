"""The global scheduler's sizing rule: measured per-tier load -> replica counts, through the real placement.

Workers report cumulative counts once a second; `RateMeter` keeps their deltas, so replicas may come
and go without a jump in the rates. `Autoscaler.plan` turns every tier into a placement `ModelSpec`
with its measured rate, the observed mean prompt and output lengths, and the TTFT SLO its replicas
enforce, and asks `placement.place("fineserve", ...)` for the DP count that meets the SLO at that rate
(FineServe step B: dp grows until rate_min_bs <= min(slo_max_bs, cache_max_bs)). The count is clamped
to [1, max_replicas] and to the GPU share the other tiers leave; a smaller count is applied only after
the plans asked for it `downscale_delay_s` in a row, so a short lull does not tear replicas down.
With `moves` on, `colocation` also reads where the plan puts each tier: the plan's GPU labels are matched
to the node's GPUs so that as many tiers as possible stay where they run, and a tier whose GPU holds none
of its planned replicas is to move to the GPU that holds most of them, once plans have asked for that
`move_delay_s` in a row. No Ray here: the controller feeds it and applies what it returns.
"""
from __future__ import annotations

import math
from collections import Counter, deque
from dataclasses import dataclass

from app.config import AppConfig, ModelDeployment
from fineserve_core.cost_model import AVG_INPUT_LEN, AVG_OUTPUT_LEN, CostModel
from fineserve_core.model_source import resolve_model
from fineserve_core.placement import GiB, ClusterSpec, ModelSpec, Plan, PlacementConfig, place

COUNTED = ("arrivals", "overflowed", "finished", "slo_met", "dropped", "prompt_tokens", "requested_tokens",
           "output_tokens")
GAUGES = ("running", "waiting", "kv_blocks_in_use")
CPU_MEMORY_PER_GPU = 16 * GiB       # a logical GPU on a CPU host: room for several small replicas


@dataclass(slots=True)
class TierLoad:
    rate: float = 0.0                # requests/s arriving at the tier (overflowed ones included)
    overflow_rate: float = 0.0       # of those, sent on to the next tier
    attainment: float | None = None  # finished within the TTFT SLO / (finished + dropped), in the window
    prompt_tokens: int = 0
    requested_tokens: int = 0        # max_tokens of the admitted requests (output length before any finished)
    output_tokens: int = 0
    admitted: int = 0                # arrivals not overflowed (their prompt tokens are counted)
    finished: int = 0
    running: int = 0
    waiting: int = 0
    kv_blocks_in_use: int = 0
    replicas_reporting: int = 0
    ttft_slo_s: float | None = None


class RateMeter:
    """Per-tier rates over a sliding window from the workers' cumulative counts."""

    def __init__(self, window_s: float, stale_s: float = 3.0):
        self.window_s, self.stale_s = window_s, stale_s
        self.events: deque[tuple[float, str, dict]] = deque()
        self.last: dict[tuple[str, str], tuple[dict, float]] = {}      # (tier, replica) -> (counts, time)
        self.first_seen: float | None = None

    def add(self, tier: str, replica: str, counts: dict, now: float) -> None:
        prev = self.last.get((tier, replica))
        self.last[(tier, replica)] = (counts, now)
        self.first_seen = now if self.first_seen is None else self.first_seen
        self.events.append((now, tier, {k: counts.get(k, 0) - (prev[0].get(k, 0) if prev else 0) for k in COUNTED}))

    def loads(self, tiers: list[str], now: float) -> dict[str, TierLoad]:
        while self.events and self.events[0][0] < now - self.window_s:
            self.events.popleft()
        for key, (_, t) in list(self.last.items()):
            if t < now - max(self.window_s, self.stale_s):              # a replica gone for good
                del self.last[key]
        span = max(1e-9, min(self.window_s, now - (self.first_seen or now)) or self.window_s)
        sums = {t: dict.fromkeys(COUNTED, 0) for t in tiers}
        for _, tier, d in self.events:
            if tier in sums:
                for k, v in d.items():
                    sums[tier][k] += v
        out = {}
        for t in tiers:
            s, live = sums[t], [c for (tier, _), (c, ts) in self.last.items() if tier == t and ts >= now - self.stale_s]
            done = s["finished"] + s["dropped"]
            out[t] = TierLoad(rate=s["arrivals"] / span, overflow_rate=s["overflowed"] / span,
                              attainment=s["slo_met"] / done if done else None, prompt_tokens=s["prompt_tokens"],
                              requested_tokens=s["requested_tokens"], output_tokens=s["output_tokens"],
                              admitted=s["arrivals"] - s["overflowed"],
                              finished=s["finished"], replicas_reporting=len(live),
                              **{g: sum(int(c.get(g, 0)) for c in live) for g in GAUGES},
                              ttft_slo_s=next((c["ttft_slo_s"] for c in live if c.get("ttft_slo_s")), None))
        return out


@dataclass(slots=True)
class Decision:
    tier: str
    current: int
    target: int                      # what the plan wants (after clamping)
    apply: bool                      # change the replica count now
    reason: str


@dataclass(slots=True)
class Move:
    tier: str
    gpu: int                         # where the plan puts it
    reason: str


class Autoscaler:
    def __init__(self, cfg: AppConfig, cost: CostModel, memory_per_gpu: float):
        self.cfg, self.cost = cfg, cost
        self.cluster = ClusterSpec(1, cfg.num_gpus, memory_per_gpu=memory_per_gpu,
                                   gpu_memory_utilization=cfg.gpu_memory_utilization)
        self.down_since: dict[str, float] = {}
        self.move_since: dict[tuple[str, int], float] = {}     # (tier, GPU) -> first plan asking for it
        self.last_plan: Plan | None = None
        self.lengths = (AVG_INPUT_LEN, AVG_OUTPUT_LEN)     # ShareGPT's means until requests were seen
        self.shapes = {m.tier: resolve_model(m.source or m.name).config for m in cfg.models}

    def _spec(self, m: ModelDeployment, load: TierLoad) -> tuple[ModelSpec | None, str]:
        """The placement input for one tier, or None and why not."""
        precision, note = m.precision, ""
        if not self.cost.tps(m.name, precision):
            if not self.cost.tps(m.name, "bf16"):
                return None, f"no cost entry for {m.name} in the cost table"
            precision, note = "bf16", f"; no {m.precision} cost entry, sized with {m.name}'s bf16 entry"
        slo = m.slo.ttft_ms / 1e3 if m.slo.ttft_ms else load.ttft_slo_s
        return ModelSpec(m.tier, self.shapes[m.tier], precision, load.rate, slo_ttft=slo, cost_name=m.name), note

    def _lengths(self, loads: list[TierLoad]) -> tuple[float, float]:
        """FineServe's sizing with this workload's mean prompt and output lengths in the window: outputs of
        finished requests, else the max_tokens asked for; the last known ones when the window is empty."""
        admitted, finished = sum(x.admitted for x in loads), sum(x.finished for x in loads)
        if not admitted:
            return self.lengths
        out = (sum(x.output_tokens for x in loads) / finished if finished
               else sum(x.requested_tokens for x in loads) / admitted)
        return sum(x.prompt_tokens for x in loads) / admitted, out

    def plan(self, loads: dict[str, TierLoad], current: dict[str, int], now: float) -> list[Decision]:
        a = self.cfg.autoscale
        specs, notes, out = [], {}, []
        for m in self.cfg.models:
            spec, note = self._spec(m, loads[m.tier])
            if spec is None:
                out.append(Decision(m.tier, current[m.tier], current[m.tier], False, note))
            else:
                specs.append(spec)
                notes[m.tier] = note
        if not specs:
            return out
        self.lengths = self._lengths([loads[s.name] for s in specs])
        pcfg = PlacementConfig(avg_input_len=self.lengths[0], avg_output_len=self.lengths[1])
        plan = self.last_plan = place("fineserve", specs, self.cluster, self.cost, pcfg)
        targets = dict(current)
        for m in self.cfg.models:
            if m.tier not in notes:
                continue
            mp, load = plan.models[m.tier], loads[m.tier]
            want = max(1, mp.dp)
            others = sum(targets[o.tier] * o.gpu_fraction for o in self.cfg.on_gpu(m.gpu) if o.tier != m.tier)
            room = math.floor((1.0 - others) / m.gpu_fraction + 1e-9)
            target = max(1, min(want, a.max_replicas, room))
            why = (f"rate {load.rate:.2f} req/s (overflowed {load.overflow_rate:.2f}/s), attainment "
                   f"{'-' if load.attainment is None else f'{load.attainment:.0%}'}, lengths {pcfg.avg_input_len:.0f}"
                   f"+{pcfg.avg_output_len:.0f} tokens, TTFT SLO {mp.slo_ttft:.3f}s: placement dp {mp.dp}"
                   f" ({mp.reasons[-1]})" + notes[m.tier])
            if target < want:
                why += f"; capped at {target} (max_replicas {a.max_replicas}, GPU {m.gpu} share holds {room})"
            cur = current[m.tier]
            if target < cur:
                since = self.down_since.setdefault(m.tier, now)
                if now - since < a.downscale_delay_s:
                    out.append(Decision(m.tier, cur, target, False, why + f"; scale-down held until plans ask for "
                                        f"it {a.downscale_delay_s:g}s in a row ({now - since:.0f}s so far)"))
                    continue
            else:
                self.down_since.pop(m.tier, None)
            targets[m.tier] = target
            out.append(Decision(m.tier, cur, target, target != cur, why))
        return out

    def colocation(self, now: float, ready: set[str]) -> list[Move]:
        """The moves the last plan asks for that are due (held `move_delay_s`), for tiers of TP 1 among
        `ready` (serving: a tier still starting up is not moved, and its hold starts once it serves)."""
        if self.last_plan is None:
            return []
        planned = {t: [g for r in mp.replicas for g in r.gpus] for t, mp in self.last_plan.models.items()
                   if mp.tp == 1 and mp.placed}
        at = {m.tier: m.gpu for m in self.cfg.models if m.tier in planned}
        # the plan numbers GPUs afresh: match its labels to the GPUs the tiers run on, most overlap first
        overlap = Counter((g, at[t]) for t, gs in planned.items() for g in set(gs))
        label: dict[int, int] = {}
        for (g, phys), _ in sorted(overlap.items(), key=lambda kv: (-kv[1], kv[0])):
            if g not in label and phys not in label.values():
                label[g] = phys
        free = iter(sorted(set(range(self.cfg.num_gpus)) - set(label.values())))
        for g in sorted({g for gs in planned.values() for g in gs} - set(label)):
            label[g] = next(free)
        moves, wanted = [], set()
        for t, gs in planned.items():
            on = [label[g] for g in gs]
            if at[t] in on or t not in ready:
                continue
            (dst, n), = Counter(sorted(on)).most_common(1)
            wanted.add((t, dst))
            since = self.move_since.setdefault((t, dst), now)
            if now - since >= self.cfg.autoscale.move_delay_s:
                moves.append(Move(t, dst, f"the plan puts {n} of {len(on)} replica(s) of {t} on GPU {dst} and none "
                                          f"on GPU {at[t]}, where it runs (plans asked for it {now - since:.0f}s in a "
                                          f"row; plan GPUs matched to the running ones to keep the most tiers in place)"))
        self.move_since = {k: v for k, v in self.move_since.items() if k in wanted}
        return moves
