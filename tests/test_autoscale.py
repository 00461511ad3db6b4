"""The controller sizes tiers from measured rates (private CPU Ray cluster with 2 logical GPUs, real HTTP):
a rate rise scales the bf16 tier up through Serve's external scaler API, the fall scales it down again,
every request of the run completes, and every decision carries its reason."""
import asyncio
import threading
import time

import httpx
import pytest
import ray
from ray import serve

from app.controller import CONTROLLER_NAME
from fineserve_core.cost_model import CostModel
from fineserve_core.model_source import resolve_model
from fineserve_core.placement import GiB, ClusterSpec, ModelSpec, PlacementConfig, place
from tests.test_app import dev_app_args, serve_on_private_cluster

BF16, W4 = "smollm2-135m:bf16", "smollm2-135m:w4a8kv4"
NS, APP = "fineserve-autoscale", "autoscale"
PROMPT = "Count slowly: one, two, three, four, five,"
MAX_TOKENS, SLO_MS, HIGH, LOW = 32, 30, 3.0, 0.25       # req/s


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    args = dev_app_args(NS, num_gpus=2, autoscale={
        "enabled": True, "tick_s": 0.5, "period_s": 60, "window_s": 4, "rate_shift": 0.5, "min_rate_delta": 0.5,
        "downscale_delay_s": 3, "max_replicas": 2})
    for m in args["models"]:
        # bf16 alone on GPU 0 with room for a second replica; FCFS so the load is not shed by SAAB
        m |= {"gpu": 0 if m.get("precision", "bf16") == "bf16" else 1, "scheduler": "fcfs",
              "slo": {"ttft_ms": SLO_MS}}
    yield from serve_on_private_cluster(args, APP, tmp_path_factory, external_scaler_enabled=True)


def planned_dp(rate: float) -> int:
    """What the real placement says for the test's load (the controller must agree)."""
    c = resolve_model("smollm2-135m").config
    specs = [ModelSpec(BF16, c, "bf16", rate, SLO_MS / 1e3, cost_name="smollm2-135m"),
             ModelSpec(W4, c, "bf16", 0.0, SLO_MS / 1e3, cost_name="smollm2-135m")]
    plan = place("fineserve", specs, ClusterSpec(1, 2, memory_per_gpu=16 * GiB), CostModel.default("cpu"),
                 PlacementConfig(avg_input_len=13, avg_output_len=MAX_TOKENS))
    return plan.models[BF16].dp


def running(tier: str) -> int:
    dep = "worker-" + tier.replace(":", "-").replace(".", "_")
    states = serve.status().applications[APP].deployments[dep].replica_states
    return states.get("RUNNING", 0)


class Load:
    """Open-loop load at a fixed rate, in a thread, until stopped; keeps every response."""

    def __init__(self, base: str, rate: float):
        self.base, self.rate, self.stop, self.results = base, rate, threading.Event(), []
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()))
        self.thread.start()

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=300) as c:
            body = {"model": BF16, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
            tasks = []
            while not self.stop.is_set():
                tasks.append(asyncio.create_task(c.post(self.base + "/v1/completions", json=body)))
                await asyncio.sleep(1 / self.rate)
            self.results += await asyncio.gather(*tasks)

    def finish(self) -> list[httpx.Response]:
        self.stop.set()
        self.thread.join()
        return self.results


def wait_for(pred, timeout: float, what: str, state=lambda: None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; {state()}")


def test_rate_rise_scales_up_and_fall_scales_down(base):
    assert planned_dp(HIGH) == 2 and planned_dp(LOW) == 1     # the load levels straddle one more replica
    ctl = ray.get_actor(CONTROLLER_NAME, namespace=NS)
    assert ray.get(ctl.placement.remote())["replicas"] == {BF16: 1, W4: 1}

    high = Load(base, HIGH)                                 # the rate rises ...
    wait_for(lambda: ray.get(ctl.placement.remote())["replicas"][BF16] == 2, 30, "the controller to scale up",
             lambda: ray.get(ctl.placement.remote())["load"])
    wait_for(lambda: running(BF16) == 2, 90, "Serve to run the second bf16 replica")
    p = ray.get(ctl.placement.remote())
    up = [d for d in p["decisions"] if d.get("tier") == BF16 and d.get("to") == 2]
    assert up and up[0]["applied"] and "rate shift" in up[0]["trigger"] and "placement dp 2" in up[0]["reason"]
    assert p["replicas"][W4] == 1 and running(W4) == 1       # no load there: stays at one
    results = high.finish()

    low = Load(base, LOW)                                   # ... and falls; requests keep coming meanwhile
    wait_for(lambda: ray.get(ctl.placement.remote())["replicas"][BF16] == 1, 60, "the controller to scale down")
    wait_for(lambda: running(BF16) == 1, 60, "Serve to stop the extra replica")
    results += low.finish()
    down = [d for d in ray.get(ctl.decisions.remote()) if d.get("tier") == BF16 and d.get("to") == 1]
    assert down[-1]["applied"] and down[-1]["from"] == 2

    for d in ray.get(ctl.decisions.remote()):
        print({k: d[k] for k in ("tier", "from", "to", "applied", "trigger", "reason") if k in d})
    # nothing was lost on the way: every request of both phases completed in full
    assert len(results) >= 10
    assert all(r.status_code == 200 for r in results), [r.text for r in results if r.status_code != 200][:3]
    assert all(r.json()["usage"]["completion_tokens"] == MAX_TOKENS for r in results)
    http = httpx.get(base + "/v1/fineserve/placement", timeout=60).json()
    assert http["autoscale"] and any(d.get("to") == 2 for d in http["decisions"])
