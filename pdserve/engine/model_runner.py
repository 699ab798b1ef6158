"""Turns a scheduler step into model inputs, runs the forward pass, returns logits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pdserve.engine.kv_cache import KVCache
from pdserve.engine.model import ForwardBatch, LlamaModel, PrefillSegment
from pdserve.engine.scheduler import ScheduledChunk

# Gets (request chunk, layer, k (n, kvh, hd), v (n, kvh, hd)) for exporting requests.
ChunkKVHook = Callable[[ScheduledChunk, int, torch.Tensor, torch.Tensor], None]


@dataclass
class ModelOutput:
    logits: torch.Tensor
    """(R, V) float32: one row per chunk in ``sampling``, 1 + k for one with k drafts
    (the next token after its last real token, then after each draft)."""
    sampling: list[ScheduledChunk]
    """The chunks that caught their request up, so they sample a token."""


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: KVCache, device: torch.device) -> None:
        self.model = model
        self.kv = kv
        self.device = device
        self.block_size = kv.block_size

    def execute(
        self, chunks: list[ScheduledChunk], export: ChunkKVHook | None = None,
        interrupted: Callable[[], bool] | None = None,
    ) -> ModelOutput:
        """Run one step: the logits of the chunks that sample."""
        decode = [c for c in chunks if c.is_decode]
        prefill = [c for c in chunks if not c.is_decode]
        ordered = decode + prefill
        fb = self._build(decode, prefill)
        hook = None
        exporting = [(i, c) for i, c in enumerate(ordered) if c.request.kv_exporter is not None]
        if exporting and export is not None:
            starts = _starts(ordered)

            def hook(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
                for i, c in exporting:
                    rows = slice(starts[i], starts[i] + c.num_tokens)
                    export(c, layer, k[rows], v[rows])

        logits = self.model.forward(fb, self.kv, hook, interrupted)
        return ModelOutput(logits, [c for c in ordered if c.samples])

    def _build(self, decode: list[ScheduledChunk], prefill: list[ScheduledChunk]) -> ForwardBatch:
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for c in decode:  # a row per token: the last real one, then each draft
            r = c.request
            p = r.num_computed_tokens
            ids += [r.all_token_ids[p], *c.draft_token_ids]
            positions += range(p, p + c.num_tokens)
            slots += [r.block_ids[q // bs] * bs + q % bs for q in range(p, p + c.num_tokens)]
        segments: list[PrefillSegment] = []
        for c in prefill:
            r = c.request
            p0, n = r.num_computed_tokens, c.num_tokens
            nb = -(-(p0 + n) // bs)
            table = torch.tensor(r.block_ids[:nb], dtype=torch.int64)
            segments.append(PrefillSegment(len(ids), n, p0, table.to(self.device)))
            ids += r.all_token_ids[p0 : p0 + n]
            positions += range(p0, p0 + n)
            pos = torch.arange(p0, p0 + n)
            slots += (table[pos // bs] * bs + pos % bs).tolist()
        ordered = decode + prefill
        starts = _starts(ordered)
        dev = self.device
        tables, seq_lens = self._decode_tables(decode)
        return ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            num_decode=sum(c.num_tokens for c in decode),
            decode_block_tables=tables,
            decode_seq_lens=seq_lens,
            prefills=segments,
            logits_indices=torch.tensor(  # the last row of every chunk that samples
                [i for s, c in zip(starts, ordered, strict=True) if c.samples
                 for i in range(s + c.num_tokens - 1 - len(c.draft_token_ids), s + c.num_tokens)],
                dtype=torch.int64, device=dev,
            ),
        )

    def _decode_tables(
        self, decode: list[ScheduledChunk]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(block tables (D, nb) padded with block 0, sequence lengths (D,)) of the decode
        rows. A draft row attends to its request's tokens up to itself: every row's K and
        V are in the pool before any row attends, so the rows of one request make a
        causal block without a mask of their own."""
        if not decode:
            return None, None
        bs = self.block_size
        lens = [c.request.num_computed_tokens + 1 + j for c in decode for j in range(c.num_tokens)]
        nb = -(-max(lens) // bs)
        table = [c.request.block_ids[:nb] + [0] * (nb - len(c.request.block_ids[:nb]))
                 for c in decode for _ in range(c.num_tokens)]
        tables = torch.tensor(table, dtype=torch.int64, device=self.device)  # (D, nb)
        return tables, torch.tensor(lens, dtype=torch.int64, device=self.device)


def _starts(chunks: list[ScheduledChunk]) -> list[int]:
    out, acc = [], 0
    for c in chunks:
        out.append(acc)
        acc += c.num_tokens
    return out
