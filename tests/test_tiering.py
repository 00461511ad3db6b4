"""Precision tiering on the real app (private CPU Ray cluster, real HTTP): a request naming the logical
model goes to bf16 while bf16's replica predicts it meets the TTFT SLO; a burst overflows to w4a8kv4
instead of queueing; once the burst is over, requests go back to bf16."""
import asyncio

import httpx
import pytest

from tests.test_app import dev_app_args, serve_on_private_cluster

NAME, BF16, W4 = "smollm2-135m", "smollm2-135m:bf16", "smollm2-135m:w4a8kv4"
PROMPT = "The three primary colors are red, yellow and blue. " * 16      # ~190 tokens
BURST = 24


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    args = dev_app_args("fineserve-tiering")
    for m in args["models"]:
        if m.get("precision", "bf16") == "bf16":
            # SLO = 1 x this replica's measured single-request TTFT at 903 tokens: one ~190-token prompt
            # meets it, a queue of more than ~4 does not, whatever this CPU's speed
            m["slo"] = {"ttft_scale": 1.0}
    yield from serve_on_private_cluster(args, "tiering", tmp_path_factory)


def complete(client: httpx.Client, base: str, model: str = NAME) -> httpx.Response:
    return client.post(base + "/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 4,
                                                       "temperature": 0, "ignore_eos": True}, timeout=300)


async def burst(base: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=300) as c:
        body = {"model": NAME, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        return await asyncio.gather(*(c.post(base + "/v1/completions", json=body) for _ in range(n)))


def test_burst_overflows_to_the_quantized_tier_and_returns_to_bf16(base):
    with httpx.Client() as c:
        r = complete(c, base)                       # idle: quality first
        assert r.status_code == 200, r.text
        assert r.headers["x-fineserve-tier"] == r.json()["model"] == BF16

        rs = asyncio.run(burst(base, BURST))
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
        tiers = [r.headers["x-fineserve-tier"] for r in rs]
        print(f"burst of {BURST}: {tiers.count(BF16)} served by bf16, {tiers.count(W4)} overflowed to w4a8kv4")
        assert all(r.json()["model"] == t for r, t in zip(rs, tiers))
        assert tiers.count(BF16) >= 1, tiers       # bf16 took what it could serve in time
        assert tiers.count(W4) >= BURST // 2, tiers # the rest overflowed instead of queueing

        after = [complete(c, base).headers["x-fineserve-tier"] for _ in range(3)]
        assert after == [BF16] * 3                  # the burst is over: back to bf16

        pinned = complete(c, base, BF16)            # `name:precision` is never rerouted
        assert pinned.headers["x-fineserve-tier"] == BF16

        p = c.get(base + "/v1/fineserve/placement", timeout=60).json()
        ing = p["ingress"]
        assert ing["overflowed"][BF16] == tiers.count(W4) and ing["overflowed"][W4] == 0
        assert ing["answered"][BF16] == 1 + tiers.count(BF16) + 3 + 1 and ing["answered"][W4] == tiers.count(W4)
