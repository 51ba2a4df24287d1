"""The engine's step loop in one background thread, fed and drained through queues.

HTTP handlers (asyncio) call ``generate()``: the request is handed to the engine thread, which
adds it between steps (validation errors come back as exceptions), steps while there is work,
and pushes each ``RequestOutput`` to the handler's asyncio queue with ``call_soon_threadsafe``.
Cancelling the consumer (a client that disconnects) aborts the request, which frees its pages.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
import traceback

from ..engine import LLMEngine, SamplingParams
from ..engine.parallel import WorkerGone


class Overloaded(Exception):
    """The waiting queue is over its limit: answer 503 with Retry-After."""


class EngineDead(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int = 1024):
        self.engine = engine
        self.max_waiting = max_waiting
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.wake = threading.Event()
        self.stopped = False
        self.error: BaseException | None = None
        self.pending = 0  # accepted by a handler, not yet added by the engine thread
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, name="pagoda-engine", daemon=True)
        self.thread.start()

    # -- handler side (event loop) -------------------------------------------------------
    async def generate(self, prompt, params: SamplingParams, request_id: str, lora_request=None):
        """Async iterator of RequestOutput for one request (the last one has finished=True); lora_request: its
        LoRA adapter (LLMEngine.add_request's)."""
        if self.error is not None:
            raise EngineDead(f"the engine stopped: {self.error}")
        with self.lock:
            if len(self.engine.scheduler.waiting) + self.pending >= self.max_waiting:
                raise Overloaded(f"{len(self.engine.scheduler.waiting) + self.pending} requests are waiting")
            self.pending += 1
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        self.streams[request_id] = (loop, q)
        self.commands.put(("add", request_id, prompt, params, lora_request))
        self.wake.set()
        finished = False
        try:
            first = await q.get()
            if isinstance(first, BaseException):
                raise first
            # "added": from here on outputs arrive
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self.streams.pop(request_id, None)
            if not finished:
                self.commands.put(("abort", request_id))
                self.wake.set()

    async def call(self, fn):
        """fn() run on the engine thread between steps (what touches the engine's state from a handler: loading a
        LoRA adapter); its result, or its exception raised here."""
        if self.error is not None or self.stopped:
            raise EngineDead(f"the engine stopped: {self.error}")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.commands.put(("call", fn, loop, fut))
        self.wake.set()
        return await fut

    def stop(self, timeout: float = 5.0) -> None:
        self.stopped = True
        self.wake.set()
        self.thread.join(timeout)

    # -- engine thread ------------------------------------------------------------------
    def _push(self, request_id: str, item) -> None:
        s = self.streams.get(request_id)
        if s is not None:
            loop, q = s
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the event loop is closed (shutdown)
                pass

    def _drain(self) -> None:
        while True:
            try:
                cmd = self.commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, prompt, params, lora = cmd
                with self.lock:
                    self.pending -= 1
                if rid not in self.streams:  # the client left before we got to it
                    continue
                try:
                    self.engine.add_request(prompt, params, request_id=rid, lora_request=lora)
                except WorkerGone:  # (not the request's fault: the engine is dead, _loop reports it to every one)
                    raise
                except Exception as e:  # noqa: BLE001 - validation errors go back to the handler
                    self._push(rid, e)
                else:
                    self._push(rid, "added")
            elif cmd[0] == "abort":
                self.engine.abort(cmd[1])
            elif cmd[0] == "call":
                _, fn, loop, fut = cmd
                try:
                    result, ok = fn(), True
                except Exception as e:  # noqa: BLE001 - goes back to the handler that asked
                    result, ok = e, False

                def settle(fut=fut, result=result, ok=ok):
                    if not fut.done():
                        fut.set_result(result) if ok else fut.set_exception(result)
                try:
                    loop.call_soon_threadsafe(settle)
                except RuntimeError:  # the event loop is closed (shutdown)
                    pass

    def _loop(self) -> None:
        try:
            while not self.stopped:
                self._drain()
                if not self.engine.has_unfinished():
                    self.wake.wait(0.05)
                    self.wake.clear()
                    continue
                for out in self.engine.step():
                    self._push(out.request_id, out)
        except BaseException as e:  # noqa: BLE001 - report to every waiting handler, then stop
            traceback.print_exc()
            self.error = e
            for rid in list(self.streams):
                self._push(rid, EngineDead(f"the engine stopped: {e}"))
        finally:
            for rid in list(self.engine.requests):
                try:
                    self.engine.abort(rid)
                except Exception:  # noqa: BLE001 - an engine that failed (a tensor-parallel worker gone) may raise
                    pass
            self.stopped = True
            self.stop_time = time.monotonic()
