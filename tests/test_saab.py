"""SAAB (FineServe's SLO-aware adaptive batching) against FCFS, on the scheduler alone and in the engine."""
import time

import pytest
import torch

from fineserve_core.config import EngineConfig
from fineserve_core.engine import Engine
from fineserve_core.kv_slab import BlockCache, KVSlabManager, ModelKVSpec
from fineserve_core.sampling import SamplingParams
from fineserve_core.scheduler import Scheduler
from fineserve_core.sequence import Sequence, Status

P = SamplingParams(max_tokens=4)


def scheduler(policy: str, tpt: float) -> Scheduler:
    spec = ModelKVSpec("m", num_layers=2, block_bytes=1024, tokens_per_block=16, precision="bf16",
                       max_num_batched_tokens=64)
    mgr = KVSlabManager(torch.empty(8 << 20, dtype=torch.uint8), [spec])
    return Scheduler(BlockCache(mgr, "m"), 16, max_num_seqs=64, max_num_batched_tokens=100_000,
                     policy=policy, ttft_per_token=tpt)


def seq(rid: str, n: int, slo: float) -> Sequence:
    return Sequence(rid, list(range(n)), P, deadline=time.monotonic() + slo)


def test_saab_drops_hopeless_requests_and_holds_back_the_longest():
    s = scheduler("saab", tpt=0.001)                 # 1 ms per batched token
    hopeless = seq("hopeless", 500, slo=0.2)          # 0.5 s alone > 0.2 s: dropped
    short = [seq(f"s{i}", 50, slo=0.3) for i in range(3)]
    long_ = seq("long", 180, slo=1.0)                 # fits alone, but with it the short ones would miss
    for x in (hopeless, short[0], long_, short[1], short[2]):
        s.add(x)
    batch = {q.request_id for q, _ in s.schedule()}
    assert [d.request_id for d in s.dropped] == ["hopeless"] and hopeless.status is Status.FINISHED
    assert batch == {"s0", "s1", "s2"}                # 150 tokens: 0.15 s < 0.3 s for all
    assert long_ in s.waiting                         # held back, not dropped: it starts next round
    batch2 = {q.request_id for q, _ in s.schedule()}
    assert "long" in batch2


def test_saab_online_takes_the_slope_of_stretched_steps_and_never_goes_below_the_profile():
    s = scheduler("saab-online", tpt=0.001)
    assert s.ttft_slope() == 0.001
    s.observe(100, 0.05)                              # fast steps: the profiled slope stays the floor
    assert s.ttft_slope() == 0.001
    for _ in range(16):                               # a shared GPU: steps take 4 ms per token
        s.observe(100, 0.4)
    assert s.ttft_slope() == pytest.approx(0.004)
    short = seq("short", 50, slo=0.3)                 # 0.05 s at the profile, 0.2 s at 4 ms: admitted
    tight = seq("tight", 100, slo=0.3)                # 0.1 s at the profile, 0.4 s even alone: dropped
    s.add(short)
    s.add(tight)
    assert [q.request_id for q, _ in s.schedule()] == ["short"] and [d.request_id for d in s.dropped] == ["tight"]
    plain = scheduler("saab", tpt=0.001)
    plain.observe(100, 0.4)                           # plain SAAB keeps the profiled model
    assert plain.ttft_slope() == 0.001


def test_fcfs_admits_in_order_without_drops():
    s = scheduler("fcfs", tpt=0.001)
    for x in (seq("hopeless", 500, 0.2), seq("a", 50, 0.3)):
        s.add(x)
    assert [q.request_id for q, _ in s.schedule()] == ["hopeless", "a"] and not s.dropped


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="policy"):
        scheduler("lifo", 0.0)


def test_engine_reports_saab_drops_as_finished_outputs():
    eng = Engine(EngineConfig(model="smollm2-135m", dtype="float32", device="cpu", scheduler="saab"))
    eng.scheduler.ttft_per_token = eng.measure_ttft_per_token(64)
    assert 0 < eng.scheduler.ttft_per_token < 1
    eng.add_request("late", [1] * 200, P, deadline=time.monotonic() - 1.0)       # already past its deadline
    ok = eng.add_request("ok", [1] * 8, P, deadline=time.monotonic() + 600)
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    late = [o for o in outs if o.request_id == "late"]
    assert len(late) == 1 and late[0].finish_reason == "dropped" and late[0].completion_tokens == 0
    assert ok.finish_reason == "length" and len(ok.output_ids) == 4
    eng.close()


def test_engine_feeds_saab_online_its_prompt_steps():
    eng = Engine(EngineConfig(model="smollm2-135m", dtype="float32", device="cpu", scheduler="saab-online",
                              max_num_batched_tokens=32))
    eng.scheduler.ttft_per_token = 1e-9                # below any real step: the slope is the engine's own
    t0 = time.perf_counter()
    eng.add_request("a", [1] * 80, P, deadline=time.monotonic() + 600)     # 3 prompt steps of <= 32 tokens
    while eng.has_unfinished():
        eng.step()
    wall = time.perf_counter() - t0
    assert [n for n, _ in eng.scheduler._steps] == [32, 32, 16]
    assert 1e-9 < eng.scheduler.ttft_slope() < wall / 80
    eng.close()
