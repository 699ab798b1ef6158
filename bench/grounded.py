"""W6, grounded generation: a 512-token passage and the instruction to repeat it.

The passage is 512 whole-word tokens (vocabulary entries that are a space and a
lowercase word), drawn with a fixed seed; the user message asks for it verbatim
and the model's chat template wraps it. The result is sent as token ids, so
every server sees the same input. Output that copies its prompt is what n-gram
(prompt-lookup) speculation accelerates; pdserve's engine has none yet, so
this workload reports plain decode speed for now.
"""

from __future__ import annotations

import random
from typing import Any

W6_REQUESTS = 16
W6_PASSAGE = 512
W6_OUTPUT = 256
INSTRUCTION = "Repeat the following passage verbatim, word for word, and nothing else.\n\n"


def load_tokenizer(model_dir: str | None) -> Any:
    from transformers import AutoTokenizer

    from pdserve.model_files import resolve_model

    return AutoTokenizer.from_pretrained(str(resolve_model(model_dir, convert=False)))


def word_ids(tokenizer: Any) -> list[int]:
    """Ids of tokens that are a word-start marker (byte-level "Ġ" or sentencepiece "▁")
    and a lowercase ASCII word of 3+ letters: they decode to " word" and re-encode alike."""
    ids = []
    for tid, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        word = (tok or "")[1:]
        if (tok or "")[:1] in ("Ġ", "▁") and len(word) >= 3 and word.isascii() \
                and word.isalpha() and word.islower():
            ids.append(tid)
    if len(ids) < 50:
        raise ValueError(f"tokenizer has only {len(ids)} whole-word tokens; W6 needs a "
                         "natural-language vocabulary")
    return ids


def grounded_prompts(tokenizer: Any, n: int = W6_REQUESTS, passage_tokens: int = W6_PASSAGE,
                     seed: int = 6) -> list[list[int]]:
    words = word_ids(tokenizer)
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        passage = tokenizer.decode([rng.choice(words) for _ in range(passage_tokens)]).strip()
        messages = [{"role": "user", "content": INSTRUCTION + passage}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        prompts.append([int(i) for i in ids])
    return prompts
