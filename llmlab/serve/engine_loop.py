"""One thread steps the engine; HTTP handlers hand it requests and read their tokens from asyncio queues.

Taught in notebook 15 (serving and its metrics).  The :class:`~llmlab.engine.Engine`
is not thread-safe, so exactly one thread touches it: this loop.  Handlers send it
commands (add a request, abort one, run a function) through a thread-safe queue and
wake it; it applies them between steps, steps the engine while any request is
unfinished, and hands each request's new tokens to its handler's event loop with
``loop.call_soon_threadsafe``.  With nothing to do it sleeps on an event — no busy
spin.  Every request shares the same batches: continuous batching.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from llmlab.engine import Engine, EngineError
from llmlab.engine.sequence import Sequence as EngineSequence
from llmlab.sampling import SamplingParams

SHUTDOWN_MESSAGE = "the server is shutting down, so this request was stopped: send it again once the server is back."


class ServerShuttingDown(EngineError):
    """The engine loop has stopped: no new request is taken (send it again when the server is back)."""


@dataclass
class Update:
    """What one request got from one engine step: new token ids, and its finish reason or an error at the end."""

    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    sequence: EngineSequence | None = None

    @property
    def last(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class RequestStream:
    """A request's updates as the engine loop produces them (read them with ``await stream.next()``)."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self._loop = loop
        self._queue: asyncio.Queue[Update] = asyncio.Queue()

    async def next(self) -> Update:
        return await self._queue.get()

    def _put(self, update: Update) -> None:  # called on the engine thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, update)
        except RuntimeError:  # the handler's event loop is closed: nobody is listening any more
            pass


class EngineLoop:
    """The one thread that steps ``engine`` (notebook 15); ``observer`` hears about tokens and finished requests.

    ``observer`` (e.g. :class:`llmlab.serve.metrics.ServerMetrics`) gets ``prompt(n)``,
    ``generated(n)``, ``finished(sequence, reason)`` and ``engine_state(engine)``, all on the
    engine thread.  ``on_idle`` runs on the engine thread every ``idle_interval`` seconds without
    work (a tensor-parallel server's heartbeat, :mod:`llmlab.serve.parallel`).
    """

    def __init__(self, engine: Engine, observer: Any = None, *, on_idle: Callable[[], None] | None = None,
                 idle_interval: float = 10.0) -> None:
        self.engine = engine
        self.observer = observer
        self.on_idle, self.idle_interval = on_idle, idle_interval
        self._last_active = time.monotonic()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, RequestStream] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ids = 0
        self._ids_lock = threading.Lock()
        self._closed = False
        self._closing = threading.Lock()

    # -- life -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="llmlab-engine", daemon=True)
            self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def request_stop(self) -> None:
        """Ask the thread to stop (returns at once): every unfinished request ends with an error update."""
        self._stopping = True
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread and wait (at most ``timeout`` seconds) until it has aborted every request."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- what handlers call (any thread) -------------------------------------------------------

    async def submit(self, prompt_ids: Sequence[int], params: SamplingParams) -> RequestStream:
        """Add a request on the engine thread; return its stream (the engine's errors are raised here)."""
        stream = RequestStream(self._new_id(), asyncio.get_running_loop())
        done: concurrent.futures.Future = concurrent.futures.Future()
        with self._closing:
            if self._closed or self._stopping or self._thread is None:
                raise ServerShuttingDown(SHUTDOWN_MESSAGE)
            self._send(("add", stream, list(prompt_ids), params, time.perf_counter(), done))
        await asyncio.wrap_future(done)
        return stream

    def abort(self, request_id: str, reason: str = "abort") -> None:
        """Abort a request on the engine thread (its blocks are freed there); ``reason`` is what metrics count."""
        self._send(("abort", request_id, reason))

    def call(self, fn: Callable[[Engine], Any], timeout: float = 30.0) -> Any:
        """Run ``fn(engine)`` on the engine thread between steps and return its result (blocks the caller)."""
        if threading.current_thread() is self._thread:
            return fn(self.engine)
        done: concurrent.futures.Future = concurrent.futures.Future()
        with self._closing:
            if self._closed or self._thread is None:  # nothing steps the engine: safe to look at it from here
                return fn(self.engine)
            self._send(("call", fn, done))
        return done.result(timeout)

    def _send(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    def _new_id(self) -> str:
        with self._ids_lock:
            self._ids += 1
            return f"cmpl-{self._ids}"

    # -- the engine thread -------------------------------------------------------------------------

    def _run(self) -> None:
        parameter = next(self.engine.model.parameters())
        if parameter.device.type == "cuda":  # the current CUDA device is per thread
            torch.cuda.set_device(parameter.device)
        while not self._stopping:
            self._wake.clear()
            self._apply_commands()
            if self.engine.has_unfinished_requests:
                self._step()
            else:
                self._observe_state()
                self._idle()
        self._shut_down()

    def _idle(self) -> None:
        """Sleep until woken; with ``on_idle``, call it whenever ``idle_interval`` seconds passed without a step."""
        if self.on_idle is None:
            self._wake.wait()
            return
        self._wake.wait(max(0.0, self._last_active + self.idle_interval - time.monotonic()))
        if time.monotonic() - self._last_active >= self.idle_interval:
            self.on_idle()
            self._last_active = time.monotonic()

    def _apply_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            kind, *rest = command
            getattr(self, f"_do_{kind}")(*rest)

    def _do_add(self, stream: RequestStream, prompt_ids: list[int], params: SamplingParams, arrival: float,
                done: concurrent.futures.Future) -> None:
        try:
            self.engine.add_request(prompt_ids, params, request_id=stream.request_id, arrival_time=arrival)
        except Exception as err:  # noqa: BLE001 - handed to the handler, which answers 400 or 500
            done.set_exception(err)
            return
        self._streams[stream.request_id] = stream
        self._notify("prompt", len(prompt_ids))
        done.set_result(stream.request_id)

    def _do_abort(self, request_id: str, reason: str) -> None:
        stream = self._streams.pop(request_id, None)
        if request_id not in self.engine.requests:
            return
        seq = self.engine.abort(request_id)
        self._notify("finished", seq, reason)
        if stream is not None:
            stream._put(Update(finish_reason=reason, sequence=seq))

    def _do_call(self, fn: Callable[[Engine], Any], done: concurrent.futures.Future) -> None:
        try:
            done.set_result(fn(self.engine))
        except Exception as err:  # noqa: BLE001 - raised again in the caller's thread
            done.set_exception(err)

    def _step(self) -> None:
        self._last_active = time.monotonic()
        try:
            outputs = self.engine.step()
        except Exception:  # noqa: BLE001 - a bug: fail the requests in flight, keep serving the next ones
            traceback.print_exc(file=sys.stderr)
            self._fail_all("the engine failed on this request's batch (a bug, see the server's log): try again.")
            return
        generated = 0
        for out in outputs:
            generated += len(out.new_token_ids)
            reason = None if out.finish_reason is None else out.finish_reason.value
            stream = self._streams.get(out.request_id)
            if reason is not None:
                self._streams.pop(out.request_id, None)
                self._notify("finished", out.sequence, reason)
            if stream is not None:
                stream._put(Update(list(out.new_token_ids), reason, sequence=out.sequence if reason else None))
        self._notify("generated", generated)
        self._observe_state()

    def _fail_all(self, message: str) -> None:
        for request_id in list(self.engine.requests):
            seq = self.engine.abort(request_id)
            self._notify("finished", seq, "abort")
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream._put(Update(error=message, sequence=seq))
        for stream in self._streams.values():
            stream._put(Update(error=message))
        self._streams.clear()

    def _shut_down(self) -> None:
        with self._closing:
            self._closed = True
        self._apply_commands_for_shutdown()
        self._fail_all(SHUTDOWN_MESSAGE)
        self._observe_state()

    def _apply_commands_for_shutdown(self) -> None:
        """Commands that came in too late: requests are refused, aborts and calls still run."""
        while True:
            try:
                kind, *rest = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                rest[-1].set_exception(ServerShuttingDown(SHUTDOWN_MESSAGE))
            else:
                getattr(self, f"_do_{kind}")(*rest)

    def _notify(self, event: str, *args: Any) -> None:
        handler = getattr(self.observer, event, None)
        if handler is not None:
            handler(*args)

    def _observe_state(self) -> None:
        self._notify("engine_state", self.engine)
