"""In-process fake servers for `pdserve bench --target` tests: a Generation servicer
(gRPC, port 0) and an OpenAI-style SSE completions server (aiohttp, port 0). Both
stream ``max_tokens`` tokens, the first after ``first_delay`` s, the rest
``gap`` s apart, ``per_chunk`` tokens per message, and remember what they got."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

from pdserve._proto.pdserve.v1 import api_pb2, api_pb2_grpc


def _chunks(max_tokens: int, per_chunk: int) -> list[list[int]]:
    ids = list(range(100, 100 + max_tokens))
    return [ids[i:i + per_chunk] for i in range(0, max_tokens, per_chunk)]


class FakeGeneration(api_pb2_grpc.GenerationServicer):
    def __init__(self, first_delay: float = 0.0, gap: float = 0.0, per_chunk: int = 1) -> None:
        self.first_delay, self.gap, self.per_chunk = first_delay, gap, per_chunk
        self.requests: list[api_pb2.GenerateRequest] = []

    def Generate(self, request: api_pb2.GenerateRequest,  # noqa: N802
                 context: grpc.ServicerContext) -> Iterator[api_pb2.GenerateResponse]:
        self.requests.append(request)
        chunks = _chunks(request.params.max_tokens, self.per_chunk)
        time.sleep(self.first_delay)
        for i, ids in enumerate(chunks):
            if i:
                time.sleep(self.gap)
            msg = api_pb2.GenerateResponse(request_id=request.request_id, token_ids=ids)
            if i == len(chunks) - 1:
                msg.finish_reason = "length"
                msg.usage.CopyFrom(api_pb2.Usage(prompt_tokens=len(request.token_ids.ids),
                                                 completion_tokens=request.params.max_tokens))
            yield msg


def start_fake_grpc(servicer: FakeGeneration) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
    api_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


class FakeOpenAI:
    """POST /v1/completions (SSE, usage chunk, [DONE]) and GET /v1/models, served from
    its own thread and event loop."""

    def __init__(self, first_delay: float = 0.0, gap: float = 0.0, per_chunk: int = 1) -> None:
        self.first_delay, self.gap, self.per_chunk = first_delay, gap, per_chunk
        self.payloads: list[dict[str, Any]] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> FakeOpenAI:
        self._thread.start()
        assert self._ready.wait(10), "fake OpenAI server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        runner = web.AppRunner(app)
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    async def _models(self, request: Any) -> Any:
        from aiohttp import web

        return web.json_response({"object": "list", "data": [{"id": "fake-model"}]})

    async def _completions(self, request: Any) -> Any:
        from aiohttp import web

        body = await request.json()
        self.payloads.append(body)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(obj: Any) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj)
            await resp.write(f"data: {data}\n\n".encode())

        await resp.write(b": ping\n\n")  # an SSE comment: must not count as a token
        chunks = _chunks(body["max_tokens"], self.per_chunk)
        await asyncio.sleep(self.first_delay)
        for i, ids in enumerate(chunks):
            if i:
                await asyncio.sleep(self.gap)
            last = i == len(chunks) - 1
            await send({"id": "cmpl-1", "object": "text_completion", "choices": [
                {"index": 0, "text": " t" * len(ids),
                 "finish_reason": "length" if last else None}]})
        await send({"id": "cmpl-1", "choices": [], "usage": {
            "prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"]}})
        await send("[DONE]")
        await resp.write_eof()
        return resp
