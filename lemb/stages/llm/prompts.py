"""Prompt rendering and tokenization, one implementation for every backend: the chat template (or the bare prompt and
a newline), the prompt's token ids, each continuation's ids, and generated ids back to cleaned text. All three
backends sample after and score these same ids.

A continuation is tokenized on its own (no special tokens added) and appended to the prompt's ids: the samples were
generated after exactly those prompt ids, the desired output and every sample share one boundary, and every engine
scores the same prompt ids + continuation ids. One joint string could merge tokens across the boundary."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

PROMPT_CACHE = 8192  # prompts whose token ids are kept


def clean_sample(text: str) -> str:
    """Cut at the first newline that follows the first non-blank character, then strip (shared by all backends)."""
    return text.lstrip().split("\n", 1)[0].strip()


class Prompts:
    """A tokenizer's prompts: rendered with its chat template where it has one, their ids kept for the prompts of the
    last few blocks (the label stage samples a block's prompts, then scores the same prompts)."""

    def __init__(self, tokenizer: Any, eos: int | list[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos)
        self.cache: dict[str, list[int]] = {}

    def render(self, user_message: str) -> str:
        if not self.has_chat_template:
            return user_message + "\n"
        messages = [{"role": "user", "content": user_message}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, user_message: str) -> list[int]:
        """The rendered prompt's token ids (a copy of the cached ones)."""
        ids = self.cache.get(user_message)
        if ids is None:
            if len(self.cache) >= PROMPT_CACHE:
                self.cache.clear()
            # A chat template already writes BOS and the turn markers; only a bare prompt needs the tokenizer's own.
            rendered = self.render(user_message)
            ids = self.tokenizer(rendered, add_special_tokens=not self.has_chat_template)["input_ids"]
            self.cache[user_message] = ids
        return list(ids)

    def continuations(self, texts: Sequence[str]) -> list[list[int]]:
        """Each continuation's token ids, tokenized on its own; one without tokens is refused."""
        encoded = []
        for i, text in enumerate(texts):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            if not ids:
                raise ValueError(f"continuation {i} ({text!r}) has no tokens; drop empty samples before scoring")
            encoded.append(ids)
        return encoded

    def decode(self, rows: list[list[int]]) -> list[str]:
        """Generated rows as cleaned text (`clean_sample`), each cut at its first end-of-sequence token."""
        texts = []
        for row in rows:
            # Rows that stopped early are filled with pad, which need not be a special token: cut at eos first.
            end = next((j for j, t in enumerate(row) if t in self.eos_ids), len(row))
            texts.append(clean_sample(self.tokenizer.decode(row[:end], skip_special_tokens=True)))
        return texts
