"""The chaos load: requests over gRPC (``pdserve.client``) and OpenAI HTTP (streamed
or not), some of them misbehaving clients, each under a hard deadline.

A request: PLANNED (``RequestSpec``) → SENT → one ``Outcome``:
``completed`` (finish reason seen; its tokens or text), ``error`` (a gRPC status or
an HTTP error with its body), ``disconnected`` (the client walked away on purpose,
what it had received so far), or ``hung`` (no end within the deadline; a gRPC
DEADLINE_EXCEEDED counts as hung too: the request ran out of time instead of
ending). Client misbehaviour (``client_fault``): ``disconnect_prefill`` (cancel
before the first token), ``disconnect_decode`` (cancel after the first tokens),
``slow_reader`` (pause between reads).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc

from pdserve.client import AsyncClient

CLIENT_FAULTS = ("disconnect_prefill", "disconnect_decode", "slow_reader")


@dataclass(frozen=True)
class Prompt:
    """One prompt of the pool, and how many tokens to generate for it (greedy,
    ignore_eos: the output is fully determined)."""

    token_ids: tuple[int, ...]
    max_tokens: int


@dataclass(frozen=True)
class RequestSpec:
    rid: str
    prompt_index: int
    transport: str  # grpc | http | http_stream
    client_fault: str | None = None
    hostile_mode: str | None = None  # in the request id: ...~h=MODE


@dataclass
class Outcome:
    spec: RequestSpec
    status: str = "hung"  # completed | error | disconnected | hung
    code: str = ""  # gRPC status name or HTTP status
    message: str = ""
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    t_start: float = 0.0
    t_end: float = 0.0
    clear: bool = False  # error: a status that says what went wrong


def prompt_pool(n: int, vocab_size: int, seed: int, max_prompt: int = 200,
                max_new: int = 24) -> list[Prompt]:
    """``n`` random prompts of token ids (ids 3+: no special tokens), half of them
    shorter than the router's local-prefill threshold would allow remote."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = rng.randint(4, 15) if i % 4 == 0 else rng.randint(16, max_prompt)
        out.append(Prompt(tuple(rng.randrange(3, vocab_size) for _ in range(length)),
                          rng.randint(4, max_new)))
    return out


class LoadGenerator:
    def __init__(self, router: str, http_url: str, prompts: Sequence[Prompt],
                 deadline_s: float) -> None:
        self.router, self.http_url = router, http_url
        self.prompts, self.deadline_s = prompts, deadline_s

    async def run(self, specs: Sequence[RequestSpec], rate: float,
                  concurrency: int) -> list[Outcome]:
        """Send ``specs`` at ``rate`` per second (0: all at once), at most
        ``concurrency`` in flight."""
        limit = asyncio.Semaphore(concurrency)
        client = AsyncClient(self.router, timeout=self.deadline_s)
        async with aiohttp.ClientSession() as session:
            async def one(i: int, spec: RequestSpec) -> Outcome:
                if rate:
                    await asyncio.sleep(i / rate)
                async with limit:
                    return await self.send(client, session, spec)
            try:
                return list(await asyncio.gather(*(one(i, s) for i, s in enumerate(specs))))
            finally:
                await client.close()

    async def send(self, client: AsyncClient, session: aiohttp.ClientSession,
                   spec: RequestSpec) -> Outcome:
        out = Outcome(spec, t_start=time.time())
        call = self._grpc(client, spec, out) if spec.transport == "grpc" else \
            self._http(session, spec, out)
        try:  # the hard deadline: the server's deadline plus a little
            await asyncio.wait_for(call, self.deadline_s + 5)
        except TimeoutError:
            out.status, out.message = "hung", "no end within the client's hard deadline"
        out.t_end = time.time()
        return out

    async def _grpc(self, client: AsyncClient, spec: RequestSpec, out: Outcome) -> None:
        p = self.prompts[spec.prompt_index]
        stream = client.generate(list(p.token_ids), request_id=spec.rid,
                                 max_tokens=p.max_tokens, ignore_eos=True)
        try:
            if spec.client_fault == "disconnect_prefill":
                first = asyncio.ensure_future(stream.__anext__())
                await asyncio.sleep(random.uniform(0.0, 0.05))
                if not first.done():
                    first.cancel()
                    out.status = "disconnected"
                    with contextlib.suppress(asyncio.CancelledError):
                        await first  # the generator is free to close only once it stopped
                    return
                d = first.result()
                out.token_ids += d.token_ids
                out.text += d.text
                if d.finish_reason:
                    out.status = "completed"
                    return
            async for d in stream:
                out.token_ids += d.token_ids
                out.text += d.text
                if d.finish_reason:
                    out.status = "completed"
                elif spec.client_fault == "disconnect_decode":
                    out.status = "disconnected"
                    return
                elif spec.client_fault == "slow_reader":
                    await asyncio.sleep(0.1)
        except grpc.aio.AioRpcError as e:
            _grpc_error(out, e)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]  # an async generator

    async def _http(self, session: aiohttp.ClientSession, spec: RequestSpec,
                    out: Outcome) -> None:
        p = self.prompts[spec.prompt_index]
        stream = spec.transport == "http_stream"
        body = {"prompt": list(p.token_ids), "max_tokens": p.max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": stream}
        timeout = aiohttp.ClientTimeout(total=self.deadline_s)
        try:
            async with session.post(f"{self.http_url}/v1/completions", json=body,
                                    headers={"X-Request-Id": spec.rid}, timeout=timeout) as r:
                if r.status != 200 or not stream:
                    _http_whole(out, r.status, await r.read())
                    return
                await self._sse(r, spec, out)
        except TimeoutError:
            out.status, out.message = "hung", "HTTP request ran out its deadline"
        except aiohttp.ClientError as e:
            out.status, out.code, out.message = "error", "connection", repr(e)

    async def _sse(self, r: aiohttp.ClientResponse, spec: RequestSpec, out: Outcome) -> None:
        events = 0
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                if out.status not in ("error", "completed"):
                    out.status, out.code = "error", "stream"
                    out.message = "stream ended without a finish reason or an error"
                return
            obj = json.loads(line[6:])
            if "error" in obj:
                _envelope(out, "200+error", obj)
                continue
            for choice in obj.get("choices", []):
                out.text += choice.get("text", "")
                if choice.get("finish_reason"):
                    out.status = "completed"
            events += 1
            if spec.client_fault == "disconnect_decode" and events >= 2:
                out.status = "disconnected"
                return
            if spec.client_fault == "slow_reader":
                await asyncio.sleep(0.1)
        out.status, out.code, out.message = "error", "stream", "stream cut before [DONE]"


def _grpc_error(out: Outcome, e: grpc.aio.AioRpcError) -> None:
    code = e.code()
    out.code, out.message = code.name, e.details() or ""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        out.status = "hung"
        return
    out.status = "error"
    out.clear = code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL) and \
        bool(out.message)


def _http_whole(out: Outcome, status: int, body: bytes) -> None:
    try:
        obj: Any = json.loads(body)
    except ValueError:
        out.status, out.code, out.message = "error", str(status), body[:200].decode(errors="replace")
        return
    if status == 200:
        out.text = obj["choices"][0]["text"]
        out.status = "completed"
        return
    _envelope(out, str(status), obj)


def _envelope(out: Outcome, code: str, obj: Any) -> None:
    """An OpenAI error envelope (a status, or an error event in the stream): clear
    when it carries a message."""
    out.status, out.code = "error", code
    err = obj.get("error") if isinstance(obj, dict) else None
    out.message = err.get("message", "") if isinstance(err, dict) else json.dumps(obj)[:200]
    if code == "504" or "deadline" in out.message.lower():
        out.status = "hung"
        return
    out.clear = isinstance(err, dict) and bool(out.message)
