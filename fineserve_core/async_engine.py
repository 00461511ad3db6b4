"""Streaming front of the engine: a background thread steps the engine, callers get async iterators.

Engine state is touched only by the stepping thread; callers hand requests and aborts over through a
queue, so no lock guards the engine itself.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator

from fineserve_core.engine import Engine, RequestOutput
from fineserve_core.sampling import SamplingParams


class EngineDeadError(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="fineserve-engine", daemon=True)
        self._thread.start()

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                       deadline: float | None = None) -> AsyncIterator[RequestOutput]:
        """Yield outputs as tokens arrive. Leaving the loop early (or cancellation) aborts the request."""
        if self.error is not None:
            raise EngineDeadError(f"engine stopped: {self.error!r}")
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        ready = loop.create_future()
        self._streams[request_id] = (loop, q)
        self._inbox.put(("add", request_id, prompt, params, deadline, ready))
        self._wake.set()
        finished = False
        try:
            await ready                                          # raises the engine's RequestError
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "abort":
                self.engine.abort(msg[1])
                continue
            _, rid, prompt, params, deadline, ready = msg
            loop = self._streams.get(rid, (None,))[0]
            try:
                self.engine.add_request(rid, prompt, params, deadline)
                err = None
            except Exception as e:                              # refused request: tell only that caller
                err = e
            if loop is not None:
                loop.call_soon_threadsafe(_settle, ready, err)

    def _loop(self) -> None:
        try:
            while not self._stop:
                self._drain_inbox()
                if not self.engine.has_unfinished():
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                outs = self.engine.step()
                if not outs:
                    time.sleep(0.001)                         # waiting for KV blocks held by other models
                for out in outs:
                    s = self._streams.get(out.request_id)
                    if s is not None:
                        s[0].call_soon_threadsafe(s[1].put_nowait, out)
        except BaseException as e:                            # a dead engine must fail its callers, not hang them
            self.error = e
            for loop, q in list(self._streams.values()):
                loop.call_soon_threadsafe(q.put_nowait, EngineDeadError(f"engine failed: {e!r}"))
            raise
        finally:
            self.engine.close()


def _settle(fut: asyncio.Future, err: BaseException | None) -> None:
    if not fut.done():
        fut.set_exception(err) if err else fut.set_result(None)
