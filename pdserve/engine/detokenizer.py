"""Incremental detokenization and stop-string detection for one request.

Decodes a short window of tokens around the new ones instead of the whole
output each step (the prefix/read-offset scheme of vLLM and TGI), and holds
back text that ends in an incomplete UTF-8 sequence.
"""

from __future__ import annotations

from typing import Any

from pdserve.engine.request import Request


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, request: Request) -> None:
        self.tokenizer = tokenizer
        self.request = request
        self.prefix_offset = 0
        self.read_offset = 0
        self.skip_special = request.params.skip_special_tokens

    def update(self) -> str | None:
        """Extend ``request.text`` with the newly decodable text.

        Returns the stop string that matched, if any (the text is then cut
        before it, or after it with ``include_stop_str_in_output``).
        """
        r = self.request
        out = r.output_token_ids
        prefix = self.tokenizer.decode(
            out[self.prefix_offset : self.read_offset], skip_special_tokens=self.skip_special
        )
        full = self.tokenizer.decode(
            out[self.prefix_offset :], skip_special_tokens=self.skip_special
        )
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None  # nothing new, or a multi-byte character still incomplete
        old_len = len(r.text)
        r.text += full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(out)
        return self._check_stop(old_len)

    def _check_stop(self, old_len: int) -> str | None:
        r = self.request
        for stop in r.params.stop:
            start = max(0, old_len - len(stop) + 1)
            pos = r.text.find(stop, start)
            if pos != -1:
                end = pos + len(stop) if r.params.include_stop_str_in_output else pos
                r.text = r.text[:end]
                return stop
        return None
