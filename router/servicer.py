"""The public ``Generation`` service: prompt in, token stream out.

Per request: RECEIVED → VALIDATED (tokenized, params and context length checked,
else INVALID_ARGUMENT) → ROUTED (decode worker and plan chosen; a full decode
worker answers RESOURCE_EXHAUSTED and the next one is tried) → STREAMING (relay
of the decode worker's stream) → DONE. Client cancellation, ``Abort`` and the
deadline all cancel the decode worker's call, which cancels the prefill call.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc

from pdserve._proto.pdserve.v1 import api_pb2, api_pb2_grpc, worker_pb2, worker_pb2_grpc
from pdserve.grpc_server import OPTIONS
from pdserve.params_pb import params_from_pb, params_to_pb
from router.policy import Choice, LoadAwarePolicy
from router.tokenizer import RouterTokenizer

log = logging.getLogger(__name__)


class RouterServicer(api_pb2_grpc.GenerationServicer):
    def __init__(self, model_id: str, tokenizer: RouterTokenizer, policy: LoadAwarePolicy,
                 max_model_len: int) -> None:
        self.model_id = model_id
        self.tokenizer = tokenizer
        self.policy = policy
        self.max_model_len = max_model_len
        self._stubs: dict[str, worker_pb2_grpc.DecodeWorkerStub] = {}
        self._calls: dict[str, grpc.aio.UnaryStreamCall] = {}
        self._aborted: set[str] = set()

    def _stub(self, address: str) -> worker_pb2_grpc.DecodeWorkerStub:
        if address not in self._stubs:
            ch = grpc.aio.insecure_channel(address, options=OPTIONS)
            self._stubs[address] = worker_pb2_grpc.DecodeWorkerStub(ch)
        return self._stubs[address]

    async def ListModels(self, request, context) -> api_pb2.ListModelsResponse:  # noqa: N802
        return api_pb2.ListModelsResponse(
            models=[api_pb2.Model(id=self.model_id, max_model_len=self.max_model_len)])

    async def Abort(self, request, context) -> api_pb2.AbortResponse:  # noqa: N802
        call = self._calls.get(request.request_id)
        if call is None:
            return api_pb2.AbortResponse(found=False)
        self._aborted.add(request.request_id)
        call.cancel()
        return api_pb2.AbortResponse(found=True)

    async def Generate(self, request: api_pb2.GenerateRequest,  # noqa: N802
                       context: grpc.aio.ServicerContext) -> AsyncIterator[api_pb2.GenerateResponse]:
        t0 = time.perf_counter()
        rid = request.request_id or f"req-{uuid.uuid4().hex[:16]}"
        try:
            prompt, params = self._validate(request)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if rid in self._calls:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, f"request_id {rid!r} is in use")
        tried: set[str] = set()
        while True:
            choice = self.policy.choose(len(prompt), tried)
            if choice is None:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    "every decode worker is full; retry later" if self.policy.decode
                                    else "no decode worker is registered yet; retry later")
            assert choice is not None
            tried.add(choice.decode.address)
            relay = self._relay(rid, prompt, params, request, choice, context, t0)
            try:
                async for msg in relay:
                    yield msg
                return
            except _Retry:
                continue

    def _validate(self, request: api_pb2.GenerateRequest) -> tuple[list[int], object]:
        if request.model and request.model != self.model_id:
            raise ValueError(f"model {request.model!r} is not served here (serving "
                             f"{self.model_id!r})")
        kind = request.WhichOneof("prompt")
        if kind == "text":
            prompt = self.tokenizer.encode(request.text)
        elif kind == "chat":
            prompt = self.tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in request.chat.messages])
        elif kind == "token_ids":
            prompt = list(request.token_ids.ids)
        else:
            raise ValueError("prompt: give text, chat messages or token_ids")
        if not prompt:
            raise ValueError("prompt must contain at least 1 token, got an empty prompt")
        if len(prompt) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt)} tokens; it must be shorter than the "
                             f"context (max_model_len={self.max_model_len})")
        bad = next((t for t in prompt if t >= self.tokenizer.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt token ids must be in [0, {self.tokenizer.vocab_size}), "
                             f"got {bad}")
        return prompt, params_from_pb(request.params)

    async def _relay(self, rid: str, prompt: list[int], params, request, choice: Choice,  # type: ignore[no-untyped-def]
                     context: grpc.aio.ServicerContext, t0: float,
                     ) -> AsyncIterator[api_pb2.GenerateResponse]:
        dreq = worker_pb2.DecodeRequest(
            request_id=rid, prompt_token_ids=prompt, params=params_to_pb(params),
            plan=worker_pb2.PLAN_REMOTE if choice.prefill else worker_pb2.PLAN_LOCAL,
            prefill_address=choice.prefill.address if choice.prefill else "",
            encoding=request.kv_encoding)
        plan = "remote" if choice.prefill else "local"
        call = self._stub(choice.decode.address).Generate(dreq, timeout=context.time_remaining())
        self._calls[rid] = call
        LoadAwarePolicy.begin(choice, len(prompt))
        timings = api_pb2.Timings(plan=plan)
        n_out, sent = 0, False
        try:
            async for msg in call:
                if not sent:
                    LoadAwarePolicy.prefill_done(choice)
                    timings.ttft_s = time.perf_counter() - t0
                    timings.prefill_compute_s = msg.prefill_compute_s
                    timings.kv_transfer_s, timings.kv_bytes = msg.kv_transfer_s, msg.kv_bytes
                n_out += len(msg.token_ids)
                out = api_pb2.GenerateResponse(request_id=rid, token_ids=msg.token_ids,
                                               text=msg.text, logprobs=msg.logprobs,
                                               finish_reason=msg.finish_reason)
                if msg.finish_reason:
                    timings.e2e_s = time.perf_counter() - t0
                    out.usage.CopyFrom(api_pb2.Usage(prompt_tokens=len(prompt),
                                                     completion_tokens=n_out))
                    out.timings.CopyFrom(timings)
                sent = True
                yield out
        except asyncio.CancelledError:
            if rid not in self._aborted:
                raise
            yield api_pb2.GenerateResponse(request_id=rid, finish_reason="abort",
                                           usage=api_pb2.Usage(prompt_tokens=len(prompt),
                                                               completion_tokens=n_out))
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and not sent:
                raise _Retry() from e
            if e.code() == grpc.StatusCode.CANCELLED and rid in self._aborted:
                yield api_pb2.GenerateResponse(request_id=rid, finish_reason="abort")
                return
            await context.abort(e.code(), f"decode worker {choice.decode.address}: {e.details()}")
        finally:
            LoadAwarePolicy.end(choice, len(prompt))
            self._calls.pop(rid, None)
            self._aborted.discard(rid)
            call.cancel()


class _Retry(Exception):
    """The decode worker was full before sending anything: try the next one."""
