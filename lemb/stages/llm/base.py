"""What every LLM backend shares: prompt rendering and tokenization, so that all of them sample after and score
the same token ids, and the interface the label stage calls (`sample_many`, `score_many`, `greedy`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def clean_sample(text: str) -> str:
    """Cut at the first newline that follows the first non-blank character, then strip (shared by all backends)."""
    return text.lstrip().split("\n", 1)[0].strip()


def check_reduce(reduce: str) -> None:
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', not {reduce!r}")


def reduced(total: float, tokens: int, reduce: str) -> tuple[float, int]:
    """A continuation's score from its summed log-probability (every backend's): the mean over its tokens, or the
    sum; with its token count."""
    return (total / tokens if reduce == "mean" else total), tokens


def restart_seed(seed: int | None, sample: int, length: int) -> int | None:
    """Seed of the request that continues sample `sample` of a prompt after a blank line of `length` tokens (see
    `LLMBackend.stopped_blank`): its own, so a continued sample depends on nothing else."""
    return None if seed is None else seed + 7919 * (sample + 1) + length


class RequestRefused(Exception):
    """A request that can never succeed (a server's 400 or 404): `index` is the prompt (sampling) or item (scoring)
    of the call, so the caller can name its query."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


PROMPT_CACHE = 8192  # prompts whose token ids a backend keeps


Progress = Callable[[float], None]  # told the fraction of a call's work done


class LLMBackend:
    """What every LLM backend shares: prompt rendering and tokenization (so all of them sample after and score the
    same token ids), and the methods that only combine the backend's own ones."""

    tokenizer: Any
    has_chat_template: bool
    eos_ids: list[int]

    def _open(
        self, name: str, path: str, trust_remote_code: bool, revision: str | None = None, eos: Any = None
    ) -> None:
        """What every backend sets up alike: its name, the fingerprint of its model (a folder's: `model_fingerprint`),
        its tokenizer, and the tokens it stops at (`eos`, else the model's generation_config.json, else the
        tokenizer's end of sequence)."""
        from transformers import AutoTokenizer, GenerationConfig

        from lemb.stages.models import model_fingerprint

        self.name = name
        self.revision = model_fingerprint(path) if revision is None else revision
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if eos is None:
            try:
                eos = GenerationConfig.from_pretrained(path).eos_token_id
            except OSError:
                eos = None
        self._init_codec(tokenizer, eos)

    @classmethod
    def codec(cls, tokenizer: Any, eos: int | list[int] | None = None) -> LLMBackend:
        """A backend with a tokenizer and no model: it renders prompts and counts their tokens (label --dry-run)."""
        backend = cls()
        backend._init_codec(tokenizer, eos)
        return backend

    def _init_codec(self, tokenizer: Any, eos: int | list[int] | None) -> None:
        self.tokenizer = tokenizer
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos)
        self.generated_tokens = 0  # tokens sampled or decoded greedily (up to each row's end), for cost reports

    def render(self, user_message: str) -> str:
        if not self.has_chat_template:
            return user_message + "\n"
        messages = [{"role": "user", "content": user_message}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _encode_prompt(self, user_message: str) -> list[int]:
        """The prompt's token ids, kept for the prompts of the last few blocks: the label stage samples a block's
        prompts, then scores the same prompts."""
        cache = self.__dict__.setdefault("_prompt_ids", {})
        ids = cache.get(user_message)
        if ids is None:
            if len(cache) >= PROMPT_CACHE:
                cache.clear()
            # A chat template already writes BOS and the turn markers; only a bare prompt needs the tokenizer's own.
            rendered = self.render(user_message)
            ids = cache[user_message] = self.tokenizer(rendered, add_special_tokens=not self.has_chat_template)[
                "input_ids"
            ]
        return list(ids)

    def _encode_continuations(self, continuations: Sequence[str]) -> list[list[int]]:
        encoded = []
        for i, text in enumerate(continuations):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            if not ids:
                raise ValueError(f"continuation {i} ({text!r}) has no tokens; drop empty samples before scoring")
            encoded.append(ids)
        return encoded

    def _decode(self, rows: list[list[int]]) -> list[str]:
        texts = []
        for row in rows:
            # Rows that stopped early are filled with pad, which need not be a special token: cut at eos first.
            end = next((j for j, t in enumerate(row) if t in self.eos_ids), len(row))
            texts.append(clean_sample(self.tokenizer.decode(row[:end], skip_special_tokens=True)))
        return texts

    def _texts(self, rows: list[list[int]]) -> list[str]:
        """The cleaned texts of generated rows, counting each row's tokens up to its end (eos, or the padding that
        fills a row which stopped before the others) into `generated_tokens`."""
        ends = {*self.eos_ids, getattr(self, "pad_id", None)}
        self.generated_tokens += sum(next((j for j, t in enumerate(r) if t in ends), len(r)) for r in rows)
        return self._decode(rows)

    def stopped_blank(self, row: list[int], finish_reason: str | None, stop_reason: Any, max_new_tokens: int) -> bool:
        """A vLLM sample that stopped at a newline before any text, with budget left. vLLM's stop string "\\n" ends
        it there, where the transformers backend goes on (a line ends after its first non-blank character): the
        vLLM-based backends continue such a sample from its newline, seeded by `restart_seed`."""
        stopped = finish_reason == "stop" and stop_reason == "\n"
        return stopped and len(row) < max_new_tokens and not self._decode([row])[0]

    def prompt_lengths(self, user_messages: Sequence[str]) -> list[int]:
        """Token count of each rendered prompt (as sampled and scored), for sizing work by a token budget."""
        return [len(self._encode_prompt(m)) for m in user_messages]

    def sample_many(
        self,
        user_messages: Sequence[str],
        ns: Sequence[int],
        max_new_tokens: int,
        temperature: float,
        seeds: Sequence[int],
        batch_tokens: int | None = None,
        progress: Progress | None = None,
    ) -> list[list[str]]:
        """ns[i] samples of each prompt i (cleaned: one line, stripped) in one call.

        The samples of prompt i are a function of (prompt i, ns[i], seeds[i], max_new_tokens, temperature) alone:
        the other prompts of the call, their order and lengths, and how the backend splits the call (`batch_tokens`
        bounds the KV tokens one batch holds, where the backend batches itself) do not change them. So sampling a
        block of queries in one call gives each query the samples it would get alone. `progress`, if given, is
        called with the fraction of the call's work done as parts of it finish.
        """
        raise NotImplementedError

    @staticmethod
    def _check_sampling(user_messages: Sequence[str], ns: Sequence[int], seeds: Sequence[int]) -> None:
        if not len(user_messages) == len(ns) == len(seeds):
            raise ValueError(
                f"sample_many needs one n and one seed per prompt: {len(user_messages)} prompts, {len(ns)} ns, "
                f"{len(seeds)} seeds"
            )

    def greedy(self, user_messages: list[str], max_new_tokens: int) -> list[str]:
        raise NotImplementedError

    def score(self, user_message: str, continuations: list[str], reduce: str = "mean") -> list[tuple[float, int]]:
        """(mean or sum token log-probability, token count) of each continuation after the rendered prompt."""
        return self.score_many([(user_message, continuations)], reduce)[0]

    def score_many(
        self,
        items: Sequence[tuple[str, list[str]]],
        reduce: str = "mean",
        batch_tokens: int | None = None,
        progress: Progress | None = None,
    ) -> list[list[tuple[float, int]]]:
        """score() of several (prompt, continuations) items in one call; `batch_tokens` bounds a forward pass;
        `progress` as in sample_many."""
        raise NotImplementedError
