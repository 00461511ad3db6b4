"""Workload generator, the simulator (real placement + Scheduler + KV allocators) and its CLI."""
import json
import math
import time

import numpy as np
import pytest
import torch

from fineserve_core.cost_model import CostModel
from fineserve_core.kv_slab import BlockCache, KVOutOfMemory, KVSlabManager, ModelKVSpec, StaticPartitionAllocator
from fineserve_core.placement import GiB, ClusterSpec, ModelSpec, place
from fineserve_core.sampling import SamplingParams
from fineserve_core.scheduler import Scheduler
from fineserve_core.sequence import Sequence
from load_tests import simulate as sim
from load_tests.workload import LengthSampler, arrival_times, generate, power_law_rates, power_law_weights


# --------------------------------------------------------------------------------------------------- workload

def test_workload_is_seeded_and_models_are_independent():
    a = generate({"x": 5.0, "y": 2.0}, 20.0, seed=3)
    b = generate({"x": 5.0, "y": 2.0}, 20.0, seed=3)
    assert a == b and [r.arrival for r in a] == sorted(r.arrival for r in a)
    c = generate({"x": 5.0, "y": 2.0, "z": 9.0}, 20.0, seed=3)
    assert [r for r in a if r.model == "x"] != [] and \
        [(r.arrival, r.input_len) for r in a if r.model == "x"] == [(r.arrival, r.input_len) for r in c if r.model == "x"]
    assert generate({"x": 5.0}, 20.0, seed=4) != generate({"x": 5.0}, 20.0, seed=3)


def test_arrivals_poisson_and_gamma_cv():
    rng = np.random.default_rng(0)
    t = arrival_times(rng, 50.0, 400.0)
    gaps = np.diff(t)
    assert len(t) / 400 == pytest.approx(50, rel=0.05) and gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)
    t3 = arrival_times(np.random.default_rng(1), 50.0, 400.0, cv=3.0)
    g3 = np.diff(t3)
    assert len(t3) / 400 == pytest.approx(50, rel=0.15) and g3.std() / g3.mean() == pytest.approx(3.0, rel=0.15)
    assert len(arrival_times(rng, 0.0, 10.0)) == 0


def test_power_law_popularity():
    w = power_law_weights(19, 0.9)
    assert sum(w) == pytest.approx(1) and w[3] / w[0] == pytest.approx(4 ** -0.9)
    r = power_law_rates(19, 2.1, max_rate=40 * 0.5)
    assert r[0] == pytest.approx(20) and r[18] == pytest.approx(20 * 19 ** -2.1)
    assert sum(power_law_rates(5, 1.3, total_rate=10)) == pytest.approx(10)
    with pytest.raises(ValueError):
        power_law_rates(5, 1.0)


def test_rotating_popularity_moves_the_rates_and_keeps_the_total():
    rates = {"a": 40.0, "b": 10.0, "c": 5.0, "d": 5.0}
    reqs = generate(rates, 40.0, seed=3, rotate=10.0)
    for k in range(4):                                  # period k: model i has model (i - k)'s rate
        got = {m: sum(1 for r in reqs if r.model == m and 10 * k <= r.arrival < 10 * k + 10) / 10 for m in rates}
        want = {m: list(rates.values())[(i - k) % 4] for i, m in enumerate(rates)}
        assert max(got, key=got.get) == max(want, key=want.get)
        assert got[max(want, key=want.get)] == pytest.approx(40, rel=0.25)
    assert len(reqs) == pytest.approx(60 * 40, rel=0.1)
    assert generate(rates, 40.0, seed=3, rotate=None) == generate(rates, 40.0, seed=3)
    with pytest.raises(ValueError, match="rotate"):
        generate(rates, 40.0, rotate=0)


def test_sharegpt_lengths_match_the_published_p95s():
    ls = LengthSampler()
    ins, outs = ls.sample(np.random.default_rng(0), 40000)
    assert np.percentile(ins, 95) == pytest.approx(903, rel=0.06)
    assert np.percentile(outs, 95) == pytest.approx(631, rel=0.06)
    assert ins.min() >= 4 and outs.min() >= 4 and ins.max() <= 2048 and (ins + outs).max() <= 4096
    d = ls.describe()
    assert d["input_p95"] == 903 and d["sigma"] == 1.0
    fi, fo = LengthSampler.fixed(512, 256).sample(np.random.default_rng(0), 3)
    assert list(fi) == [512] * 3 and list(fo) == [256] * 3


# --------------------------------------------------------------------------------------------------- real parts

def test_scheduler_uses_the_injected_clock():
    now = [100.0]
    spec = ModelKVSpec("m", num_layers=2, block_bytes=1024, tokens_per_block=16, precision="bf16",
                       max_num_batched_tokens=64)
    mgr = KVSlabManager(torch.empty(8 << 20, dtype=torch.uint8, device="meta"), [spec])
    s = Scheduler(BlockCache(mgr, "m"), 16, 64, 100_000, "saab", 0.001, clock=lambda: now[0])
    p = SamplingParams(max_tokens=4)
    s.add(Sequence("late", [0] * 100, p, arrival=0.0, deadline=100.05))    # 0.1 s of prefill > 0.05 s left
    s.add(Sequence("ok", [0] * 100, p, arrival=0.0, deadline=100.5))
    batch = s.schedule()
    assert [q.request_id for q in s.dropped] == ["late"] and [q.request_id for q, _ in batch] == ["ok"]


def test_prism_queue_admits_by_cumulative_prediction():
    spec = ModelKVSpec("m", num_layers=2, block_bytes=1024, tokens_per_block=16, precision="bf16",
                       max_num_batched_tokens=64)
    mgr = KVSlabManager(torch.empty(8 << 20, dtype=torch.uint8, device="meta"), [spec])
    s = sim.PrismScheduler(BlockCache(mgr, "m"), 16, 64, 100_000, ttft_per_token=0.001, clock=lambda: 0.0)
    p = SamplingParams(max_tokens=4)
    for rid, n, dl in (("a", 100, 0.3), ("b", 100, 0.15), ("c", 100, 0.35), ("d", 500, 0.4)):
        s.add(Sequence(rid, [0] * n, p, arrival=0.0, deadline=dl))
    batch = [q.request_id for q, _ in s.schedule()]
    # a: 0.1 < 0.3 in; b: 0.2 > 0.15 held (alone 0.1 < 0.15, so not dropped); c: 0.2 < 0.35 in; d: dropped
    assert batch == ["a", "c"] and [q.request_id for q in s.dropped] == ["d"]
    assert [q.request_id for q in s.waiting] == ["b"]


def test_mesh_allocator_allocates_on_every_gpu_or_none():
    spec = ModelKVSpec("r", num_layers=2, block_bytes=1024, tokens_per_block=16, precision="bf16",
                       max_num_batched_tokens=64)
    big = KVSlabManager(torch.empty(4 << 20, dtype=torch.uint8, device="meta"), [spec])
    small = StaticPartitionAllocator(torch.empty(256 << 10, dtype=torch.uint8, device="meta"), [spec])
    mesh = sim._MeshAllocator([big, small])
    ids = mesh.alloc("r", 10)
    assert big.num_allocated_blocks("r") == small.num_allocated_blocks("r") == 10
    with pytest.raises(KVOutOfMemory):
        mesh.alloc("r", small.num_free_blocks("r") + 1)
    assert big.num_allocated_blocks("r") == 10                      # rolled back on the big one
    mesh.free("r", ids)
    assert big.num_allocated_blocks("r") == small.num_allocated_blocks("r") == 0
    assert mesh.num_free_blocks("r") == small.num_free_blocks("r")


# --------------------------------------------------------------------------------------------------- simulator

@pytest.fixture(scope="module")
def h100():
    return CostModel.default("h100")


def small_models(rate):
    return [ModelSpec("a", "llama-2-7b-shape", "bf16", rate), ModelSpec("b", "llama-3-8b-shape", "w4a8kv4", rate),
            ModelSpec("c", "llama-2-13b-shape", "fp8", rate / 2)]


def test_light_load_meets_every_slo_with_real_components(h100):
    cl = ClusterSpec(1, 2)
    specs = small_models(1.0)
    reqs = generate({s.name: s.rate for s in specs}, 20.0, seed=1)
    for pol in ("fineserve", "static", "prism"):
        plan = place(pol, specs, cl, h100)
        s = sim.Simulator(plan, specs, h100, reqs)
        reps = [r for rs in s.replicas.values() for r in rs]
        assert reps and all(isinstance(r.sched, Scheduler) for r in reps)
        kinds = {type(r.sched.blocks.allocator).__name__ for r in reps}
        assert kinds <= {"KVSlabManager", "StaticPartitionAllocator", "_MeshAllocator"}
        m = s.run()
        assert m["requests"] == len(reqs) and m["status"] == {"ok": len(reqs)}
        assert m["slo_attainment"] > 0.95 and m["token_throughput"] > 0
        assert m["ttft_p50"] <= m["ttft_p90"] <= m["ttft_p99"]
        assert sum(d["requests"] for d in m["per_model"].values()) == len(reqs)


def test_overload_saab_drops_and_fcfs_queues():
    """SmolLM2 (measured CPU table) at several times one replica's capacity: SAAB drops hopeless
    requests and serves the rest within the SLO; FCFS drops none and serves them late (timeouts)."""
    cpu = CostModel.default("cpu")
    cl = ClusterSpec(1, 1, 16 * GiB)
    specs = [ModelSpec("a", "smollm2-135m", "bf16", 32.0, slo_ttft=3.0)]
    reqs = generate({"a": 32.0}, 40.0, seed=2, lengths=LengthSampler.fixed(64, 16))
    _, fs = sim.simulate("fineserve", specs, cl, cpu, reqs)
    _, st = sim.simulate("static", specs, cl, cpu, reqs)
    assert fs["status"].get("dropped", 0) > 0 and st["status"].get("dropped", 0) == 0
    assert fs["slo_attainment"] * fs["requests"] >= 0.9 * fs["status"]["ok"]   # served in time
    assert st["ttft_p50"] > 3.0 and st["status"].get("aborted", 0) > 0         # FCFS: late, then timeouts
    assert fs["ttft_p99"] < st["ttft_p99"]


def test_unplaced_and_oversized_requests_are_misses(h100):
    cl = ClusterSpec(1, 1)
    specs = [ModelSpec("a", "llama-2-7b-shape", "bf16", 1.0), ModelSpec("x", "llama-2-7b-shape", "bf16", 1.0,
                                                                          slo_ttft=0.001)]
    reqs = generate({"a": 1.0, "x": 1.0}, 10.0, seed=0)
    plan, m = sim.simulate("fineserve", specs, cl, h100, reqs)
    assert not plan.models["x"].placed
    nx = sum(r.model == "x" for r in reqs)
    assert m["status"]["unplaced"] == nx and m["per_model"]["x"]["attainment"] == 0
    assert m["slo_attainment"] <= 1 - nx / len(reqs) + 1e-9


def test_headline_interpolation():
    rows = [{"alpha": 1, "scale": s, "policy": p, "slo_attainment": a}
            for p, pts in (("static", [(1, 0.9), (2, 0.6), (3, 0.2)]), ("fineserve", [(1, 1.0), (2, 0.95), (3, 0.8)]),
                           ("prism", [(1, 1.0), (2, 0.7), (3, 0.4)]))
            for s, a in pts]
    h = sim.headline(rows, [1])[0]
    assert h["static_50pct_scale"] == pytest.approx(2.25)
    assert h["fineserve_attainment"] == pytest.approx(0.9125) and h["fineserve_vs_static"] == pytest.approx(1.82, abs=0.01)


def test_quick_cli_writes_results_and_plot(tmp_path):
    out = tmp_path / "q.json"
    t0 = time.perf_counter()
    assert sim.main(["--scenario", "muxserve-32", "--quick", "--workers", "1", "--out", str(out)]) == 0
    assert time.perf_counter() - t0 < 60
    d = json.loads(out.read_text())
    assert {"command", "device", "versions", "date"} <= set(d)             # write_result's run info
    assert {r["policy"] for r in d["rows"]} == {"fineserve", "static", "prism"}
    assert d["headline"] and len(d["models"]) == 19
    assert "llama-65b-shape bf16 tp4" in d["cost_estimated"]                 # no GPU measures 65B here
    assert not any(e.startswith("llama-2-7b-shape") and e.endswith("tp1") for e in d["cost_estimated"])
    assert all(math.isfinite(r["slo_attainment"]) for r in d["rows"])
    assert out.with_suffix(".png").stat().st_size > 1000


def test_rotating_workload_reaches_the_runs(tmp_path):
    """--rotate is validated, recorded, and changes what the (seeded) run simulates."""
    with pytest.raises(SystemExit):
        sim.main(["--quick", "--rotate", "0", "--out", str(tmp_path / "x.json")])
    base = ["--scenario", "muxserve-32", "--quick", "--alphas", "0.9", "--scales", "6", "--policies", "fineserve",
            "--workers", "1", "--no-plot"]
    rows = {}
    for name, extra in (("fixed", []), ("rotating", ["--rotate", "0.25"])):
        assert sim.main(base + extra + ["--out", str(tmp_path / f"{name}.json")]) == 0
        d = json.loads((tmp_path / f"{name}.json").read_text())
        (rows[name],) = d["rows"]
        assert d["rotate_s"] == (0.25 if extra else None) and ("rotating" in d["workload"]["rates"]) == bool(extra)
    key = lambda r: (r["requests_generated"], r["slo_attainment"], r["token_throughput"])   # noqa: E731
    assert key(rows["fixed"]) != key(rows["rotating"])
