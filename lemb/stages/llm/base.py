"""What every LLM backend shares: the interface the label stage and eval call (`sample_many`, `score_many`,
`greedy`), composed of three components, as a batch LLM pipeline composes its stages:

- `Prompts` (prompts.py): chat template rendering and tokenization, one implementation for every backend, so all of
  them sample after and score the same token ids;
- a `Sampler` of the backend's engine: token ids of N samples (or the greedy answer) of each prompt;
- a `Scorer` of the backend's engine: the summed log-probability of each continuation after its prompt.

A backend builds its engine, then the three components on it; everything else is here: tokenizing before the
engine, cleaning and counting the generated text after it, and the one mean-or-sum reduce of a score."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from lemb.stages.llm.prompts import Prompts

Progress = Callable[[float], None]  # told the fraction of a call's work done


def check_reduce(reduce: str) -> None:
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', not {reduce!r}")


def reduced(total: float, tokens: int, reduce: str) -> tuple[float, int]:
    """A continuation's score from its summed log-probability (every backend's): the mean over its tokens, or the
    sum; with its token count."""
    return (total / tokens if reduce == "mean" else total), tokens


def restart_seed(seed: int | None, sample: int, length: int) -> int | None:
    """Seed of the request that continues sample `sample` of a prompt after a blank line of `length` tokens (see
    `stopped_blank`): its own, so a continued sample depends on nothing else."""
    return None if seed is None else seed + 7919 * (sample + 1) + length


def stopped_blank(
    prompts: Prompts, row: list[int], finish_reason: str | None, stop_reason: Any, max_new_tokens: int
) -> bool:
    """A vLLM sample that stopped at a newline before any text, with budget left. vLLM's stop string "\\n" ends
    it there, where the transformers backend goes on (a line ends after its first non-blank character): the
    vLLM-based samplers continue such a sample from its newline, seeded by `restart_seed`."""
    stopped = finish_reason == "stop" and stop_reason == "\n"
    return stopped and len(row) < max_new_tokens and not prompts.decode([row])[0]


def length_batches(
    lengths: list[int], budget: int, weights: list[int] | None = None, extra: int = 0
) -> list[list[int]]:
    """Indices grouped longest first into batches of at most `budget` tokens once padded to the batch's longest
    row, taking a row only while it is at least 3/4 of that longest (padding is wasted compute). With `weights`,
    item i stands for weights[i] rows of lengths[i] + `extra` tokens (a prompt's samples and their new tokens)."""
    weights = weights or [1] * len(lengths)
    batches: list[list[int]] = []
    held = 0  # rows of the last batch
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if batches:
            longest = lengths[batches[-1][0]]
            if (held + weights[i]) * (longest + extra) <= budget and 4 * lengths[i] >= 3 * longest:
                batches[-1].append(i)
                held += weights[i]
                continue
        batches.append([i])
        held = weights[i]
    return batches


class RequestRefused(Exception):
    """A request that can never succeed (a server's 400 or 404): `index` is the prompt (sampling) or item (scoring)
    of the call, so the caller can name its query."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


class Sampler(Protocol):
    """Generated token ids of an engine, after prompts given as token ids."""

    def sample(
        self,
        prompts: list[list[int]],
        ns: list[int],
        max_new_tokens: int,
        temperature: float,
        seeds: list[int],
        batch_tokens: int | None,
        progress: Progress | None,
    ) -> list[list[list[int]]]:
        """ns[i] rows of generated ids after prompt i (every ns[i] positive), a function of (prompt i, ns[i],
        seeds[i], max_new_tokens, temperature) alone (`LLMBackend.sample_many`)."""
        ...

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """The temperature-0 row of each prompt."""
        ...


class Scorer(Protocol):
    """Log-probabilities of an engine, of continuations after prompts, all given as token ids."""

    def score(
        self,
        prompts: list[list[int]],
        continuations: list[list[list[int]]],
        batch_tokens: int | None,
        progress: Progress | None,
    ) -> list[list[float]]:
        """The summed log-probability of each continuations[i][j] after prompts[i]."""
        ...


def forwarded(component: str, name: str) -> property:
    """An attribute of the backend that is its component's (read and set there)."""
    return property(
        lambda self: getattr(getattr(self, component), name),
        lambda self, value: setattr(getattr(self, component), name, value),
        doc=f"`{component}.{name}`",
    )


class LLMBackend:
    """The interface every backend offers, from its `prompts`, `sampler` and `scorer` (see the module's notes)."""

    prompts: Prompts
    sampler: Sampler
    scorer: Scorer
    pad_id: int | None = None  # the token that fills a generated row after its end, where an engine pads rows
    tokenizer = forwarded("prompts", "tokenizer")
    has_chat_template = forwarded("prompts", "has_chat_template")
    eos_ids = forwarded("prompts", "eos_ids")

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
        self.prompts = Prompts(tokenizer, eos)
        self.generated_tokens = 0  # tokens sampled or decoded greedily (up to each row's end), for cost reports

    def render(self, user_message: str) -> str:
        return self.prompts.render(user_message)

    def prompt_lengths(self, user_messages: Sequence[str]) -> list[int]:
        """Token count of each rendered prompt (as sampled and scored), for sizing work by a token budget."""
        return [len(self.prompts.encode(m)) for m in user_messages]

    # the prompt's and continuations' ids as sampled and scored (benchmarks read them: bench/label_throughput.py)
    def _encode_prompt(self, user_message: str) -> list[int]:
        return self.prompts.encode(user_message)

    def _encode_continuations(self, continuations: Sequence[str]) -> list[list[int]]:
        return self.prompts.continuations(continuations)

    def _texts(self, rows: list[list[int]]) -> list[str]:
        """The cleaned texts of generated rows, counting each row's tokens up to its end (eos, or the padding that
        fills a row which stopped before the others) into `generated_tokens`."""
        ends = {*self.eos_ids, self.pad_id}
        self.generated_tokens += sum(next((j for j, t in enumerate(r) if t in ends), len(r)) for r in rows)
        return self.prompts.decode(rows)

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
        if not len(user_messages) == len(ns) == len(seeds):
            raise ValueError(
                f"sample_many needs one n and one seed per prompt: {len(user_messages)} prompts, {len(ns)} ns, "
                f"{len(seeds)} seeds"
            )
        asked = [i for i, n in enumerate(ns) if n > 0]
        try:
            rows = self.sampler.sample(
                [self.prompts.encode(user_messages[i]) for i in asked], [ns[i] for i in asked], max_new_tokens,
                temperature, [seeds[i] for i in asked], batch_tokens, progress,
            )  # fmt: skip
        except RequestRefused as exc:
            exc.index = asked[exc.index]  # the sampler's prompt i is the call's prompt asked[i]
            raise
        out: list[list[str]] = [[] for _ in user_messages]
        for i, samples in zip(asked, rows):
            out[i] = self._texts(samples)
        return out

    def greedy(self, user_messages: list[str], max_new_tokens: int) -> list[str]:
        """The temperature-0 answer of each prompt (cleaned as samples are)."""
        if not user_messages:
            return []
        return self._texts(self.sampler.greedy([self.prompts.encode(m) for m in user_messages], max_new_tokens))

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
        """score() of several (prompt, continuations) items in one call; `batch_tokens` bounds a forward pass, where
        the backend batches itself; `progress` as in sample_many."""
        check_reduce(reduce)
        prompts = [self.prompts.encode(m) for m, _ in items]
        conts = [self.prompts.continuations(c) for _, c in items]
        totals = self.scorer.score(prompts, conts, batch_tokens, progress)
        return [[reduced(t, len(c), reduce) for t, c in zip(ts, cs)] for ts, cs in zip(totals, conts)]
