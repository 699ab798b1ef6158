"""Where a decode worker gets a prompt's KV: the ``KVSource`` seam.

A source turns a ``KVRequest`` sent to a prefill worker address into the stream's
domain events (header, chunks, first token). A failure of the peer itself comes
out as ``PeerFailed`` carrying its status (UNAVAILABLE: unreachable or died;
RESOURCE_EXHAUSTED: full, or a message over the size limit; ...), which the import
may answer by asking the next prefill worker or prefilling locally
(pdserve/engine/kv_import.py::PEER_FAULTS); what the events say is checked by the
import, not here, and so is a peer that goes silent (``kv_idle_timeout_s``), which
``is_alive`` (its ``grpc.health.v1`` probe) tells from one that is only busy.

Sources, chosen by ``WorkerConfig.kv_source``:

- ``grpc``: the real one, ``PrefillWorker.Prefill`` over gRPC (one channel per
  address, reused).
- ``loopback``: an in-process fake that prefills on this worker's own engine and
  hands its exported KV over without a network (decode_worker/fake_kv_sources.py;
  tests also script hostile streams there).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve._proto.pdserve.v1 import worker_pb2
from pdserve.config import TLSConfig
from pdserve.convert import kv_request_to_pb, parse_prefill_response
from pdserve.engine.async_engine import AsyncEngine
from pdserve.grpc_server import OPTIONS
from pdserve.kvwire.stream import KVEvent, KVRequest, PeerFailed
from pdserve.tls import aio_channel

PREFILL_METHOD = "/pdserve.v1.PrefillWorker/Prefill"


class KVSource(Protocol):
    def prefill(self, address: str, request: KVRequest,
                timeout: float) -> AsyncGenerator[KVEvent, None]:
        """The KV stream of ``request`` from the prefill worker at ``address``; closing
        the generator cancels the call."""
        ...

    async def is_alive(self, address: str, timeout: float) -> bool:
        """Whether the prefill worker at ``address`` answers SERVING within ``timeout``."""
        ...

    async def close(self) -> None: ...


class GrpcKVSource:
    """The Prefill stream's responses come up as bytes: ``parse_prefill_response``
    reads the KV chunks in them without copying (the generated stub would parse each
    through protobuf objects)."""

    def __init__(self, tls: TLSConfig | None = None) -> None:
        self._tls = tls  # mTLS to prefill workers when set
        self._calls: dict[str, grpc.aio.UnaryStreamMultiCallable] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def prefill(self, address: str, request: KVRequest,
                      timeout: float) -> AsyncGenerator[KVEvent, None]:
        call = self._call(address)(kv_request_to_pb(request), timeout=timeout)
        try:
            async for data in call:
                yield parse_prefill_response(data)
        except grpc.aio.AioRpcError as e:
            raise PeerFailed(e.code().name, e.details() or "") from None  # the caller names it
        finally:
            call.cancel()

    async def is_alive(self, address: str, timeout: float) -> bool:
        stub = health_pb2_grpc.HealthStub(self._channel(address))
        try:
            r = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False  # no answer in time, refused, or no health service
        return bool(r.status == health_pb2.HealthCheckResponse.SERVING)

    def _call(self, address: str) -> grpc.aio.UnaryStreamMultiCallable:
        if address not in self._calls:
            self._calls[address] = self._channel(address).unary_stream(
                PREFILL_METHOD, request_serializer=worker_pb2.PrefillRequest.SerializeToString)
        return self._calls[address]

    def _channel(self, address: str) -> grpc.aio.Channel:
        """The one channel per address (Prefill calls and health probes share it)."""
        if address not in self._channels:
            self._channels[address] = aio_channel(address, self._tls, OPTIONS)
        return self._channels[address]

    async def close(self) -> None:
        for c in self._channels.values():
            await c.close()


def make_kv_source(name: str, engine: AsyncEngine, tls: TLSConfig | None = None) -> KVSource:
    """The source called ``name`` (``WorkerConfig.kv_source``) for a worker's engine;
    ``tls``: the worker's own, for mTLS to prefill workers."""
    if name == "grpc":
        return GrpcKVSource(tls)
    if name == "loopback":
        from decode_worker.fake_kv_sources import LoopbackKVSource

        return LoopbackKVSource(engine)
    raise ValueError(f"kv_source must be grpc or loopback, got {name!r}")
