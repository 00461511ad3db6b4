"""One load-test request over real HTTP: a streamed /v1/completions, timed per chunk (one chunk per token).

Every request ends in exactly one `status`:
  ok        the stream finished ([DONE] after a finish_reason)
  http_4xx  refused with a 4xx (SAAB's 429 drop, backpressure 429, 400 too long ...), `code` says which;
            also a 429-type error event inside a started stream (a drop after preemption)
  http_5xx  a 5xx, or a server error event inside the stream
  timeout   no token within the request's time limit (or before the end of the run)
  cut       streaming when its time limit (or the end of the run) came: its TTFT counts, nothing else
  error     the connection failed, or the stream broke off without [DONE]
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
STATUSES = ("ok", "http_4xx", "http_5xx", "timeout", "cut", "error")


def check_loopback(url: str) -> str:
    """Load tests only ever drive a server on this machine."""
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"load tests target loopback only (127.0.0.1, localhost, ::1), not {host!r}")
    return url.rstrip("/")


@dataclass(slots=True)
class Result:
    rid: int
    model: str                        # the tier sent as `model`
    arrival: float                    # scheduled send time, seconds from the run's start
    input_len: int
    output_len: int                   # max_tokens (ignore_eos: the output has exactly this length)
    sent: float | None = None         # actual send time, seconds from the run's start
    status: str = "timeout"           # until it ends otherwise
    code: int | None = None           # HTTP status, or 429/503 for an error event inside a stream
    error: str | None = None
    chunks: list[float] = field(default_factory=list)   # arrival of each token chunk, seconds after `sent`
    done: float | None = None         # end of the stream, seconds after `sent`
    output_tokens: int = 0            # the server's usage.completion_tokens (else chunks counted)

    @property
    def ttft(self) -> float | None:
        return self.chunks[0] if self.status in ("ok", "cut") and self.chunks else None

    @property
    def e2e(self) -> float | None:
        return self.done if self.status == "ok" else None

    @property
    def tpot(self) -> float | None:
        """(e2e - TTFT) / (output tokens - 1), vLLM's definition."""
        if self.status != "ok" or self.output_tokens < 2 or not self.chunks:
            return None
        return (self.chunks[-1] - self.chunks[0]) / (self.output_tokens - 1)

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.chunks, self.chunks[1:])] if self.status == "ok" else []

    def to_dict(self) -> dict:
        return {"rid": self.rid, "model": self.model, "arrival": round(self.arrival, 4), "input_len": self.input_len,
                "output_len": self.output_len, "sent": None if self.sent is None else round(self.sent, 4),
                "status": self.status, "code": self.code, "error": self.error,
                "ttft": self.ttft, "tpot": self.tpot, "e2e": self.e2e, "output_tokens": self.output_tokens}


async def send(client: httpx.AsyncClient, url: str, r: Result, prompt: list[int], t0: float,
               timeout_s: float) -> Result:
    """POST one streamed completion and fill `r` (never raises for a request's own failure)."""
    body = {"model": r.model, "prompt": prompt, "max_tokens": r.output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    r.sent = time.perf_counter() - t0
    start = time.perf_counter()
    try:
        await asyncio.wait_for(_stream(client, url, body, r, start), timeout_s)
    except asyncio.TimeoutError:
        r.status, r.error = "cut" if r.chunks else "timeout", f"no complete answer within {timeout_s:g}s"
    except asyncio.CancelledError:
        r.status, r.error = "cut" if r.chunks else "timeout", "open at the end of the run"
        raise
    except httpx.HTTPError as e:
        r.status, r.error = "error", f"{type(e).__name__}: {e}"
    return r


async def _stream(client: httpx.AsyncClient, url: str, body: dict, r: Result, start: float) -> None:
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        r.code = resp.status_code
        if resp.status_code != 200:
            text = (await resp.aread()).decode(errors="replace")
            r.status = "http_4xx" if 400 <= resp.status_code < 500 else "http_5xx"
            try:
                r.error = json.loads(text)["error"]["message"][:300]
            except (ValueError, KeyError, TypeError):
                r.error = text[:300]
            return
        finished = False
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":                       # read on to the end: no disconnect for the server
                r.done = time.perf_counter() - start
                continue
            ev = json.loads(data)
            if "error" in ev:                            # refused or failed after the stream started
                e = ev["error"]
                r.code = 429 if e.get("type") == "rate_limit_error" else 503
                r.status = "http_4xx" if r.code == 429 else "http_5xx"
                r.error = e.get("message", "")[:300]
                return
            if ev.get("usage"):
                r.output_tokens = ev["usage"]["completion_tokens"]
            for c in ev.get("choices", ()):
                r.chunks.append(time.perf_counter() - start)
                finished = finished or c.get("finish_reason") is not None
        if r.done is None or not finished:
            r.status, r.error = "error", "the stream ended without a finish_reason and [DONE]"
            return
        r.output_tokens = r.output_tokens or len(r.chunks)
        r.status = "ok"
