"""OpenAI-compatible HTTP ingress: validates, routes by `model` to the worker deployments, streams SSE.

Precision tiering: `name:precision` pins one tier; a logical `name` goes quality first (bf16, fp8,
w4a8kv4) and, with `tiering: overflow`, is sent on to the next tier when a tier refuses it: its replica
predicts a TTFT SLO miss (SAAB's linear model over the tokens queued there) or drops it, or Serve's
queues for it are full. The last tier never refuses for this reason. The answer names the tier that
served it (`model`, `x-fineserve-tier`); GET /v1/fineserve/placement has the counts and the controller's
decisions.

Status codes (DESIGN.md): 400/404/413/422 for bad requests, 401 for a missing or wrong API key,
429 + Retry-After for overload (SAAB drops, full queues, nothing started in time), 503 + Retry-After
only when a model has no live replica (its replica died and the retries ran out, or Serve reports the
deployment unavailable); every error is OpenAI's `{"error": {"message", "type", "param", "code"}}`.
A 500 is a bug, and still answered in that shape.
"""

import asyncio
import json
import logging
import math
import time
import uuid
from typing import Annotated, Literal

import ray
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints
from ray import serve
from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, RayTaskError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.auth import KeyChecker
from app.config import AppConfig
from app.grpc_bind import bind_to_node_ip
from fineserve_core.sampling import MAX_STOP_STRINGS

PRECISION_ORDER = ("bf16", "fp8", "w4a8kv4")    # quality first: a bare model name goes to the best tier
MAX_STOP_LEN = 256                              # characters per stop string
MAX_TOKENS_CAP = 1 << 24                        # beyond any context length; the worker checks the real one
MAX_MESSAGES = 4096
GREEDY_BELOW = 1e-5                             # vLLM's _SAMPLING_EPS
MIN_TOP_P = 1e-6
# a replica (or the process or node under it) went away: the request may be sent again if nothing of
# it reached the client yet
REPLICA_FAILURES = (RayActorError, ReplicaUnavailableError, WorkerCrashedError, NodeDiedError, ObjectLostError)
log = logging.getLogger("ray.serve")


def _utf8(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it holds a lone surrogate)") from None
    return s


Text = Annotated[str, AfterValidator(_utf8)]
StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_LEN), AfterValidator(_utf8)]
TokenId = Annotated[int, Field(ge=0, lt=1 << 31)]


class _Strict(BaseModel):
    # strict: "5" is not a number and 1 is not a bool; unknown fields are errors
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Req(_Strict):
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CAP)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=0, le=1 << 31)                   # vLLM extension; 0 = off
    n: int = Field(1, ge=1, le=1)                             # one choice per request
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 64)
    ignore_eos: bool = False                                 # vLLM extension
    user: str | None = Field(None, max_length=256)

    def params(self, default_max: int) -> dict:
        # like vLLM, a temperature below 1e-5 means greedy: dividing logits by 1e-300 gives inf, NaN
        # probabilities, and an engine that dies on them (found by fuzzing)
        t = 0.0 if self.temperature < GREEDY_BELOW else self.temperature
        # a top_p that rounds to 0 in float32 keeps no token at all (found by fuzzing): any top_p this
        # small keeps exactly the most likely token, as 1e-6 does
        return {"max_tokens": self.max_tokens or default_max, "temperature": t,
                "top_p": max(self.top_p, MIN_TOP_P), "top_k": self.top_k, "seed": self.seed, "stop": self.stop,
                "ignore_eos": self.ignore_eos}


class CompletionRequest(_Req):
    prompt: Annotated[Text, StringConstraints(min_length=1)] | Annotated[list[TokenId], Field(min_length=1)]


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Text | Annotated[list[TextPart], Field(min_length=1)]

    def plain(self) -> dict:
        c = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": c}


class ChatRequest(_Req):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_CAP)


class MoveRequest(_Strict):
    model: str = Field(description="the tier to move, `name:precision`")
    gpu: int = Field(ge=0, description="the GPU to move it to")


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


ERRORS = {s: {"model": ErrorResponse, "description": d} for s, d in (
    (400, "invalid request"), (401, "missing or invalid API key"), (404, "unknown model"),
    (409, "the operation cannot be done now (the message says why)"),
    (413, "request body too large"), (429, "overloaded: retry after Retry-After seconds"),
    (503, "the model has no live replica: retry after Retry-After seconds"))}


def error(status: int, message: str, etype: str = "invalid_request_error", code: str | None = None,
          headers: dict | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": etype, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _retry_after(seconds: float | None, default: int) -> dict:
    s = default if seconds is None else seconds
    return {"Retry-After": str(max(0, math.ceil(s)))}


class _ReplicaFailed(Exception):
    pass


class _Stalled(Exception):
    pass


class _EngineDead(Exception):
    pass


OVERFLOW = object()     # _serve_tier's answer when the tier refused the request for the next tier


api = FastAPI(title="FineServe", version="0.1.0",
              description="OpenAI-compatible API over many models of mixed precision sharing GPUs")


@api.exception_handler(RequestValidationError)
async def _invalid(_, exc: RequestValidationError):
    parts, param = [], None
    for e in exc.errors()[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        # drop pydantic's union-member tags (`str`, `list[...]`, `function-after[...]`) from the path
        loc = [x for x in loc if not (x in ("str", "int", "list", "bool") or "[" in x)]
        where = ".".join(loc)
        param = param or (where or None)
        msg = str(e.get("msg"))
        if e.get("type") == "json_invalid":
            msg = f"the body is not valid JSON ({(e.get('ctx') or {}).get('error', 'decode error')})"
            where, param = "", None
        parts.append(f"{where}: {msg}" if where else msg)
    return error(400, "; ".join(dict.fromkeys(parts)) or "invalid request", param=param)


@api.exception_handler(StarletteHTTPException)
async def _http(_, exc: StarletteHTTPException):
    etype = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    msg = str(exc.detail)
    if exc.status_code == 400 and "parsing the body" in msg:
        msg = "the body could not be parsed as UTF-8 JSON"
    return error(exc.status_code, msg, etype, headers=getattr(exc, "headers", None))


@api.exception_handler(Exception)
async def _bug(_, exc: Exception):
    log.exception("fineserve ingress: unexpected error")
    return error(500, f"internal error ({type(exc).__name__}); this is a bug", "server_error")


class Guard:
    """ASGI middleware in front of every route: bearer API keys on /v1/* (401), and the request body
    size limit (413) enforced while reading, before FastAPI parses anything. The settings live on the
    Ingress instance of this replica."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            ing = serve.get_replica_context().servable_object
        except Exception:                    # not inside a replica (a bare FastAPI test client)
            ing = None
        keys: KeyChecker | None = getattr(ing, "keys", None)
        limit = getattr(getattr(ing, "cfg", None), "ingress", None)
        limit = limit.max_request_bytes if limit else 4 << 20
        path = scope.get("path", "")
        if keys is not None and keys.enabled and (path == "/v1" or path.startswith("/v1/")):
            auth = None
            for k, v in scope.get("headers", ()):
                if k == b"authorization":
                    auth = v.decode("latin-1")
                    break
            if not keys.check(auth):
                resp = error(401, "Missing or invalid API key: send `Authorization: Bearer <key>`.",
                             code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await resp(scope, receive, send)
        length = None
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                try:
                    length = int(v)
                except ValueError:
                    return await error(400, "bad Content-Length header")(scope, receive, send)
        if length is not None and length > limit:
            return await self._too_large(limit, scope, receive, send)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        # read the whole body first (FastAPI would anyway), counting, then replay it
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            if size > limit:
                return await self._too_large(limit, scope, receive, send)
            chunks.append(body)
            if not msg.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            try:
                return await receive()
            except Exception:               # Serve cancels its receive task once the response is done
                return {"type": "http.disconnect"}
        return await self.app(scope, replay, send)

    @staticmethod
    async def _too_large(limit: int, scope, receive, send):
        resp = error(413, f"the request body exceeds {limit} bytes", code="request_too_large")
        return await resp(scope, receive, send)


api.add_middleware(Guard)


@serve.ingress(api)
class Ingress:
    def __init__(self, workers: dict, app: dict, key_digests: list[str] | None = None):
        bind_to_node_ip()
        self.cfg = AppConfig(**app)
        self.keys = KeyChecker(key_digests)
        self.workers = workers                                   # tier -> DeploymentHandle
        self.tiers: dict[str, list[str]] = {}
        for m in sorted(self.cfg.models, key=lambda m: PRECISION_ORDER.index(m.precision)):
            self.tiers.setdefault(m.name, []).append(m.tier)
        self.created = int(time.time())
        self.counters = {"replica_failures": 0, "retried": 0, "failed_after_retries": 0, "backpressure": 0,
                         "timeouts": 0, "stream_errors": 0}
        self.answered: dict[str, int] = dict.fromkeys(self.workers, 0)     # answers (any status), per tier
        self.overflowed: dict[str, int] = dict.fromkeys(self.workers, 0)   # sent on to the next tier, per tier

    # ---- routing ------------------------------------------------------------------------------
    def _route(self, model: str) -> str | None:
        if model in self.workers:
            return model
        tiers = self.tiers.get(model)
        return tiers[0] if tiers else None

    def _chain(self, model: str) -> list[str]:
        """The tiers to try in order: `name:precision` pins one; a logical name is quality first, then
        (tiering "overflow") the next tier when one refuses."""
        if model in self.workers:
            return [model]
        tiers = self.tiers.get(model, [])
        return tiers if self.cfg.tiering == "overflow" else tiers[:1]

    def _unknown(self, model: str) -> JSONResponse:
        known = sorted(set(self.tiers) | set(self.workers))
        shown = model if len(model) <= 64 else model[:64] + "..."
        return error(404, f"model {shown!r} does not exist; available: {known}", code="model_not_found",
                     param="model")

    # ---- endpoints ----------------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "models": sorted(self.workers)}

    @api.get("/v1/fineserve/placement", responses={401: ERRORS[401]})
    async def placement(self) -> dict:
        """The controller's placement, replica targets and every decision with its reason, and this
        ingress replica's routing counts."""
        from app.controller import CONTROLLER_NAME    # here: the controller module pulls in torch
        try:
            ctl = ray.get_actor(CONTROLLER_NAME, namespace=self.cfg.namespace)
            plan = await ctl.placement.remote()
        except (ValueError, RayActorError) as e:
            return self._server_error("controller", f"unreachable ({type(e).__name__})")
        return {**plan, "ingress": {"answered": self.answered, "overflowed": self.overflowed, **self.counters}}

    @api.post("/v1/fineserve/placement/move", status_code=202, responses={s: ERRORS[s] for s in (401, 404, 409)})
    async def move(self, body: MoveRequest):
        """Move a tier to another GPU while it serves (the controller's `move`: the new replica first, then
        the old one drains and its slabs are freed). 202 once accepted; the steps appear in the placement's
        decisions. 409 when the move cannot happen now (the reason says why)."""
        from app.controller import CONTROLLER_NAME
        if body.model not in self.workers:
            return self._unknown(body.model)
        try:
            ctl = ray.get_actor(CONTROLLER_NAME, namespace=self.cfg.namespace)
            r = await ctl.move.remote(body.model, body.gpu, "operator request (HTTP)")
        except (ValueError, RayActorError) as e:
            return self._server_error("controller", f"unreachable ({type(e).__name__})")
        if not r["accepted"]:
            return error(409, f"{body.model} not moved: {r['reason']}", code="move_refused")
        return {"accepted": True, "model": body.model, "gpu": body.gpu, "reason": r["reason"]}

    @api.get("/v1/models", responses={401: ERRORS[401]})
    async def models(self) -> dict:
        return {"object": "list", "data": [self._card(t) for t in sorted(self.tiers) + sorted(self.workers)]}

    @api.get("/v1/models/{model_id:path}", responses={s: ERRORS[s] for s in (401, 404)})
    async def model(self, model_id: str):
        if self._route(model_id) is None:
            return self._unknown(model_id)
        return self._card(model_id)

    def _card(self, model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": self.created, "owned_by": "fineserve",
                "root": self._route(model_id)}

    @api.post("/v1/completions", responses=ERRORS)
    async def completions(self, body: CompletionRequest):
        return await self._serve(body, {"prompt": body.prompt}, "text_completion", body.max_tokens or 16)

    @api.post("/v1/chat/completions", responses=ERRORS)
    async def chat(self, body: ChatRequest):
        msgs = [m.plain() for m in body.messages]
        if body.max_completion_tokens:
            body.max_tokens = body.max_completion_tokens
        return await self._serve(body, {"messages": msgs}, "chat.completion", body.max_tokens or 256)

    # ---- the request path ---------------------------------------------------------------------
    async def _next(self, stream, timeout: float) -> dict:
        """The next item of a worker stream; replica failures and stalls become our own exceptions."""
        try:
            return await asyncio.wait_for(stream.__anext__(), timeout)
        except asyncio.TimeoutError:
            raise _Stalled() from None
        except REPLICA_FAILURES as e:
            raise _ReplicaFailed(type(e).__name__) from None
        except RayTaskError as e:
            if type(getattr(e, "cause", None)).__name__ == "EngineDeadError":
                # the replica's engine died (its health check makes Serve replace it); not retried: this
                # very request may be what killed it, and would take the next replica down too
                raise _EngineDead(str(e.cause)) from None
            raise

    def _refused(self, e: dict) -> JSONResponse:
        """The worker's {"error": {status, message[, retry_after]}} item: a 400 or a SAAB drop (429)."""
        status = e.get("status", 500)
        headers = (_retry_after(e.get("retry_after"), self.cfg.ingress.retry_after_s)
                   if status in (429, 503) or "retry_after" in e else None)
        etype = {429: "rate_limit_error", 503: "server_error"}.get(status, "invalid_request_error")
        return error(status, e.get("message", "refused"), etype, headers=headers)

    def _server_error(self, tier: str, what: str) -> JSONResponse:
        return error(503, f"{tier}: {what}; retry", "server_error", code="replica_unavailable",
                     headers=_retry_after(None, self.cfg.ingress.retry_after_s))

    async def _serve(self, body: _Req, payload: dict, kind: str, default_max: int):
        chain = self._chain(body.model)
        if not chain:
            return self._unknown(body.model)
        rid = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}"
        arrival = time.time()       # the next tier's SAAB deadline counts from the request's arrival
        for i, tier in enumerate(chain):
            resp = await self._serve_tier(body, payload, kind, default_max, tier, rid, arrival,
                                          overflow=i + 1 < len(chain))
            if resp is not OVERFLOW:
                self.answered[tier] += 1
                return resp
            self.overflowed[tier] += 1
        raise AssertionError("unreachable: the last tier never overflows")

    async def _serve_tier(self, body: _Req, payload: dict, kind: str, default_max: int, tier: str, rid: str,
                          arrival: float, overflow: bool):
        """One tier's answer, or OVERFLOW when `overflow` allows the next tier and this one refused: its
        replica predicted a TTFT SLO miss, or Serve's queues for it are full."""
        opts = self.cfg.ingress
        attempts = opts.replica_failure_retries + 1
        for attempt in range(attempts):
            # a retry gets a fresh engine request id: a replica that was only unreachable may still hold the old one
            req = {"request_id": rid if attempt == 0 else f"{rid}-retry{attempt}", "params": body.params(default_max),
                   "arrival": arrival, "overflow": overflow, **payload}
            stream = self.workers[tier].options(stream=True).generate.remote(req)
            try:
                first = await self._next(stream, opts.first_output_timeout_s)
                if "error" in first:
                    stream.cancel()
                    if overflow and first["error"].get("status") == 429:    # predicted miss or SAAB drop
                        return OVERFLOW
                    return self._refused(first["error"])
                if body.stream:
                    usage = bool(body.stream_options and body.stream_options.include_usage)
                    return StreamingResponse(self._sse(stream, first, rid, tier, kind, usage),
                                             headers={"x-fineserve-tier": tier}, media_type="text/event-stream")
                return await self._collect(stream, first, rid, tier, kind)
            except _ReplicaFailed as e:
                stream.cancel()
                self.counters["replica_failures"] += 1
                if attempt + 1 < attempts:
                    self.counters["retried"] += 1
                    log.warning("fineserve ingress: %s replica failed (%s) before answering %s; sending it again",
                                tier, e, rid)
                    await asyncio.sleep(min(0.25 * 2 ** attempt, 2.0))
                    continue
                self.counters["failed_after_retries"] += 1
                return self._server_error(tier, f"the replica serving this request failed ({e}) "
                                                f"{attempts} time(s)")
            except _EngineDead:
                stream.cancel()
                self.counters["replica_failures"] += 1
                return self._server_error(tier, "the engine of the replica serving this request failed "
                                                "(Serve replaces it)")
            except _Stalled:
                stream.cancel()
                self.counters["timeouts"] += 1
                return error(429, f"{tier} did not start or continue this request within its time limit "
                                  f"at the current load; retry later", "rate_limit_error",
                             code="timeout", headers=_retry_after(None, opts.retry_after_s))
            except StopAsyncIteration:
                return self._server_error(tier, "the replica ended the request without an answer")
            except BackPressureError as e:
                self.counters["backpressure"] += 1
                if overflow:
                    return OVERFLOW
                # capacity exhaustion is overload, not an outage: 429 whatever the deployment's status code
                return error(429, f"{tier} is at capacity ({e.message}); retry later", "rate_limit_error",
                             code="overloaded", headers=_retry_after(e.retry_after_s, opts.retry_after_s))
            except DeploymentUnavailableError as e:
                return self._server_error(tier, f"no live replica ({e.message})")
        raise AssertionError("unreachable")

    async def _collect(self, stream, first: dict, rid: str, tier: str, kind: str) -> JSONResponse:
        text, last = first.get("text", ""), first
        while not last.get("finished"):
            try:
                item = await self._next(stream, self.cfg.ingress.stall_timeout_s)
            except StopAsyncIteration:
                break
            except _Stalled:
                stream.cancel()
                self.counters["timeouts"] += 1
                return self._server_error(tier, "the replica stopped producing output for this request")
            if "error" in item:                    # refused after it started (e.g. dropped once preempted)
                stream.cancel()
                return self._refused(item["error"])
            text += item.get("text", "")
            last = item
        usage = {"prompt_tokens": last["prompt_tokens"], "completion_tokens": last["completion_tokens"],
                 "total_tokens": last["prompt_tokens"] + last["completion_tokens"]}
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if kind == "chat.completion"
                  else {"index": 0, "text": text, "logprobs": None})
        choice["finish_reason"] = last["finish_reason"]
        headers = {"x-fineserve-tier": tier}
        m = last.get("metrics") or {}
        for key in ("ttft", "tpot", "e2e"):      # the engine's own times (TGI's x-*-time idea): what is not
            if m.get(key) is not None:           # in them is transport, proxy, ingress and handle overhead
                headers[f"x-fineserve-engine-{key}-ms"] = f"{m[key] * 1e3:.3f}"
        return JSONResponse({"id": rid, "object": kind, "created": int(time.time()), "model": tier,
                             "choices": [choice], "usage": usage}, headers=headers)

    async def _sse(self, stream, first: dict, rid: str, tier: str, kind: str, include_usage: bool):
        chat = kind == "chat.completion"
        obj = "chat.completion.chunk" if chat else "text_completion"
        created = int(time.time())

        def chunk(delta_text: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                delta = {"role": "assistant"} if role else {}
                if delta_text is not None:
                    delta["content"] = delta_text
                c = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                c = {"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": finish}
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": tier,
                                          "choices": [c]}) + "\n\n"

        def failed(message: str, etype: str = "server_error", code: str = "replica_unavailable") -> str:
            self.counters["stream_errors"] += 1
            return "data: " + json.dumps({"error": {"message": message, "type": etype, "param": None,
                                                    "code": code}}) + "\n\n"
        last = first
        try:
            if chat:
                yield chunk("", None, role=True)
            item = first
            while True:
                # one chunk per token, also when its text is held back or empty (no tokenizer), as vLLM
                # does: clients time TTFT and inter-token latency by chunks
                if item.get("text") or item.get("finished") or item.get("token_ids"):
                    yield chunk(item.get("text", ""), item.get("finish_reason"))
                last = item
                if item.get("finished"):
                    break
                item = await self._next(stream, self.cfg.ingress.stall_timeout_s)
                if "error" in item:                # refused after it started (e.g. dropped once preempted)
                    e = item["error"]
                    yield failed(e.get("message", "refused"),
                                 "rate_limit_error" if e.get("status") == 429 else "server_error",
                                 "dropped" if e.get("status") == 429 else "refused")
                    return
            if include_usage:
                usage = {"prompt_tokens": last["prompt_tokens"], "completion_tokens": last["completion_tokens"],
                         "total_tokens": last["prompt_tokens"] + last["completion_tokens"]}
                yield "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": tier,
                                             "choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"
        except (StopAsyncIteration, _ReplicaFailed, _EngineDead):
            yield failed(f"the {tier} replica serving this stream failed; retry the request")
        except _Stalled:
            yield failed(f"the {tier} replica stopped producing output for this stream; retry the request")
        except Exception as e:                   # a bug: still end the stream with an error event
            log.exception("fineserve ingress: stream %s failed", rid)
            yield failed(f"internal error ({type(e).__name__}); this is a bug", code="internal_error")
        finally:
            stream.cancel()                       # client gone or done: the worker aborts and frees blocks
