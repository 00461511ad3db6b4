"""KV fragmentation: KV Slab (FineServe's code and measured alternatives) vs static partition.

    python -m load_tests.kv_fragmentation            # full: every scenario, 3 seeds (~2 min, 2 CPUs)
    python -m load_tests.kv_fragmentation --quick    # SmolLM2 scenarios, 1 seed (< 15 s)

Replays seeded synthetic traces (`fineserve_core.kv_trace`: a block-level model of vLLM-style
continuous batching, FCFS admission, recompute preemption; time is in engine steps) against each
allocator on the same meta-device buffer and reports, per scenario, DESIGN.md's fragmentation at
each failed block request, averaged over the failures of the run and then over seeds:

    wasted = slack (allocated blocks not holding live tokens)
           + unusable (free bytes the failing model cannot use: other formats' partial slabs, other
             models' static regions, bytes no region covers)
           + overhead (non-default slab policies only: slab-edge padding, unused split-scale slots)

plus KV memory efficiency (live KV bytes / buffer) at those failures and over all steps, failures,
preemptions and output tokens (a throughput proxy: every allocator runs the same number of steps).

Scenarios (three models, one per precision, sharing one GPU's KV buffer):
  a  smol        SmolLM2-135M shape (30 layers, 3 KV heads, d 64; bf16 / fp8 / w4a8kv4), Poisson
                 0.1 req/step each, buffer = mean KV demand rounded to the faithful slab unit.
  b  gpu         Llama-3-8B bf16 + Llama-2-7B fp8 (32 KV heads: 4x the KV bytes of Llama-3's 8) +
                 Llama-3-8B w4a8kv4, one 32-layer pool, 50 GiB buffer, Poisson, equal rates scaled
                 so the mean KV demand equals the buffer.
  c  rotate      as b, the hot model rotates every 1/6 of the run (2x its rate, the others 0.5x).
     bursty      as b, Gamma inter-arrivals with CV 3.
     shift       as b, rate weights (1.5, 1, 0.5) for the first half, (0.5, 1, 1.5) after, each half
                 scaled to mean demand = buffer; static(demand) is sized with the first half's
                 weights (what was known when it was deployed).
  a/c smol-rotate  as smol, with c's rotating hot model.
  gpu-t16        as gpu with 16-token bf16/fp8 and 32-token w4a8kv4 blocks (fewer allocators): how
                 much of the waste is the last block's slack.
  quick mode: smol and smol-rotate, one seed.
Lengths (all scenarios): lognormal, sigma 1, p95 = FineServe's 903 input / 631 output tokens
(means ~287 / ~201), capped at 4096 / 2048 (`kv_trace.SHAREGPT_LENGTHS`).

Allocators: static partition (share = rate x bytes/token, and equal shares); KV Slab "faithful"
(FineServe: slab = 2 lcm, lowest partial slab first), with and without the engine block cache; the
KVSlabManager policies of `kv_slab.SLAB_POLICIES`; and "ideal", a reference pool in which any free
byte is usable by any model (no format boundaries, byte-granular): its waste is slack only, the floor
for any block allocator at these block sizes.
"""
from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from fineserve_core.kv_format import KVFormat
from fineserve_core.kv_slab import (FragmentationReport, KVOutOfMemory, KVSlabManager, ModelKVSpec,
                                    SlabPolicy, StaticPartitionAllocator, _ModelBook, resolve_policy)
from fineserve_core.kv_trace import (SHAREGPT_LENGTHS, TraceRequest, piecewise_trace, replay_trace,
                                     synthetic_trace)

GiB = 1 << 30
PRECISIONS = ("bf16", "fp8", "w4a8kv4")
MAX_NUM_SEQS = 1024             # per engine; high enough that KV memory, not the cap, limits the batch


# ---------------------------------------------------------------------------------------------------
# reference allocator: one byte-granular pool, no format boundaries
# ---------------------------------------------------------------------------------------------------

class IdealSharedPool:
    """Lower bound: a block fits whenever the buffer has its bytes free, whoever freed them. Not
    buildable with paged kernels (it ignores layout); it prices the format boundaries of real
    allocators. Fragmentation = slack only (free bytes are usable by every model)."""

    def __init__(self, buffer: torch.Tensor, specs: Sequence[ModelKVSpec]):
        self._book = _ModelBook({s.model_id: s for s in specs})
        self.buffer_bytes = buffer.numel()
        self._used = 0
        self._next = {s.model_id: 0 for s in specs}
        self._recycled: dict[str, list[int]] = {s.model_id: [] for s in specs}

    @property
    def model_ids(self) -> tuple[str, ...]:
        return tuple(self._book.specs)

    def spec(self, model_id: str) -> ModelKVSpec:
        return self._book.spec(model_id)

    def num_blocks(self, model_id: str) -> int:
        return self.buffer_bytes // self.spec(model_id).bytes_per_block

    def num_free_blocks(self, model_id: str) -> int:
        return (self.buffer_bytes - self._used) // self.spec(model_id).bytes_per_block

    def num_allocated_blocks(self, model_id: str) -> int:
        return len(self._book.owned[model_id])

    def alloc(self, model_id: str, n: int, near: int | None = None) -> list[int]:
        bpb = self.spec(model_id).bytes_per_block
        if self._used + n * bpb > self.buffer_bytes:
            raise KVOutOfMemory(f"model {model_id!r}: {n} blocks do not fit")
        rec, out = self._recycled[model_id], []
        for _ in range(n):
            if rec:
                out.append(rec.pop())
            else:
                out.append(self._next[model_id])
                self._next[model_id] += 1
        self._used += n * bpb
        self._book.owned[model_id].update(out)
        return out

    def free(self, model_id: str, ids: Iterable[int]) -> None:
        ids = list(ids)
        self._book.check_free(model_id, ids)
        self._book.owned[model_id].difference_update(ids)
        self._recycled[model_id].extend(ids)
        self._used -= len(ids) * self.spec(model_id).bytes_per_block

    def fragmentation(self, live_tokens: dict[str, int], failing_model: str | None = None) -> FragmentationReport:
        live, allocated, per = self._book.slack(live_tokens)
        return FragmentationReport(self.buffer_bytes, live, allocated, 0, 0, per, failing_model)


# ---------------------------------------------------------------------------------------------------
# allocators and scenarios
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AllocatorSpec:
    name: str
    kind: str                          # static | slab | ideal
    share: str = "demand"
    policy: SlabPolicy | None = None
    block_cache: bool = False
    description: str = ""

    def make(self, buffer: torch.Tensor, specs: Sequence[ModelKVSpec]):
        if self.kind == "static":
            return StaticPartitionAllocator(buffer, specs, share=self.share)
        if self.kind == "ideal":
            return IdealSharedPool(buffer, specs)
        return KVSlabManager(buffer, specs, policy=self.policy)


def _slab(name: str, description: str, block_cache: bool = False, policy: str | None = None) -> AllocatorSpec:
    return AllocatorSpec(name, "slab", policy=resolve_policy(policy or name), block_cache=block_cache,
                         description=description)


ALLOCATORS: list[AllocatorSpec] = [
    AllocatorSpec("static_demand", "static", "demand",
                  description="static partition, region = rate x KV bytes/token share"),
    AllocatorSpec("static_equal", "static", "equal", description="static partition, equal bytes per model"),
    _slab("faithful", "KV Slab as FineServe's code: slab = 2 lcm(block bytes), lowest partial slab first"),
    _slab("faithful+cache", "faithful + engine block cache (refill 32, return 16 above 64)", True, "faithful"),
    _slab("lcm1", "slab = 1 lcm"),
    _slab("bestfit", "fill the fullest partial slab first"),
    _slab("affinity", "a sequence's next block goes to its last block's slab if it has room"),
    _slab("padded", "slab = smallest multiple of lcm(bf16, fp8 blocks) holding 4 w4a8kv4 blocks; "
                    "w4a8kv4 blocks straddling slab edges are padding; block layout unchanged"),
    _slab("padded_wholeslab", "padded + a prompt of >= one slab takes whole free slabs first"),
    _slab("split_scale", "w4a8kv4 scales in a reserved per-pool region (a slot per block id), "
                         "slabs hold data only, slab = 2 lcm(data blocks)"),
    _slab("split_scale_fine", "split_scale with slab = 1 lcm(data blocks) + whole slabs first "
                              "(the app's default, kv_slab.SERVE_SLAB_POLICY)"),
    AllocatorSpec("ideal", "ideal", description="reference: any free byte usable by any model (slack only)"),
]


@dataclass
class Scenario:
    name: str
    title: str
    specs: list[ModelKVSpec]           # .rate = the rates a static(demand) split is sized with
    buffer_bytes: int
    steps: int
    trace: Callable[[int], list[TraceRequest]]
    notes: str = ""
    params: dict = field(default_factory=dict)
    allocators: tuple[str, ...] | None = None      # a subset of ALLOCATORS (None: all)


def smol_specs(rates: Sequence[float] = (1.0, 1.0, 1.0)) -> list[ModelKVSpec]:
    return [ModelKVSpec.from_format(f"smollm2-{p}", KVFormat.for_model(p, 3, 64, torch.bfloat16), 30, rate=r)
            for p, r in zip(PRECISIONS, rates)]


def gpu_specs(rates: Sequence[float] = (1.0, 1.0, 1.0), half_blocks: bool = False) -> list[ModelKVSpec]:
    shapes = {"llama3-8b-bf16": ("bf16", 8), "llama2-7b-fp8": ("fp8", 32), "llama3-8b-w4a8kv4": ("w4a8kv4", 8)}
    tpb = {"bf16": 16, "fp8": 16, "w4a8kv4": 32} if half_blocks else {}
    return [ModelKVSpec.from_format(m, KVFormat.for_model(p, h, 128, torch.bfloat16, tpb.get(p)), 32, rate=r)
            for (m, (p, h)), r in zip(shapes.items(), rates)]


@functools.lru_cache(maxsize=None)
def mean_token_steps(seed: int = 12345, n: int = 20000) -> float:
    """E[KV token-steps per request] under SHAREGPT_LENGTHS (a request holds input + k tokens during
    its k-th decode step), from a fixed sample."""
    tr = synthetic_trace(["m"], n, 1.0, seed=seed, **SHAREGPT_LENGTHS)
    return statistics.fmean(r.output_len * r.input_len + r.output_len * (r.output_len - 1) / 2 for r in tr)


def rate_for_buffer(specs: Sequence[ModelKVSpec], weights: Sequence[float], buffer_bytes: float,
                    token_steps: float) -> float:
    """Base rate r such that rates r * weights make the mean KV demand equal buffer_bytes."""
    return buffer_bytes / (token_steps * sum(w * s.bytes_per_token for w, s in zip(weights, specs)))


def faithful_unit(specs: Sequence[ModelKVSpec]) -> int:
    L = specs[0].num_layers
    return 2 * L * 2 * math.lcm(*(s.block_bytes for s in specs))


def scenarios(quick: bool = False) -> list[Scenario]:
    ts = mean_token_steps()
    lengths = SHAREGPT_LENGTHS
    out: list[Scenario] = []

    # (a) SmolLM2 shape: 0.1 req/step each, buffer = mean demand in whole faithful slab units.
    sm = smol_specs()
    smol_rate = 0.1
    unit = faithful_unit(sm)
    demand = smol_rate * ts * sum(s.bytes_per_token for s in sm)
    smol_buf = max(3, round(demand / unit)) * unit
    smol_steps = 3000
    ids = [s.model_id for s in sm]
    out.append(Scenario("smol", "a: SmolLM2 shape, Poisson", sm, smol_buf, smol_steps,
                        lambda seed: synthetic_trace(ids, smol_steps, smol_rate, seed=seed, **lengths),
                        f"buffer = mean KV demand = {smol_buf / unit:.0f} faithful slab units",
                        {"rate_per_step": smol_rate}))
    phase = smol_steps // 6
    out.append(Scenario("smol-rotate", "a/c: SmolLM2 shape, rotating hot model", sm, smol_buf, smol_steps,
                        lambda seed: piecewise_trace(ids, _rotation(ids, 6, phase, smol_rate), seed=seed,
                                                     **lengths),
                        "as smol; hot model 2x, others 0.5x, rotating every 1/6 of the run",
                        {"rate_per_step": smol_rate}))
    if quick:
        return out

    # (b) and (c): GPU scale, 50 GiB, one 32-layer pool.
    g = gpu_specs()
    gids = [s.model_id for s in g]
    buf = 50 * GiB
    steps = 2000
    r = rate_for_buffer(g, (1, 1, 1), buf, ts)
    out.append(Scenario("gpu", "b: 8B-class GPU scale, Poisson", g, buf, steps,
                        lambda seed: synthetic_trace(gids, steps, r, seed=seed, **lengths),
                        "equal rates, mean KV demand = buffer", {"rate_per_step": r}))
    out.append(Scenario("rotate", "c: rotating hot model", g, buf, steps,
                        lambda seed: piecewise_trace(gids, _rotation(gids, 6, steps // 6, r), seed=seed,
                                                     **lengths),
                        "hot model 2x, others 0.5x, rotating every 1/6 of the run; static sized with "
                        "the mean (equal) rates", {"rate_per_step": r}))
    out.append(Scenario("bursty", "c: bursty (Gamma CV 3)", g, buf, steps,
                        lambda seed: synthetic_trace(gids, steps, r, seed=seed, cv=3.0, **lengths),
                        "equal mean rates, Gamma inter-arrival CV 3", {"rate_per_step": r, "cv": 3.0}))
    first, second = (1.5, 1.0, 0.5), (0.5, 1.0, 1.5)
    r1, r2 = rate_for_buffer(g, first, buf, ts), rate_for_buffer(g, second, buf, ts)
    out.append(Scenario("shift", "c: rate shift mid-run", gpu_specs(first), buf, steps,
                        lambda seed: piecewise_trace(gids, [(steps // 2, dict(zip(gids, (r1 * x for x in first)))),
                                                            (steps - steps // 2, dict(zip(gids, (r2 * x for x in second))))],
                                                     seed=seed, **lengths),
                        "rate weights (1.5, 1, 0.5) then (0.5, 1, 1.5), each half scaled to mean KV demand = "
                        "buffer; static(demand) is sized with the first half's weights",
                        {"rate_per_step_first_half": [r1 * x for x in first],
                         "rate_per_step_second_half": [r2 * x for x in second]}))
    # Sensitivity: b with half the tokens per block (16 bf16/fp8, 32 w4a8kv4): slack is the floor.
    g16 = gpu_specs(half_blocks=True)
    out.append(Scenario("gpu-t16", "b with 16/32-token blocks", g16, buf, steps,
                        lambda seed: synthetic_trace(gids, steps, r, seed=seed, **lengths),
                        "as gpu (same traces), tokens per block 16 (bf16, fp8) / 32 (w4a8kv4) instead of 32/64",
                        {"rate_per_step": r},
                        ("static_demand", "faithful", "padded_wholeslab", "split_scale_fine", "ideal")))
    return out


def _rotation(ids: Sequence[str], phases: int, phase_steps: int, rate: float) -> list[tuple[int, dict]]:
    return [(phase_steps, {m: rate * (2.0 if j == i % len(ids) else 0.5) for j, m in enumerate(ids)})
            for i in range(phases)]


# ---------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------

AT_OOM = ("mean_wasted_fraction", "mean_slack_fraction", "mean_unusable_fraction", "mean_overhead_fraction",
          "mean_kv_efficiency")
METRICS = ("mean_wasted_fraction", "mean_slack_fraction", "mean_unusable_fraction", "mean_overhead_fraction",
           "mean_kv_efficiency", "mean_kv_efficiency_all_steps", "failures", "preemptions",
           "generated_tokens", "completed")


def _run_one(args: tuple[bool, str, int, Sequence[AllocatorSpec]]) -> list[dict]:
    quick, name, seed, allocators = args
    torch.set_num_threads(1)
    sc = next(s for s in scenarios(quick) if s.name == name)     # rebuilt here: traces are closures
    trace = sc.trace(seed)
    rows = []
    for al in allocators:
        if sc.allocators is not None and al.name not in sc.allocators:
            continue
        t0 = time.perf_counter()
        a = al.make(torch.empty(sc.buffer_bytes, dtype=torch.uint8, device="meta"), sc.specs)
        r = replay_trace(a, trace, use_block_cache=al.block_cache, max_num_seqs=MAX_NUM_SEQS, max_steps=sc.steps)
        row = {"scenario": sc.name, "seed": seed, "allocator": al.name, "requests": len(trace),
               "seconds": time.perf_counter() - t0, **{k: getattr(r, k) for k in METRICS}}
        if isinstance(a, KVSlabManager):
            row["slab_size"] = a.slab_size
            row["num_slabs"] = sum(t.num_slabs for t in a.pools.values())
        rows.append(row)
    return rows


def aggregate(rows: list[dict]) -> dict:
    out: dict[str, dict[str, dict]] = {}
    for sc in dict.fromkeys(r["scenario"] for r in rows):
        out[sc] = {}
        for al in dict.fromkeys(r["allocator"] for r in rows if r["scenario"] == sc):
            rs = [r for r in rows if r["scenario"] == sc and r["allocator"] == al]
            # At-OOM averages are undefined for a run that never ran out of KV memory: average those
            # over the runs that did (and say how many did not).
            oom = [r for r in rs if r["failures"] > 0] or rs
            d = {k: statistics.fmean(r[k] for r in (oom if k in AT_OOM else rs)) for k in METRICS}
            d["runs"], d["runs_without_oom"] = len(rs), sum(r["failures"] == 0 for r in rs)
            w = [r["mean_wasted_fraction"] if r["failures"] else None for r in rs]
            ws = [x for x in w if x is not None]
            d["wasted_std_over_seeds"] = statistics.stdev(ws) if len(ws) > 1 else 0.0
            d["wasted_per_seed"] = w
            for k in ("slab_size", "num_slabs"):
                if k in rs[0]:
                    d[k] = rs[0][k]
            out[sc][al] = d
    return out


def run_benchmark(quick: bool = False, seeds: Sequence[int] | None = None, jobs: int = 1,
                  allocators: Sequence[AllocatorSpec] | None = None,
                  only: Sequence[str] | None = None) -> dict:
    """Replay every scenario x seed x allocator; returns the results payload (nothing is written)."""
    allocators = list(allocators or ALLOCATORS)
    seeds = list(seeds if seeds is not None else ((0,) if quick else (0, 1, 2)))
    scs = [s for s in scenarios(quick) if not only or s.name in only]
    work = [(quick, sc.name, seed, allocators) for sc in scs for seed in seeds]
    t0 = time.perf_counter()
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as ex:
            parts = list(ex.map(_run_one, work))
    else:
        parts = [_run_one(w) for w in work]
    rows = [r for p in parts for r in p]
    return {
        "mode": "quick" if quick else "full", "seeds": seeds, "wall_seconds": time.perf_counter() - t0,
        "metric": "DESIGN.md fragmentation at each failed block request, averaged over a run's failures, "
                  "then over seeds: wasted = slack + unusable + overhead, fractions of the KV buffer",
        "lengths": {**SHAREGPT_LENGTHS, "p95_input": 903, "p95_output": 631, "distribution": "lognormal"},
        "max_num_seqs": MAX_NUM_SEQS,
        "scenarios": {s.name: {"title": s.title, "notes": s.notes, "buffer_bytes": s.buffer_bytes,
                               "steps": s.steps, **s.params,
                               "models": [{"model": m.model_id, "precision": m.precision,
                                           "block_bytes": m.block_bytes, "tokens_per_block": m.tokens_per_block,
                                           "num_layers": m.num_layers, "kv_bytes_per_token": m.bytes_per_token,
                                           "static_rate_weight": m.rate} for m in s.specs]}
                      for s in scs},
        "allocators": {a.name: a.description for a in allocators},
        "results": (res := aggregate(rows)),
        "summary": summarize(res),
        "runs": rows,
    }


def summarize(results: dict) -> dict:
    """Per scenario: faithful, the static baselines, the best non-reference allocator, the floor."""
    out = {}
    for sc, d in results.items():
        w = {a: v["mean_wasted_fraction"] for a, v in d.items()}
        real = {a: x for a, x in w.items() if a != "ideal"}
        best = min(real, key=real.get)
        out[sc] = {"faithful": w.get("faithful"), "static_demand": w.get("static_demand"),
                   "static_equal": w.get("static_equal"), "best": best, "best_wasted": real[best],
                   "ideal_floor": w.get("ideal"),
                   "tokens_best_vs_faithful": d[best]["generated_tokens"] / d["faithful"]["generated_tokens"]}
    return out


def summary_text(payload: dict) -> str:
    lines = ["per scenario: wasted at OOM, faithful KV Slab / static(demand) / static(equal) / best / floor"]
    for sc, v in summarize(payload["results"]).items():
        f = lambda x: "-" if x is None else f"{x:.2%}"
        lines.append(f"  {sc:12s} {f(v['faithful'])} / {f(v['static_demand'])} / {f(v['static_equal'])} / "
                     f"{v['best']} {f(v['best_wasted'])} (tokens x{v['tokens_best_vs_faithful']:.3f} vs faithful) / "
                     f"ideal {f(v['ideal_floor'])}")
    return "\n".join(lines)


def table(payload: dict, allocators: Sequence[str] | None = None) -> str:
    res = payload["results"]
    lines = [f"{'scenario':12s} {'allocator':17s} {'wasted':>7s} {'±sd':>6s} {'slack':>6s} {'unusbl':>6s} "
             f"{'ovhd':>6s} {'eff@OOM':>7s} {'eff all':>7s} {'fails':>6s} {'preempt':>7s} {'tokens':>8s}"]
    for sc, d in res.items():
        for al, v in d.items():
            if allocators and al not in allocators:
                continue
            lines.append(f"{sc:12s} {al:17s} {v['mean_wasted_fraction']:7.2%} {v['wasted_std_over_seeds']:6.2%} "
                         f"{v['mean_slack_fraction']:6.2%} {v['mean_unusable_fraction']:6.2%} "
                         f"{v['mean_overhead_fraction']:6.2%} {v['mean_kv_efficiency']:7.2%} "
                         f"{v['mean_kv_efficiency_all_steps']:7.2%} {v['failures']:6.0f} {v['preemptions']:7.0f} "
                         f"{v['generated_tokens']:8.0f}")
    return "\n".join(lines)


def plot(payload: dict, path) -> None:
    """Grouped stacked bars: per scenario, per allocator, slack + unusable + overhead (fractions)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    res = payload["results"]
    scs = list(res)
    als = list(dict.fromkeys(a for d in res.values() for a in d))
    colors = {a: plt.get_cmap("tab20")(j % 20) for j, a in enumerate(als)}
    fig, ax = plt.subplots(figsize=(max(8, 2.6 * len(scs)), 5.8))
    top = 0.0
    for i, sc in enumerate(scs):
        present = [a for a in als if a in res[sc]]
        width = 0.84 / len(present)
        for j, al in enumerate(present):
            v, x = res[sc][al], i + (j - (len(present) - 1) / 2) * width
            slack, unus, ovh = (v["mean_slack_fraction"], v["mean_unusable_fraction"], v["mean_overhead_fraction"])
            c = colors[al]
            ax.bar(x, slack, width, color=c, edgecolor="black", linewidth=0.3)
            ax.bar(x, unus, width, bottom=slack, color=c, alpha=0.45, edgecolor="black", linewidth=0.3)
            ax.bar(x, ovh, width, bottom=slack + unus, color="white", hatch="////", edgecolor=c, linewidth=0.3)
            top = max(top, slack + unus + ovh)
    ax.axhline(0.03, color="green", linestyle="--", linewidth=1)
    ax.axhline(0.25, color="red", linestyle="--", linewidth=1)
    ax.text(-0.5, 0.031, "DESIGN target, KV Slab <= 3%", color="green", ha="left", va="bottom", fontsize=8)
    ax.text(len(scs) - 0.5, 0.251, "DESIGN target, static >= 25%", color="red", ha="right", va="bottom", fontsize=8)
    ax.set_ylim(0, max(0.27, top * 1.06))
    ax.set_xlim(-0.55, len(scs) - 0.45)
    ax.set_xticks(range(len(scs)))
    ax.set_xticklabels([payload["scenarios"][s]["title"] for s in scs], fontsize=8)
    ax.set_ylabel("KV bytes wasted at a failed block request / buffer")
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    seeds = len(payload["seeds"])
    ax.set_title(f"KV fragmentation at OOM, mean of {seeds} seed{'s' * (seeds > 1)} (solid: slack of partly "
                 "filled blocks, light: free bytes the failing model cannot use, hatched: padding / reserved "
                 "scale slots)", fontsize=9)
    handles = [Patch(facecolor=colors[a], edgecolor="black", linewidth=0.3, label=a) for a in als]
    ax.legend(handles=handles, fontsize=7, ncol=3, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="SmolLM2 scenarios, one seed (< 15 s); prints only")
    ap.add_argument("--seeds", type=int, nargs="*", help="trace seeds (default 0 1 2; quick: 0)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--only", nargs="*", help="scenario names")
    ap.add_argument("--no-write", action="store_true", help="print the table only (implied by --quick)")
    args = ap.parse_args(argv)
    payload = run_benchmark(args.quick, args.seeds, args.jobs, only=args.only)
    print(table(payload))
    print(f"[{payload['wall_seconds']:.1f} s]")
    print(summary_text(payload))
    if not (args.no_write or args.quick or args.only or args.seeds is not None):
        from fineserve_core.results import RESULTS_DIR, device_tag, write_result
        name = "kv-fragmentation"
        png = RESULTS_DIR / f"{name}-{device_tag()}.png"
        payload["plot"] = png.name
        out = write_result(name, payload)
        plot(payload, png)
        print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
