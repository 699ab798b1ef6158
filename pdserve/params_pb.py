"""Protobuf ⇄ domain conversions of sampling parameters and logprobs.

No torch here: the router uses it too.
"""

from __future__ import annotations

from pdserve._proto.pdserve.v1 import common_pb2
from pdserve.logprobs import Logprob
from pdserve.sampling_params import SamplingParams


def params_from_pb(p: common_pb2.SamplingParams) -> SamplingParams:
    """Raises ValueError naming the field for out-of-range values."""
    return SamplingParams(
        max_tokens=p.max_tokens or 16,
        temperature=p.temperature,
        top_p=p.top_p or 1.0,
        top_k=p.top_k,
        seed=p.seed if p.HasField("seed") else None,
        stop=tuple(p.stop),
        stop_token_ids=tuple(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        min_tokens=p.min_tokens,
        logprobs=p.logprobs if p.HasField("logprobs") else None,
    )


def params_to_pb(p: SamplingParams) -> common_pb2.SamplingParams:
    out = common_pb2.SamplingParams(
        max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
        stop=list(p.stop), stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos,
        min_tokens=p.min_tokens)
    if p.seed is not None:
        out.seed = p.seed
    if p.logprobs is not None:
        out.logprobs = p.logprobs
    return out


def logprob_to_pb(lp: Logprob) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(
        token_id=lp.token_id, logprob=lp.logprob,
        top=[common_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])


def logprob_from_pb(lp: common_pb2.TokenLogprob) -> Logprob:
    return Logprob(lp.token_id, lp.logprob, [(t.token_id, t.logprob) for t in lp.top])
