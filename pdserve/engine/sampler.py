"""Turns one step's logits into tokens, per request.

Greedy rows take the argmax; the others apply temperature, top-k and top-p and
draw with the exponential-race trick (argmax of p / Exp(1)), which needs no
host sync. A request's draw at output position t uses a generator seeded from
(seed, t): the same seed gives the same tokens on any engine of the same device
type, including after its KV moved to another worker. The generator lives on the
logits' device (one per device, made on first use): a CPU generator cannot draw
into a CUDA tensor, and CUDA's Philox stream differs from the CPU's, so a seeded
request reproduces per device type, not across CPU and CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.engine.request import Request
from pdserve.logprobs import Logprob

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, position) pairs


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[Logprob | None]


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: tuple[int, ...], seed: int) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self._gens: dict[torch.device, torch.Generator] = {}
        self._base_seed = seed
        self._num_unseeded = 0

    def sample(self, logits: torch.Tensor, reqs: list[Request]) -> SampleResult:
        """``logits`` (R, V) float32, one row per request in ``reqs``."""
        self._suppress_stops(logits, reqs)
        greedy = [r.params.greedy for r in reqs]
        if all(greedy):
            token_list: list[int] = logits.argmax(dim=-1).tolist()  # one host sync
        else:
            token_list = [int(logits[i].argmax()) if greedy[i] else self._draw(logits[i], r)
                          for i, r in enumerate(reqs)]
        return SampleResult(token_list, self._logprobs(logits, reqs, token_list))

    def _suppress_stops(self, logits: torch.Tensor, reqs: list[Request]) -> None:
        # min_tokens: EOS and stop ids may not end the request early.
        for i, r in enumerate(reqs):
            if r.num_output_tokens < r.params.min_tokens:
                banned = list(r.params.stop_token_ids)
                if not r.params.ignore_eos:
                    banned += self.eos_token_ids
                logits[i, banned] = float("-inf")

    def _draw(self, row: torch.Tensor, r: Request) -> int:
        p = r.params
        row = row / p.temperature  # (V,)
        if 0 < p.top_k < row.shape[0]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1.0:
            row = _top_p_filter(row, p.top_p)
        probs = torch.softmax(row, dim=-1)
        gen = self._generator_for(r, probs.device)
        race = torch.empty_like(probs).exponential_(generator=gen)
        return int(torch.argmax(probs / race))

    def generator(self, device: torch.device) -> torch.Generator:
        """This sampler's generator on ``device`` (the device of the logits it draws for)."""
        gen = self._gens.get(device)
        if gen is None:
            gen = self._gens[device] = torch.Generator(device=device)
        return gen

    def _generator_for(self, r: Request, device: torch.device) -> torch.Generator:
        if r.params.seed is None:
            self._num_unseeded += 1
            seed = self._base_seed * 1_000_003 + self._num_unseeded
        else:
            seed = r.params.seed
        gen = self.generator(device)
        gen.manual_seed((seed * _MIX + r.num_output_tokens) & 0x7FFF_FFFF_FFFF_FFFF)
        return gen

    def _logprobs(
        self, logits: torch.Tensor, reqs: list[Request], tokens: list[int]
    ) -> list[Logprob | None]:
        wanted = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
        out: list[Logprob | None] = [None] * len(reqs)
        if not wanted:
            return out
        lp = torch.log_softmax(logits[wanted], dim=-1)  # (W, V), raw model distribution
        for row, i in enumerate(wanted):
            k = reqs[i].params.logprobs or 0
            top: list[tuple[int, float]] = []
            if k:
                vals, idx = torch.topk(lp[row], k)
                top = list(zip(idx.tolist(), vals.tolist(), strict=True))
            out[i] = Logprob(tokens[i], float(lp[row, tokens[i]]), top)
        return out


def _top_p_filter(row: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_vals, order = torch.sort(row, descending=True)
    probs = torch.softmax(sorted_vals, dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least one token).
    drop = probs.cumsum(dim=-1) - probs >= top_p
    sorted_vals = sorted_vals.masked_fill(drop, float("-inf"))
    return torch.empty_like(row).scatter_(0, order, sorted_vals)
