"""Block hashes for prefix caching: a chain over each full block's token ids.

Block i's hash covers block i-1's hash and block i's token ids, so equal hashes mean
equal prefixes, not just equal blocks. The chain starts from a salt naming what the
KV values depend on beyond the tokens (model, weights, KV dtype, and how the KV got
here: computed, or imported through a lossy wire encoding), so KV made one way is
never served where another was asked for. Hashes are stable across processes
(blake2b, not Python's ``hash``): a router can compare the summaries workers publish.
"""

from __future__ import annotations

import hashlib
from array import array

BlockHash = bytes

_DIGEST = 16  # bytes: 2**-64 collision odds at a million cached blocks


def salt_hash(*parts: object) -> BlockHash:
    """The chain's root for KV made under ``parts`` (e.g. model, dtype, encoding)."""
    text = "\x1f".join(str(p) for p in parts)
    return hashlib.blake2b(text.encode(), digest_size=_DIGEST).digest()


def extend_hashes(hashes: list[BlockHash], token_ids: list[int], block_size: int,
                  salt: BlockHash, upto_tokens: int) -> None:
    """Append the hashes of the full blocks of ``token_ids[:upto_tokens]`` not yet in
    ``hashes`` (which holds the chain's first blocks)."""
    parent = hashes[-1] if hashes else salt
    for i in range(len(hashes), upto_tokens // block_size):
        block = array("q", token_ids[i * block_size:(i + 1) * block_size])
        parent = hashlib.blake2b(parent + block.tobytes(), digest_size=_DIGEST).digest()
        hashes.append(parent)


def prefix_hashes(token_ids: list[int], block_size: int, salt: BlockHash) -> list[BlockHash]:
    """Hashes of every full block of ``token_ids``."""
    out: list[BlockHash] = []
    extend_hashes(out, token_ids, block_size, salt, len(token_ids))
    return out
