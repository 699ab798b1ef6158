"""The two kinds of server `pdserve bench` drives, behind one interface.

A backend turns one request (token-id prompt, greedy, ``ignore_eos``, a fixed
number of output tokens) into a stream of ``Chunk``s; ``measure`` times that
stream the same way for every backend, so pdserve's router and any
OpenAI-compatible server (``vllm serve``) are measured by the same code.

- ``GrpcBackend`` (``grpc://host:port``): the router's public gRPC API through
  ``pdserve.client.AsyncClient``; a content chunk is a message with token ids.
- ``OpenAIBackend`` (``http://host:port/v1``): streaming ``POST /completions``
  with ``prompt`` as a list of token ids and ``stream_options.include_usage``;
  as in ``vllm bench serve``, a content chunk is an SSE event with non-empty
  ``choices`` and the output token count comes from the final ``usage``.

Lifecycle of a backend: CREATED → ``start()`` (connections open, model named)
→ OPEN (any number of concurrent ``stream`` calls) → ``close()`` → CLOSED.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from bench.stats import RequestRecord

REQUEST_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class RequestSpec:
    rid: str
    cls: str
    prompt: list[int]
    max_tokens: int


@dataclass(frozen=True)
class Chunk:
    """One streamed message: ``content`` when it carries output (it counts for TTFT and
    ITL); ``tokens`` when the backend knows how many; ``usage`` on the final count."""

    content: bool
    tokens: int | None = None
    usage: int | None = None
    error: str = ""
    plan: str = ""
    """pdserve's gRPC API, on the final chunk: the router's plan and its prediction,
    and the KV bytes that crossed the link for it."""
    predicted_ttft_s: float = 0.0
    kv_bytes: int = 0


class Backend(Protocol):
    target: str

    async def start(self) -> None: ...

    def stream(self, spec: RequestSpec) -> AsyncIterator[Chunk]: ...

    async def close(self) -> None: ...


class GrpcBackend:
    def __init__(self, target: str) -> None:
        self.target = target
        self.address = target.removeprefix("grpc://")
        self._client = None

    async def start(self) -> None:
        from pdserve.client import AsyncClient

        self._client = AsyncClient(self.address, timeout=REQUEST_TIMEOUT_S)  # type: ignore[assignment]

    async def stream(self, spec: RequestSpec) -> AsyncIterator[Chunk]:
        assert self._client is not None, "start() first"
        async for d in self._client.generate(spec.prompt, request_id=spec.rid,  # type: ignore[attr-defined]
                                             max_tokens=spec.max_tokens, temperature=0.0,
                                             ignore_eos=True):
            if d.token_ids:
                yield Chunk(True, tokens=len(d.token_ids))
            if d.finish_reason:
                t = d.timings or {}
                yield Chunk(False, usage=d.completion_tokens,
                            error="aborted" if d.finish_reason == "abort" else "",
                            plan=t.get("plan", ""),
                            predicted_ttft_s=t.get("predicted_ttft_s", 0.0),
                            kv_bytes=t.get("kv_bytes", 0))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


class OpenAIBackend:
    def __init__(self, target: str, model: str | None = None, api_key: str | None = None) -> None:
        self.target = target
        self.base = target.rstrip("/")
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session = None

    async def start(self) -> None:
        import aiohttp

        # No connection limit: an open-loop run must never queue in the client.
        self._session = aiohttp.ClientSession(  # type: ignore[assignment]
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S), headers=self.headers)
        if self.model is None:
            async with self._session.get(f"{self.base}/models") as r:  # type: ignore[attr-defined]
                r.raise_for_status()
                self.model = (await r.json())["data"][0]["id"]

    async def stream(self, spec: RequestSpec) -> AsyncIterator[Chunk]:
        assert self._session is not None, "start() first"
        payload = {"model": self.model, "prompt": spec.prompt, "max_tokens": spec.max_tokens,
                   "temperature": 0.0, "ignore_eos": True, "stream": True,
                   "stream_options": {"include_usage": True}}
        async with self._session.post(f"{self.base}/completions", json=payload) as r:  # type: ignore[attr-defined]
            if r.status != 200:
                yield Chunk(False, error=f"HTTP {r.status}: {(await r.text())[:200]}")
                return
            async for raw in r.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators and SSE comments (pings)
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                event = json.loads(data)
                if event.get("choices"):
                    yield Chunk(True)
                elif event.get("usage"):
                    yield Chunk(False, usage=event["usage"].get("completion_tokens"))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def make_backend(target: str, model: str | None = None, api_key: str | None = None) -> Backend:
    if target.startswith("grpc://"):
        return GrpcBackend(target)
    if target.startswith(("http://", "https://")):
        return OpenAIBackend(target, model, api_key)
    raise ValueError(f"--target must start with grpc:// (pdserve router) or http(s):// "
                     f"(an OpenAI-compatible base URL such as http://127.0.0.1:8000/v1), "
                     f"got {target!r}")


async def measure(backend: Backend, spec: RequestSpec, run_t0: float) -> RequestRecord:
    """Send one request and time its stream; never raises (failures are recorded)."""
    rec = RequestRecord(spec.rid, spec.cls, len(spec.prompt), spec.max_tokens)
    st = time.perf_counter()
    rec.start_s = st - run_t0
    counted, usage, last = 0, None, st
    try:
        async for ch in backend.stream(spec):
            now = time.perf_counter()
            if ch.error:
                rec.error = ch.error
            if ch.usage is not None:
                usage = ch.usage
            if ch.plan:
                rec.plan, rec.predicted_ttft_s = ch.plan, ch.predicted_ttft_s
                rec.kv_bytes = ch.kv_bytes
            if ch.content:
                if not rec.chunk_times_s:
                    rec.ttft_s = now - st
                rec.chunk_times_s.append(now - run_t0)
                counted += ch.tokens if ch.tokens is not None else 1
                last = now
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
        rec.error = f"{type(e).__name__}: {e}"
    rec.e2e_s = last - st
    rec.output_tokens = usage if usage is not None else counted
    rec.success = bool(rec.chunk_times_s) and not rec.error
    if not rec.chunk_times_s and not rec.error:
        rec.error = "no content chunk received"
    return rec
