"""OpenAI-compatible HTTP ingress: validates, routes by `model` to the worker deployments, streams SSE."""

import json
import time
import uuid
from typing import Literal

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.config import AppConfig
from fineserve_core.sampling import MAX_STOP_STRINGS

PRECISION_ORDER = ("bf16", "fp8", "w4a8kv4")    # quality first: a bare model name goes to the best tier


class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)                              # vLLM extension
    n: int = Field(1, ge=1, le=1)                             # one choice per request
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = Field(None, max_length=MAX_STOP_STRINGS)
    seed: int | None = None
    ignore_eos: bool = False                                 # vLLM extension
    user: str | None = None

    def params(self, default_max: int) -> dict:
        return {"max_tokens": self.max_tokens or default_max, "temperature": self.temperature,
                "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed, "stop": self.stop,
                "ignore_eos": self.ignore_eos}


class CompletionRequest(_Req):
    prompt: str | list[int] = Field(min_length=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Req):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def error(status: int, message: str, etype: str = "invalid_request_error", code: str | None = None,
          headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": etype, "param": None, "code": code}},
                        status_code=status, headers=headers)


api = FastAPI(title="FineServe", version="0.1.0",
              description="OpenAI-compatible API over many models of mixed precision sharing GPUs")


@api.exception_handler(RequestValidationError)
async def _invalid(_, exc: RequestValidationError):
    parts = []
    for e in exc.errors()[:5]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return error(400, "; ".join(parts) or "invalid request")


@api.exception_handler(StarletteHTTPException)
async def _http(_, exc: StarletteHTTPException):
    return error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else "invalid_request_error")


@serve.ingress(api)
class Ingress:
    def __init__(self, workers: dict, app: dict):
        self.cfg = AppConfig(**app)
        self.workers = workers                                   # tier -> DeploymentHandle
        self.tiers: dict[str, list[str]] = {}
        for m in sorted(self.cfg.models, key=lambda m: PRECISION_ORDER.index(m.precision)):
            self.tiers.setdefault(m.name, []).append(m.tier)
        self.created = int(time.time())

    # ---- routing ------------------------------------------------------------------------------
    def _route(self, model: str) -> str | None:
        if model in self.workers:
            return model
        tiers = self.tiers.get(model)
        return tiers[0] if tiers else None

    def _unknown(self, model: str) -> JSONResponse:
        known = sorted(set(self.tiers) | set(self.workers))
        return error(404, f"model {model!r} does not exist; available: {known}", code="model_not_found")

    # ---- endpoints ----------------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "models": sorted(self.workers)}

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [self._card(t) for t in sorted(self.tiers) + sorted(self.workers)]}

    @api.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str):
        if self._route(model_id) is None:
            return self._unknown(model_id)
        return self._card(model_id)

    def _card(self, model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": self.created, "owned_by": "fineserve",
                "root": self._route(model_id)}

    @api.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        return await self._serve(body, {"prompt": body.prompt}, "text_completion", body.max_tokens or 16)

    @api.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest):
        msgs = [m.model_dump() for m in body.messages]
        if body.max_completion_tokens:
            body.max_tokens = body.max_completion_tokens
        return await self._serve(body, {"messages": msgs}, "chat.completion", body.max_tokens or 256)

    # ---- the request path ---------------------------------------------------------------------
    async def _serve(self, body: _Req, payload: dict, kind: str, default_max: int):
        tier = self._route(body.model)
        if tier is None:
            return self._unknown(body.model)
        rid = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}"
        req = {"request_id": rid, "params": body.params(default_max), "arrival": time.time(), **payload}
        stream = self.workers[tier].options(stream=True).generate.remote(req)
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            return error(503, f"{tier} ended the request without an answer", "server_error")
        except (BackPressureError, DeploymentUnavailableError, RayActorError) as e:
            return error(503, f"{tier} has no replica able to take the request now: {type(e).__name__}",
                         "server_error", headers={"Retry-After": "1"})
        if "error" in first:
            e = first["error"]
            headers = {"Retry-After": str(e["retry_after"])} if "retry_after" in e else None
            etype = "rate_limit_error" if e["status"] == 429 else "invalid_request_error"
            return error(e["status"], e["message"], etype, headers=headers)
        headers = {"x-fineserve-tier": tier}
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(self._sse(stream, first, rid, tier, kind, usage), headers=headers,
                                     media_type="text/event-stream")
        text, last = first["text"], first
        try:
            async for item in stream:
                text += item.get("text", "")
                last = item
        except RayActorError:
            return error(503, f"the {tier} replica serving this request failed; retry", "server_error",
                         headers={"Retry-After": "1"})
        usage = {"prompt_tokens": last["prompt_tokens"], "completion_tokens": last["completion_tokens"],
                 "total_tokens": last["prompt_tokens"] + last["completion_tokens"]}
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if kind == "chat.completion"
                  else {"index": 0, "text": text, "logprobs": None})
        choice["finish_reason"] = last["finish_reason"]
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
        last = first
        try:
            if chat:
                yield chunk("", None, role=True)
            item = first
            while True:
                if item.get("text") or item.get("finished"):
                    yield chunk(item.get("text", ""), item.get("finish_reason"))
                last = item
                if item.get("finished"):
                    break
                item = await stream.__anext__()
            if include_usage:
                usage = {"prompt_tokens": last["prompt_tokens"], "completion_tokens": last["completion_tokens"],
                         "total_tokens": last["prompt_tokens"] + last["completion_tokens"]}
                yield "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": tier,
                                             "choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"
        except (StopAsyncIteration, RayActorError):
            err = {"error": {"message": f"the {tier} replica serving this stream failed", "type": "server_error"}}
            yield "data: " + json.dumps(err) + "\n\n"
        finally:
            stream.cancel()                       # client gone or done: the worker aborts and frees blocks
