"""Placement (FineServe slab-aware, static partition, Prism KVPR) on crafted clusters."""
import json

import pytest

from fineserve_core.cost_model import CostModel
from fineserve_core.placement import (GiB, ClusterSpec, ModelSpec, PlacementConfig, model_slos, place,
                                      tp_candidates)


@pytest.fixture(scope="module")
def h100():
    return CostModel.default("h100")


def gpus_of(plan, name):
    return [r.gpus for r in plan.models[name].replicas]


def test_slo_rule_scale_times_single_request_ttft(h100):
    m7 = ModelSpec("a", "llama-2-7b-shape", "bf16", 1.0)
    slo, tpot, why = model_slos(m7, h100)
    p = h100.profile("llama-2-7b-shape", "bf16", 1)
    assert slo == pytest.approx(40 * p.ttft_est(1, 903) + 0.004)
    assert tpot == pytest.approx(5 * p.decode_step(1))
    assert "40 x" in why and "ESTIMATE" not in why                     # measured on the H100
    assert "ESTIMATE" in model_slos(ModelSpec("e", "llama-30b-shape", "bf16"), h100)[2]
    # >= 60 B params: the SLO is taken at TP 4 (FineServe's base_ngpu)
    m65 = ModelSpec("b", "llama-65b-shape", "bf16", 1.0)
    assert m65.base_tp == 4 and ModelSpec("c", "llama-30b-shape", "fp8").base_tp == 2
    assert model_slos(m65, h100)[0] == pytest.approx(40 * h100.profile("llama-65b-shape", "bf16", 4).ttft_est(1, 903) + 0.004)
    assert model_slos(ModelSpec("d", "llama-2-7b-shape", slo_ttft=2.0), h100)[0] == 2.0      # configured wins
    quick = PlacementConfig(slo_scale=10)
    assert model_slos(m7, h100, quick)[0] < slo


def test_a_rate_one_replica_cannot_carry_adds_dp_replicas(h100):
    cl = ClusterSpec(1, 8)
    one = place("fineserve", [ModelSpec("m", "llama-2-7b-shape", "bf16", 1.0)], cl, h100).models["m"]
    assert (one.tp, one.dp, one.feasible) == (1, 1, True) and 1 <= one.min_num_seqs <= one.max_num_seqs
    cap = h100.profile("llama-2-7b-shape", "bf16", 1).throughput(one.max_num_seqs)
    busy = place("fineserve", [ModelSpec("m", "llama-2-7b-shape", "bf16", 3.5 * cap)], cl, h100).models["m"]
    assert busy.feasible and busy.tp * busy.dp >= 4
    gp = gpus_of(place("fineserve", [ModelSpec("m", "llama-2-7b-shape", "bf16", 3.5 * cap)], cl, h100), "m")
    assert len({g for r in gp for g in r}) == busy.tp * busy.dp        # DP replicas do not share GPUs
    assert any("rate" in c.reason for c in busy.candidates)


def test_a_tight_slo_adds_dp_replicas_and_an_impossible_one_is_reported(h100):
    cl = ClusterSpec(1, 8)
    loose = place("fineserve", [ModelSpec("m", "llama-2-7b-shape", "bf16", 8.0, slo_ttft=2.0)], cl, h100).models["m"]
    tight = place("fineserve", [ModelSpec("m", "llama-2-7b-shape", "bf16", 8.0, slo_ttft=0.2)], cl, h100).models["m"]
    slo_bs = lambda m: next(c.slo_max_bs for c in m.candidates if c.tp == m.tp)   # noqa: E731
    assert slo_bs(tight) < slo_bs(loose)                                # slo_max_bs shrinks with the SLO
    assert tight.tp * tight.dp > loose.tp * loose.dp
    assert tight.feasible and loose.feasible
    hopeless = place("fineserve", [ModelSpec("m", "llama-2-7b-shape", "bf16", 1.0, slo_ttft=0.001)], cl, h100)
    m = hopeless.models["m"]
    assert not m.feasible and not m.placed
    assert any("below the TTFT of one request" in r for r in m.reasons)


def test_replicas_that_cannot_all_fit_are_shared_in_proportion_to_rate(h100):
    """Four 40 GiB GPUs hold four 8B bf16 replicas; both models plan four. The extra replicas go by
    rate per replica (D'Hondt): 400 vs 100 req/s gives 3 and 1, equal rates give 2 and 2."""
    cl = ClusterSpec(1, 4, 40 * GiB)
    for rates, want in (((400.0, 100.0), (3, 1)), ((100.0, 100.0), (2, 2))):
        plan = place("fineserve", [ModelSpec("A", "llama-3-8b-shape", "bf16", rates[0]),
                                   ModelSpec("B", "llama-3-8b-shape", "bf16", rates[1])], cl, h100)
        assert [plan.models[m].dp for m in "AB"] == [4, 4] and len(plan.unplaced) == 4
        assert tuple(sum(1 for g in gpus_of(plan, m) if g) for m in "AB") == want, plan.summary()


def test_slab_aware_score_puts_a_low_kv_precision_model_where_memory_is_tight(h100):
    """X (7B fp8) and Y (13B w4a8kv4) go first, one per GPU; Z (8B w4a8kv4, small KV blocks) comes
    last. Y's GPU has less free memory, but its blocks are small too: the harmonic-mean block size
    there stays small, so more blocks fit, and slab-aware placement picks the tight GPU. Scoring by
    free memory alone picks the other one."""
    cl = ClusterSpec(1, 2, 48 * GiB)
    ms = [ModelSpec("X", "llama-2-7b-shape", "fp8", 0.5), ModelSpec("Y", "llama-2-13b-shape", "w4a8kv4", 0.5),
          ModelSpec("Z", "llama-3-8b-shape", "w4a8kv4", 0.5)]
    slab = place("fineserve", ms, cl, h100)
    mem = place("fineserve", ms, cl, h100, PlacementConfig(score="memory"))
    gx, gy = gpus_of(slab, "X")[0][0], gpus_of(slab, "Y")[0][0]
    assert gx != gy and gpus_of(mem, "X") == gpus_of(slab, "X")
    # free memory before Z: Y's GPU is the tight one
    req = {r.model: r.required_memory for m in slab.models.values() for r in m.replicas}
    assert cl.usable_per_gpu - req["Y"] < cl.usable_per_gpu - req["X"]
    assert gpus_of(slab, "Z") == [(gy,)]
    assert gpus_of(mem, "Z") == [(gx,)]


def test_research_notes_figure1_layout(h100):
    """FineServe's Figure 1: A (16-bit KV), B (FP8), C (4-bit KV) 8B models and D (32B bf16, TP 2) on
    two GPUs; FineServe's scheduler gives {B, C, D} and {A, D}: the KV-heavy model alone with D."""
    cl = ClusterSpec(1, 2, 80 * GiB)
    ms = [ModelSpec("A", "llama-3-8b-shape", "bf16", 2.0), ModelSpec("B", "llama-3-8b-shape", "fp8", 2.0),
          ModelSpec("C", "llama-3-8b-shape", "w4a8kv4", 2.0), ModelSpec("D", "qwen3-32b-shape", "bf16", 1.0)]
    plan = place("fineserve", ms, cl, h100)
    assert gpus_of(plan, "D") == [(0, 1)]
    (a,), (b,), (c,) = gpus_of(plan, "A")[0], gpus_of(plan, "B")[0], gpus_of(plan, "C")[0]
    assert b == c != a
    tenants = {g.gpu: sorted(r.split("/")[0] for r in g.replicas) for g in plan.gpus}
    assert tenants[b] == ["B", "C", "D"] and tenants[a] == ["A", "D"]


def test_research_notes_example_configs(h100):
    """examples/fineserve-2models.yaml: Llama-3.1-8B FP16 (rate 5, SLO 2 s) + FP8-KV8 (rate 5, SLO 3 s)
    on one GPU; and one model at rate 0.1 with a 0.5 s SLO."""
    cl = ClusterSpec(1, 1, 80 * GiB)
    ms = [ModelSpec("org", "llama-3-8b-shape", "bf16", 5, slo_ttft=2.0),
          ModelSpec("fp8", "llama-3-8b-shape", "fp8", 5, slo_ttft=3.0)]
    plan = place("fineserve", ms, cl, h100)
    assert not plan.unplaced
    for name, slo in (("org", 2.0), ("fp8", 3.0)):
        m = plan.models[name]
        assert (m.tp, m.dp, m.slo_ttft, m.feasible) == (1, 1, slo, True)
        assert m.max_num_seqs == 256                                    # vLLM's default, as for the baselines
        capped = place("fineserve", ms, cl, h100, PlacementConfig(cap_at_slo_max_bs=True)).models[name]
        assert capped.max_num_seqs == min(256, next(c.slo_max_bs for c in m.candidates if c.tp == 1))
        assert gpus_of(plan, name) == [(0,)]
    one = place("fineserve", [ModelSpec("x", "llama-3-8b-shape", "bf16", 0.1, slo_ttft=0.5)], cl, h100).models["x"]
    assert (one.tp, one.dp, one.min_num_seqs) == (1, 1, 1) and one.max_num_seqs >= 1


def test_static_partition_is_memory_proportional_fcfs(h100):
    cl = ClusterSpec(1, 1, 80 * GiB)
    ms = [ModelSpec("big", "llama-2-13b-shape", "bf16", 1.0), ModelSpec("small", "llama-3-8b-shape", "w4a8kv4", 1.0)]
    plan = place("static", ms, cl, h100)
    assert (plan.kv_policy, plan.local_policy) == ("static", "fcfs")
    big, small = plan.models["big"].replicas[0], plan.models["small"].replicas[0]
    assert big.kv_share[0] + small.kv_share[0] == pytest.approx(1.0)
    assert big.kv_share[0] / small.kv_share[0] == pytest.approx(ms[0].placement_memory / ms[1].placement_memory)
    assert plan.models["big"].max_num_seqs == 256
    assert plan.gpus[0].kv_buffer_bytes == pytest.approx(cl.usable_per_gpu - ms[0].placement_memory - ms[1].placement_memory)


def test_prism_kvpr_spreads_by_pressure(h100):
    cl = ClusterSpec(1, 2, 80 * GiB)
    ms = [ModelSpec(f"m{r}", "llama-3-8b-shape", "bf16", float(r), slo_ttft=1.0) for r in (3, 2, 1)]
    plan = place("prism", ms, cl, h100)
    assert (plan.kv_policy, plan.local_policy) == ("elastic-2mib", "prism")
    # highest rate/SLO first on GPU 0, the next where the pressure is lower, the third joins the lighter
    assert gpus_of(plan, "m3") == [(0,)] and gpus_of(plan, "m2") == [(1,)] and gpus_of(plan, "m1") == [(1,)]
    assert all("KVPR" in r.reason for m in plan.models.values() for r in m.replicas)


def test_tp_candidates_cover_memory_and_slo(h100):
    cl = ClusterSpec(1, 8)
    m = ModelSpec("m", "llama-65b-shape", "bf16", 1.0)
    slo = model_slos(m, h100)[0]
    cands = {c.tp: c for c in tp_candidates(m, slo, h100, cl)}
    assert cands[1].cache_max_bs == 0 and not cands[1].satisfied          # 130 GB of weights on one GPU
    assert cands[4].satisfied and cands[4].slo_max_bs >= 1
    plan = place("fineserve", [m], cl, h100)
    assert plan.models["m"].tp >= 2 and len(gpus_of(plan, "m")[0]) == plan.models["m"].tp


def test_plan_serializes_and_summarizes(h100):
    cl = ClusterSpec(2, 4)
    ms = [ModelSpec(f"m{i}", s, p, r) for i, (s, p, r) in enumerate(
        [("llama-2-7b-shape", "bf16", 6.0), ("llama-2-13b-shape", "fp8", 2.0), ("llama-30b-shape", "w4a8kv4", 1.0)])]
    for pol in ("fineserve", "static", "prism"):
        plan = place(pol, ms, cl, h100)
        d = json.loads(json.dumps(plan.to_dict()))
        assert d["policy"] == pol and set(d["models"]) == {"m0", "m1", "m2"}
        assert all(r["gpus"] for m in d["models"].values() for r in m["replicas"])
        assert "m2" in plan.summary()
        for r in plan.replicas():
            assert len({cl.node_of(g) for g in r.gpus}) == 1                 # a TP group stays in one node
    with pytest.raises(ValueError, match="policy"):
        place("random", ms, cl, h100)
    with pytest.raises(ValueError, match="unique"):
        place("fineserve", ms + ms[:1], cl, h100)


def test_works_with_the_measured_cpu_table():
    cpu = CostModel.default("cpu")
    plan = place("fineserve", [ModelSpec("s", "smollm2-135m", "bf16", 0.5, slo_ttft=5.0)],
                 ClusterSpec(1, 2, 16 * GiB), cpu)
    m = plan.models["s"]
    assert m.placed and not m.cost_estimate and m.ttft_per_token == pytest.approx(
        cpu.profile("smollm2-135m", "bf16").ttft_per_token)


def _layout_min_ok(plan, specs):
    """Independent oracle: every used GPU's KV buffer holds a KVSlabManager layout of the plan's KV
    policy (what the app's make_allocator and the simulator build) with one full 2048-token prefill
    reservation per replica: the app's KV Slab layout, else padded slabs; Prism's 2 MiB pages."""
    import torch
    from fineserve_core.cost_model import kv_format
    from fineserve_core.kv_slab import SERVE_SLAB_POLICY, KVSlabManager, ModelKVSpec
    tries = {"slab": [dict(policy=SERVE_SLAB_POLICY), dict(policy="padded")],
             "elastic-2mib": [dict(slab_size=2 << 20, policy="padded")]}[plan.kv_policy]
    by_name = {s.name: s for s in specs}
    bad = []
    for g in plan.gpus:
        if not g.used:
            continue
        kvs = []
        for rid in g.replicas:
            s = by_name[rid.split("/")[0]]
            tp = plan.models[s.name].tp
            kvs.append(ModelKVSpec.from_format(rid, kv_format(s.config, s.precision, tp), s.config.num_layers,
                                               max_num_batched_tokens=2048))
        buf = torch.empty(int(g.kv_buffer_bytes), dtype=torch.uint8, device="meta")
        for kw in tries:
            try:
                KVSlabManager(buf, kvs, **kw)
                break
            except ValueError:
                continue
        else:
            bad.append((g.gpu, g.replicas, int(g.kv_buffer_bytes)))
    return bad


def test_prism_never_leaves_a_gpu_too_small_for_its_2mib_pages(h100):
    """Five 8B replicas whose bytes of one prefill batch fit the GPU (w4a8kv4: 68 MB each) but whose
    2 MiB pages do not (a page per layer, K and V: 128 MiB each). Byte counting alone put all five on
    the GPU and the simulator could not build its KV (fineserve-16, scale 20: 'no KV Slab layout fits
    627498680 B for [5 replicas]'). Placement must leave the ones that do not fit unplaced, saying why."""
    ms = [ModelSpec(f"w{i}", "llama-3-8b-shape", "w4a8kv4", 1.0 - 0.1 * i, slo_ttft=1.0) for i in range(5)]
    bytes_fit = sum(m.placement_memory + m.kv_bytes_per_token(1) * 2048 for m in ms) + 50e6
    cl = ClusterSpec(1, 1, bytes_fit / 0.9)
    plan = place("prism", ms, cl, h100)
    assert _layout_min_ok(plan, ms) == []
    assert 1 <= len(plan.replicas()) < 5 and plan.unplaced
    assert all("KV" in r.reason for m in plan.models.values() for r in m.replicas if not r.gpus)


def test_fineserve_never_leaves_a_gpu_too_small_for_its_slab_layout(h100):
    """Required memory counts KV for rate_min_bs sequences of 1227 tokens; a replica's slab layout
    reserves one 2048-token prefill batch (and whole slabs). On a GPU sized to the required memory of
    three low-rate models the bytes fit but no layout does; placement must not co-locate them there."""
    ms = [ModelSpec("a", "llama-3-8b-shape", "bf16", 0.2), ModelSpec("b", "llama-3-8b-shape", "fp8", 0.2),
          ModelSpec("c", "llama-3-8b-shape", "w4a8kv4", 0.2)]
    probe = place("fineserve", ms, ClusterSpec(1, 1), h100)
    req = sum(r.required_memory for r in probe.replicas())
    assert len(probe.replicas()) == 3 and all(m.min_num_seqs == 1 for m in probe.models.values())
    cl = ClusterSpec(1, 1, (req + 10e6) / 0.9)
    plan = place("fineserve", ms, cl, h100)
    assert _layout_min_ok(plan, ms) == []
    assert plan.replicas() and plan.unplaced
    assert all("KV layout" in r.reason for m in plan.models.values() for r in m.replicas if not r.gpus)
    # the simulator builds the plan's KV exactly as planned (no smaller reservations, no error)
    from load_tests.simulate import Simulator
    s = Simulator(plan, ms, h100, [])
    assert sum(len(v) for v in s.replicas.values()) == len(plan.replicas())
