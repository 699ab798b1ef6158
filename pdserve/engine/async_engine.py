"""Runs an ``LLMEngine`` on its own thread and serves asyncio callers.

The engine is not thread-safe, so everything that touches it (add, abort, KV
import) is a command executed on the engine thread between steps, in the order
it was sent. Each request lives in a ``RequestStream`` (``request(rid)``): its
outputs come back on the stream's asyncio queue; KV exported during prefill
travels the same queue, ahead of the token that follows it; a KV import
(pdserve/engine/kv_import.py) is handed out by the stream.

Engine thread loop::

    idle ──command──▶ run commands ──work?──▶ step ──▶ deliver outputs ──┐
      ▲                                                                 │
      └──────────────────────── no work left ◀──────────────────────────┘

Engine lifecycle: RUNNING ─any exception escapes a step─▶ DEAD. Dying is final: the
engine's state can no longer be trusted (blocks, batch), so nothing is retried.
On death, in this order, on the event loop: ``on_death(error)`` runs (the worker
host sets health NOT_SERVING there, so nobody is told to come back), then every
open request stream and every pending ``call`` fails with ``EngineDeadError("engine
died: …")``, then ``wait_dead`` returns. From then on ``request``, ``call`` and
``send`` raise ``EngineDeadError`` at once; ``abort`` is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from pdserve.engine.engine import LLMEngine
from pdserve.engine.kv_import import KVImport
from pdserve.engine.kv_staging import HostStaging, wait_ready
from pdserve.engine.outputs import RequestOutput
from pdserve.kvwire.codec import Encoding, WireRows
from pdserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class KVPiece:
    """One layer of one computed chunk of a prompt (a private host copy; on CUDA
    still being written until ``ready`` returns, see kv_staging.py)."""

    layer: int
    start: int
    k: WireRows  # (n, kvh, hd), on the host
    v: WireRows
    done: Any = None  # the CUDA event of the device → host copy; None: written

    async def ready(self) -> None:
        await wait_ready(self.done)


class EngineDeadError(RuntimeError):
    """The engine thread died; this worker serves nothing more (its host exits)."""


DEATH_HOOK_TIMEOUT_S = 2.0  # on_death must not hold the failing of the callers for long


class _QueueExporter:
    """Ships each prompt token's KV of each layer once, in order."""

    def __init__(self, deliver: Callable[[object], None], staging: HostStaging,
                 wire: Encoding, skip: int = 0) -> None:
        self.deliver = deliver
        self.staging, self.wire = staging, wire
        self.skip = skip  # the receiver holds the first ``skip`` tokens' KV already
        self.sent: dict[int, int] = {}  # layer -> tokens shipped

    def on_kv(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        skip = self.sent.get(layer, self.skip) - start  # rows shipped or not wanted
        if skip >= k.shape[0]:
            return
        skip = max(skip, 0)
        self.sent[layer] = start + k.shape[0]
        self.deliver(KVPiece(layer, start + skip,
                             *self.staging.stage(k[skip:], v[skip:], self.wire)))


class RequestStream:
    """One request in an ``AsyncEngine``: started as a prefill here (``add``) or as a
    KV import (``reserve_import``), then read through ``outputs``."""

    def __init__(self, engine: AsyncEngine, request_id: str) -> None:
        self.engine = engine
        self.request_id = request_id
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self.finished = False

    async def add(self, prompt: list[int], params: SamplingParams,
                  export_kv: Encoding | None = None, export_skip: int = 0) -> None:
        """Queue the request for prefill here; ``export_kv`` (the wire encoding, MODEL
        resolved) ships its prompt's KV from token ``export_skip`` on as ``KVPiece``s
        ahead of its outputs. Raises ValueError for a bad prompt."""
        e = self.engine
        exporter = (None if export_kv is None else
                    _QueueExporter(e._deliverer(self.request_id), e.staging, export_kv,
                                   export_skip))
        await e.call(e.engine.add_request, self.request_id, prompt, params, exporter)

    async def reserve_import(self, prompt: list[int], params: SamplingParams,
                             encoding: Encoding) -> KVImport:
        """Reserve blocks for the prompt's KV, to come from a peer in ``encoding``.
        Raises NoFreeBlocksError when the pool is short, ValueError for a bad prompt."""
        e = self.engine
        cached = await e.call(e.engine.begin_import, self.request_id, prompt, params, encoding)
        expected = e.engine.kv_header(encoding, len(prompt), cached)
        return KVImport(e, self.request_id, expected, params.logprobs is not None)

    async def outputs(self) -> AsyncIterator[RequestOutput | KVPiece]:
        """The request's items until its final output."""
        while not self.finished:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            self.finished = isinstance(item, RequestOutput) and item.finished
            yield item  # type: ignore[misc]


class AsyncEngine:
    def __init__(self, engine: LLMEngine,
                 on_death: Callable[[BaseException], Awaitable[None]] | None = None) -> None:
        self.engine = engine
        self.on_death = on_death
        self.staging = HostStaging(engine.device)
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, asyncio.Queue[object]] = {}
        self._calls: set[asyncio.Future[Any]] = set()  # pending ``call``s, failed on death
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.dead: BaseException | None = None
        self._callers_failed: asyncio.Event | None = None
        self._dying: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._callers_failed = asyncio.Event()
        self._thread.start()

    async def wait_dead(self) -> BaseException:
        """Return the engine's fatal error once it died and every caller was told."""
        assert self._callers_failed is not None, "start() first"
        await self._callers_failed.wait()
        assert self.dead is not None
        return self.dead

    def stop(self) -> None:
        self._stop.set()
        self._commands.put(lambda: None)
        self._thread.join(timeout=10)

    # --- calls from asyncio --------------------------------------------------------
    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the engine thread; return its result or raise its error."""
        assert self._loop is not None
        fut: asyncio.Future[T] = self._loop.create_future()
        self._calls.add(fut)
        fut.add_done_callback(self._calls.discard)

        def run() -> None:
            try:
                result = fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                self._loop.call_soon_threadsafe(_set_exception, fut, e)  # type: ignore[union-attr]
            else:
                self._loop.call_soon_threadsafe(_set_result, fut, result)  # type: ignore[union-attr]

        self.send(run)
        return await fut

    def send(self, fn: Callable[[], None]) -> None:
        """Queue ``fn`` for the engine thread without waiting (keeps order with ``call``)."""
        self._raise_if_dead()
        self._commands.put(fn)

    def _raise_if_dead(self) -> None:
        if self.dead is not None:
            raise EngineDeadError(_died_message(self.dead))

    @contextlib.asynccontextmanager
    async def request(self, request_id: str) -> AsyncIterator[RequestStream]:
        """One request's seat: its output queue, open while inside. Leaving it aborts
        the request (freeing its blocks) unless it finished."""
        self._raise_if_dead()
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already in use")
        stream = RequestStream(self, request_id)
        self._streams[request_id] = stream.queue
        try:
            yield stream
        finally:
            self._streams.pop(request_id, None)
            if not stream.finished:
                self.abort(request_id)

    @property
    def open_requests(self) -> list[str]:
        """Ids of the requests whose output queue is open."""
        return list(self._streams)

    def abort(self, request_id: str) -> None:
        """Abort the request in the engine (no-op if it is gone)."""
        if self.dead is None:
            self.engine.interrupt_requested = True  # free its blocks now, not after the step
            self.send(lambda: self._abort(request_id))

    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams,
                       export_kv: Encoding | None = None, export_skip: int = 0,
                       ) -> AsyncIterator[RequestOutput | KVPiece]:
        async with self.request(request_id) as stream:
            await stream.add(prompt, params, export_kv, export_skip)
            async for item in stream.outputs():
                yield item

    def _abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    # --- the engine thread ---------------------------------------------------------
    def _deliverer(self, request_id: str) -> Callable[[object], None]:
        loop = self._loop
        assert loop is not None

        def deliver(item: object) -> None:
            loop.call_soon_threadsafe(self._put, request_id, item)

        return deliver

    def _put(self, request_id: str, item: object) -> None:
        q = self._streams.get(request_id)
        if q is not None:
            q.put_nowait(item)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._run_commands(block=not self.engine.has_unfinished_requests)
                if self.engine.has_unfinished_requests:
                    for out in self.engine.step():
                        self._loop.call_soon_threadsafe(  # type: ignore[union-attr]
                            self._put, out.request_id, out)
        except BaseException as e:  # noqa: BLE001 - every waiter must hear of it
            log.exception(_died_message(e))  # the one error line, with the traceback
            self.dead = e
            loop = self._loop
            assert loop is not None
            with contextlib.suppress(RuntimeError):  # the loop closed first: nobody waits
                loop.call_soon_threadsafe(self._start_dying, e)

    def _run_commands(self, block: bool) -> None:
        self.engine.interrupt_requested = False
        try:
            cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            try:
                cmd()
            except Exception:  # a command for a request that is gone: that request only
                log.exception("engine command failed")
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _start_dying(self, e: BaseException) -> None:
        self._dying = asyncio.get_running_loop().create_task(self._died(e))  # kept: no GC

    async def _died(self, e: BaseException) -> None:
        """DEAD, on the event loop: ``on_death`` first, then every caller fails."""
        if self.on_death is not None:
            try:
                await asyncio.wait_for(self.on_death(e), DEATH_HOOK_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - the callers must still hear of the death
                log.exception("on_death hook failed")
        message = _died_message(e)
        for q in self._streams.values():
            q.put_nowait(EngineDeadError(message))
        for fut in list(self._calls):
            _set_exception(fut, EngineDeadError(message))
        assert self._callers_failed is not None
        self._callers_failed.set()


def _died_message(e: BaseException) -> str:
    return f"engine died: {type(e).__name__}: {e}"


def _set_result(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[Any], e: BaseException) -> None:
    if not fut.done():
        fut.set_exception(e)
