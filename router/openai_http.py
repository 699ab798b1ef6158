"""OpenAI-compatible HTTP API on the router (aiohttp): ``/v1/completions``,
``/v1/chat/completions`` (JSON or SSE), ``/v1/models``, ``/health``, ``/metrics``,
``/openapi.json`` (router/openapi.py). Every error is the OpenAI error envelope.

Each choice is one domain stream (``Generator.generate``); a request with n
choices runs n streams side by side. The first delta is awaited before any byte
is sent, so a request that fails validation or routing gets an HTTP error status
rather than a 200 stream. The handler is cancelled when the client goes away
(``handler_cancellation``), which closes the domain streams and so cancels the
call on the decode worker, which cancels the prefill call.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from router.auth import ApiKey
from router.generation import Generator
from router.openai_protocol import (
    BadRequest,
    ParsedRequest,
    chat_logprobs,
    completion_logprobs,
    parse_chat,
    parse_completion,
    parse_json,
    usage,
)
from router.openapi import openapi_document
from router.request import Delta, GenerationError

_STATUS = {"INVALID_ARGUMENT": 400, "ALREADY_EXISTS": 400, "NOT_FOUND": 404,
           "UNAUTHENTICATED": 401, "RESOURCE_EXHAUSTED": 503, "UNAVAILABLE": 503,
           "DEADLINE_EXCEEDED": 504}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BODY_BYTES = 64 * 1024 * 1024
log = logging.getLogger(__name__)


def error_from_domain(e: GenerationError) -> BadRequest:
    status = _STATUS.get(e.code, 500)
    code = {"NOT_FOUND": "model_not_found", "RESOURCE_EXHAUSTED": "overloaded",
            "UNAVAILABLE": "unavailable"}.get(e.code)
    if e.message.startswith("This model's maximum context length"):
        code = "context_length_exceeded"
    return BadRequest(e.message, e.param, status, code,
                      "invalid_request_error" if status < 500 else "server_error")


def _error_response(e: BadRequest) -> web.Response:
    return web.json_response(e.envelope(), status=e.status)


class OpenAIServer:
    def __init__(self, generator: Generator, registry: CollectorRegistry,
                 api_key: ApiKey | None, serving: Callable[[], bool]) -> None:
        self.generator = generator
        self.registry = registry
        self.api_key = api_key
        self.serving = serving
        self._runner: web.AppRunner | None = None
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_json_errors, self._auth],
                              client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/openapi.json", self._openapi)
        return app

    async def start(self, host: str, port: int, grace_s: float = 10.0,
                    ssl_context: ssl.SSLContext | None = None) -> None:
        """Serve on ``host:port``; HTTPS when ``ssl_context`` (pdserve/tls.py) is given."""
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None,
                                     shutdown_timeout=grace_s)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.api_key is not None and request.path.startswith("/v1/") and \
                not self.api_key.accepts(request.headers.get("Authorization")):
            return _error_response(BadRequest(
                "Missing or wrong API key: send 'Authorization: Bearer KEY'.", None, 401,
                "invalid_api_key"))
        return await handler(request)

    async def _health(self, request: web.Request) -> web.Response:
        ok = self.serving()
        return web.json_response({"status": "ok" if ok else "unavailable"},
                                 status=200 if ok else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _openapi(self, request: web.Request) -> web.Response:
        return web.json_response(openapi_document())

    async def _models(self, request: web.Request) -> web.Response:
        g = self.generator
        return web.json_response({"object": "list", "data": [
            {"id": g.model_id, "object": "model", "created": 0, "owned_by": "pdserve",
             "max_model_len": g.max_model_len}]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_completion, "cmpl")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_chat, "chatcmpl")

    async def _generate(self, request: web.Request, parse: Callable[[Any], ParsedRequest],
                        prefix: str) -> web.StreamResponse:
        try:
            # Parsing a large body (JSON, the Unicode walk) takes CPU: off the event loop.
            parsed = parse(await asyncio.to_thread(parse_json, await request.read()))
        except BadRequest as e:
            return _error_response(e)
        base = request.headers.get("X-Request-Id") or f"{prefix}-{uuid.uuid4().hex}"
        streams = [self.generator.generate(r) for r in parsed.requests(base)]
        answer = _Answer(parsed, base, self.generator.model_id, self.generator.tokenizer.token_text)
        async with aclosing(_merge(streams)) as merged:
            try:
                first = await merged.__anext__()
            except GenerationError as e:
                return _error_response(error_from_domain(e))
            if parsed.stream:
                return await self._stream(request, answer, first, merged)
            answer.add(*first)
            try:
                async for index, delta in merged:
                    answer.add(index, delta)
            except GenerationError as e:
                return _error_response(error_from_domain(e))
            return web.json_response(answer.whole())

    async def _stream(self, request: web.Request, answer: _Answer, first: tuple[int, Delta],
                      rest: AsyncIterator[tuple[int, Delta]]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)

        async def send(obj: Any) -> None:
            await resp.write(f"data: {json.dumps(obj)}\n\n".encode())

        for chunk in answer.opening():
            await send(chunk)
        await send(answer.chunk(*first))
        try:
            async for index, delta in rest:
                await send(answer.chunk(index, delta))
        except GenerationError as e:
            await send(error_from_domain(e).envelope())
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception:  # headers are sent: the error goes in the stream
            log.exception("internal error mid-stream")
            await send(BadRequest("internal server error", None, 500, "internal_error",
                                  "server_error").envelope())
        if answer.parsed.include_usage:
            await send(answer.usage_chunk())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error is the OpenAI envelope: aiohttp's own (404, 405, 413 body too large)
    and any exception a handler let through (a JSON 500, logged), never plain text."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        kind = "invalid_request_error" if e.status < 500 else "server_error"
        return _error_response(BadRequest(e.text or e.reason, None, e.status, None, kind))
    except ConnectionError:  # the client went away: nobody to answer
        raise
    except Exception:
        log.exception("internal error serving %s %s", request.method, request.path)
        return _error_response(BadRequest("internal server error", None, 500, "internal_error",
                                          "server_error"))


async def _merge(streams: list[AsyncGenerator[Delta]]) -> AsyncGenerator[tuple[int, Delta]]:
    """Deltas of every stream as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for d in only:
                yield 0, d
        return
    queue: asyncio.Queue[tuple[int, Delta | None, Exception | None]] = asyncio.Queue()

    async def pump(i: int, s: AsyncGenerator[Delta]) -> None:
        try:
            async with aclosing(s):
                async for d in s:
                    await queue.put((i, d, None))
        except Exception as e:
            await queue.put((i, None, e))
            return
        await queue.put((i, None, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item, err = await queue.get()
            if err is not None:
                raise err
            if item is None:
                remaining -= 1
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Answer:
    """Builds the OpenAI JSON of one request's choices, whole or chunk by chunk."""

    def __init__(self, parsed: ParsedRequest, rid: str, model: str,
                 token_text: Callable[[int], str]) -> None:
        self.parsed, self.rid, self.model, self.token_text = parsed, rid, model, token_text
        self.created = int(time.time())
        count = len(parsed.prompts) * parsed.n
        self.texts = [""] * count
        self.logprobs: list[list[Any]] = [[] for _ in range(count)]
        self.finish: list[str | None] = [None] * count
        self.prompt_tokens = [0] * count
        self.completion_tokens = [0] * count
        self.cached_tokens = [0] * count

    def add(self, index: int, d: Delta) -> None:
        self.texts[index] += d.text
        self.logprobs[index] += d.logprobs
        if d.finish_reason:
            self.finish[index] = d.finish_reason
            self.completion_tokens[index] = d.completion_tokens
            if index % self.parsed.n == 0:  # a prompt counts once, however many choices
                self.prompt_tokens[index] = d.prompt_tokens
                self.cached_tokens[index] = d.cached_tokens

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.rid, "object": kind, "created": self.created, "model": self.model}

    def _logprobs(self, index: int, lps: list[Any], offset: int) -> Any:
        if self.parsed.logprobs is None:
            return None
        if self.parsed.chat:
            return chat_logprobs(lps, self.token_text)
        return completion_logprobs(lps, self.token_text, offset)

    def usage(self) -> dict[str, Any]:
        return usage(sum(self.prompt_tokens), sum(self.completion_tokens),
                     sum(self.cached_tokens))

    def whole(self) -> dict[str, Any]:
        choices = []
        for i, text in enumerate(self.texts):
            c: dict[str, Any] = {"index": i, "logprobs": self._logprobs(i, self.logprobs[i], 0),
                                 "finish_reason": self.finish[i]}
            c.update({"message": {"role": "assistant", "content": text}} if self.parsed.chat
                     else {"text": text})
            choices.append(c)
        kind = "chat.completion" if self.parsed.chat else "text_completion"
        return {**self._head(kind), "choices": choices, "usage": self.usage()}

    def opening(self) -> list[dict[str, Any]]:
        """Chat streams open each choice with the assistant role."""
        if not self.parsed.chat:
            return []
        return [{**self._head("chat.completion.chunk"), "choices": [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None}]} for i in range(len(self.texts))]

    def chunk(self, index: int, d: Delta) -> dict[str, Any]:
        offset = len(self.texts[index])
        self.add(index, d)
        c: dict[str, Any] = {"index": index, "logprobs": self._logprobs(index, d.logprobs, offset),
                             "finish_reason": d.finish_reason or None}
        if self.parsed.chat:
            c["delta"] = {"content": d.text} if d.text or not d.finish_reason else {}
            return {**self._head("chat.completion.chunk"), "choices": [c]}
        c["text"] = d.text
        return {**self._head("text_completion"), "choices": [c]}

    def usage_chunk(self) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.parsed.chat else "text_completion"
        return {**self._head(kind), "choices": [], "usage": self.usage()}
