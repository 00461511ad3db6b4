"""Live re-placement (private CPU Ray cluster with 2 logical GPUs, real HTTP): the controller moves the bf16
tier from GPU 0 to GPU 1 under steady streaming load. The new replica runs before the old one stops, the
old one drains, its KV blocks go back to GPU 0's slab manager, every request completes in full, and each
step is a decision with its reason."""
import asyncio
import json
import threading
import time

import httpx
import pytest
import ray
from ray import serve

from app.controller import CONTROLLER_NAME
from app.worker import slab_manager_name
from tests.test_app import dev_app_args, serve_on_private_cluster
from tests.test_autoscale import wait_for

BF16, W4 = "smollm2-135m:bf16", "smollm2-135m:w4a8kv4"
NS, APP = "fineserve-replace", "replace"
PROMPT = "Count slowly: one, two, three, four, five,"
MAX_TOKENS, RATE = 16, 2.0          # tokens per request, requests/s
STEPS = ["move", "new replica running", "old drained", "slabs freed"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    args = dev_app_args(NS, num_gpus=2)
    for m in args["models"]:
        # bf16 on GPU 0, w4a8kv4 on GPU 1: GPU 1 has room for bf16 (0.5 + 0.5); FCFS so no request is shed
        m |= {"gpu": 0 if m.get("precision", "bf16") == "bf16" else 1, "scheduler": "fcfs"}
    yield from serve_on_private_cluster(args, APP, tmp_path_factory)


class StreamLoad:
    """Open-loop streamed completions at a fixed rate, in a thread, until stopped. Streams, so that a request
    cut mid-generation shows (an error event or no [DONE]) instead of being retried unseen."""

    def __init__(self, base: str, rate: float, model: str = BF16):
        self.base, self.rate, self.model, self.stop, self.results = base, rate, model, threading.Event(), []
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()))
        self.thread.start()

    async def _one(self, c: httpx.AsyncClient) -> dict:
        body = {"model": self.model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        out = {"start": time.time(), "done": False, "tokens": None, "errors": []}
        try:
            async with c.stream("POST", self.base + "/v1/completions", json=body) as r:
                out["status"] = r.status_code
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        out["done"] = True
                        continue
                    ev = json.loads(line[6:])
                    if "error" in ev:
                        out["errors"].append(ev["error"])
                    if ev.get("usage"):
                        out["tokens"] = ev["usage"]["completion_tokens"]
        except httpx.HTTPError as e:
            out["errors"].append(repr(e))
        out["end"] = time.time()
        return out

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=300) as c:
            tasks = []
            while not self.stop.is_set():
                tasks.append(asyncio.create_task(self._one(c)))
                await asyncio.sleep(1 / self.rate)
            self.results += await asyncio.gather(*tasks)

    def finish(self) -> list[dict]:
        self.stop.set()
        self.thread.join()
        return self.results


def replica_actors(deployment: str) -> set[str]:
    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{APP}#{deployment}#")}


def test_move_under_steady_load_loses_no_request(base):
    ctl = ray.get_actor(CONTROLLER_NAME, namespace=NS)
    mgr = {g: ray.get_actor(slab_manager_name(g), namespace=NS) for g in (0, 1)}
    w4_worker = serve.get_deployment_handle("worker-smollm2-135m-w4a8kv4", APP)
    bf16_worker = serve.get_deployment_handle("worker-smollm2-135m-bf16", APP)
    others = {d: replica_actors(d) for d in ("Ingress", "worker-smollm2-135m-w4a8kv4")}
    assert ray.get(ctl.placement.remote())["gpus"] == {0: [BF16], 1: [W4]}
    assert bf16_worker.info.remote().result()["gpu"] == 0

    load = StreamLoad(base, RATE)
    wait_for(lambda: ray.get(ctl.placement.remote())["load"][BF16]["replicas_reporting"] == 1, 30,
             "the bf16 replica to report its load")
    t_move = time.time()
    move = lambda body: httpx.post(base + "/v1/fineserve/placement/move", json=body, timeout=30)
    r = move({"model": BF16, "gpu": 1})                       # an operator's HTTP call
    assert r.status_code == 202 and r.json()["accepted"], r.text
    again = move({"model": BF16, "gpu": 1})
    assert again.status_code == 409 and "moving already" in again.json()["error"]["message"], again.text
    assert move({"model": "nope:bf16", "gpu": 1}).status_code == 404
    assert move({"model": BF16, "gpu": "1"}).status_code == 400                      # strict types
    steps = lambda: [d for d in ray.get(ctl.decisions.remote()) if d.get("tier") == BF16 and d["step"] != "refused"]
    wait_for(lambda: steps() and steps()[-1]["step"] in ("slabs freed", "failed"), 120, "the move to finish",
             lambda: steps())
    time.sleep(2)                                   # the load goes on, now served on GPU 1
    results = load.finish()

    moved = steps()
    for d in moved:
        print(d["step"], "|", d["reason"])
    assert [d["step"] for d in moved] == STEPS and all(d["reason"] for d in moved)
    new_running, freed = moved[1], moved[3]
    # the old replica kept running while the new one started, and was still there when it ran
    assert new_running["old_serving_min"] == 1 and new_running["old_replicas_present"] == 1
    assert freed["held_blocks"] > 0 and freed["allocated_after"] == 0 and freed["reaped_blocks"] == 0   # clean exit

    # the replica runs on GPU 1 and holds its KV there; GPU 0 holds none of bf16's blocks any more
    assert bf16_worker.info.remote().result()["gpu"] == 1
    assert ray.get(ctl.placement.remote())["gpus"] == {0: [], 1: [BF16, W4]}
    assert any(o["model"] == BF16 for o in ray.get(mgr[1].owners.remote()).values())
    assert not any(o["model"] == BF16 for o in ray.get(mgr[0].owners.remote()).values())
    assert ray.get(mgr[0].num_allocated_blocks.remote(BF16)) == 0
    gpu0 = ray.get(mgr[0].stats.remote())                    # nothing else runs there: every slab is free again
    assert not any(p["partial_slabs"] or p["full_slabs"] for p in gpu0["precisions"].values()), gpu0["precisions"]
    assert w4_worker.info.remote().result()["gpu"] == 1
    assert {d: replica_actors(d) for d in others} == others     # the other deployments were left alone

    # not one request lost: each streamed all its tokens, before, during and after the move
    during = [r for r in results if t_move <= r["start"] <= freed["time"]]
    print(f"{len(results)} requests, {len(during)} sent during the move")
    assert len(during) >= 10
    bad = [r for r in results if r.get("status") != 200 or r["errors"] or not r["done"] or r["tokens"] != MAX_TOKENS]
    assert not bad, bad[:3]
    http = httpx.get(base + "/v1/fineserve/placement", timeout=60).json()
    assert [d["step"] for d in http["decisions"] if d.get("tier") == BF16 and d["step"] != "refused"] == STEPS
