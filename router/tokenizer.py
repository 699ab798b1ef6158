"""Tokenizer and chat template without transformers or torch.

Reads ``tokenizer.json`` with the ``tokenizers`` library and renders the chat
template (``chat_template.jinja`` or ``tokenizer_config.json``) with jinja2, the
way transformers does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


class PromptTokenizer(Protocol):
    """What the router needs of a tokenizer (RouterTokenizer; a fake in tests)."""

    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def token_text(self, token_id: int) -> str: ...

    def decode(self, token_ids: list[int], skip_special_tokens: bool) -> str: ...

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]: ...


class RouterTokenizer:
    def __init__(self, model_dir: Path) -> None:
        self.tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        cfg_path = model_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        template = cfg.get("chat_template")
        jinja_file = model_dir / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text()
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self.template = env.from_string(template) if template else None
        self.vocab_size = self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text).ids)

    def token_text(self, token_id: int) -> str:
        """One token as text (logprobs name tokens this way)."""
        return str(self.tok.decode([token_id], skip_special_tokens=False))

    def decode(self, token_ids: list[int], skip_special_tokens: bool) -> str:
        """Output tokens as text (a migrated request's text, see router/migration.py)."""
        return str(self.tok.decode(token_ids, skip_special_tokens=skip_special_tokens))

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        if self.template is None:
            raise ValueError("messages: this model has no chat template; send text or token ids")
        for i, m in enumerate(messages):
            if m.get("role") not in ("system", "user", "assistant", "tool"):
                raise ValueError(f"messages[{i}].role must be system, user, assistant or tool, "
                                 f"got {m.get('role')!r}")
        text = self.template.render(messages=messages, add_generation_prompt=True,
                                    bos_token=self.bos_token, eos_token=self.eos_token)
        # The template already holds the special tokens: do not add them again.
        return list(self.tok.encode(text, add_special_tokens=False).ids)


def _token_text(tok: object) -> str:
    if isinstance(tok, dict):
        return str(tok.get("content", ""))
    return str(tok or "")


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)
