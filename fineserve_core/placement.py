"""Global placement: which models run where, with how many GPUs and replicas (pure functions, no Ray).

`place(policy, models, cluster, cost)` -> `Plan`. Policies (same inputs, same output type):

fineserve  FineServe's slab-aware placement (papers.md 1.5, `finesched/placement`):
  A. per-model TTFT SLO = slo_scale (40) x TTFT_est(batch 1, 903 tokens, TP = base) + 4 ms, unless
     configured; base TP = 4 for >= 60 B params, 2 for >= 30 B, else 1. TPOT SLO = 5 x decode step at
     batch 1 (DESIGN.md), unless configured.
  B. per TP in the cost table: slo_max_bs = floor(b where TTFT_est(b, 722.4) = SLO), cache_max_bs =
     floor((memory x util x TP - placement memory) / KV bytes of a 722.4 + 504.8-token sequence),
     rate_min_bs = ceil(b where throughput(b) = rate / dp); dp grows until rate_min_bs <=
     min(slo_max_bs, cache_max_bs). Of the satisfied TPs (<= GPUs per node) the one needing the fewest
     GPUs (tp x dp) wins, then the least memory (dp x required memory), then the smaller TP. Replica
     engine limits: max_num_seqs 256 (FineServe's code: slo_max_bs, see Deviations), min batch =
     rate_min_bs. No TP satisfied: best effort with the TP/dp that serves the most, reason says so.
  C. required memory = max(1.3 x weights, placement memory) + KV bytes per token x (722.4 + 504.8) x
     rate_min_bs; replicas are placed largest first on the GPU group (TP GPUs of one node, each with
     required/TP free) with the highest score: sum over its GPUs of floor((free - required/TP) /
     avg_block) / 1e5, avg_block = harmonic mean of the per-GPU KV block sizes (16 tokens, all layers)
     of every model on that GPU including the new one (FineServe's proxy for marginal memory
     efficiency: low-KV-precision co-tenants make a GPU "roomier"). Every model's first replica is
     placed before any model's extra DP replicas; DP replicas of one model avoid sharing a GPU.
static     the static-partition baseline (vLLM / MuxServe "spatial"): TP = base (raised until the model
  fits), dp from the same estimator at that TP, replicas placed largest first on the GPU group with
  the most free memory; every replica a FIXED KV region proportional to its placement memory
  (FineServe's `--restrict-gpu-memory-utilization`), FCFS, max_num_seqs 256 (vLLM's default).
prism      Prism's KV-pressure-ratio placement as FineServe's code has it: TP = base, dp from that TP's
  estimate; replicas sorted by rate/(SLO x TP) descending; per node the TP GPUs with the smallest
  KVPR = (w_g + rate/SLO x TP) / (kv_g - weights/TP), the node with the smallest sum; then w_g +=
  rate/(SLO x TP), kv_g -= weights/TP (FineServe multiplies by TP in the candidate and divides in the
  update; kept). Elastic KV (2 MiB pages from a shared pool), Prism's cumulative-deadline queue.

Deviations from FineServe's code, on purpose (each found on the 32-GPU scenario):
  * TP choice: FineServe takes the satisfied TP with the smallest rate_min_bs ("minimizes memory
    usage"); rate_min_bs shrinks as TP grows, so on a shared cluster it gave e.g. a 2.8 req/s 65B
    model 11 TP-2 replicas. We take the fewest GPUs first, then the least memory.
  * Order: first replicas of all models before extra DP replicas, and the extra replicas by the
    load each would carry per GPU, rate / ((index + 1) x TP), highest first: D'Hondt's apportionment,
    so that when not every planned replica fits each model keeps replicas in proportion to its rate
    (FineServe sorts all replicas by required memory: under overload whole models were left without a
    GPU, and the big models' extra replicas took the memory the most popular 7B model needed: it got 3
    of 32 planned replicas. Rounds of equal shares of each model's planned dp, our previous order, still
    gave a 440 req/s model 4 of 16 replicas beside an 88 req/s one's 2 of 3; load_tests/results/
    simulate.md has the effect); anti-affinity of DP replicas of one model. Static uses the same
    order; Prism keeps its KVPR order after the first replicas.
  * max_num_seqs stays at 256 (vLLM's default, as for the baselines) instead of FineServe's
    slo_max_bs (48-137 for the 8B-70B shapes at the default SLO): SAAB already admits only what meets
    its TTFT deadline, and the cap only kept decodes from batching. Simulated (scratch runs before the
    change, `cap_at_slo_max_bs=True` restores FineServe's rule): FineServe's 50 % point on the 16-GPU
    scenario 30.2 -> 54.0 x, on the 32-GPU one 13.5 -> 16.3 (alpha 0.7), 18.8 -> 21.1 (0.9), 27.8 ->
    30.5 (1.3); TTFT-and-TPOT attainment falls (16 GPUs, scale 17.5: 24.5 -> 18.9 %; static 3.6 %).
  * Required memory uses max(1.3 x weights, placement memory) (1.3 x weights can be less than weights
    + activation workspace, which left KV buffers negative); rate/dp is a true division (FineServe's
    `rate // dp` floors to 0 for rates below dp).
  * KV layout check (fineserve and prism): a GPU takes a replica only if its KV buffer (usable memory
    - reserved) still holds the KV layout its allocator builds (`slab_layout`: the app's KV Slab
    layout, else padded slabs; Prism's 2 MiB pages) with one prefill batch (min_kv_tokens) reserved per
    replica. Byte counts alone miss that slabs come whole, per layer, K and V (a 2 MiB page per layer
    is 128 MiB for an 8B model whose 2048 tokens of 4-bit KV are 68 MB) and that required memory's KV
    part (rate_min_bs x 1227 tokens) can be below a 2048-token prefill reservation: at overload
    Prism's placement put five replicas on a GPU with 0.63 GB of KV, which no layout fits. The next
    best group is tried; a replica no group can take stays unplaced (fewer DP replicas; a model whose
    first replica fits nowhere is UNPLACED), with the reason.

Units: bytes and seconds everywhere (FineServe's GB constants converted: 3 GB activation workspace
per 2 activation bytes, 0.8 GB per process x 2).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from fineserve_core.config import LlamaConfig
from fineserve_core.cost_model import (ACT_BYTES, AVG_INPUT_LEN, AVG_OUTPUT_LEN, P95_INPUT, CostModel, CostProfile,
                                       kv_bytes_per_token, kv_format, param_count, resolve_shape, weight_bytes)
from fineserve_core.kv_slab import SERVE_SLAB_POLICY, KVSlabManager, ModelKVSpec

GB = 1e9
GiB = 1 << 30
MiB = 1 << 20
POLICIES = ("fineserve", "static", "prism")
PRISM_PAGE_BYTES = 2 * MiB                 # Prism's elastic KV: 2 MiB pages whatever the precision
#: KVSlabManager layouts of each slab-based KV policy, in the order they are tried (the simulator
#: builds its allocators with `slab_layout`): the slabs the app serves with (SERVE_SLAB_POLICY), then
#: padded slabs when the lcm is too coarse for the buffer (as app/slab_manager.make_allocator falls
#: back); Prism's pages. "static" (whole blocks per region) has none.
SLAB_LAYOUTS: dict[str, tuple[dict, ...]] = {
    "slab": ({"policy": SERVE_SLAB_POLICY}, {"policy": "padded"}),
    "elastic-2mib": ({"slab_size": PRISM_PAGE_BYTES, "policy": "padded"},),
}


@dataclass(frozen=True)
class ModelSpec:
    """One logical model to serve. `shape` is a preset name (model_source.PRESETS) or a LlamaConfig;
    `cost_name` the model key in the cost table (default: the shape's name)."""
    name: str
    shape: str | LlamaConfig
    precision: str = "bf16"
    rate: float = 1.0                      # requests/s
    slo_ttft: float | None = None          # seconds; None: scale x single-request TTFT at 903 tokens
    slo_tpot: float | None = None          # seconds; None: 5 x single-request TPOT
    cost_name: str | None = None

    @property
    def config(self) -> LlamaConfig:
        return resolve_shape(self.shape)

    @property
    def cost_key(self) -> str:
        if self.cost_name:
            return self.cost_name
        if isinstance(self.shape, str):
            return self.shape
        raise ValueError(f"model {self.name!r}: a LlamaConfig shape needs cost_name")

    @property
    def params(self) -> int:
        return param_count(self.config)

    @property
    def weight_bytes(self) -> float:
        return weight_bytes(self.config, self.precision)

    @property
    def placement_memory(self) -> float:
        """FineServe's placement memory: weights + activation workspace (3 GB x act bytes) + 2 x 0.8 GB."""
        return self.weight_bytes + 3 * GB * ACT_BYTES[self.precision] + 2 * 0.8 * GB

    def kv_bytes_per_token(self, tp: int = 1) -> float:
        """KV bytes per token on one GPU of a TP-`tp` replica (tp=1: the whole model's)."""
        return kv_bytes_per_token(self.config, self.precision, tp)

    def kv_spec(self, replica_id: str, tp: int, rate: float = 1.0, max_num_batched_tokens: int = 2048) -> ModelKVSpec:
        """The KV allocator's spec of one replica on one of its GPUs."""
        cfg = self.config
        return ModelKVSpec.from_format(replica_id, kv_format(cfg, self.precision, tp), cfg.num_layers,
                                       rate=max(rate, 1e-6), max_num_batched_tokens=max_num_batched_tokens)

    @property
    def base_tp(self) -> int:
        b = self.params / 1e9
        return 4 if b >= 60 else 2 if b >= 30 else 1


@dataclass(frozen=True)
class ClusterSpec:
    nodes: int = 1
    gpus_per_node: int = 8
    memory_per_gpu: float = 80 * GiB       # bytes
    gpu_memory_utilization: float = 0.9

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def usable_per_gpu(self) -> float:
        return self.memory_per_gpu * self.gpu_memory_utilization

    def node_gpus(self, node: int) -> list[int]:
        return list(range(node * self.gpus_per_node, (node + 1) * self.gpus_per_node))

    def node_of(self, gpu: int) -> int:
        return gpu // self.gpus_per_node


@dataclass(frozen=True)
class PlacementConfig:
    slo_scale: float = 40.0                # FineServe HEAD (50 in its first commit)
    slo_buffer: float = 0.004
    slo_input_len: int = P95_INPUT
    tpot_scale: float = 5.0
    avg_input_len: float = AVG_INPUT_LEN
    avg_output_len: float = AVG_OUTPUT_LEN
    weight_factor: float = 1.3             # required memory = 1.3 x weights + KV(rate_min_bs)
    max_num_seqs_cap: int = 256
    static_max_num_seqs: int = 256
    tp_options: tuple[int, ...] = (1, 2, 4, 8)
    score_tokens_per_block: int = 16       # FineServe's NUM_TOKENS_PER_BLOCK in the mesh score
    score: str = "harmonic"                # "harmonic" (FineServe) or "memory" (free bytes only: ablation)
    min_kv_tokens: int = 2048              # a replica's KV must hold one prefill batch
    cap_at_slo_max_bs: bool = False        # True: fineserve/prism max_num_seqs = slo_max_bs (FineServe's code)


@dataclass
class TPCandidate:
    tp: int
    dp: int
    satisfied: bool
    slo_max_bs: int
    rate_min_bs: int
    cache_max_bs: int
    throughput: float                      # requests/s of one replica at rate_min_bs
    reason: str


@dataclass
class ReplicaPlan:
    replica_id: str
    model: str
    index: int
    tp: int
    gpus: tuple[int, ...]
    rate: float                            # the share of the model's rate this replica expects
    required_memory: float                 # bytes over all its GPUs
    kv_share: dict[int, float] = field(default_factory=dict)   # GPU -> share of that GPU's KV buffer
    kv_bytes: dict[int, float] = field(default_factory=dict)   # GPU -> bytes (static: fixed; else expected)
    reason: str = ""


@dataclass
class ModelPlan:
    name: str
    precision: str
    shape: str
    rate: float
    slo_ttft: float
    slo_tpot: float
    tp: int
    dp: int
    max_num_seqs: int
    min_num_seqs: int
    ttft_per_token: float
    cost_estimate: bool
    feasible: bool
    replicas: list[ReplicaPlan] = field(default_factory=list)
    candidates: list[TPCandidate] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def placed(self) -> bool:
        return any(r.gpus for r in self.replicas)


@dataclass
class GpuPlan:
    gpu: int
    node: int
    replicas: list[str] = field(default_factory=list)
    reserved_bytes: float = 0.0            # weights + activation workspace of the replicas (per GPU)
    kv_buffer_bytes: float = 0.0           # usable memory - reserved

    @property
    def used(self) -> bool:
        return bool(self.replicas)


@dataclass
class Plan:
    policy: str
    kv_policy: str                         # "slab" | "static" | "elastic-2mib"
    local_policy: str                      # "saab" | "fcfs" | "prism"
    cluster: ClusterSpec
    models: dict[str, ModelPlan]
    gpus: list[GpuPlan]
    unplaced: list[str] = field(default_factory=list)   # replica ids without GPUs

    def replicas(self) -> list[ReplicaPlan]:
        return [r for m in self.models.values() for r in m.replicas if r.gpus]

    def to_dict(self) -> dict:
        return {"policy": self.policy, "kv_policy": self.kv_policy, "local_policy": self.local_policy,
                "cluster": asdict(self.cluster), "unplaced": list(self.unplaced),
                "models": {n: {**{k: v for k, v in asdict(m).items() if k not in ("replicas", "candidates")},
                               "replicas": [{**asdict(r), "gpus": list(r.gpus),
                                             "kv_share": {str(g): round(v, 4) for g, v in r.kv_share.items()},
                                             "kv_bytes": {str(g): int(v) for g, v in r.kv_bytes.items()}}
                                            for r in m.replicas],
                               "candidates": [asdict(c) for c in m.candidates]}
                           for n, m in self.models.items()},
                "gpus": [{**asdict(g), "reserved_bytes": int(g.reserved_bytes),
                          "kv_buffer_bytes": int(g.kv_buffer_bytes)} for g in self.gpus]}

    def summary(self) -> str:
        """A fixed-width table of the decisions (one line per model)."""
        lines = [f"placement {self.policy} (KV {self.kv_policy}, queue {self.local_policy}): "
                 f"{sum(g.used for g in self.gpus)}/{len(self.gpus)} GPUs used"
                 + (f", UNPLACED {self.unplaced}" if self.unplaced else ""),
                 f"{'model':<24}{'prec':<9}{'rate':>7}{'SLO s':>7}{'tp x dp':>8}{'max/min bs':>11}  GPUs per replica"]
        for m in self.models.values():
            gp = " | ".join(",".join(map(str, r.gpus)) or "-" for r in m.replicas)
            lines.append(f"{m.name:<24}{m.precision:<9}{m.rate:>7.2f}{m.slo_ttft:>7.2f}{m.tp:>4} x {m.dp:<2}"
                         f"{m.max_num_seqs:>6}/{m.min_num_seqs:<4}  {gp}" + ("" if m.feasible else "  (SLO/rate infeasible)"))
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Step A and B: SLOs and TP/DP candidates
# ---------------------------------------------------------------------------------------------------

def _base_profile(spec: ModelSpec, cost: CostModel) -> CostProfile:
    tps = cost.tps(spec.cost_key, spec.precision)
    if not tps:
        raise KeyError(f"model {spec.name!r}: no cost entry for {spec.cost_key} {spec.precision}")
    tp = spec.base_tp if spec.base_tp in tps else min((t for t in tps if t >= spec.base_tp), default=max(tps))
    return cost.profile(spec.cost_key, spec.precision, tp)


def model_slos(spec: ModelSpec, cost: CostModel, cfg: PlacementConfig = PlacementConfig()) -> tuple[float, float, str]:
    """(TTFT SLO, TPOT SLO, how it was set)."""
    prof = _base_profile(spec, cost)
    why = []
    if spec.slo_ttft is not None:
        ttft = spec.slo_ttft
        why.append(f"TTFT SLO {ttft:.3f} s configured")
    else:
        single = prof.ttft_est(1, cfg.slo_input_len)
        ttft = single * cfg.slo_scale + cfg.slo_buffer
        why.append(f"TTFT SLO {ttft:.3f} s = {cfg.slo_scale:g} x {single * 1e3:.1f} ms (TTFT at "
                   f"{cfg.slo_input_len} tokens, TP {prof.tp}) + {cfg.slo_buffer * 1e3:g} ms")
    if spec.slo_tpot is not None:
        tpot = spec.slo_tpot
    else:
        tpot = cfg.tpot_scale * prof.decode_step(1)
        why.append(f"TPOT SLO {tpot * 1e3:.1f} ms = {cfg.tpot_scale:g} x decode step at batch 1")
    if prof.estimate:
        why.append("costs are roofline ESTIMATES")
    return ttft, tpot, "; ".join(why)


def tp_candidates(spec: ModelSpec, slo_ttft: float, cost: CostModel, cluster: ClusterSpec,
                  cfg: PlacementConfig = PlacementConfig()) -> list[TPCandidate]:
    """FineServe's estimate_throughputs for every TP of the cost table that a node can hold."""
    out = []
    seq_tokens = cfg.avg_input_len + cfg.avg_output_len
    for tp in cost.tps(spec.cost_key, spec.precision):
        if tp not in cfg.tp_options or tp > cluster.gpus_per_node:
            continue
        prof = cost.profile(spec.cost_key, spec.precision, tp)
        slo_bs = prof.max_batch_for_ttft(slo_ttft, cfg.avg_input_len)
        free = cluster.usable_per_gpu * tp - spec.placement_memory
        cache_bs = max(0, int(free // (spec.kv_bytes_per_token(1) * seq_tokens))) if free > 0 else 0
        max_bs = min(slo_bs, cache_bs)
        max_dp = max(1, cluster.num_gpus // tp)
        dp, rate_bs = 1, 1
        while True:
            r = spec.rate / dp
            rate_bs = max(1, prof.min_batch_for_rate(r, cfg.avg_input_len, cfg.avg_output_len)) if r > 0 else 1
            if rate_bs <= max_bs or max_bs < 1 or dp >= max_dp:
                break
            dp += 1
        ok = max_bs >= 1 and rate_bs <= max_bs
        if slo_bs < 1:
            why = (f"tp={tp}: infeasible, the SLO {slo_ttft:.3f} s is below the TTFT of one request "
                   f"({prof.ttft_est(1, cfg.avg_input_len):.3f} s at {cfg.avg_input_len:g} tokens)")
        elif cache_bs < 1:
            why = f"tp={tp}: infeasible, the weights leave no KV memory for one sequence"
        else:
            why = (f"tp={tp}: SLO allows batch <= {slo_bs}, KV <= {cache_bs}; rate {spec.rate:g}/dp {dp} needs "
                   f">= {rate_bs}" + ("" if ok else f" (unsatisfiable with dp <= {max_dp})"))
        out.append(TPCandidate(tp, dp, ok, slo_bs, rate_bs, cache_bs,
                               prof.throughput(rate_bs, cfg.avg_input_len, cfg.avg_output_len), why))
    return out


def _choose_tp(spec: ModelSpec, cands: list[TPCandidate], policy: str, cluster: ClusterSpec,
               cfg: PlacementConfig) -> tuple[TPCandidate | None, str]:
    if not cands:
        return None, "no TP of the cost table fits a node"
    if policy == "fineserve":
        sat = [c for c in cands if c.satisfied]
        if sat:
            c = min(sat, key=lambda c: (c.tp * c.dp, c.dp * required_memory(spec, c.rate_min_bs, cfg), c.tp))
            return c, (f"tp={c.tp} dp={c.dp}: of the satisfied TPs the fewest GPUs, then the least memory "
                       f"(dp x required memory); candidates (tp, dp, rate_min_bs) "
                       f"{[(x.tp, x.dp, x.rate_min_bs) for x in sat]}")
        ok = [c for c in cands if c.slo_max_bs >= 1 and c.cache_max_bs >= 1]
        if ok:   # best effort: the most throughput at the largest dp we allow
            c = max(ok, key=lambda c: (c.dp * min(c.slo_max_bs, c.cache_max_bs), -c.tp))
            return c, f"tp={c.tp} dp={c.dp}: best effort, no TP meets rate and SLO ({c.reason})"
        return None, "no TP can meet the SLO with even one request (" + "; ".join(c.reason for c in cands) + ")"
    # static / prism: the base TP (raised until the model fits in memory)
    fits = [c for c in cands if c.cache_max_bs >= 1 and c.tp >= spec.base_tp]
    if not fits:
        fits = [c for c in cands if c.cache_max_bs >= 1]
    if not fits:
        return None, "the model does not fit on any TP group of a node"
    c = min(fits, key=lambda c: c.tp)
    return c, f"tp={c.tp} (base TP {spec.base_tp}{', raised to fit' if c.tp != spec.base_tp else ''}) dp={c.dp}: {c.reason}"


# ---------------------------------------------------------------------------------------------------
# Step C: placing replicas
# ---------------------------------------------------------------------------------------------------

@dataclass
class _Gpu:
    gpu: int
    free: float
    tenants: list[tuple[ModelSpec, int]] = field(default_factory=list)     # (spec, tp)
    reserved: float = 0.0
    kvpr_w: float = 0.0                    # prism: sum of rate/(SLO x tp)
    kvpr_kv: float = 0.0                   # prism: memory left after weights


def _block(spec: ModelSpec, tp: int, cfg: PlacementConfig) -> float:
    """Per-GPU KV bytes of one 16-token block over all layers (FineServe's blk_m x layers / tp)."""
    return spec.kv_bytes_per_token(tp) * cfg.score_tokens_per_block


def _mesh_score(mesh: Sequence[_Gpu], spec: ModelSpec, tp: int, required: float, cfg: PlacementConfig) -> float:
    score = 0.0
    for g in mesh:
        left = g.free - required / tp
        if cfg.score == "memory":
            score += left / GiB
            continue
        models = g.tenants + [(spec, tp)]
        avg_block = len(models) / sum(1.0 / _block(s, t, cfg) for s, t in models)
        score += math.floor(left / avg_block) / 1e5
    return score


def _meshes(gpus: dict[int, _Gpu], cluster: ClusterSpec, tp: int, need: float, avoid: str | None = None):
    """GPU groups of `tp` GPUs in one node, each with `need` bytes free and no replica of model `avoid`."""
    for node in range(cluster.nodes):
        cand = [gpus[g] for g in cluster.node_gpus(node) if gpus[g].free >= need
                and not (avoid and any(s.name == avoid for s, _ in gpus[g].tenants))]
        if len(cand) >= tp:
            yield from itertools.combinations(cand, tp)


def _pick(gpus: dict[int, _Gpu], cluster: ClusterSpec, tp: int, need: float, model: str,
          score: Callable[[Sequence[_Gpu]], float], ok: Callable[[_Gpu], bool]) -> tuple[tuple[_Gpu, ...] | None, float]:
    """The group (of `_meshes`) with the highest score whose every GPU passes `ok` (checked lazily, best
    first; ties keep the first). Groups without a replica of `model` already (DP replicas on one GPU
    would share its compute) first; the others only when none of those passes."""
    seen: dict[int, bool] = {}

    def good(g: _Gpu) -> bool:
        if g.gpu not in seen:
            seen[g.gpu] = ok(g)
        return seen[g.gpu]
    for avoid in (model, None):
        ranked = sorted(((score(m), i, m) for i, m in enumerate(_meshes(gpus, cluster, tp, need, avoid))),
                        key=lambda x: (-x[0], x[1]))
        for s, _, m in ranked:
            if all(good(g) for g in m):
                return m, s
    return None, -math.inf


def _assign(gpus: dict[int, _Gpu], mesh: Sequence[_Gpu], spec: ModelSpec, tp: int, take: float) -> tuple[int, ...]:
    for g in mesh:
        g.free -= take / tp
        g.reserved += spec.placement_memory / tp
        g.tenants.append((spec, tp))
    return tuple(g.gpu for g in mesh)


def _replica_order(x) -> tuple:
    """Placement order: first replicas of all models (largest memory first), then extra DP replicas by
    the rate each would carry per GPU, rate / ((index + 1) x TP), highest first (D'Hondt), then largest
    memory first."""
    spec, r, mem = x
    return (r.index > 0, -spec.rate / ((r.index + 1) * r.tp), -mem)


def required_memory(spec: ModelSpec, rate_min_bs: int, cfg: PlacementConfig = PlacementConfig()) -> float:
    seq = cfg.avg_input_len + cfg.avg_output_len
    return (max(cfg.weight_factor * spec.weight_bytes, spec.placement_memory)
            + spec.kv_bytes_per_token(1) * seq * max(1, rate_min_bs))


def _min_kv(spec: ModelSpec, tp: int, cfg: PlacementConfig) -> float:
    return spec.kv_bytes_per_token(tp) * cfg.min_kv_tokens


_LAYOUT_PROBE_BYTES = 2 * GiB              # per replica: a probe most layouts fit (else the whole buffer is tried)


def slab_layout(kv_policy: str, buffer: torch.Tensor, specs: Sequence[ModelKVSpec]) -> tuple[KVSlabManager, int]:
    """The first layout of SLAB_LAYOUTS[kv_policy] that sizes on `buffer` (every model reserving
    ceil(prefill blocks / blocks per slab) slabs in each of its layers), and its index there."""
    errors = []
    for i, kw in enumerate(SLAB_LAYOUTS[kv_policy]):
        try:
            return KVSlabManager(buffer, specs, **kw), i
        except ValueError as e:
            errors.append(f"{kw}: {e}")
    raise ValueError(f"no KV Slab layout fits {buffer.numel()} B for {[s.model_id for s in specs]}: "
                     + "; ".join(errors))


def _kv_layout_fits(g: _Gpu, spec: ModelSpec, tp: int, kv_policy: str, cluster: ClusterSpec,
                    cfg: PlacementConfig) -> bool:
    """Whether GPU `g`, with a TP-`tp` replica of `spec` added, keeps a KV buffer that the layout of
    `kv_policy` fits with one prefill batch (cfg.min_kv_tokens) per replica. Static regions are whole
    blocks: `_min_kv` is exact there."""
    if kv_policy not in SLAB_LAYOUTS:
        return True
    kv = int(cluster.usable_per_gpu - g.reserved - spec.placement_memory / tp)
    if kv <= 0:
        return False
    specs = [s.kv_spec(f"{s.name}#{i}", t, max_num_batched_tokens=cfg.min_kv_tokens)
             for i, (s, t) in enumerate(g.tenants + [(spec, tp)])]
    # A layout that sizes on a buffer sizes on any larger one (the slab size depends on the formats
    # only), so try a small probe first: building the slab tables of a 50 GB buffer costs ~20 ms.
    probe = min(kv, _LAYOUT_PROBE_BYTES * len(specs))
    for nbytes in (probe, kv) if probe < kv else (kv,):
        try:
            slab_layout(kv_policy, torch.empty(nbytes, dtype=torch.uint8, device="meta"), specs)
            return True
        except ValueError:
            continue
    return False


_KV_AND_QUEUE = {"fineserve": ("slab", "saab"), "static": ("static", "fcfs"), "prism": ("elastic-2mib", "prism")}


def place(policy: str, models: Sequence[ModelSpec], cluster: ClusterSpec, cost: CostModel,
          cfg: PlacementConfig = PlacementConfig()) -> Plan:
    """Plan placements for `models` on `cluster` with one of POLICIES."""
    if policy not in POLICIES:
        raise ValueError(f"unknown placement policy {policy!r}; one of {POLICIES}")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique: {names}")
    plans: dict[str, ModelPlan] = {}
    reps: list[tuple[ModelSpec, ReplicaPlan, float]] = []      # (spec, replica, required memory)
    for spec in models:
        slo, tpot, why = model_slos(spec, cost, cfg)
        cands = tp_candidates(spec, slo, cost, cluster, cfg)
        c, reason = _choose_tp(spec, cands, policy, cluster, cfg)
        if c is None:
            plans[spec.name] = ModelPlan(spec.name, spec.precision, str(spec.cost_key), spec.rate, slo, tpot, 0, 0, 0,
                                         0, 0.0, _base_profile(spec, cost).estimate, False, [], cands, [why, reason])
            continue
        prof = cost.profile(spec.cost_key, spec.precision, c.tp)
        max_seqs = (cfg.static_max_num_seqs if policy == "static" or not cfg.cap_at_slo_max_bs
                    else max(1, min(c.slo_max_bs, cfg.max_num_seqs_cap)))
        mp = ModelPlan(spec.name, spec.precision, str(spec.cost_key), spec.rate, slo, tpot, c.tp, c.dp, max_seqs,
                       c.rate_min_bs, prof.ttft_per_token, prof.estimate, c.satisfied, [], cands, [why, reason])
        plans[spec.name] = mp
        req = required_memory(spec, c.rate_min_bs, cfg)
        for i in range(c.dp):
            r = ReplicaPlan(f"{spec.name}/{i}", spec.name, i, c.tp, (), spec.rate / c.dp, req)
            mp.replicas.append(r)
            reps.append((spec, r, req))

    gpus = {g: _Gpu(g, cluster.usable_per_gpu, kvpr_kv=cluster.memory_per_gpu) for g in range(cluster.num_gpus)}
    unplaced = []
    kv_policy, local = _KV_AND_QUEUE[policy]
    no_room = (f"no GPU group has memory for its weights and a {kv_policy} KV layout with one "
               f"{cfg.min_kv_tokens}-token prefill batch per replica")
    if policy == "fineserve":
        # every model's first replica (largest required memory first) before any extra DP replica,
        # then the extra replicas by rate per replica and GPU (D'Hondt)
        for spec, r, req in sorted(reps, key=_replica_order):
            ok = lambda g: _kv_layout_fits(g, spec, r.tp, kv_policy, cluster, cfg)     # noqa: E731
            best, best_score = _pick(gpus, cluster, r.tp, req / r.tp, spec.name,
                                     lambda m: _mesh_score(m, spec, r.tp, req, cfg), ok)
            if best is not None:
                r.gpus = _assign(gpus, best, spec, r.tp, req)
                r.reason = f"score {best_score:.5f} (free 16-token blocks / 1e5 under the harmonic-mean block size)"
                continue
            need = spec.placement_memory + _min_kv(spec, 1, cfg)
            fallback, _ = _pick(gpus, cluster, r.tp, need / r.tp, spec.name,
                                lambda m: _mesh_score(m, spec, r.tp, need, cfg), ok)
            if fallback is not None:
                r.gpus = _assign(gpus, fallback, spec, r.tp, need)
                r.reason = "no group had the required memory for rate_min_bs; placed with less KV"
            else:
                unplaced.append(r.replica_id)
                r.reason = no_room
    elif policy == "static":
        for spec, r, _ in sorted(reps, key=lambda x: _replica_order((x[0], x[1], x[0].placement_memory))):
            need = spec.placement_memory + _min_kv(spec, 1, cfg)
            best, _ = _pick(gpus, cluster, r.tp, need / r.tp, spec.name, lambda m: sum(g.free for g in m),
                            lambda g: True)
            if best is None:
                unplaced.append(r.replica_id)
                r.reason = "no GPU group has memory for its weights and one prefill batch of KV"
                continue
            r.gpus = _assign(gpus, best, spec, r.tp, need)
            r.reason = "the group with the most free memory"
    else:   # prism
        order = sorted(reps, key=lambda x: (x[1].index > 0, -(x[1].rate / (plans[x[0].name].slo_ttft * x[1].tp))))
        for spec, r, _ in order:
            slo, tp, w = plans[spec.name].slo_ttft, r.tp, spec.weight_bytes / GB
            need = spec.placement_memory + _min_kv(spec, 1, cfg)     # weights + one prefill batch of KV
            best, best_sum = None, math.inf
            for node in range(cluster.nodes):
                cand = []
                for g in cluster.node_gpus(node):
                    G = gpus[g]
                    if G.kvpr_kv / GB <= w / tp or G.free < need / tp:
                        continue
                    cand.append(((G.kvpr_w + r.rate / slo * tp) / (G.kvpr_kv / GB - w / tp), g))
                cand.sort()
                # the tp lowest-KVPR GPUs whose pages still fit (checked lazily, lowest first)
                pick = list(itertools.islice((x for x in cand if _kv_layout_fits(gpus[x[1]], spec, tp, kv_policy,
                                                                                 cluster, cfg)), tp))
                if len(pick) < tp:
                    continue
                s = sum(k for k, _ in pick)
                if s < best_sum:
                    best, best_sum = [gpus[g] for _, g in pick], s
            if best is None:
                unplaced.append(r.replica_id)
                r.reason = no_room
                continue
            for G in best:
                G.kvpr_w += r.rate / (slo * tp)
                G.kvpr_kv -= spec.weight_bytes / tp
            r.gpus = _assign(gpus, best, spec, tp, need)
            r.reason = f"KVPR sum {best_sum:.4f} (smallest in its node)"

    # KV buffers and shares
    out_gpus = []
    by_gpu: dict[int, list[tuple[ModelSpec, ReplicaPlan]]] = {g: [] for g in gpus}
    specs = {m.name: m for m in models}
    for mp in plans.values():
        for r in mp.replicas:
            for g in r.gpus:
                by_gpu[g].append((specs[mp.name], r))
    for g, G in gpus.items():
        kv = max(0.0, cluster.usable_per_gpu - G.reserved)
        out_gpus.append(GpuPlan(g, cluster.node_of(g), [r.replica_id for _, r in by_gpu[g]], G.reserved, kv))
        ten = by_gpu[g]
        if not ten:
            continue
        if policy == "static":
            w = {r.replica_id: s.placement_memory / r.tp for s, r in ten}
        else:
            w = {r.replica_id: max(r.rate, 1e-6) * s.kv_bytes_per_token(r.tp) for s, r in ten}
        tot = sum(w.values())
        for s, r in ten:
            r.kv_share[g] = w[r.replica_id] / tot
            r.kv_bytes[g] = kv * w[r.replica_id] / tot
    for mp in plans.values():
        if mp.replicas and not mp.placed:
            mp.reasons.append("UNPLACED: " + "; ".join(r.reason for r in mp.replicas))
    return Plan(policy, kv_policy, local, cluster, plans, out_gpus, unplaced)


PLACERS: dict[str, Callable[..., Plan]] = {p: (lambda p: lambda *a, **k: place(p, *a, **k))(p) for p in POLICIES}
place_fineserve, place_static, place_prism = PLACERS["fineserve"], PLACERS["static"], PLACERS["prism"]
