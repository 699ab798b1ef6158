"""LLMEngine: the streaming interface every pdserve role drives.

``add_request`` → ``step`` (repeatedly; each returns the requests that moved) →
``abort`` by id. KV can leave during prefill (a ``KVExporter`` gets every layer
of every chunk as soon as that layer is computed) and enter a second engine
(``begin_import`` / ``write_kv`` / ``commit_import``, or ``prefill_locally`` when
the sender fails), which then decodes as if it had prefilled itself; asyncio callers
drive these through a ``KVImport`` (pdserve/engine/kv_import.py).

Each step: the scheduler picks the tokens, the model runner computes them, the
sampler picks the next tokens, and the scheduler applies the result (``update``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import torch

from pdserve.config import EngineConfig
from pdserve.engine.block_manager import BlockManager, NoFreeBlocksError
from pdserve.engine.kv_cache import KVCache
from pdserve.engine.linear import kv_dtype_for
from pdserve.engine.model import LlamaModel, StepInterrupted, load_hf_config
from pdserve.engine.model_runner import ModelRunner
from pdserve.engine.ngram_drafter import NgramDrafter
from pdserve.engine.outputs import RequestOutput
from pdserve.engine.request import Request, RequestState
from pdserve.engine.sampler import Sampler, SampleResult
from pdserve.engine.scheduler import SampledToken, ScheduledChunk, Scheduler
from pdserve.engine.step_meter import MIN_PREFILL_TOKENS, StepMeter
from pdserve.engine.stop_checker import StopChecker
from pdserve.kvwire.codec import Encoding, resolve
from pdserve.kvwire.stream import PROTOCOL_VERSION, KVHeader
from pdserve.logprobs import Logprob
from pdserve.malloc_tuning import keep_freed_memory
from pdserve.model_files import resolve_model
from pdserve.prefix_hash import salt_hash
from pdserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


class KVExporter(Protocol):
    def on_kv(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """K/V (n, kvh, hd) of prompt tokens [start, start + n) of ``layer``.

        Called inside the forward pass right after the layer wrote them; the
        tensors are only valid during the call. After a preemption or an
        interrupted step, tokens are recomputed and ranges may repeat (same
        values, same positions): exporters skip what they already sent.
        """


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = cfg = config or EngineConfig()
        if cfg.num_threads is not None:
            torch.set_num_threads(cfg.num_threads)
        self.device = _pick_device(cfg.device)
        if self.device.type == "cpu":
            # Steps allocate and free megabyte-sized activations: without this glibc
            # hands them back and every step faults the pages in again (W3 on the
            # AVX-512 box: 842 -> 1,113 prefill tok/s). Workers set it too.
            keep_freed_memory()
        self.weight_dtype = _DTYPES[cfg.dtype]
        self.model_dir = resolve_model(cfg.model)
        hf_config = load_hf_config(self.model_dir)
        self.tokenizer = _load_tokenizer(self.model_dir)
        self.kv_dtype = kv_dtype_for(cfg.kv_cache_dtype, self.weight_dtype, self.device)
        self.model = LlamaModel(self.model_dir, hf_config, self.weight_dtype, self.device,
                                cfg.kernels, cfg.quantization, self.kv_dtype)
        self.dtype = self.model.dtype  # activations of small steps
        s = self.spec = self.model.spec
        self.max_model_len = _max_model_len(cfg, s.max_position_embeddings)
        per_block = KVCache.bytes_per_block(
            s.num_layers, cfg.block_size, s.num_kv_heads, s.head_dim, self.kv_dtype
        )
        num_blocks = cfg.num_kv_blocks or max(1, int(cfg.kv_cache_gb * 2**30 // per_block))
        self.kv = KVCache(s.num_layers, num_blocks, cfg.block_size, s.num_kv_heads,
                          s.head_dim, self.kv_dtype, self.device)
        self.blocks = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        # KV computed here depends on the model, its weights' dtype and quantization
        # and the pool's dtype; imported KV also on the wire encoding (_salt_for).
        self._salt_parts = (s.name, cfg.dtype, cfg.quantization, self.kv_dtype)
        self.local_salt = salt_hash(*self._salt_parts)
        self.eos_token_ids = _eos_ids(self.model_dir, self.tokenizer)
        stops = StopChecker(self.eos_token_ids, self.max_model_len, self.tokenizer)
        sc = cfg.speculative_config
        drafter = NgramDrafter(sc.num_speculative_tokens, sc.prompt_lookup_min or 0,
                               sc.prompt_lookup_max or 0, sc.disable_by_batch_size) \
            if sc is not None else None
        self.scheduler = Scheduler(self.blocks, cfg.max_num_batched_tokens, cfg.max_num_seqs,
                                   stops, self._prefill_cap, drafter)
        self.sampler = Sampler(s.vocab_size, self.eos_token_ids, cfg.seed)
        self.runner = ModelRunner(self.model, self.kv, self.device)
        self.meter = StepMeter()
        self.requests: dict[str, Request] = {}
        self._to_report: dict[str, Request] = {}
        # Set from another thread to stop a long step between layers (an abort is
        # waiting); the step's tokens are then recomputed next step.
        self.interrupt_requested = False
        log.info("engine ready: model=%s weights=%s device=%s kv_blocks=%d max_model_len=%d",
                 self.model_dir, cfg.dtype, self.device, num_blocks, self.max_model_len)

    # --- requests in --------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
        kv_exporter: KVExporter | None = None,
    ) -> None:
        req = self._new_request(request_id, prompt, params or SamplingParams())
        req.kv_exporter = kv_exporter
        self.scheduler.add(req)

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt).input_ids)
        return list(prompt)

    def _new_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                     ) -> Request:
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        ids = self.tokenize(prompt)
        self._validate_prompt(ids, params)
        req = Request(request_id, ids, params)
        req.hash_salt = self.local_salt
        self.requests[request_id] = req
        self.scheduler.stops.track(req)
        return req

    def _validate_prompt(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError("prompt must contain at least 1 token, got an empty prompt")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens; it must be shorter than the context "
                f"(max_model_len={self.max_model_len}) to leave room for output"
            )
        self.check_token_ids("prompt token ids", ids)
        self.check_token_ids("stop_token_ids", params.stop_token_ids)
        total = min(len(ids) + params.max_tokens, self.max_model_len)
        need = self.blocks.blocks_for_tokens(total)
        if need > self.blocks.num_blocks:
            raise ValueError(
                f"prompt + max_tokens needs {need} KV blocks but the pool has "
                f"{self.blocks.num_blocks}; lower max_tokens or raise kv_cache_gb"
            )

    def check_token_ids(self, field: str, ids: Iterable[int]) -> None:
        """Every id must index the vocabulary: one outside it crashes the sampler (or
        the embedding) inside a step and with it every request of the engine."""
        v = self.spec.vocab_size
        bad = next((t for t in ids if not 0 <= t < v), None)
        if bad is not None:
            raise ValueError(f"{field} must be in [0, {v}), got {bad}")

    def abort(self, request_id: str) -> bool:
        req = self.requests.get(request_id)
        if req is None or req.is_finished:
            return False
        self.scheduler.finish(req, "abort")
        self._to_report[request_id] = req
        return True

    # --- KV import (decode side of a disaggregated request) ----------------------
    def begin_import(self, request_id: str, prompt: list[int], params: SamplingParams,
                     encoding: Encoding = Encoding.MODEL) -> int:
        """Reserve blocks for the prompt's KV, arriving in ``encoding``; raises
        NoFreeBlocksError if the pool is short. Returns how many leading prompt tokens
        the prefix cache already holds: their KV need not (and must not) be written."""
        req = self._new_request(request_id, prompt, params)
        req.hash_salt = self._salt_for(encoding)
        hits = self.scheduler.cached_prefix(req, req.num_prompt_tokens - 1)
        if not self.scheduler.reserve(req, hits, req.num_prompt_tokens + 1):
            need = self.blocks.blocks_for_tokens(req.num_prompt_tokens + 1) - len(hits)
            self.scheduler.finish(req, "abort")
            self._forget(req)
            raise NoFreeBlocksError(
                f"need {need} KV blocks for the prompt, {self.blocks.num_free_blocks} free")
        req.state = RequestState.IMPORTING
        return req.num_cached_tokens

    def _salt_for(self, encoding: Encoding) -> bytes:
        """Imported KV matches computed KV unless the wire encoding rounded it more
        than the pool does (int8, or 16-bit into a float32 pool)."""
        wire = resolve(encoding, self.weight_dtype)
        if wire in (Encoding.FP32, resolve(Encoding.MODEL, self.kv_dtype)):
            return self.local_salt
        return salt_hash(*self._salt_parts, wire.name)

    @torch.inference_mode()
    def write_kv(self, request_id: str, layer: int, start: int,
                 k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K/V (n, kvh, hd) of prompt tokens [start, start + n) of ``layer``."""
        req = self._importing(request_id)
        n = k.shape[0]
        if not req.num_cached_tokens <= start <= start + n <= req.num_prompt_tokens:
            raise ValueError(f"KV rows [{start}, {start + n}) outside the prompt's uncached "
                             f"part [{req.num_cached_tokens}, {req.num_prompt_tokens})")
        slots = self._slots(req, start, n)
        self.kv.write(layer, slots, k.to(self.device), v.to(self.device))  # in the pool's dtype

    def commit_import(self, request_id: str, first_token_id: int,
                      logprob: Logprob | None = None) -> None:
        """The prompt's KV is complete: join the decode batch with the first token.
        Raises ValueError (the request stays importing) for a token id a peer made up."""
        req = self._importing(request_id)
        self.check_token_ids("first token id", [first_token_id])
        if logprob is not None:
            self.check_token_ids("first token logprob ids",
                                 [logprob.token_id, *(t for t, _ in logprob.top)])
        req.commit_import(first_token_id)
        self._append(req, first_token_id, logprob)
        if not req.is_finished:
            self.scheduler.add_running(req)

    def prefill_locally(self, request_id: str) -> None:
        """Give up the import (its sender failed): prefill the prompt in this engine."""
        req = self._importing(request_id)
        self.blocks.free(req.abandon_import())
        if req.hash_salt != self.local_salt:
            req.hash_salt, req.block_hashes = self.local_salt, []
        self.scheduler.add(req)

    def kv_header(self, encoding: Encoding, num_tokens: int,
                  num_cached_tokens: int = 0) -> KVHeader:
        """This model's fingerprint for a KV stream of ``num_tokens`` prompt tokens, the
        first ``num_cached_tokens`` left out (``Encoding.MODEL`` resolved to the weights'
        dtype)."""
        s = self.spec
        return KVHeader(PROTOCOL_VERSION, s.name, s.num_layers, s.num_kv_heads, s.head_dim,
                        self.blocks.block_size, resolve(encoding, self.weight_dtype), num_tokens,
                        num_cached_tokens)

    def _importing(self, request_id: str) -> Request:
        req = self.requests.get(request_id)
        if req is None or req.state is not RequestState.IMPORTING:
            raise ValueError(f"request {request_id!r} is not importing KV")
        return req

    # --- the step ------------------------------------------------------------------
    @property
    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work or bool(self._to_report)

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Compute one batch of tokens; report every request that changed."""
        sched = self.scheduler.schedule()
        if not sched.chunks:
            return self._reports()
        for c in sched.chunks:
            if c.num_cached_tokens and c.request.kv_exporter is not None:
                self._export_cached(c)
        t0 = time.perf_counter()
        try:
            out = self.runner.execute(sched.chunks, _export, lambda: self.interrupt_requested)
        except StepInterrupted:
            return self._reports()
        # A row per logits row: a chunk with k drafts has 1 + k.
        rows = [c.request for c in out.sampling for _ in range(1 + len(c.draft_token_ids))]
        sampled: list[SampledToken] = []
        if rows:
            sampled = _accepted(out.sampling, self.sampler.sample(out.logits, rows))
        self.scheduler.update(sched, sampled)
        prefill = sum(c.num_tokens for c in sched.chunks if not c.is_decode)
        decode = sum(1 for c in sched.chunks if c.is_decode)
        self.meter.record(prefill, decode, time.perf_counter() - t0)
        self._to_report.update((c.request.request_id, c.request) for c in out.sampling)
        return self._reports()

    def _prefill_cap(self) -> int | None:
        """Prefill tokens that fit in a step beside the decode rows within
        ``decode_step_budget_s``, at the measured rates (None: no budget, or not yet
        measured)."""
        budget, m = self.config.decode_step_budget_s, self.meter
        if budget <= 0 or m.prefill_tokens_per_s <= 0:
            return None
        spare = max(budget - m.decode_step_s, 0.0)
        return max(MIN_PREFILL_TOKENS, int(spare * m.prefill_tokens_per_s))

    def _export_cached(self, chunk: ScheduledChunk) -> None:
        """A prompt's prefix came from the cache, not the forward pass: export it from
        the pool before the rest is computed."""
        req = chunk.request
        slots = self._slots(req, 0, chunk.num_cached_tokens)
        for layer in range(self.spec.num_layers):
            req.kv_exporter.on_kv(layer, 0, *self.kv.read(layer, slots))

    def _slots(self, req: Request, start: int, n: int) -> torch.Tensor:
        """Pool slots of ``req``'s tokens [start, start + n), on the pool's device."""
        bs = self.blocks.block_size
        pos = torch.arange(start, start + n)
        table = torch.tensor(req.block_ids, dtype=torch.int64)
        return (table[pos // bs] * bs + pos % bs).to(self.device)

    def _reports(self) -> list[RequestOutput]:
        reports = [RequestOutput.report(r) for r in self._to_report.values()]
        for r in self._to_report.values():
            if r.is_finished:
                self._forget(r)
        self._to_report.clear()
        return reports

    def _append(self, req: Request, token: int, logprob: Logprob | None) -> None:
        """A token from outside a step (an import's first token): report it."""
        self.scheduler.append(req, token, logprob)
        self._to_report[req.request_id] = req

    def _forget(self, req: Request) -> None:
        self.requests.pop(req.request_id, None)


def _accepted(chunks: list[ScheduledChunk], result: SampleResult) -> list[SampledToken]:
    """Each sampling chunk's tokens: the model's next token; with drafts, each draft the
    model agrees with (its own token at that row equals the draft) and then the model's
    token after the last of them."""
    out: list[SampledToken] = []
    row = 0
    for c in chunks:
        drafts = c.draft_token_ids
        for j in range(1 + len(drafts)):
            token = result.token_ids[row + j]
            out.append(SampledToken(c.request, token, result.logprobs[row + j], draft=j > 0))
            if j == len(drafts) or token != drafts[j]:
                break
        row += 1 + len(drafts)
    return out


def _export(chunk: ScheduledChunk, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
    req = chunk.request
    start = req.num_computed_tokens
    n = min(chunk.num_tokens, req.num_prompt_tokens - start)  # prompt rows only
    if n > 0:
        req.kv_exporter.on_kv(layer, start, k[:n], v[:n])


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device must be 'cpu' or 'auto' here: CUDA is not available")
    return torch.device(name)


def _max_model_len(cfg: EngineConfig, model_max: int) -> int:
    if cfg.max_model_len is None:
        return model_max
    if cfg.max_model_len > model_max:
        raise ValueError(
            f"max_model_len must be <= the model's max_position_embeddings ({model_max}), "
            f"got {cfg.max_model_len}")
    return cfg.max_model_len


def _load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise ValueError(f"model: cannot load the tokenizer of {model_dir}: {e}") from e


def _eos_ids(model_dir: Path, tokenizer: Any) -> tuple[int, ...]:
    ids: set[int] = set()
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if tok_eos is not None:
        ids.add(tok_eos)
    return tuple(sorted(ids))
