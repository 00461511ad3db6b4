"""The Ray Serve app on a private CPU cluster (127.0.0.1, one logical GPU), through real HTTP and the
official `openai` client: two models share one GPU and one KV Slab buffer."""
import copy
import os
import socket
import time

import httpx
import openai
import pytest
import ray
import yaml
from ray import serve

from app.builder import build_app
from app.controller import CONTROLLER_NAME
from app.launch import start_cluster
from fineserve_core.config import EngineConfig
from fineserve_core.engine import Engine
from fineserve_core.sampling import SamplingParams

os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
DEV = os.environ.get("FINESERVE_TEST_CONFIG") or os.path.join(os.path.dirname(__file__), "..", "serve_configs", "dev.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dev_app_args(namespace: str, **top) -> dict:
    """A copy of dev.yaml's application args in its own namespace (plus `top`-level overrides)."""
    with open(DEV) as f:
        args = copy.deepcopy(yaml.safe_load(f)["applications"][0]["args"])
    return args | {"namespace": namespace, **top}


def serve_on_private_cluster(args: dict, name: str, tmp_path_factory, **run_kw):
    """Start a private Ray cluster (one logical GPU per config GPU, loopback), serve the app; yield its
    base URL, then shut both down. For module fixtures: `yield from serve_on_private_cluster(...)`."""
    start_cluster(args["num_gpus"], temp_dir=str(tmp_path_factory.mktemp("ray")), metrics_port=free_port(),
                  include_dashboard=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name=name, route_prefix="/", **run_kw)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def dev_args():
    with open(DEV) as f:
        return yaml.safe_load(f)["applications"][0]["args"]


@pytest.fixture(scope="module")
def server(dev_args, tmp_path_factory):
    http, metrics = free_port(), free_port()
    # one logical GPU more than the config uses: a second app below takes it
    start_cluster(dev_args["num_gpus"] + 1, temp_dir=str(tmp_path_factory.mktemp("ray")), metrics_port=metrics,
                  include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": http})
    serve.run(build_app(dev_args), name="fineserve", route_prefix="/")
    yield {"base": f"http://127.0.0.1:{http}", "metrics": f"http://127.0.0.1:{metrics}/metrics", "args": dev_args}
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tiers(dev_args):
    return [f"{m['name']}:{m.get('precision', 'bf16')}" for m in dev_args["models"]]


@pytest.fixture(scope="module")
def reference(dev_args):
    """In-process engines of the same tiers, for greedy outputs to compare with."""
    engines = {}
    for m in dev_args["models"]:
        cfg = EngineConfig(model=m.get("source") or m["name"], precision=m.get("precision", "bf16"), device="cpu")
        engines[f"{m['name']}:{cfg.precision}"] = Engine(cfg)
    yield engines
    for e in engines.values():
        e.close()


@pytest.fixture
def replica_threads(server):
    """The reference engines compute with as many torch threads as a replica (num_cpus=0: one): CPU
    reductions round differently with another count, and a quantized model's greedy text can follow."""
    import torch

    def threads() -> int:             # a local function: shipped by value (tests/ is not importable there)
        import torch
        return torch.get_num_threads()
    n = ray.get(ray.remote(num_cpus=0)(threads).remote())
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    yield n
    torch.set_num_threads(before)


def worker(tier: str):
    name = "worker-" + tier.replace(":", "-").replace(".", "_")
    return serve.get_deployment_handle(name, "fineserve")


PROMPT = "The three primary colors are"


def test_completions_and_chat_match_the_in_process_engine(client, tiers, reference, replica_threads):
    for tier in tiers:
        eng = reference[tier]
        want = eng.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0.0))[0]
        r = client.completions.create(model=tier, prompt=PROMPT, max_tokens=12, temperature=0)
        assert r.model == tier
        assert r.choices[0].text == want["text"]
        assert r.usage.prompt_tokens == len(eng.tokenize(PROMPT))
        assert r.usage.completion_tokens == len(want["token_ids"]) == 12
        assert r.usage.total_tokens == r.usage.prompt_tokens + 12
        # streamed: the same text, chunk by chunk, usage in the last chunk
        chunks = list(client.completions.create(model=tier, prompt=PROMPT, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want["text"]
        assert chunks[-1].usage.completion_tokens == 12

        msgs = [{"role": "user", "content": "Name a color."}]
        chat_prompt = eng.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        want = eng.generate([chat_prompt], SamplingParams(max_tokens=10, temperature=0.0))[0]
        c = client.chat.completions.create(model=tier, messages=msgs, max_tokens=10, temperature=0)
        assert c.choices[0].message.content == want["text"] and c.choices[0].message.role == "assistant"
        assert c.usage.prompt_tokens == len(eng.tokenize(chat_prompt))
        s = list(client.chat.completions.create(model=tier, messages=msgs, max_tokens=10, temperature=0,
                                                stream=True))
        assert "".join(x.choices[0].delta.content or "" for x in s if x.choices) == want["text"]
        assert s[-1].choices[0].finish_reason in ("length", "stop")


def test_bare_model_name_routes_to_the_best_tier_and_says_which(server, tiers, client):
    name = tiers[0].split(":")[0]
    r = httpx.post(server["base"] + "/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 2},
                   timeout=60)
    assert r.status_code == 200
    assert r.json()["model"] == r.headers["x-fineserve-tier"] == tiers[0]
    ids = {m.id for m in client.models.list()}
    assert set(tiers) <= ids and name in ids
    assert client.models.retrieve(tiers[1]).id == tiers[1]


def test_clear_errors(client, server):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="smollm2-135m", prompt="x", max_tokens=2, temperature=5)
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model="smollm2-135m", prompt="word " * 5000, max_tokens=2)
    r = httpx.post(server["base"] + "/v1/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    assert httpx.get(server["base"] + "/health", timeout=30).json()["status"] == "ok"
    spec = httpx.get(server["base"] + "/openapi.json", timeout=30).json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"} <= set(spec["paths"])


def test_both_models_share_one_kv_slab_buffer(server, tiers):
    infos = [worker(t).info.remote().result() for t in tiers]
    assert infos[0]["gpu"] == infos[1]["gpu"] == 0
    assert infos[0]["kv_buffer"] == infos[1]["kv_buffer"]       # the same shared file, mapped by both
    controller = ray.get_actor(CONTROLLER_NAME, namespace=server["args"].get("namespace", "fineserve"))
    stats = ray.get(controller.kv_stats.remote())
    assert list(stats) == [0]
    assert set(stats[0]["models"]) == set(tiers)
    assert len(set(stats[0]["precisions"]) | {stats[0]["kind"]}) >= 2


def test_cancelled_stream_frees_its_blocks(server, tiers):
    tier = tiers[0]
    body = {"model": tier, "prompt": "Count: 1, 2, 3,", "max_tokens": 400, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server["base"] + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        n = 0
        for line in r.iter_lines():
            n += line.startswith("data: ")
            if n >= 3:
                break
        assert worker(tier).info.remote().result()["kv_blocks_in_use"] > 0
    for _ in range(100):
        info = worker(tier).info.remote().result()
        if info["kv_blocks_in_use"] == 0 and info["running"] == 0:
            break
        time.sleep(0.1)
    assert info["kv_blocks_in_use"] == 0 and info["running"] == 0 and info["waiting"] == 0


def test_prometheus_endpoint_shows_our_metrics(server, client, tiers):
    client.completions.create(model=tiers[0], prompt="Hello", max_tokens=3, temperature=0)
    text = ""
    for _ in range(60):
        text = httpx.get(server["metrics"], timeout=10).text
        if all(m in text for m in ("ray_fineserve_ttft_seconds", "ray_fineserve_kv_blocks", "ray_fineserve_kv_slabs")):
            break
        time.sleep(1)
    for name in ("ray_fineserve_ttft_seconds", "ray_fineserve_requests", "ray_fineserve_kv_blocks",
                 "ray_fineserve_kv_slabs", "ray_fineserve_kv_fragmentation", "ray_serve_num_http_requests"):
        assert name in text, f"{name} missing from the Prometheus export"


def test_requests_that_cannot_meet_their_ttft_slo_get_429(server):
    """A second app (own namespace, own controller) whose model has an impossible TTFT SLO: SAAB drops
    every request before it starts, and the client hears 429 with Retry-After, not silence."""
    gpu = server["args"]["num_gpus"]                      # the spare logical GPU
    args = {"num_gpus": gpu + 1, "kv_cache_bytes": 256 << 20, "namespace": "fineserve-slo-test",
            "models": [{"name": "strict", "source": "smollm2-135m", "gpu": gpu, "gpu_fraction": 0.5,
                        "slo": {"ttft_ms": 0.001}, "engine": {"max_num_batched_tokens": 512}}]}
    serve.run(build_app(args), name="strict", route_prefix="/strict")
    try:
        r = httpx.post(server["base"] + "/strict/v1/completions", timeout=60,
                       json={"model": "strict", "prompt": "Hello there", "max_tokens": 4})
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"] == "1" and "TTFT SLO" in r.json()["error"]["message"]
    finally:
        serve.delete("strict")


def test_every_listener_of_the_cluster_is_on_loopback(server, client, tiers):
    """Proxy, replicas (their inter-deployment gRPC servers included), GCS, raylet, metrics: nothing of
    this cluster listens beyond 127.0.0.1."""
    import ipaddress

    import psutil
    client.completions.create(model=tiers[0], prompt=PROMPT, max_tokens=2)     # every hop has been used
    ours = {p.pid for p in psutil.Process().children(recursive=True)}
    listening = [(c.pid, c.laddr) for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in ours]
    names = {pid: psutil.Process(pid).name() for pid, _ in listening}
    assert any("ServeRepli" in n for n in names.values()), names            # replicas' servers are seen
    def loopback(ip: str) -> bool:
        a = ipaddress.ip_address(ip)
        return a.is_loopback or (a.version == 6 and a.ipv4_mapped is not None and a.ipv4_mapped.is_loopback)
    wide = [(names[pid], addr) for pid, addr in listening if not loopback(addr.ip)]
    assert not wide, wide
