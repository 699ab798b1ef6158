"""The sending side of a KV stream: prefill one prompt and yield its events as the
forward pass computes them — the header, each layer of each chunk (``KVPiece``),
then the first token. The prefill worker writes them to the wire; the loopback
KV source hands them to an import in the same process."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator

from pdserve.engine.async_engine import AsyncEngine, KVPiece
from pdserve.engine.outputs import RequestOutput
from pdserve.kvwire.stream import FirstToken, KVHeader, KVRequest
from pdserve.logprobs import Logprob
from pdserve.sampling_params import SamplingParams


class PrefillEndedEarly(RuntimeError):
    """The engine ended the prefill without a token (aborted while it ran)."""


async def export_kv(engine: AsyncEngine, request: KVRequest,
                    ) -> AsyncGenerator[KVHeader | KVPiece | FirstToken, None]:
    """Raises ValueError (after the header) when the engine refuses the prompt,
    ``PrefillEndedEarly`` when it finishes the request without a token."""
    prompt = request.prompt
    header = engine.engine.kv_header(request.encoding, len(prompt), request.num_cached_tokens)
    yield header
    # Only the first token is sampled here; the receiver does the rest.
    params = _first_token_only(request.params)
    async for item in engine.generate(request.request_id, prompt, params,
                                      export_kv=header.encoding,
                                      export_skip=request.num_cached_tokens):
        if isinstance(item, KVPiece):
            await item.ready()  # on CUDA: its device → host copy is done
            yield item
        elif item.finished and not item.token_ids:
            raise PrefillEndedEarly(f"prefill ended without a token ({item.finish_reason})")
        elif item.finished:
            yield _first_token(item, len(prompt))


def _first_token_only(params: SamplingParams) -> SamplingParams:
    return dataclasses.replace(params, max_tokens=1, min_tokens=min(params.min_tokens, 1),
                               stop=(), detokenize=False)


def _first_token(out: RequestOutput, num_prompt_tokens: int) -> FirstToken:
    t = out.timings
    lp = out.logprobs[0] if out.logprobs else Logprob(out.token_ids[0], 0.0, [])
    compute = 0.0
    if t is not None and t.ttft_s is not None and t.queue_s is not None:
        compute = t.ttft_s - t.queue_s
    return FirstToken(lp, compute, num_prompt_tokens, out.num_cached_tokens)
