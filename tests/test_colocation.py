"""The global scheduler applies its plan's co-location (private CPU Ray cluster with 2 logical GPUs, real
HTTP): both tiers start on GPU 0, the placement puts them on separate GPUs, and with `autoscale.moves`
the controller moves one of them to GPU 1 by itself, live, under steady streaming load. Every request
completes in full and the move's decisions name the plan as their reason."""
import time

import pytest
import ray
from ray import serve

from app.controller import CONTROLLER_NAME
from tests.test_app import dev_app_args, serve_on_private_cluster
from tests.test_autoscale import wait_for
from tests.test_replacement import MAX_TOKENS, STEPS, StreamLoad

BF16, W4 = "smollm2-135m:bf16", "smollm2-135m:w4a8kv4"
NS, APP = "fineserve-coloc", "coloc"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    args = dev_app_args(NS, num_gpus=2, autoscale={
        "enabled": True, "tick_s": 0.5, "period_s": 2, "window_s": 4, "moves": True, "move_delay_s": 15})
    for m in args["models"]:
        m |= {"gpu": 0, "scheduler": "fcfs"}            # both on GPU 0; FCFS so that no request is shed
    yield from serve_on_private_cluster(args, APP, tmp_path_factory, external_scaler_enabled=True)


def test_the_plan_moves_a_tier_to_the_gpu_it_puts_it_on(base):
    ctl = ray.get_actor(CONTROLLER_NAME, namespace=NS)
    placement = lambda: ray.get(ctl.placement.remote())       # noqa: E731
    loads = [StreamLoad(base, 1.0, t) for t in (BF16, W4)]   # both tiers, before, during and after the move
    assert placement()["gpus"] == {0: [BF16, W4], 1: []}      # the plans ask for the move for 15 s first
    steps = lambda: [d for d in ray.get(ctl.decisions.remote()) if d.get("step", "refused") != "refused"]  # noqa: E731
    wait_for(lambda: any(d["step"] in ("slabs freed", "failed") for d in steps()), 180,
             "the controller to move a tier by its plan", lambda: (placement()["gpus"], steps()))
    results = [r for load in loads for r in load.finish()]

    moved = steps()
    for d in moved:
        print(d["tier"], d["step"], "|", d["reason"])
    tier = moved[0]["tier"]
    assert [d["step"] for d in moved] == STEPS and all(d["tier"] == tier for d in moved)
    assert moved[0]["reason"].startswith("plan (") and "none on GPU 0" in moved[0]["reason"]
    assert moved[0]["from_gpu"] == 0 and moved[0]["to_gpu"] == 1
    stay = W4 if tier == BF16 else BF16
    assert placement()["gpus"] == {0: [stay], 1: [tier]}
    worker = serve.get_deployment_handle("worker-" + tier.replace(":", "-"), APP)
    assert worker.info.remote().result()["gpu"] == 1
    # the placement now agrees with where the tiers run: later plans move nothing
    n = len(steps())
    time.sleep(6)                                             # three more planning periods
    assert len(steps()) == n
    bad = [r for r in results if r.get("status") != 200 or r["errors"] or not r["done"] or r["tokens"] != MAX_TOKENS]
    assert len(results) >= 20 and not bad, bad[:3]
