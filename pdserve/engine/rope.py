"""Rotary position embeddings, computed once into a (positions, hd/2) table.

Inverse frequencies come from transformers' own RoPE initialisers, so every
scaling variant a config carries (linear, dynamic, yarn, longrope, llama3, ...)
matches the reference. Dynamic NTK is evaluated at the configured maximum length.
"""

from __future__ import annotations

import torch


class RotaryEmbedding:
    def __init__(
        self, config: object, head_dim: int, max_positions: int,
        dtype: torch.dtype, device: torch.device,
    ) -> None:
        inv_freq, scaling = _inv_freq(config, head_dim)
        pos = torch.arange(max_positions, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq[None, :]  # (P, hd/2), fp32 as transformers does
        self.cos = (freqs.cos() * scaling).to(device=device, dtype=dtype)  # (P, hd/2)
        self.sin = (freqs.sin() * scaling).to(device=device, dtype=dtype)
        self.half = head_dim // 2

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.cos.index_select(0, positions).unsqueeze(1)  # (N, 1, hd/2)
        sin = self.sin.index_select(0, positions).unsqueeze(1)
        return cos, sin

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` (N, heads, hd) the "rotate_half" way (HF Llama layout)."""
        x1, x2 = x[..., : self.half], x[..., self.half :]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _inv_freq(config: object, head_dim: int) -> tuple[torch.Tensor, float]:
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:  # older configs
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        base = float(params["rope_theta"])
        exps = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return 1.0 / (base**exps), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(
            f"model: rope_type {rope_type!r} is not supported "
            f"(supported: default, {', '.join(ROPE_INIT_FUNCTIONS)})"
        )
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config)
    return inv_freq.float(), float(scaling)
