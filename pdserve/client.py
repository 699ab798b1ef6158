"""Python client for the router's public gRPC API (sync and asyncio)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from pdserve._proto.pdserve.v1 import api_pb2, api_pb2_grpc, common_pb2
from pdserve.grpc_server import OPTIONS


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


def build_request(prompt: str | list[int] | None = None, *,
                  messages: list[dict[str, str]] | None = None, request_id: str = "",
                  max_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                  top_k: int = -1, seed: int | None = None, stop: list[str] | None = None,
                  ignore_eos: bool = False, kv_encoding: int = 0) -> api_pb2.GenerateRequest:
    params = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                       top_p=top_p, top_k=top_k, stop=stop or [],
                                       ignore_eos=ignore_eos)
    if seed is not None:
        params.seed = seed
    req = api_pb2.GenerateRequest(request_id=request_id, params=params,
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
               "kv_transfer_s": t.kv_transfer_s, "kv_bytes": t.kv_bytes, "plan": t.plan} \
        if msg.HasField("timings") else {}
    return Delta(msg.request_id, list(msg.token_ids), msg.text, msg.finish_reason,
                 msg.usage.prompt_tokens, msg.usage.completion_tokens, timings)


class Client:
    def __init__(self, address: str = "127.0.0.1:50051", timeout: float | None = None) -> None:
        self.channel = grpc.insecure_channel(address, options=OPTIONS)
        self.stub = api_pb2_grpc.GenerationStub(self.channel)
        self.timeout = timeout

    def generate(self, prompt: str | list[int] | None = None, **kw: Any) -> Iterator[Delta]:
        for msg in self.stub.Generate(build_request(prompt, **kw), timeout=self.timeout):
            yield _delta(msg)

    def abort(self, request_id: str) -> bool:
        return self.stub.Abort(api_pb2.AbortRequest(request_id=request_id)).found

    def close(self) -> None:
        self.channel.close()


class AsyncClient:
    def __init__(self, address: str = "127.0.0.1:50051", timeout: float | None = None) -> None:
        self.channel = grpc.aio.insecure_channel(address, options=OPTIONS)
        self.stub = api_pb2_grpc.GenerationStub(self.channel)
        self.timeout = timeout

    async def generate(self, prompt: str | list[int] | None = None,
                       **kw: Any) -> AsyncIterator[Delta]:
        async for msg in self.stub.Generate(build_request(prompt, **kw), timeout=self.timeout):
            yield _delta(msg)

    async def abort(self, request_id: str) -> bool:
        return (await self.stub.Abort(api_pb2.AbortRequest(request_id=request_id))).found

    async def close(self) -> None:
        await self.channel.close()
