"""Reliability and security of the Serve app (issue 8), on one private CPU cluster (127.0.0.1, one
logical GPU, one SmolLM2 bf16 tier with a deliberately small capacity):

- bad input: a table of malformed requests, each answered with an OpenAI-style 4xx, the server still
  serving the next good request;
- auth: bearer API keys on /v1/* (openai.AuthenticationError with a wrong key), /health open, no key in
  any log;
- fuzzing: schemathesis against our own /openapi.json, positive and negative cases, output capped at
  4 tokens: zero 5xx, zero hangs (FUZZ_EXAMPLES=5000 for the long run; figures printed);
- overload: a burst of 10x capacity gets 200 or 429 + Retry-After, nothing else, and the server stays
  healthy;
- faults: a worker replica killed mid-load through its actor handle (every request answered, none lost,
  Serve restarts it, its KV blocks go back to the GPU's slab pool); the controller killed (serving goes
  on, a rebuilt controller recovers the managers).
"""
import asyncio
import json
import os
import socket
import time

import httpx
import openai
import pytest
import ray
from ray import serve

from app.auth import ApiKeyError, KeyChecker, digest, load_key_digests
from app.builder import build_app, gpu_resource
from app.config import AppConfig
from app.controller import CONTROLLER_NAME, Controller
from app.slab_manager import GpuSlabManager
from app.worker import slab_manager_name

# fault handling that lives in files this issue does not own: the tests check it once it is there
RECLAIMS_DEAD_REPLICA_BLOCKS = hasattr(GpuSlabManager, "register_owner")
CONTROLLER_ADOPTS_MANAGERS = hasattr(Controller, "_adopt")

KEYS = ("sk-fineserve-test-Q7vXk2", "sk-fineserve-test-9pLmZ4")
WRONG_KEY = "sk-fineserve-wrong-Hh3Tq8"
KEY_ENV = "FINESERVE_TEST_API_KEYS"
APP = "rel"
NAMESPACE = "fineserve-rel"
TIER = "smollm2-135m:bf16"
DEPLOYMENT = "worker-smollm2-135m-bf16"
# capacity of the one replica: 4 requests in flight + 8 queued in the ingress' router
MAX_ONGOING, MAX_QUEUED = 4, 8
ARGS = {
    "num_gpus": 1, "kv_cache_bytes": 256 << 20, "namespace": NAMESPACE, "api_keys_env": KEY_ENV,
    "ingress": {"replica_failure_retries": 3, "retry_after_s": 1},
    "models": [{"name": "smollm2-135m", "precision": "bf16", "gpu": 0, "gpu_fraction": 0.5,
                "max_ongoing_requests": MAX_ONGOING, "max_queued_requests": MAX_QUEUED,
                "engine": {"max_num_batched_tokens": 512, "max_num_seqs": MAX_ONGOING}}],
}
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "600"))
REQUEST_TIMEOUT = 120            # any answer slower than this counts as a hang


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- no cluster: the key loader and the config ----------------------------------------------------

def test_api_keys_load_from_env_and_file(tmp_path, monkeypatch):
    assert load_key_digests(None, None) is None                       # auth off
    monkeypatch.setenv("K1", " key-one , key-two ,,")
    f = tmp_path / "keys"
    f.write_text("# ops keys\nkey-three\n\n  key-four  \n")
    got = load_key_digests("K1", str(f))
    assert got == sorted(digest(k) for k in ("key-one", "key-two", "key-three", "key-four"))
    assert not any("key" in d for d in got)
    monkeypatch.setenv("EMPTY", " , ")
    with pytest.raises(ApiKeyError, match="refusing to start"):
        load_key_digests("EMPTY", None)                               # configured but empty: fail closed
    with pytest.raises(ApiKeyError, match="cannot be read"):
        load_key_digests(None, str(tmp_path / "missing"))
    chk = KeyChecker(got)
    assert chk.check("Bearer key-three") and chk.check("bearer  key-four") and not chk.check("Bearer key-three3")
    assert not chk.check(None) and not chk.check("key-one") and not chk.check("Basic key-one")
    assert not chk.check("Bearer ")
    assert KeyChecker(None).check(None)


def test_config_rejects_bad_limits():
    with pytest.raises(ValueError, match="max_queued_requests"):
        AppConfig(models=[{"name": "m", "max_queued_requests": 0}])
    with pytest.raises(ValueError):
        AppConfig(models=[{"name": "m"}], api_keys_env="NOT A NAME")
    with pytest.raises(ValueError):
        AppConfig(models=[{"name": "m"}], ingress={"no_such_option": 1})
    m = AppConfig(**ARGS).models[0]
    assert (m.ongoing_limit, m.queued_limit) == (MAX_ONGOING, MAX_QUEUED)
    assert AppConfig(models=[{"name": "m", "engine": {"max_num_seqs": 8}}]).models[0].queued_limit == 32
    with pytest.raises(ValueError, match="graph_max_tokens"):
        AppConfig(models=[{"name": "m", "engine": {"graph_max_tokens": -1}}])
    e = AppConfig(models=[{"name": "m", "engine": {"cuda_graphs": False, "graph_max_tokens": 0}}]).models[0].engine
    assert (e.cuda_graphs, e.graph_max_tokens) == (False, 0)


# ---- the cluster ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from app.launch import start_cluster
    temp = str(tmp_path_factory.mktemp("ray"))
    http = free_port()
    start_cluster(1, temp_dir=temp, metrics_port=free_port(), include_dashboard=False)
    # set after the cluster started, so no Ray process inherits the keys: only their digests travel
    os.environ[KEY_ENV] = ",".join(KEYS)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http})
        serve.run(build_app(ARGS), name=APP, route_prefix="/")
        yield {"base": f"http://127.0.0.1:{http}", "temp": temp}
    finally:
        os.environ.pop(KEY_ENV, None)
        serve.shutdown()
        ray.shutdown()


AUTH = {"Authorization": f"Bearer {KEYS[0]}"}


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server["base"], headers=AUTH, timeout=REQUEST_TIMEOUT) as c:
        yield c


def good(http) -> None:
    """The server still serves a normal request."""
    r = http.post("/v1/completions", json={"model": TIER, "prompt": "Hello", "max_tokens": 1, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 1


def assert_openai_error(r: httpx.Response, statuses) -> dict:
    assert r.status_code in statuses, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def worker_handle():
    return serve.get_deployment_handle(DEPLOYMENT, APP)


def manager():
    return ray.get_actor(slab_manager_name(0), namespace=NAMESPACE)


# ---- bad input -------------------------------------------------------------------------------------

J = {"content-type": "application/json"}
C = {"model": TIER, "prompt": "Hello", "max_tokens": 2}
M = {"model": TIER, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
BAD = [
    # id, path, body (dict -> JSON; bytes -> raw with JSON content type), allowed statuses, message part
    ("malformed-json", "/v1/completions", b'{"model": "x", "prompt": ', {400}, "not valid JSON"),
    ("not-an-object", "/v1/completions", b"[1, 2, 3]", {400}, "valid dictionary"),
    ("json-null", "/v1/completions", b"null", {400}, ""),
    ("non-utf8-bytes", "/v1/completions", b'{"model": "smollm2-135m", "prompt": "\xff\xfe\xfd"}', {400}, "UTF-8"),
    ("lone-surrogate", "/v1/completions", b'{"model": "smollm2-135m", "prompt": "\\ud800", "max_tokens": 2}', {400},
     "surrogate"),
    ("deep-nesting", "/v1/completions", b"[" * 100_000 + b"]" * 100_000, {400, 413}, ""),
    ("nan-temperature", "/v1/completions", b'{"model": "smollm2-135m", "prompt": "x", "temperature": NaN}', {400},
     "temperature"),
    ("unknown-model", "/v1/completions", {**C, "model": "no-such-model"}, {404}, "does not exist"),
    ("unknown-model-chat", "/v1/chat/completions", {**M, "model": "gpt-4o"}, {404}, "does not exist"),
    ("missing-model", "/v1/completions", {"prompt": "x"}, {400}, "model"),
    ("missing-prompt", "/v1/completions", {"model": TIER}, {400}, "prompt"),
    ("empty-prompt", "/v1/completions", {**C, "prompt": ""}, {400}, "prompt"),
    ("empty-token-list", "/v1/completions", {**C, "prompt": []}, {400}, "prompt"),
    ("token-out-of-vocab", "/v1/completions", {**C, "prompt": [1, 10_000_000]}, {400}, "token ids"),
    ("negative-token", "/v1/completions", {**C, "prompt": [-1]}, {400}, "prompt"),
    ("over-long-prompt", "/v1/completions", {**C, "prompt": "word " * 5000}, {400, 413}, "context length"),
    ("over-long-token-list", "/v1/completions", {**C, "prompt": [42] * 5000}, {400, 413}, "context length"),
    ("max-tokens-zero", "/v1/completions", {**C, "max_tokens": 0}, {400}, "max_tokens"),
    ("max-tokens-negative", "/v1/completions", {**C, "max_tokens": -5}, {400}, "max_tokens"),
    ("max-tokens-huge", "/v1/completions", {**C, "max_tokens": 1_000_000}, {400}, "context length"),
    ("max-tokens-astronomic", "/v1/completions", {**C, "max_tokens": 10 ** 30}, {400}, "max_tokens"),
    ("max-completion-tokens-zero", "/v1/chat/completions", {**M, "max_completion_tokens": 0}, {400},
     "max_completion_tokens"),
    ("temperature-high", "/v1/completions", {**C, "temperature": 5}, {400}, "temperature"),
    ("temperature-negative", "/v1/completions", {**C, "temperature": -0.1}, {400}, "temperature"),
    ("top-p-zero", "/v1/completions", {**C, "top_p": 0}, {400}, "top_p"),
    ("top-p-high", "/v1/completions", {**C, "top_p": 1.5}, {400}, "top_p"),
    ("top-k-negative", "/v1/completions", {**C, "top_k": -1}, {400}, "top_k"),
    ("seed-too-big", "/v1/completions", {**C, "seed": 2 ** 70}, {400}, "seed"),
    ("wrong-type-max-tokens", "/v1/completions", {**C, "max_tokens": "5"}, {400}, "max_tokens"),
    ("wrong-type-float-max-tokens", "/v1/completions", {**C, "max_tokens": 2.5}, {400}, "max_tokens"),
    ("wrong-type-temperature", "/v1/completions", {**C, "temperature": "hot"}, {400}, "temperature"),
    ("wrong-type-prompt", "/v1/completions", {**C, "prompt": 123}, {400}, "prompt"),
    ("wrong-type-prompt-batch", "/v1/completions", {**C, "prompt": ["a", "b"]}, {400}, "prompt"),
    ("wrong-type-stream", "/v1/completions", {**C, "stream": "yes"}, {400}, "stream"),
    ("wrong-type-model", "/v1/completions", {**C, "model": 7}, {400}, "model"),
    ("wrong-type-messages", "/v1/chat/completions", {**M, "messages": "hi"}, {400}, "messages"),
    ("unknown-field", "/v1/completions", {**C, "frobnicate": True}, {400}, "frobnicate"),
    ("unsupported-openai-field", "/v1/completions", {**C, "logit_bias": {"50256": -100}}, {400}, "logit_bias"),
    ("unknown-stream-option", "/v1/completions", {**C, "stream": True, "stream_options": {"x": 1}}, {400},
     "stream_options"),
    ("n-two", "/v1/completions", {**C, "n": 2}, {400}, "n"),
    ("n-huge", "/v1/completions", {**C, "n": 1_000_000}, {400}, "n"),
    ("too-many-stops", "/v1/completions", {**C, "stop": [f"s{i}" for i in range(17)]}, {400}, "stop"),
    ("too-long-stop", "/v1/completions", {**C, "stop": "x" * 10_000}, {400}, "stop"),
    ("too-long-stop-in-list", "/v1/completions", {**C, "stop": ["ok", "y" * 300]}, {400}, "stop"),
    ("empty-stop", "/v1/completions", {**C, "stop": [""]}, {400}, "stop"),
    ("bad-role", "/v1/chat/completions", {**M, "messages": [{"role": "wizard", "content": "hi"}]}, {400}, "role"),
    ("empty-messages", "/v1/chat/completions", {**M, "messages": []}, {400}, "messages"),
    ("message-without-content", "/v1/chat/completions", {**M, "messages": [{"role": "user"}]}, {400}, "content"),
    ("message-extra-key", "/v1/chat/completions", {**M, "messages": [{"role": "user", "content": "a", "x": 1}]},
     {400}, "messages"),
    ("bad-content-part", "/v1/chat/completions",
     {**M, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, {400}, "content"),
    ("over-long-chat", "/v1/chat/completions", {**M, "messages": [{"role": "user", "content": "hi " * 5000}]},
     {400, 413}, "context length"),
    ("body-too-large", "/v1/completions", {**C, "prompt": "z" * (5 << 20)}, {413}, "exceeds"),
]


@pytest.mark.parametrize("path,body,statuses,needle", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(http, path, body, statuses, needle):
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers=J)
    else:
        r = http.post(path, json=body)
    err = assert_openai_error(r, statuses)
    assert needle.lower() in err["message"].lower(), err
    good(http)


def test_odd_requests_outside_the_body(http, server):
    # no content type, a text content type, a wrong method, an unknown path, a bad Content-Length
    assert_openai_error(http.post("/v1/completions", content=json.dumps(C).encode(), headers={"content-type": ""}),
                        {400, 415})
    assert_openai_error(http.post("/v1/completions", content=json.dumps(C).encode(),
                                  headers={"content-type": "text/plain"}), {400, 415})
    assert_openai_error(http.get("/v1/completions"), {405})
    assert_openai_error(http.post("/v1/nope", json=C), {404})
    assert_openai_error(http.get("/v1/models/no-such-model"), {404})
    # the chat form with text parts, as the openai SDK can send it, works
    r = http.post("/v1/chat/completions", json={**M, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Say hi"}]}]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
    # found by fuzzing: a denormal temperature made NaN probabilities that killed the whole engine;
    # below 1e-5 it now means greedy (as in vLLM)
    tiny = http.post("/v1/completions", json={**C, "temperature": 5e-324, "max_tokens": 4})
    greedy = http.post("/v1/completions", json={**C, "temperature": 0, "max_tokens": 4})
    assert tiny.status_code == greedy.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
    # the same for a top_p that is 0 in float32: only the most likely token is kept
    tiny = http.post("/v1/completions", json={**C, "top_p": 5e-324, "temperature": 1.5, "max_tokens": 4})
    assert tiny.status_code == 200 and tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
    good(http)


# ---- auth ------------------------------------------------------------------------------------------

def test_api_keys_guard_every_v1_route(server, http):
    base = server["base"]
    wrong = openai.OpenAI(base_url=base + "/v1", api_key=WRONG_KEY, max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as ei:
        wrong.completions.create(model=TIER, prompt="Hi", max_tokens=1)
    assert ei.value.status_code == 401 and WRONG_KEY not in str(ei.value)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=TIER, messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
    for key in KEYS:
        right = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60)
        assert right.completions.create(model=TIER, prompt="Hi", max_tokens=1).usage.completion_tokens == 1
        assert TIER in {m.id for m in right.models.list()}
    # raw HTTP: no header, other schemes, an empty token; every /v1 path, even unknown ones
    for headers in ({}, {"Authorization": KEYS[0]}, {"Authorization": f"Basic {KEYS[0]}"},
                    {"Authorization": "Bearer"}, {"Authorization": f"Bearer {KEYS[0]}x"}):
        for method, path in (("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                             ("GET", f"/v1/models/{TIER}"), ("GET", "/v1/anything")):
            r = httpx.request(method, base + path, headers=headers, json=C, timeout=60)
            err = assert_openai_error(r, {401})
            assert err["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
    # open routes
    assert httpx.get(base + "/health", timeout=60).json()["status"] == "ok"
    assert "/v1/completions" in httpx.get(base + "/openapi.json", timeout=60).json()["paths"]
    # no key, and no presented token, in any log of the cluster
    time.sleep(1.0)
    leaks = []
    for root, _, files in os.walk(server["temp"]):
        for name in files:
            path = os.path.join(root, name)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                continue
            leaks += [(path, k) for k in (*KEYS, WRONG_KEY) if k.encode() in data]
    assert not leaks, leaks


# ---- fuzzing ---------------------------------------------------------------------------------------

def _cap(body):
    """Keep generated requests cheap: at most 4 output tokens; a fifth of them go to the real model
    (the rest keep their random model name and get 404, or 400 for what else is wrong in them)."""
    if not isinstance(body, dict):
        return body
    for k in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(k), int) and not isinstance(body.get(k), bool) and body[k] > 4:
            body[k] = 4
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 4              # absent or null would mean 16 (completions) or 256 (chat)
    h = len(repr(body))
    if isinstance(body.get("model"), str) and h % 5 == 0:
        body["model"] = TIER if h % 2 == 0 else "smollm2-135m"
    return body


def test_fuzz_openapi_with_schemathesis(server, http):
    """FUZZ_EXAMPLES=5000 pytest tests/test_reliability.py -k fuzz -s  for the long run."""
    import schemathesis
    from hypothesis import HealthCheck, errors, given, settings
    from schemathesis import GenerationMode

    spec = http.get("/openapi.json").json()
    schema = schemathesis.openapi.from_dict(spec)
    ops = {(o.method.upper(), o.path): o for o in (r.ok() for r in schema.get_all_operations())}
    assert {("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
            ("GET", "/v1/models/{model_id}"), ("GET", "/health")} <= set(ops)
    share = {("POST", "/v1/completions"): (0.3, 0.2), ("POST", "/v1/chat/completions"): (0.2, 0.2),
             ("GET", "/v1/models/{model_id}"): (0.1, 0.0), ("GET", "/v1/models"): (0.01, 0.0),
             ("GET", "/health"): (0.01, 0.0)}
    stats = {"requests": 0, "by_status": {}, "5xx": [], "hangs": [], "bad_errors": [], "model_calls": 0}
    t0 = time.monotonic()

    def send(case):
        case.body = _cap(case.body) if case.body is not None else case.body
        if isinstance(case.body, dict) and case.body.get("model") in (TIER, "smollm2-135m"):
            stats["model_calls"] += 1
        try:
            resp = case.call(base_url=server["base"], headers=dict(AUTH), timeout=REQUEST_TIMEOUT)
        except Exception as e:            # a timeout or a dropped connection: a hang or a crash
            stats["hangs"].append((case.method, case.path, repr(case.body)[:300], repr(e)[:200]))
            return
        stats["requests"] += 1
        s = resp.status_code
        stats["by_status"][s] = stats["by_status"].get(s, 0) + 1
        what = (case.method, case.path, repr(case.body)[:300], s, resp.text[:300])
        if s >= 500 and s != 503:
            stats["5xx"].append(what)
        elif s in (429, 503) and "retry-after" not in resp.headers:
            stats["bad_errors"].append(what)
        elif s == 503:
            stats["5xx"].append(what)     # nothing here may take the one replica down
        elif s >= 400:
            try:
                err = resp.json()["error"]
                assert err["message"] and {"message", "type", "param", "code"} <= set(err)
            except Exception:
                stats["bad_errors"].append(what)

    for key, (pos, neg) in share.items():
        for mode, frac in ((GenerationMode.POSITIVE, pos), (GenerationMode.NEGATIVE, neg)):
            n = max(1, int(FUZZ_EXAMPLES * frac)) if frac else 0
            if not n:
                continue

            @settings(max_examples=n, deadline=None, database=None, derandomize=False, print_blob=False,
                      suppress_health_check=list(HealthCheck))
            @given(ops[key].as_strategy(generation_mode=mode))
            def run(case):
                send(case)
            try:
                run()
            except errors.Unsatisfiable:  # nothing negative can be made of an operation without inputs
                pass
    took = time.monotonic() - t0
    print(f"\nfuzz: {stats['requests']} requests in {took:.0f}s ({stats['model_calls']} to the model), "
          f"statuses {dict(sorted(stats['by_status'].items()))}, 5xx {len(stats['5xx'])}, "
          f"hangs {len(stats['hangs'])}, malformed errors {len(stats['bad_errors'])}")
    assert not stats["5xx"], stats["5xx"][:5]
    assert not stats["hangs"], stats["hangs"][:5]
    assert not stats["bad_errors"], stats["bad_errors"][:5]
    assert stats["requests"] >= min(500, FUZZ_EXAMPLES * 0.8)
    assert stats["by_status"].get(200, 0) >= 10 and stats["model_calls"] >= 10
    good(http)


# ---- overload --------------------------------------------------------------------------------------

async def _burst(base: str, n: int, body: dict) -> list:
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
    async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=REQUEST_TIMEOUT, limits=limits) as c:
        async def one(i):
            t = time.monotonic()
            try:
                r = await c.post("/v1/completions", json={**body, "seed": i})
                return r.status_code, dict(r.headers), r.text, time.monotonic() - t
            except Exception as e:
                return None, {}, repr(e), time.monotonic() - t
        return await asyncio.gather(*(one(i) for i in range(n)))


def test_burst_of_ten_times_capacity_gets_200_or_429_with_retry_after(server, http):
    capacity = MAX_ONGOING + MAX_QUEUED
    body = {"model": TIER, "prompt": "Tell me a story about a dragon.", "max_tokens": 8, "ignore_eos": True}
    t0 = time.monotonic()
    res = asyncio.run(_burst(server["base"], 10 * capacity, body))
    took = time.monotonic() - t0
    statuses = [s for s, *_ in res]
    assert None not in statuses, [r for r in res if r[0] is None][:3]             # every request answered
    assert set(statuses) <= {200, 429}, [(s, t[:200]) for s, _, t, _ in res if s not in (200, 429)][:3]
    ok, shed = statuses.count(200), statuses.count(429)
    print(f"\noverload: {len(res)} concurrent requests (capacity {capacity}) in {took:.1f}s: "
          f"{ok} x 200, {shed} x 429; slowest answer {max(r[3] for r in res):.1f}s")
    assert ok >= MAX_ONGOING and shed >= len(res) - 3 * capacity
    for s, headers, text, _ in res:
        if s == 429:
            assert int(headers["retry-after"]) >= 1
            err = json.loads(text)["error"]
            assert err["type"] == "rate_limit_error" and "retry" in err["message"]
        else:
            assert json.loads(text)["usage"]["completion_tokens"] == 8
    # healthy afterwards: nothing left running, new requests served
    assert httpx.get(server["base"] + "/health", timeout=30).status_code == 200
    good(http)
    for _ in range(100):
        info = worker_handle().info.remote().result()
        if info["running"] == 0 and info["waiting"] == 0 and info["kv_blocks_in_use"] == 0:
            break
        time.sleep(0.2)
    assert info["running"] == 0 and info["waiting"] == 0 and info["kv_blocks_in_use"] == 0


# ---- faults ----------------------------------------------------------------------------------------

def _replica_actor(replica_id: str):
    return ray.get_actor(f"SERVE_REPLICA::{APP}#{DEPLOYMENT}#{replica_id}", namespace="serve")


def _kv_books() -> tuple[int, dict]:
    """(blocks the slab manager counts as allocated to the tier, the live replica's own view)."""
    info = worker_handle().info.remote().result()
    allocated = ray.get(manager().num_allocated_blocks.remote(TIER))
    return allocated, info


async def _load_during_kill(base: str, kill) -> list:
    """4 plain and 2 streamed requests in flight (the replica takes 4 at a time: some run, some wait in
    the ingress' router); once both streams have produced tokens, `kill()`. Every outcome is recorded."""
    limits = httpx.Limits(max_connections=20)
    started = [asyncio.Event(), asyncio.Event()]
    async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=REQUEST_TIMEOUT, limits=limits) as c:
        body = {"model": TIER, "prompt": "Count slowly: one, two,", "max_tokens": 48, "ignore_eos": True,
                "temperature": 0}

        async def plain(i):
            try:
                r = await c.post("/v1/completions", json={**body, "seed": i})
                return ("plain", r.status_code, r.headers.get("retry-after"), r.text)
            except Exception as e:
                return ("plain", None, None, repr(e))

        async def streamed(i):
            events, done, err = [], False, None
            try:                                          # long enough to be cut by the kill
                async with c.stream("POST", "/v1/completions", json={**body, "stream": True, "max_tokens": 160}) as r:
                    if r.status_code != 200:
                        started[i].set()
                        return ("stream", r.status_code, r.headers.get("retry-after"), await r.aread())
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        data = line[6:]
                        if data == "[DONE]":
                            done = True
                            break
                        ev = json.loads(data)
                        if "error" in ev:
                            err = ev["error"]
                            break
                        events.append(ev)
                        started[i].set()
                return ("stream", 200, "done" if done else ("error" if err else "truncated"), err, len(events))
            except Exception as e:
                return ("stream", None, None, repr(e))
            finally:
                started[i].set()

        tasks = [asyncio.create_task(streamed(i)) for i in range(2)]
        tasks += [asyncio.create_task(plain(i)) for i in range(4)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), REQUEST_TIMEOUT)
        await asyncio.sleep(0.3)
        await asyncio.get_running_loop().run_in_executor(None, kill)
        return await asyncio.gather(*tasks)


def test_killed_worker_replica_loses_no_request_and_frees_its_kv_blocks(server, http):
    before = worker_handle().info.remote().result()
    victim = _replica_actor(before["replica"])
    held = {}

    def kill():
        held["blocks"] = ray.get(manager().num_allocated_blocks.remote(TIER))
        held["at"] = time.monotonic()
        ray.kill(victim, no_restart=True)                 # by its actor handle: Serve starts a new replica

    t0 = time.monotonic()
    res = asyncio.run(_load_during_kill(server["base"], kill))
    took = time.monotonic() - t0
    lost = [r for r in res if r[1] is None or (r[0] == "stream" and r[2] == "truncated")]
    print(f"\nfault: replica killed {held['at'] - t0:.1f}s into the load, {held['blocks']} KV blocks "
          f"allocated to it; outcomes {[r[:3] for r in res]} after {took:.0f}s; lost {len(lost)}")
    assert not lost, lost
    # the streams were cut mid-way: each got tokens, then a clear error event (not a silent end)
    assert all(r[2] == "error" and r[4] >= 1 for r in res if r[0] == "stream"), res
    for kind, status, extra, text, *_ in res:
        if kind == "plain":
            if status == 200:
                assert json.loads(text)["usage"]["completion_tokens"] == 48
            else:                                          # a clear error with a hint when to retry
                assert status == 503 and extra, (status, text)
        else:
            assert status == 200 and extra in ("done", "error"), (status, extra, text)
            if extra == "error":
                assert "failed" in text["message"] and text["type"] == "server_error"
    # Serve brought a new replica up; it serves
    after = worker_handle().info.remote().result()
    assert after["replica"] != before["replica"] and after["pid"] != before["pid"]
    good(http)
    # the dead replica's KV blocks went back to the GPU's pool: whatever the manager still counts as
    # allocated to the tier is held by the live replica (in use or in its local block cache)
    if not RECLAIMS_DEAD_REPLICA_BLOCKS:
        pytest.xfail("the slab manager cannot reclaim a dead replica's blocks yet (needs the owner "
                     "tracking in app/slab_manager.py + app/worker.py proposed in issue 8)")
    for _ in range(50):
        allocated, info = _kv_books()
        if info["running"] == 0 and allocated == info["kv_blocks_in_use"] + info["kv_blocks_cached"]:
            break
        time.sleep(0.2)
    leaked = allocated - info["kv_blocks_in_use"] - info["kv_blocks_cached"]
    print(f"fault: after restart the manager counts {allocated} blocks for {TIER}, the live replica holds "
          f"{info['kv_blocks_in_use']} in use + {info['kv_blocks_cached']} cached: {leaked} leaked")
    assert leaked == 0


def test_killed_controller_does_not_stop_serving_and_a_rebuilt_one_recovers(server, http):
    ctl = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    placement = ray.get(ctl.placement.remote())
    stats = ray.get(ctl.kv_stats.remote())
    mgr_id = manager()._actor_id.hex()
    ray.kill(ctl, no_restart=True)
    for _ in range(50):                                    # gone from the GCS
        try:
            ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
            time.sleep(0.1)
        except ValueError:
            break
    # the workers talk to the slab managers, not to the controller: serving goes on
    for _ in range(3):
        good(http)
    r = http.post("/v1/chat/completions", json=M)
    assert r.status_code == 200
    # a rebuilt controller (what the next build_app does) adopts the live managers and their state
    if not CONTROLLER_ADOPTS_MANAGERS:
        pytest.xfail("a rebuilt controller cannot adopt the live slab managers yet (needs Controller._adopt "
                     "in app/controller.py proposed in issue 8)")
    cfg = AppConfig(**ARGS)
    have = ray.cluster_resources()
    pinned = have.get(gpu_resource(0), 0) >= 1
    new = Controller.options(name=CONTROLLER_NAME, namespace=NAMESPACE, lifetime="detached",
                             get_if_exists=True).remote()
    got = ray.get(new.configure.remote(cfg.model_dump(), pinned))
    assert got["gpus"] == placement["gpus"]
    assert manager()._actor_id.hex() == mgr_id               # the same manager, not a fresh empty one
    stats2 = ray.get(new.kv_stats.remote())
    assert stats2[0]["buffer_bytes"] == stats[0]["buffer_bytes"] and set(stats2[0]["models"]) == {TIER}
    good(http)
