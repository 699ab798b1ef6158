"""The preallocated paged KV pool of one engine.

One tensor ``(layers, 2, num_blocks, block_size, kv_heads, head_dim)``,
allocated once; ``k[layer]`` / ``v[layer]`` are views. Tokens are addressed by
slot = block * block_size + offset.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
        head_dim: int, dtype: torch.dtype, device: torch.device,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        self.data = torch.zeros(shape, dtype=dtype, device=device)
        self.k = [self.data[i, 0] for i in range(num_layers)]  # (nb, bs, kvh, hd) each
        self.v = [self.data[i, 1] for i in range(num_layers)]
        self._k_slots = [x.view(-1, num_kv_heads, head_dim) for x in self.k]  # (slots, kvh, hd)
        self._v_slots = [x.view(-1, num_kv_heads, head_dim) for x in self.v]

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return num_layers * 2 * block_size * num_kv_heads * head_dim * elem

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K/V (N, kvh, hd) of N tokens at ``slots`` (N,), in the pool's dtype."""
        dt = self.data.dtype
        self._k_slots[layer].index_copy_(0, slots, k.to(dt))
        self._v_slots[layer].index_copy_(0, slots, v.to(dt))

    def k_slots(self, layer: int) -> torch.Tensor:
        return self._k_slots[layer]  # (slots, kvh, hd), a view of the pool

    def v_slots(self, layer: int) -> torch.Tensor:
        return self._v_slots[layer]

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V (N, kvh, hd) of the tokens at ``slots``."""
        return self._k_slots[layer][slots], self._v_slots[layer][slots]
