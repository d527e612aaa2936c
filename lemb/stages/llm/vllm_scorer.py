"""Scoring with an in-process vLLM engine, on token ids.

Every continuation is one request, prompt + continuation, whose `prompt_logprobs` give the untempered
log-probability of each continuation token. vLLM skips its prefix cache for such requests by default (a cached prefix
yields no log-probabilities), which makes every continuation re-run the whole prompt. Only the continuation's rows are
needed, so each distinct prompt is prefilled once and the scoring requests read the cache
(`skip_reading_prefix_cache=False`): each one then computes the prompt's last partial KV block and its continuation.
A request whose cache hit reached into the continuation (the same text scored twice) is run again without the cache.
Prompts that were just sampled are already in the cache: their prefill then computes only the last partial block."""

from __future__ import annotations

from typing import Any

from lemb.stages.llm.base import Progress
from lemb.stages.llm.vllm_calls import EngineCalls


class VLLMScorer:
    """Summed log-probabilities through `calls` (its engine's SamplingParams class: `params`)."""

    def __init__(self, calls: EngineCalls, params: Any) -> None:
        self.calls, self.SamplingParams = calls, params
        self.rescored_requests = 0  # scoring requests run again without the cache (their hit reached too far)
        self.read_prefix_cache = True  # False: vLLM's default for prompt_logprobs requests (benchmarks compare)

    def _scoring(self, read_cache: bool) -> Any:
        """Log-probabilities of the prompt's tokens (the target's own, before any temperature), no text."""
        return self.SamplingParams(
            max_tokens=1, prompt_logprobs=0, skip_reading_prefix_cache=not read_cache, detokenize=False
        )

    def score(
        self,
        prompts: list[list[int]],
        continuations: list[list[list[int]]],
        batch_tokens: int | None,
        progress: Progress | None,
    ) -> list[list[float]]:
        """The summed log-probability of every (prompt, continuation) pair in two engine calls: each distinct prompt
        prefilled once, then all continuations at once, reading the prompts' cached KV blocks (the engine batches by
        itself, so `batch_tokens` is not used)."""
        jobs = [(i, c) for i, cs in enumerate(continuations) for c in cs]
        # progress by tokens: the prefill call computes the prompts, the scoring call (mostly) the continuations
        prefill = sum(map(len, dict.fromkeys(map(tuple, prompts)))) if self.read_prefix_cache else 0
        share = prefill / (prefill + sum(len(c) for _, c in jobs) or 1)
        if self.read_prefix_cache:
            distinct = [list(p) for p in dict.fromkeys(map(tuple, prompts))]
            first = (lambda f: progress(share * f)) if progress else None
            self.calls.run(distinct, self.SamplingParams(max_tokens=1, detokenize=False), first)
        then = (lambda f: progress(share + (1 - share) * f)) if progress else None
        outs = self.calls.run([prompts[i] + c for i, c in jobs], self._scoring(self.read_prefix_cache), then)
        # rows before a request's cached length are not computed: its continuation must start after them
        redo = [k for k, (i, _) in enumerate(jobs) if (outs[k].num_cached_tokens or 0) > len(prompts[i]) - 1]
        self.rescored_requests += len(redo)
        if redo:
            again = self.calls.run([prompts[jobs[k][0]] + jobs[k][1] for k in redo], self._scoring(read_cache=False))
            for k, out in zip(redo, again):
                outs[k] = out
        totals: list[list[float]] = [[] for _ in prompts]
        for (i, cont), out in zip(jobs, outs):
            rows = out.prompt_logprobs[len(prompts[i]) :]
            totals[i].append(sum(row[token].logprob for row, token in zip(rows, cont, strict=True)))
        return totals
