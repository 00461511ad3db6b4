"""`fineserve load-test` end to end on CPU: real Ray cluster, real HTTP, the dev config under the Prism
baseline (2 MiB precision-unaware pages + Prism's queue), every request accounted for, report + plots."""
import json
import os

import pytest
import torch
import yaml

from app.config import AppConfig
from app.slab_manager import PRISM_PAGE_BYTES, make_allocator
from fineserve_core.cli import main as cli
from fineserve_core.kv_slab import SERVE_SLAB_POLICY, KVSlabManager, StaticPartitionAllocator
from fineserve_core.scheduler import PrismScheduler, Scheduler
from load_tests.client import STATUSES, check_loopback
from load_tests.report import combine, markdown_combined

DEV = os.path.join(os.path.dirname(__file__), "..", "serve_configs", "dev.yaml")


@pytest.fixture(scope="module")
def dev_args():
    with open(DEV) as f:
        return yaml.safe_load(f)["applications"][0]["args"]


def test_policy_selects_allocator_and_queue(dev_args):
    from app.controller import model_kv_spec
    cfgs = {p: AppConfig(**{**dev_args, "policy": p}) for p in ("fineserve", "static", "prism")}
    m = cfgs["fineserve"].models[0]
    assert [cfgs[p].scheduler_of(m) for p in cfgs] == ["saab", "fcfs", "prism"]
    specs = [model_kv_spec(cfgs["fineserve"], x, False) for x in cfgs["fineserve"].models]
    buf = lambda: torch.empty(dev_args["kv_cache_bytes"], dtype=torch.uint8, device="meta")   # noqa: E731
    fs, st, pr = (make_allocator(p, buf(), specs, cfgs[p].slab_policy) for p in ("fineserve", "static", "prism"))
    assert isinstance(fs, KVSlabManager) and isinstance(st, StaticPartitionAllocator)
    assert pr.slab_size == PRISM_PAGE_BYTES and fs.slab_size != PRISM_PAGE_BYTES
    with pytest.raises(ValueError, match="unknown KV policy"):
        make_allocator("nope", buf(), specs, "faithful")
    with pytest.raises(ValueError):
        AppConfig(**{**dev_args, "policy": "vllm"})


def test_scheduler_flag_overrides_every_models_queue():
    import argparse
    from load_tests.load_test import App, add_cli
    ap = argparse.ArgumentParser()
    add_cli(ap.add_subparsers())
    base = ["load-test", "--config", DEV, "--rate", "1"]
    app = App(ap.parse_args(base + ["--scheduler", "saab-online"]))
    assert app.cfg.models and {app.cfg.scheduler_of(m) for m in app.cfg.models} == {"saab-online"}
    plain = App(ap.parse_args(base)).cfg
    assert {plain.scheduler_of(m) for m in plain.models} == {"saab"}
    with pytest.raises(SystemExit):
        ap.parse_args(base + ["--scheduler", "lifo"])


def test_engine_runs_prism_queue():
    from fineserve_core.config import EngineConfig
    from fineserve_core.engine import Engine
    from fineserve_core.sampling import SamplingParams
    eng = Engine(EngineConfig(model="smollm2-135m-shape", scheduler="prism", ttft_per_token=1e-9, device="cpu",
                              kv_cache_bytes=128 << 20, max_num_batched_tokens=256))
    assert type(eng.scheduler) is PrismScheduler and isinstance(eng.scheduler, Scheduler)
    out = eng.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=3, ignore_eos=True, temperature=0.0))
    assert len(out[0]["token_ids"]) == 3
    eng.close()


def test_loopback_only():
    assert check_loopback("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    with pytest.raises(ValueError, match="loopback"):
        check_loopback("http://example.com:8000")
    assert cli(["load-test", "--config", DEV, "--url", "http://10.0.0.1:8000", "--rate", "1"]) == 2


@pytest.mark.timeout(300)
def test_load_test_dev_config_end_to_end(tmp_path, dev_args):
    out = tmp_path / "lt.json"
    args = ["load-test", "--config", DEV, "--policy", "prism", "--rate", "1,3", "--duration", "4",
            "--lengths", "fixed", "--input-len", "24", "--output-len", "6", "--drain", "30",
            "--request-timeout", "60", "--kv-interval", "0.25", "--out", str(out), "--quiet"]
    with pytest.raises(SystemExit):                   # refused before anything starts
        cli(args + ["--rotate", "0"])
    assert cli(args + ["--rotate", "2"]) == 0
    d = json.loads(out.read_text())
    assert d["workload"]["rotate_s"] == 2.0
    assert d["policy"] == "prism" and d["launched"] and d["device"].startswith("CPU") and d["command"]
    assert [r["rate"] for r in d["rates"]] == [1.0, 3.0] and not d["skipped_rates"]
    for row in d["rates"]:
        recs = d["requests"][str(row["rate"])]
        assert row["sent"] == len(recs) == sum(row["status"].values()) > 0 and row["accounted"]
        assert {r["status"] for r in recs} <= set(STATUSES)
        ok = [r for r in recs if r["status"] == "ok"]
        assert len(ok) == row["completed"] >= 1
        for r in ok:                          # ignore_eos: exactly the sampled length; timed per token
            assert r["output_tokens"] == 6 and 0 < r["ttft"] <= r["e2e"] and r["tpot"] > 0
        for k in ("mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "mean_itl_ms", "p99_e2el_ms", "request_throughput",
                  "output_throughput", "request_goodput", "slo_attainment", "slo_attainment_ttft_tpot"):
            assert row[k] is not None, k
        assert 0 <= row["slo_attainment_ttft_tpot"] <= row["slo_attainment"] <= 1
        assert row["kv"]["samples"] > 0 and row["kv"]["buffer_bytes"] == dev_args["kv_cache_bytes"]
        assert 0 < row["kv"]["mean_allocated_fraction"] <= 1
    assert all(s["policy"] == "prism" for s in d["kv_samples"])
    for tier, slo in d["slos"].items():
        assert slo["ttft_s"] > 0 and slo["tpot_s"] > 0 and slo["source"].startswith("TTFT: worker")
    for what in ("attainment", "latency-cdf", "kv"):
        png = tmp_path / f"lt-{what}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "lt.md").read_text()
    assert "| 1 |" in md and "| 3 |" in md and "accounted for: yes" in md
    c = combine([d, {**d, "policy": "static"}])
    assert c["policies"] == ["static", "prism"] and len(c["table"]) == 4


def test_fineserve_slabs_fall_back_to_padded_when_too_coarse():
    """The e2e mix (4 block sizes) makes faithful 2 x lcm slabs 85 MB per layer: a 16 GiB buffer cannot
    hold every pool's minimum, so FineServe's sizing with padded slab edges is used instead of failing.
    The serving default keeps the INT4 scales out of the blocks: slabs of lcm(data blocks) = 640 KiB."""
    from app.controller import model_kv_spec
    from app.launch import load_serve_config
    raw = load_serve_config(os.path.join(os.path.dirname(DEV), "e2e-h100.yaml"))
    cfg = AppConfig(**raw["applications"][0]["args"])
    specs = [model_kv_spec(cfg, m, True) for m in cfg.models]
    meta = lambda gib: torch.empty(gib << 30, dtype=torch.uint8, device="meta")   # noqa: E731
    assert cfg.slab_policy == SERVE_SLAB_POLICY
    served = make_allocator("fineserve", meta(16), specs, cfg.slab_policy)
    assert served.policy.name == SERVE_SLAB_POLICY and served.slab_size == 640 << 10
    assert make_allocator("fineserve", meta(29), specs, "faithful").policy.name == "faithful"
    assert make_allocator("fineserve", meta(29), specs, "padded_wholeslab").policy.name == "padded_wholeslab"
    with pytest.raises(ValueError, match="unknown slab_policy 'nope'"):
        AppConfig(**{**raw["applications"][0]["args"], "slab_policy": "nope"})
    with pytest.raises(ValueError, match="too small"):
        KVSlabManager(meta(16), specs)
    a = make_allocator("fineserve", meta(16), specs, "faithful")
    assert a.policy.name == "padded" and all(a.num_blocks(s.model_id) > 0 for s in specs)


def test_combine_gives_the_rate_at_which_each_policy_falls_to_half_attainment():
    """e2e report: besides the ratios at static's rate nearest 50 %, the simulator's figure — the rate at
    which each policy falls to 50 % attainment (interpolated), FineServe's over static's."""
    def sweep(policy, points):
        rows = [{**{k: None for k in ("sent", "completed", "status", "slo_attainment_ttft_tpot", "request_goodput",
                                      "p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p99_tpot_ms")},
                 "http_codes": {}, "rate": r, "slo_attainment": a, "output_throughput": 100.0 * a, "kv": {}}
                for r, a in points]
        return {"policy": policy, "config": "x.yaml", "rates": rows}
    st = sweep("static", [(16, 0.7), (24, 0.3)])                          # 50 % at 20 req/s
    c = combine([st, sweep("fineserve", [(16, 0.9), (24, 0.8), (32, 0.4)])])   # 50 % at 30 req/s
    assert c["rate_at_50pct"] == {"static": 20.0, "fineserve": 30.0}
    assert c["headline"]["rate_ratio_at_50pct"] == 1.5 and c["headline"]["rate"] == 16   # nearest 50 %: first of a tie
    c = combine([st, sweep("fineserve", [(16, 0.9), (24, 0.8)])])           # never below 50 %
    assert c["rate_at_50pct"]["fineserve"] is None and c["headline"]["rate_ratio_at_50pct_at_least"] == 1.2
    assert "at least x1.20" in markdown_combined(c)
