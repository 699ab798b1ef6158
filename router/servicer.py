"""The public gRPC ``Generation`` service: the one place where ``api_pb2`` meets
the router's domain (``router.generation``), which does the work.

``GenerationError`` codes are gRPC status names and become the call's status;
client cancellation and the deadline cancel the domain stream, which cancels the
decode worker's call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc

from pdserve._proto.pdserve.v1 import api_pb2, api_pb2_grpc, common_pb2
from pdserve.params_pb import logprob_to_pb, params_from_pb
from router.generation import Generator
from router.request import Delta, GenerateRequest, GenerationError


class RouterServicer(api_pb2_grpc.GenerationServicer):
    def __init__(self, generator: Generator) -> None:
        self.generator = generator

    async def ListModels(self, request, context) -> api_pb2.ListModelsResponse:  # noqa: N802
        g = self.generator
        return api_pb2.ListModelsResponse(
            models=[api_pb2.Model(id=g.model_id, max_model_len=g.max_model_len)])

    async def Abort(self, request, context) -> api_pb2.AbortResponse:  # noqa: N802
        return api_pb2.AbortResponse(found=self.generator.abort(request.request_id))

    async def Generate(self, request: api_pb2.GenerateRequest,  # noqa: N802
                       context: grpc.aio.ServicerContext) -> AsyncIterator[api_pb2.GenerateResponse]:
        try:
            req = _request_from_pb(request, context.time_remaining())
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            # aclosing: the stream ends (and its call is cancelled) when this call ends.
            async with aclosing(self.generator.generate(req)) as deltas:
                async for delta in deltas:
                    yield _delta_to_pb(delta)
        except GenerationError as e:
            await context.abort(getattr(grpc.StatusCode, e.code, grpc.StatusCode.UNKNOWN),
                                e.message)


def _request_from_pb(r: api_pb2.GenerateRequest, timeout: float | None) -> GenerateRequest:
    """Raises ValueError naming the field for out-of-range values."""
    kind = r.WhichOneof("prompt")
    if r.kv_encoding not in common_pb2.KVEncoding.values():
        raise ValueError(f"kv_encoding must be a KVEncoding "
                         f"{sorted(common_pb2.KVEncoding.values())}, got {r.kv_encoding}")
    return GenerateRequest(
        params=params_from_pb(r.params), request_id=r.request_id, model=r.model,
        text=r.text if kind == "text" else None,
        messages=[{"role": m.role, "content": m.content} for m in r.chat.messages]
        if kind == "chat" else None,
        token_ids=list(r.token_ids.ids) if kind == "token_ids" else None,
        kv_encoding=r.kv_encoding, timeout=timeout)


def _delta_to_pb(d: Delta) -> api_pb2.GenerateResponse:
    out = api_pb2.GenerateResponse(request_id=d.request_id, token_ids=d.token_ids, text=d.text,
                                   logprobs=[logprob_to_pb(lp) for lp in d.logprobs],
                                   finish_reason=d.finish_reason)
    if d.finish_reason:
        out.usage.CopyFrom(api_pb2.Usage(prompt_tokens=d.prompt_tokens,
                                         completion_tokens=d.completion_tokens,
                                         cached_tokens=d.cached_tokens))
    if d.timings is not None:
        t = d.timings
        out.timings.CopyFrom(api_pb2.Timings(
            ttft_s=t.ttft_s, e2e_s=t.e2e_s, prefill_compute_s=t.prefill_compute_s,
            kv_transfer_s=t.kv_transfer_s, kv_bytes=t.kv_bytes, plan=t.plan,
            predicted_ttft_s=t.predicted_ttft_s))
    return out
