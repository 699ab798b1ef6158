"""Llama-family decoder forward pass over the paged KV pool.

Covers Llama, SmolLM, Mistral (without sliding window) and Qwen2 (qkv bias):
GQA, RoPE with every scaling variant transformers configs carry, tied
embeddings. Projections are fused at load time (q|k|v and gate|up) so a layer is
a handful of large ops; the LM head runs only on the rows that sample. A decode-only
step runs each layer as one native call where the weights allow
(``decode_layer.py``), else the per-op path (``layer_ops.py``); the choice of path is
made here, once at load and per step.

Each step runs in one of two precisions (linear.py has the plan): a small step (up to
``small_batch`` rows) in ``dtype`` (fp32 on a CPU: our kernels over bf16 weights), a
wide one, on CPUs with native bf16, in ``gemm_dtype`` end to end (torch's GEMMs at
the GEMM rate; our fused bf16 kernels for its norms, RoPE and SwiGLU, wide_ops.py).
The KV pool has its own dtype (engine.py: ``kv_cache_dtype``, bf16 for bf16 weights):
both kinds of step write into it and read their context from it converted.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from pdserve.engine.attention import prefill_attention
from pdserve.engine.decode_layer import DecodeLayerKernel
from pdserve.engine.kv_cache import KVCache
from pdserve.engine.layer_ops import LayerOps, causal_prefill_kernel, layer_ops
from pdserve.engine.linear import (
    Linear,
    LinearLayer,
    compute_dtype_for,
    gemm_dtype_for,
    linear_factory,
    measured_small_batch,
    small_batch_for,
)
from pdserve.engine.rope import RotaryEmbedding
from pdserve.engine.wide_ops import wide_layer_ops

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# Called after layer ``i`` wrote its K/V: (layer, k (N, kvh, hd), v (N, kvh, hd)).
LayerKVHook = Callable[[int, torch.Tensor, torch.Tensor], None]


class StepInterrupted(Exception):
    """The forward pass stopped between layers; nothing of this step counts."""


@dataclass(frozen=True)
class ModelSpec:
    """The shape facts of a model every component must agree on."""

    name: str
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    max_position_embeddings: int

    @classmethod
    def from_hf_config(cls, config: object, name: str) -> ModelSpec:
        model_type = getattr(config, "model_type", "?")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model: model_type {model_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        heads = config.num_attention_heads  # type: ignore[attr-defined]
        hidden = config.hidden_size  # type: ignore[attr-defined]
        return cls(
            name=name,
            model_type=model_type,
            num_layers=config.num_hidden_layers,  # type: ignore[attr-defined]
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or hidden // heads,
            intermediate_size=config.intermediate_size,  # type: ignore[attr-defined]
            vocab_size=config.vocab_size,  # type: ignore[attr-defined]
            rms_norm_eps=config.rms_norm_eps,  # type: ignore[attr-defined]
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
            max_position_embeddings=config.max_position_embeddings,  # type: ignore[attr-defined]
        )


@dataclass
class PrefillSegment:
    start: int  # first row of this chunk in the flat batch
    length: int  # tokens in the chunk
    num_context: int  # tokens of the request already in the pool
    block_table: torch.Tensor  # (nb,) blocks covering context + chunk


@dataclass
class ForwardBatch:
    """One engine step's inputs, flat over all scheduled tokens (N rows).

    Rows ``[0, num_decode)`` are single-token segments, batched in one attention
    call; the prefill chunks follow.
    """

    input_ids: torch.Tensor  # (N,) int64
    positions: torch.Tensor  # (N,) int64
    slot_mapping: torch.Tensor  # (N,) int64: block * block_size + offset
    num_decode: int
    decode_block_tables: torch.Tensor | None  # (D, nb) int64
    decode_seq_lens: torch.Tensor | None  # (D,) int64: tokens incl. the new one
    prefills: list[PrefillSegment]
    logits_indices: torch.Tensor  # (R,) rows whose next token is sampled


_LINEARS = ("qkv", "o", "gate_up", "down")


class _Layer:
    __slots__ = ("in_norm", "qkv", "o", "post_norm", "gate_up", "down")

    def __init__(self, t: Callable[[str], torch.Tensor], lin: Callable[..., LinearLayer],
                 i: int, bias: bool) -> None:
        p = f"model.layers.{i}."
        a = p + "self_attn."
        self.in_norm = t(p + "input_layernorm.weight")
        qkv = torch.cat([t(a + f"{x}_proj.weight") for x in "qkv"])  # (q+2kv, d)
        qkv_bias = torch.cat([t(a + f"{x}_proj.bias") for x in "qkv"]) if bias else None
        self.qkv = lin(qkv, qkv_bias, a + "q|k|v_proj.weight")
        self.o = lin(t(a + "o_proj.weight"), name=a + "o_proj.weight")
        self.post_norm = t(p + "post_attention_layernorm.weight")
        m = p + "mlp."
        self.gate_up = lin(torch.cat([t(m + "gate_proj.weight"), t(m + "up_proj.weight")]),
                           name=m + "gate|up_proj.weight")
        self.down = lin(t(m + "down_proj.weight"), name=m + "down_proj.weight")


class LlamaModel:
    def __init__(self, model_dir: Path, config: object, dtype: torch.dtype, device: torch.device,
                 kernels: str = "auto", quantization: str | None = None,
                 kv_dtype: torch.dtype | None = None):
        self.spec = ModelSpec.from_hf_config(config, name=model_dir.name)
        # Weights are stored in ``dtype``; small steps and the KV pool use the compute
        # dtype, wide steps the GEMM dtype (see linear.py).
        self.dtype = compute = compute_dtype_for(dtype, device)
        self.gemm_dtype = gemm = gemm_dtype_for(dtype, device)
        self.small_batch = small_batch_for(compute, gemm)
        self.device = device
        s = self.spec
        self.scale = s.head_dim**-0.5
        self.rope = RotaryEmbedding(config, s.head_dim, s.max_position_embeddings, compute, device)
        tensors = _read_safetensors(model_dir)

        def t(name: str) -> torch.Tensor:
            if name not in tensors:
                raise ValueError(f"model: weight {name!r} missing in {model_dir}")
            return tensors[name].to(device=device, dtype=dtype).to(compute)

        lin = linear_factory(quantization, dtype, compute, kernels, gemm)
        tied = s.tie_word_embeddings or "lm_head.weight" not in tensors
        head = "model.embed_tokens.weight" if tied else "lm_head.weight"
        self.lm_head = lin(t(head), name=head, lm_head=True)
        # Tied and not quantized: the embedding is the head's weight (one copy).
        self.embed = (self.lm_head.weight if tied and isinstance(self.lm_head, Linear)
                      else t("model.embed_tokens.weight"))  # (V, d)
        self.norm = t("model.norm.weight")
        self.layers = [_Layer(t, lin, i, s.qkv_bias) for i in range(s.num_layers)]
        if kernels == "auto" and gemm != compute and isinstance(self.layers[0].gate_up, Linear):
            self._set_small_batch(measured_small_batch(self.layers[0].gate_up, self.small_batch))
        # The pool's dtype (engine.py; None: the compute dtype) sets what kernels=auto times.
        pool = kv_dtype or compute
        self.ops = layer_ops(kernels, self.rope, s.num_heads, s.num_kv_heads, compute, device,
                             s.hidden_size, s.intermediate_size, pool)
        # Wide steps' ops: our fused bf16 kernels where they apply (wide_ops.py).
        self.wide_ops = wide_layer_ops(kernels, self.rope, s.num_heads, s.num_kv_heads, gemm,
                                       device, s.hidden_size, s.intermediate_size, pool)
        # None: first chunks of wide steps take torch's attention.
        self.causal_kernel = causal_prefill_kernel(kernels, device, gemm, s.num_heads,
                                                   s.num_kv_heads, s.head_dim)
        # None: every step takes the per-op path.
        self.decode_kernel = DecodeLayerKernel.for_model(self.ops, self.layers, s, self.rope,
                                                         self.scale, self.small_batch)

    def _set_small_batch(self, rows: int) -> None:
        """Steps of more rows run wide, and every linear takes the GEMM beyond it."""
        self.small_batch = rows
        for lin in [self.lm_head, *(getattr(w, n) for w in self.layers for n in _LINEARS)]:
            if isinstance(lin, Linear):
                lin.small_batch = rows

    def wide(self, fb: ForwardBatch) -> bool:
        """Whether this step runs in the GEMM dtype (a large step on a native-bf16 CPU)."""
        return self.gemm_dtype != self.dtype and fb.input_ids.shape[0] > self.small_batch

    def forward(
        self, fb: ForwardBatch, kv: KVCache, on_layer_kv: LayerKVHook | None = None,
        interrupted: Callable[[], bool] | None = None,
    ) -> torch.Tensor:  # (R, V) float32 logits
        wide = self.wide(fb)
        eps, ops = self.spec.rms_norm_eps, self.wide_ops if wide else self.ops
        act = self.gemm_dtype if wide else self.dtype
        x = F.embedding(fb.input_ids, self.embed).to(act)  # (N, d)
        native = None if wide else self.decode_kernel
        step = native.begin(fb) if native is not None and native.applies(fb) else None
        delta: torch.Tensor | None = None  # the last MLP output, added by the next norm
        for i, w in enumerate(self.layers):
            if interrupted is not None and interrupted():
                raise StepInterrupted(f"at layer {i}")
            if step is not None:
                step.layer(i, x, kv, on_layer_kv)  # updates x in place
            else:
                x, delta = self._layer(ops, w, i, x, delta, fb, kv, on_layer_kv)
        if delta is not None:
            x = x + delta
        _, h = ops.rms_norm(x.index_select(0, fb.logits_indices), self.norm, eps)  # (R, d)
        # h in the compute dtype: up to small_batch rows (a wide step's few sampled rows
        # included) get fp32 logits, not logits rounded to bf16 (which tie near the top).
        return self.lm_head(h.to(self.dtype)).float()  # (R, V)

    def _layer(
        self, ops: LayerOps, w: _Layer, i: int, x: torch.Tensor, delta: torch.Tensor | None,
        fb: ForwardBatch, kv: KVCache, on_layer_kv: LayerKVHook | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i`` by the per-op path: (residual x, the MLP output not yet added)."""
        eps = self.spec.rms_norm_eps
        x, h = ops.rms_norm(x, w.in_norm, eps, delta)
        q, k, v = ops.rope_store(w.qkv(h), fb, kv, i)  # (N, H, hd), (N, kvh, hd) x2
        if on_layer_kv is not None:
            on_layer_kv(i, k, v)
        attn = self._attention(fb, kv, i, q, k, v)  # (N, H*hd)
        x, h = ops.rms_norm(x, w.post_norm, eps, w.o(attn))
        return x, w.down(ops.silu_mul(w.gate_up(h)))  # (N, 2I) -> (N, I) -> (N, d)

    def _attention(
        self, fb: ForwardBatch, kv: KVCache, layer: int,
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    ) -> torch.Tensor:
        kc, vc = kv.k[layer], kv.v[layer]
        parts = []
        d = fb.num_decode
        if d:
            # Decode rows read the pool in place through the small steps' ops (our paged
            # kernel where chosen), a wide step's included: no gather of their context.
            out = self.ops.decode_attention(q[:d].to(self.dtype), kv, layer, fb, self.scale)
            parts.append(out.to(q.dtype))
        for seg in fb.prefills:
            rows = slice(seg.start, seg.start + seg.length)
            if seg.num_context == 0 and self.causal_kernel is not None \
                    and q.dtype == torch.bfloat16:
                parts.append(self.causal_kernel(q[rows], k[rows], v[rows], self.scale))
                continue
            parts.append(
                prefill_attention(
                    q[rows], k[rows], v[rows], kc, vc, seg.block_table, seg.num_context, self.scale
                )
            )
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _read_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model: no *.safetensors weights in {model_dir}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open is not a dict
                out[name] = st.get_tensor(name)
    return out


def load_hf_config(model_dir: Path) -> object:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"model: cannot read config of {model_dir}: {e}") from e
