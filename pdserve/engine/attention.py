"""Attention over the paged KV pool.

The pool of one layer is ``(num_blocks, block_size, kv_heads, head_dim)``; a
request's tokens live in the blocks its block table lists, in order. Decode
tokens (one query each) of many requests go through one batched call; each
prefill chunk (many queries of one request) gets its own causal call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def decode_attention(
    q: torch.Tensor,  # (D, H, hd): one query token per request
    k_cache: torch.Tensor,  # (num_blocks, bs, kvh, hd)
    v_cache: torch.Tensor,  # (num_blocks, bs, kvh, hd)
    block_tables: torch.Tensor,  # (D, nb) int64, padded with any valid block
    mask: torch.Tensor,  # (D, 1, 1, nb*bs) bool: True where a key exists
    scale: float,
) -> torch.Tensor:  # (D, H*hd)
    d, h, hd = q.shape
    kvh = k_cache.shape[2]
    # index_select, not fancy indexing: several times faster for whole-block copies.
    flat = block_tables.view(-1)
    k = k_cache.index_select(0, flat).view(d, -1, kvh, hd)  # (D, T, kvh, hd)
    v = v_cache.index_select(0, flat).view(d, -1, kvh, hd)  # (D, T, kvh, hd)
    # Slots past a request's length (and padding blocks) hold whatever a block's previous
    # owner left, NaN or Inf included, and the mask does not stop them: a NaN key gives a
    # NaN score that SDPA's mask does not replace, a NaN value meets its zero weight in
    # probs @ V (0 * NaN = NaN). So every non-finite value becomes 0 (a select, not a
    # multiply); what is left there is finite and the mask weighs it 0. Slots a request
    # owns are finite already (computed here, or imported and checked finite), and
    # nan_to_num_ is one plain pass over the gathered copies, ~6x cheaper than a masked
    # fill with a broadcast mask.
    torch.nan_to_num_(k, nan=0.0, posinf=0.0, neginf=0.0)
    torch.nan_to_num_(v, nan=0.0, posinf=0.0, neginf=0.0)
    k, v = k.transpose(1, 2), v.transpose(1, 2)  # (D, kvh, T, hd)
    # Grouped-query attention without repeating K/V: the G query heads that share
    # a KV head become G query rows of that head (no causal mask is needed, the
    # query is the newest token).
    qg = q.view(d, kvh, h // kvh, hd)  # (D, kvh, G, hd)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    return out.reshape(d, h * hd)


def prefill_attention(
    q: torch.Tensor,  # (L, H, hd): the chunk's queries
    k_new: torch.Tensor,  # (L, kvh, hd): the chunk's keys (already in the pool too)
    v_new: torch.Tensor,  # (L, kvh, hd)
    k_cache: torch.Tensor,  # (num_blocks, bs, kvh, hd)
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # (nb,) blocks covering context + chunk
    num_context: int,  # tokens before the chunk, already in the pool
    scale: float,
) -> torch.Tensor:  # (L, H*hd)
    n, h, hd = q.shape
    qh = q.transpose(0, 1).unsqueeze(0)  # (1, H, L, hd)
    if num_context == 0:
        # First chunk: its own K/V are all the keys; no need to read the pool.
        k = k_new.transpose(0, 1).unsqueeze(0)  # (1, kvh, L, hd)
        v = v_new.transpose(0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        kvh = k_cache.shape[2]
        total = num_context + n
        k = k_cache.index_select(0, block_table).view(-1, kvh, hd)[:total]  # (T, kvh, hd)
        v = v_cache.index_select(0, block_table).view(-1, kvh, hd)[:total]
        k, v = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)  # (1, kvh, T, hd)
        # Query i (absolute position num_context + i) sees keys 0..num_context + i.
        mask = torch.ones(n, total, dtype=torch.bool, device=q.device).tril(num_context)
        out = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1).reshape(n, h * hd)
