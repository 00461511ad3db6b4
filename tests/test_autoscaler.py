"""The controller's sizing rule without Ray: rates from cumulative worker counts, placement-driven targets,
the GPU-share cap and the scale-down delay."""
import pytest

from app.autoscaler import Autoscaler, RateMeter
from app.config import AppConfig
from fineserve_core.cost_model import CostModel
from fineserve_core.placement import GiB

BF16, W4 = "smollm2-135m:bf16", "smollm2-135m:w4a8kv4"


def counts(arrivals, finished=0, met=0, overflowed=0, prompt=0, out=0):
    return {"arrivals": arrivals, "overflowed": overflowed, "finished": finished, "slo_met": met, "dropped": 0,
            "prompt_tokens": prompt, "output_tokens": out, "running": 1, "waiting": 2, "kv_blocks_in_use": 3,
            "ttft_slo_s": 0.06}


def test_rates_survive_replicas_coming_and_going():
    m = RateMeter(window_s=4)
    for t in range(5):                                  # replica a: 3 req/s for 4 s
        m.add(BF16, "a", counts(3 * t, finished=3 * t, met=2 * t), float(t))
    m.add(BF16, "b", counts(2), 4.0)                    # a new replica's first report: its 2 arrivals
    load = m.loads([BF16, W4], 4.0)[BF16]
    assert load.rate == pytest.approx((12 + 2) / 4)
    assert load.attainment == pytest.approx(8 / 12)
    assert load.replicas_reporting == 2 and load.waiting == 4 and load.ttft_slo_s == 0.06
    assert m.loads([BF16, W4], 4.0)[W4].rate == 0
    # replica a goes away: nothing arrives later, the window empties, no negative jump
    assert m.loads([BF16], 20.0)[BF16].rate == 0 and m.loads([BF16], 20.0)[BF16].replicas_reporting == 0


def cfg(bf16_fraction=0.5, **autoscale):
    models = [{"name": "smollm2-135m", "precision": "bf16", "gpu": 0, "gpu_fraction": bf16_fraction,
               "slo": {"ttft_ms": 60}},
              {"name": "smollm2-135m", "precision": "w4a8kv4", "gpu": 1, "gpu_fraction": 0.5, "slo": {"ttft_ms": 60}}]
    return AppConfig(models=models, num_gpus=2, autoscale={"enabled": True, **autoscale})


def loads_at(rate, now, meter=None):
    meter = meter or RateMeter(window_s=4)
    n = int(rate * 4)
    meter.add(BF16, "a", counts(0), now - 4)
    meter.add(BF16, "a", counts(n, finished=n, prompt=12 * n, out=32 * n), now)
    meter.add(W4, "b", counts(0), now)
    return meter.loads([BF16, W4], now)


def test_targets_follow_the_placement_and_scale_down_waits():
    s = Autoscaler(cfg(downscale_delay_s=10, max_replicas=4), CostModel.default("cpu"), 16 * GiB)
    up = {d.tier: d for d in s.plan(loads_at(3.5, 100.0), {BF16: 1, W4: 1}, 100.0)}
    assert up[BF16].apply and up[BF16].target == 2 and "placement dp 2" in up[BF16].reason
    # the CPU table has no w4a8kv4 entry: sized with bf16's, and the decision says so
    assert not up[W4].apply and "sized with smollm2-135m's bf16 entry" in up[W4].reason
    held = {d.tier: d for d in s.plan(loads_at(0.25, 105.0), {BF16: 2, W4: 1}, 105.0)}[BF16]
    assert not held.apply and held.target == 1 and "held" in held.reason
    later = {d.tier: d for d in s.plan(loads_at(0.25, 116.0), {BF16: 2, W4: 1}, 116.0)}[BF16]
    assert later.apply and later.target == 1


def test_gpu_share_caps_the_count():
    s = Autoscaler(cfg(0.75, max_replicas=8), CostModel.default("cpu"), 16 * GiB)   # 2 x 0.75 > GPU 0
    d = {d.tier: d for d in s.plan(loads_at(3.5, 10.0), {BF16: 1, W4: 1}, 10.0)}[BF16]
    assert d.target == 1 and not d.apply and "GPU 0 share holds 1" in d.reason


def test_no_cost_entry_keeps_the_count():
    tier = "llama-2-7b-shape:bf16"                      # no entry in the CPU table
    c = AppConfig(models=[{"name": "llama-2-7b-shape", "precision": "bf16"}], autoscale={"enabled": True})
    [d] = Autoscaler(c, CostModel.default("cpu"), 16 * GiB).plan(RateMeter(4).loads([tier], 0.0), {tier: 1}, 0.0)
    assert not d.apply and "no cost entry" in d.reason


def test_colocation_moves_a_tier_where_the_plan_puts_it_once_held():
    """Both tiers run on GPU 0 of two; the placement puts them on separate GPUs. Its GPU labels are matched to
    the running ones (bf16, placed first, stays), w4a8kv4 is to move to GPU 1, but only once plans have asked
    for it move_delay_s in a row while it serves. Tiers already where the plan puts them do not move."""
    c = cfg(move_delay_s=10, moves=True)
    together = c.model_copy(update={"models": [m.model_copy(update={"gpu": 0}) for m in c.models]})
    s = Autoscaler(together, CostModel.default("cpu"), 16 * GiB)
    s.plan(loads_at(0.5, 100.0), {BF16: 1, W4: 1}, 100.0)
    gpus = {t: {g for r in mp.replicas for g in r.gpus} for t, mp in s.last_plan.models.items()}
    assert len(gpus[BF16] | gpus[W4]) == 2 and not gpus[BF16] & gpus[W4]       # the plan separates them
    assert s.colocation(100.0, {BF16, W4}) == []                       # held
    s.plan(loads_at(0.5, 111.0), {BF16: 1, W4: 1}, 111.0)
    assert s.colocation(111.0, {BF16}) == []                           # the mover (W4) is not serving yet
    s.plan(loads_at(0.5, 112.0), {BF16: 1, W4: 1}, 112.0)
    assert s.colocation(112.0, {BF16, W4}) == []                       # its hold starts now
    s.plan(loads_at(0.5, 122.0), {BF16: 1, W4: 1}, 122.0)
    [mv] = s.colocation(122.0, {BF16, W4})
    assert (mv.tier, mv.gpu) == (W4, 1) and "none on GPU 0" in mv.reason
    apart = Autoscaler(c, CostModel.default("cpu"), 16 * GiB)                  # bf16 on GPU 0, w4 on GPU 1
    for t in (100.0, 200.0):
        apart.plan(loads_at(0.5, t), {BF16: 1, W4: 1}, t)
        assert apart.colocation(t, {BF16, W4}) == []
