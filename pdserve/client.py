"""Python client for the router's public gRPC API (sync and asyncio): Generate
(streamed ``Delta``s), Abort by request id, ListModels and the health check.

``tls`` (a ``TLSConfig``): verify the router against ``tls.ca`` and present
``tls.cert``/``tls.key`` when given (a router started with
``--tls-require-client-cert`` refuses clients without one); None = plaintext."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve._proto.pdserve.v1 import api_pb2, api_pb2_grpc, common_pb2
from pdserve.config import TLSConfig
from pdserve.grpc_server import OPTIONS
from pdserve.tls import aio_channel, channel


@dataclass
class Delta:
    """One streamed piece of an answer; the last one has ``finish_reason`` set."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timings: dict[str, Any] = field(default_factory=dict)
    cached_tokens: int = 0  # of prompt_tokens, whose KV came from a prefix cache


def build_request(prompt: str | list[int] | None = None, *,
                  messages: list[dict[str, str]] | None = None, request_id: str = "",
                  max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                  top_k: int = -1, seed: int | None = None, stop: list[str] | None = None,
                  ignore_eos: bool = False, min_tokens: int = 0, logprobs: int | None = None,
                  model: str = "", kv_encoding: int = 0) -> api_pb2.GenerateRequest:
    params = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                       top_p=top_p, top_k=top_k, stop=stop or [],
                                       ignore_eos=ignore_eos, min_tokens=min_tokens)
    if seed is not None:
        params.seed = seed
    if logprobs is not None:
        params.logprobs = logprobs
    req = api_pb2.GenerateRequest(request_id=request_id, model=model, params=params,
                                  kv_encoding=kv_encoding)  # type: ignore[arg-type]
    if messages is not None:
        req.chat.messages.extend(api_pb2.ChatMessage(**m) for m in messages)
    elif isinstance(prompt, str):
        req.text = prompt
    elif prompt is not None:
        req.token_ids.ids.extend(prompt)
    return req


def _delta(msg: api_pb2.GenerateResponse) -> Delta:
    t = msg.timings
    timings = {"ttft_s": t.ttft_s, "e2e_s": t.e2e_s, "prefill_compute_s": t.prefill_compute_s,
               "kv_transfer_s": t.kv_transfer_s, "kv_bytes": t.kv_bytes, "plan": t.plan,
               "predicted_ttft_s": t.predicted_ttft_s} \
        if msg.HasField("timings") else {}
    return Delta(msg.request_id, list(msg.token_ids), msg.text, msg.finish_reason,
                 msg.usage.prompt_tokens, msg.usage.completion_tokens, timings,
                 msg.usage.cached_tokens)


@dataclass
class ModelInfo:
    id: str
    max_model_len: int


def _metadata(api_key: str | None) -> list[tuple[str, str]] | None:
    return [("authorization", f"Bearer {api_key}")] if api_key else None


def _serving(status: int) -> bool:
    return status == health_pb2.HealthCheckResponse.SERVING


class Client:
    """Blocking client. ``api_key`` (default ``$PDSERVE_API_KEY``) is sent as
    ``authorization: Bearer KEY`` metadata; ``timeout`` is each call's deadline."""

    def __init__(self, address: str = "127.0.0.1:50051", timeout: float | None = None,
                 api_key: str | None = None, tls: TLSConfig | None = None) -> None:
        self.channel = channel(address, tls, OPTIONS)
        self.stub = api_pb2_grpc.GenerationStub(self.channel)
        self.timeout = timeout
        self.metadata = _metadata(api_key if api_key is not None else _env_key())

    def generate(self, prompt: str | list[int] | None = None, **kw: Any) -> Iterator[Delta]:
        for msg in self.stub.Generate(build_request(prompt, **kw), timeout=self.timeout,
                                      metadata=self.metadata):
            yield _delta(msg)

    def abort(self, request_id: str) -> bool:
        return bool(self.stub.Abort(api_pb2.AbortRequest(request_id=request_id),
                                    timeout=self.timeout, metadata=self.metadata).found)

    def list_models(self) -> list[ModelInfo]:
        r = self.stub.ListModels(api_pb2.ListModelsRequest(), timeout=self.timeout,
                                 metadata=self.metadata)
        return [ModelInfo(m.id, m.max_model_len) for m in r.models]

    def is_serving(self, service: str = "") -> bool:
        """grpc.health.v1 Check (open: needs no key)."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout or 5)
        return _serving(r.status)

    def close(self) -> None:
        self.channel.close()


class AsyncClient:
    """asyncio twin of ``Client``."""

    def __init__(self, address: str = "127.0.0.1:50051", timeout: float | None = None,
                 api_key: str | None = None, tls: TLSConfig | None = None) -> None:
        self.channel = aio_channel(address, tls, OPTIONS)
        self.stub = api_pb2_grpc.GenerationStub(self.channel)
        self.timeout = timeout
        self.metadata = _metadata(api_key if api_key is not None else _env_key())

    async def generate(self, prompt: str | list[int] | None = None,
                       **kw: Any) -> AsyncIterator[Delta]:
        async for msg in self.stub.Generate(build_request(prompt, **kw), timeout=self.timeout,
                                            metadata=self.metadata):
            yield _delta(msg)

    async def abort(self, request_id: str) -> bool:
        r = await self.stub.Abort(api_pb2.AbortRequest(request_id=request_id),
                                  timeout=self.timeout, metadata=self.metadata)
        return bool(r.found)

    async def list_models(self) -> list[ModelInfo]:
        r = await self.stub.ListModels(api_pb2.ListModelsRequest(), timeout=self.timeout,
                                       metadata=self.metadata)
        return [ModelInfo(m.id, m.max_model_len) for m in r.models]

    async def is_serving(self, service: str = "") -> bool:
        stub = health_pb2_grpc.HealthStub(self.channel)
        r = await stub.Check(health_pb2.HealthCheckRequest(service=service),
                             timeout=self.timeout or 5)
        return _serving(r.status)

    async def close(self) -> None:
        await self.channel.close()


def _env_key() -> str | None:
    return os.environ.get("PDSERVE_API_KEY") or None
