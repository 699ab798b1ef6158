"""Issue 15, item 1 and 6, at the router's front doors (fake decode backend, real
aiohttp and gRPC servers on port 0).

Finding 1: stop_token_ids outside the vocabulary are INVALID_ARGUMENT at the router.
Finding 3: every hostile HTTP body is a 400 in the OpenAI envelope naming the field,
aiohttp's own errors (404, 413) are JSON too, an internal error is a JSON 500; an
unknown gRPC kv_encoding is INVALID_ARGUMENT.
Finding 4: the prompt size is checked before tokenizing, and tokenizing runs off the
event loop (/health answers while a slow tokenizer works).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from aiohttp.test_utils import TestClient, TestServer

from pdserve._proto.pdserve.v1 import api_pb2, api_pb2_grpc, common_pb2
from router.openai_http import OpenAIServer
from router.servicer import RouterServicer
from tests.router_fakes import (
    VOCAB,
    FakeDecodeBackend,
    FakeDecodeWorker,
    FakeTokenizer,
    RecordingPolicy,
    make_generator,
)

MAX_MODEL_LEN = 64
Scenario = Callable[[TestClient, FakeDecodeBackend], Awaitable[None]]


def _serve(scenario: Scenario, tokenizer: Any = None, max_prompt_chars: int | None = None,
           ) -> None:
    async def main() -> None:
        backend = FakeDecodeBackend([FakeDecodeWorker("d1")])
        gen = make_generator(backend, RecordingPolicy(["d1"]), max_model_len=MAX_MODEL_LEN)
        gen.tokenizer = tokenizer or gen.tokenizer
        gen.max_prompt_chars = max_prompt_chars
        server = OpenAIServer(gen, gen.metrics.registry, None, lambda: True)
        async with TestClient(TestServer(server.app())) as client:
            await scenario(client, backend)
        assert gen.running == 0 and backend.open_streams == 0

    asyncio.run(main())


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"prompt": "hi", "max_tokens": 2}
NAN_BODY = b'{"prompt": "hi", "temperature": NaN}'


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", NAN_BODY, "temperature"),
    ("/v1/completions", b'{"prompt": "hi", "top_p": NaN}', "top_p"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], '
     b'"temperature": Infinity}', "temperature"),
    ("/v1/completions", {**COMPLETION, "top_k": 2**31}, "top_k"),
    ("/v1/completions", {**COMPLETION, "top_k": 2**70}, "top_k"),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 20}, "min_tokens"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 2**40}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "seed": 2**64}, "seed"),
    ("/v1/completions", {**COMPLETION, "stop": ["x"] * 65}, "stop"),
    ("/v1/completions", {**COMPLETION, "stop": "x" * 1025}, "stop"),
    ("/v1/completions", {**COMPLETION, "prompt": ["a"] * 65}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": "x" * 2000}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": list(range(200))}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": [VOCAB + 1]}, "prompt"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]},
     "messages"),
    ("/v1/completions", b'{"prompt": "\\ud800"}', "prompt"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff x"}]}',
     "messages"),
    ("/v1/completions", b'{"prompt": "hi", "user": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     None),
    ("/v1/completions", b'{"prompt": "hi", "user": ' + b"[" * 40 + b"]" * 40 + b"}", "user"),
    ("/v1/completions", b'{"prompt": "hi", "n": 1' + b"0" * 5000 + b"}", None),
    ("/v1/completions", b"[]", None),
])
def test_finding3_hostile_bodies_are_400_envelopes_naming_the_field(
        path: str, body: Any, param: str | None) -> None:
    async def scenario(client: TestClient, backend: FakeDecodeBackend) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        resp = await client.post(path, data=data, headers={"Content-Type": "application/json"})
        text = await resp.text()
        assert resp.status == 400, text
        err = json.loads(text)["error"]
        assert err["type"] == "invalid_request_error" and err["message"]
        assert err["param"] == param, err
        assert set(err) == {"message", "type", "param", "code"}
        # the server keeps serving
        ok = await client.post("/v1/completions", json=COMPLETION)
        assert ok.status == 200, await ok.text()

    _serve(scenario, max_prompt_chars=1000)


def test_finding3_aiohttp_errors_and_internal_errors_are_json() -> None:
    async def scenario(client: TestClient, backend: FakeDecodeBackend) -> None:
        for method, path, status in (("GET", "/nope", 404), ("GET", "/v1/completions", 405)):
            resp = await client.request(method, path)
            assert resp.status == status
            assert (await resp.json())["error"]["type"] == "invalid_request_error"
        too_big = b'{"prompt": "' + b"x" * (64 * 1024 * 1024) + b'"}'
        resp = await client.post("/v1/completions", data=too_big)
        assert resp.status == 413 and "error" in await resp.json()

        def boom(*args: Any) -> Any:
            raise RuntimeError("a bug")
        backend.generate = boom  # type: ignore[method-assign,assignment]
        resp = await client.post("/v1/completions", json=COMPLETION)
        assert resp.status == 500
        err = (await resp.json())["error"]
        assert err["type"] == "server_error" and "a bug" not in err["message"]

    _serve(scenario)


class _SlowTokenizer(FakeTokenizer):
    """Holds the tokenizing thread until released: a 10 MB prompt, on a budget."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.t_started = 0.0

    def encode(self, text: str) -> list[int]:
        self.t_started = time.perf_counter()
        self.started.set()
        self.release.wait(10)
        return super().encode(text[:8])


def test_finding4_health_answers_while_a_prompt_is_tokenized() -> None:
    tok = _SlowTokenizer()

    async def scenario(client: TestClient, backend: FakeDecodeBackend) -> None:
        pending = asyncio.create_task(client.post("/v1/completions", json=COMPLETION))
        assert await asyncio.to_thread(tok.started.wait, 30)
        health = await client.get("/health")
        # On the event loop, tokenizing would hold /health until the tokenizer gave up (10 s).
        assert health.status == 200 and time.perf_counter() - tok.t_started < 5.0
        tok.release.set()
        assert (await pending).status == 200

    try:
        _serve(scenario, tokenizer=tok)
    finally:
        tok.release.set()


def test_finding4_oversized_prompt_is_refused_before_tokenizing() -> None:
    tok = _SlowTokenizer()
    tok.release.set()

    async def scenario(client: TestClient, backend: FakeDecodeBackend) -> None:
        huge = {"prompt": "x" * (10 * 1024 * 1024)}
        t0 = time.perf_counter()
        resp = await client.post("/v1/completions", json=huge)
        err = (await resp.json())["error"]
        assert resp.status == 400 and err["param"] == "prompt" and "too long" in err["message"]
        assert not tok.started.is_set()  # the tokenizer never saw it
        assert time.perf_counter() - t0 < 10

    _serve(scenario, tokenizer=tok)  # default limit: 16 characters per token of context


async def _grpc_router(backend: FakeDecodeBackend) -> AsyncIterator[api_pb2_grpc.GenerationStub]:
    gen = make_generator(backend, RecordingPolicy(["d1"]), max_model_len=MAX_MODEL_LEN)
    server = grpc.aio.server()
    api_pb2_grpc.add_GenerationServicer_to_server(RouterServicer(gen), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield api_pb2_grpc.GenerationStub(ch)
    finally:
        await server.stop(0)


@pytest.mark.parametrize(("field", "request_kwargs"), [
    ("kv_encoding", {"kv_encoding": 99}),
    ("stop_token_ids", {"params": common_pb2.SamplingParams(
        max_tokens=2, min_tokens=1, stop_token_ids=[VOCAB])}),
    ("top_k", {"params": common_pb2.SamplingParams(max_tokens=2, top_k=-5)}),
    ("temperature", {"params": common_pb2.SamplingParams(max_tokens=2,
                                                         temperature=float("inf"))}),
])
def test_finding1_and_3_grpc_generate_invalid_argument_names_the_field(
        field: str, request_kwargs: dict[str, Any]) -> None:
    async def main() -> None:
        backend = FakeDecodeBackend([FakeDecodeWorker("d1")])
        async for stub in _grpc_router(backend):
            req = api_pb2.GenerateRequest(text="hi", **request_kwargs)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                _ = [m async for m in stub.Generate(req, timeout=10)]
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
            assert field in (e.value.details() or "")
            assert not backend.workers["d1"].jobs  # nothing reached a decode worker
            ok = api_pb2.GenerateRequest(text="hi", params=common_pb2.SamplingParams(max_tokens=2))
            assert len([m async for m in stub.Generate(ok, timeout=10)]) == 2

    asyncio.run(main())
