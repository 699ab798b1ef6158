"""Attention over the paged KV pool.

The pool of one layer is ``(num_blocks, block_size, kv_heads, head_dim)``; a
request's tokens live in the blocks its block table lists, in order. Decode
tokens (one query each) of many requests go through one batched call; each
prefill chunk (many queries of one request) gets its own causal call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


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
    # In the pool's dtype: a wide bf16 step (model.py) reading an fp32 pool converts its
    # few queries, not the gathered keys and values.
    qg = q.view(d, kvh, h // kvh, hd).to(k.dtype)  # (D, kvh, G, hd)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    return out.reshape(d, h * hd).to(q.dtype)


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
    out_dtype = q.dtype
    if num_context and q.dtype != k_cache.dtype:
        # Chunk and context meet in the wider dtype: a wide bf16 step over an fp32 pool
        # converts its L rows (not the C of the context; the CPU's tiled kernel runs as
        # fast in fp32), an fp32 step over a bf16 pool widens the context (_context).
        wider = torch.promote_types(q.dtype, k_cache.dtype)
        q, k_new, v_new = (t.to(wider) for t in (q, k_new, v_new))
    qh = q.transpose(0, 1).unsqueeze(0)  # (1, H, L, hd)
    k = k_new.transpose(0, 1).unsqueeze(0)  # (1, kvh, L, hd)
    v = v_new.transpose(0, 1).unsqueeze(0)
    if q.device.type == "cuda":
        k, v = _with_context(k, v, k_cache, v_cache, block_table, num_context)
        out = fused_causal_attention(qh, k, v, scale)
    elif num_context == 0:
        # First chunk: its own K/V are all the keys; no need to read the pool.
        return causal_self_attention(q, k_new, v_new, scale).to(out_dtype)
    else:
        k_ctx, v_ctx = _context(k_cache, v_cache, block_table, num_context, q.dtype)
        if _CPU_FLASH is not None:
            out = _context_then_chunk(qh, k_ctx, v_ctx, k, v, scale)
        else:
            out = _masked(qh, torch.cat([k_ctx, k], 2), torch.cat([v_ctx, v], 2), num_context,
                          scale)
    return out[0].transpose(0, 1).reshape(n, h * hd).to(out_dtype)


def causal_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """A first chunk on a CPU, by torch's tiled kernel: q (L, H, hd), its own k and v
    (L, kvh, hd) -> (L, H*hd) (also the reference of our bf16 kernel)."""
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale,
                                         enable_gqa=True)
    return out[0].transpose(0, 1).reshape(q.shape[0], -1)


def _context(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
             num_context: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The pool's K/V of the ``num_context`` tokens before a chunk, in the chunk's
    ``dtype``: (1, kvh, C, hd) each."""
    bs, kvh, hd = k_cache.shape[1:]
    ctx_blocks = block_table[: -(-num_context // bs)]
    k_ctx = k_cache.index_select(0, ctx_blocks).view(-1, kvh, hd)[:num_context]  # (C, kvh, hd)
    v_ctx = v_cache.index_select(0, ctx_blocks).view(-1, kvh, hd)[:num_context]
    k_ctx, v_ctx = k_ctx.to(dtype), v_ctx.to(dtype)
    return k_ctx.transpose(0, 1).unsqueeze(0), v_ctx.transpose(0, 1).unsqueeze(0)


def _with_context(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, block_table: torch.Tensor,
                  num_context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every key a chunk attends to, context first: (1, kvh, C + L, hd) each."""
    if num_context == 0:
        return k, v
    k_ctx, v_ctx = _context(k_cache, v_cache, block_table, num_context, k.dtype)
    return torch.cat([k_ctx, k], 2), torch.cat([v_ctx, v], 2)


def fused_causal_attention(qh: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           scale: float) -> torch.Tensor:  # (1, H, L, hd)
    """The GPU form: queries qh (1, H, L, hd) are the last L of the T keys (1, kvh, T, hd),
    causal aligned bottom-right. ``causal_lower_right`` is a mask SDPA's fused kernels
    (flash, memory-efficient) apply tile by tile, so neither an L x T mask nor the
    score matrix is built. K/V are widened to H heads first: the fused kernels take no
    grouped-query form (``enable_gqa`` would send them to the unfused math kernel)."""
    n, t = qh.shape[2], k.shape[2]
    g = qh.shape[1] // k.shape[1]
    if g > 1:
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # (1, H, T, hd)
    if t == n:
        return F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(qh, k, v, attn_mask=causal_lower_right(n, t),
                                          scale=scale)


# torch's tiled CPU attention, which also returns each query's log-sum-exp of scores.
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _context_then_chunk(
    qh: torch.Tensor,  # (1, H, L, hd)
    k_ctx: torch.Tensor,  # (1, kvh, C, hd): every key before the chunk, all visible
    v_ctx: torch.Tensor,
    k: torch.Tensor,  # (1, kvh, L, hd): the chunk's own keys, causal
    v: torch.Tensor,
    scale: float,
) -> torch.Tensor:  # (1, H, L, hd)
    """Exact chunked-prefill attention from two tiled calls, neither with a mask:
    the queries are the last L of C + L keys, a causal mask aligned bottom-right,
    which torch's ``is_causal`` (aligned top-left) is not. So the context part runs
    unmasked, the chunk part causal, and the two softmaxes merge by their
    log-sum-exps: out = o_ctx * σ(lse_ctx - lse_chunk) + o_chunk * σ(lse_chunk - lse_ctx).
    Nothing of size L x (C + L) is built (a mask would be, and converted to floats)."""
    assert _CPU_FLASH is not None
    o_ctx, lse_ctx = _CPU_FLASH(qh, k_ctx, v_ctx, scale=scale)  # (1, H, L, hd), (1, H, L)
    o_new, lse_new = _CPU_FLASH(qh, k, v, is_causal=True, scale=scale)
    w_ctx = torch.sigmoid(lse_ctx - lse_new).unsqueeze(-1)  # (1, H, L, 1), fp32
    return torch.lerp(o_new.float(), o_ctx.float(), w_ctx).to(qh.dtype)


def _masked(qh: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_context: int,
            scale: float) -> torch.Tensor:
    """The reference form (any device): query i (absolute position num_context + i)
    sees keys 0..num_context + i, through an explicit (L, T) mask."""
    n, total = qh.shape[2], k.shape[2]
    mask = torch.ones(n, total, dtype=torch.bool, device=qh.device).tril(num_context)
    return F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
