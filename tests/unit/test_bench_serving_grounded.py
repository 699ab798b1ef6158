"""W6 prompts: whole-word passages in the chat template, reproducible, as ids."""

from __future__ import annotations

from typing import Any

import pytest

from bench.grounded import INSTRUCTION, grounded_prompts, word_ids


class FakeTokenizer:
    """Byte-level-BPE-like vocabulary: 'Ġ' marks a word start."""

    def __init__(self) -> None:
        words = [f"Ġ{w}" for w in ("alpha", "beta", "gamma", "delta", "omega")] * 12
        self.vocab = ["<s>", "Ġis", "ĠCaps", "Ġx1", "tail", *words]
        self.templated: list[str] = []

    def __len__(self) -> int:
        return len(self.vocab)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.vocab[i] for i in ids]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.vocab[i] for i in ids).replace("Ġ", " ")

    def apply_chat_template(self, messages: list[dict[str, str]], **kw: Any) -> list[int]:
        assert kw["add_generation_prompt"] and kw["tokenize"] and kw["return_dict"] is False
        self.templated.append(messages[0]["content"])
        return [0] + [1] * len(messages[0]["content"].split())


def test_passages_are_whole_words_and_reproducible() -> None:
    tok = FakeTokenizer()
    ids = word_ids(tok)
    assert ids == list(range(5, len(tok.vocab)))  # not 'is' (short), 'Caps', 'x1', 'tail'
    a = grounded_prompts(tok, n=3, passage_tokens=20, seed=1)
    assert a == grounded_prompts(FakeTokenizer(), n=3, passage_tokens=20, seed=1)
    assert len(a) == 3 and all(isinstance(i, int) for p in a for i in p)
    content = tok.templated[0]
    assert content.startswith(INSTRUCTION) and len(content[len(INSTRUCTION):].split()) == 20


def test_a_tokenizer_without_words_is_refused() -> None:
    tok = FakeTokenizer()
    tok.vocab = tok.vocab[:5]
    with pytest.raises(ValueError, match="whole-word"):
        word_ids(tok)
