"""Sampling and greedy decoding with an in-process vLLM engine, on token ids: each prompt is one request seeded from
that prompt's own seed, so its samples do not depend on the other requests of the call (vLLM draws a seeded
request's random numbers from its own generator)."""

from __future__ import annotations

import hashlib
from typing import Any

from lemb.stages.llm.base import Progress, restart_seed, stopped_blank
from lemb.stages.llm.prompts import Prompts
from lemb.stages.llm.vllm_calls import EngineCalls


def request_seed(seed: int) -> int:
    """vLLM seed of the request for a prompt with seed `seed`. vLLM seeds a request's n samples seed, seed + 1, ...,
    so prompts with consecutive seeds would share samples (prompt s's second is prompt s + 1's first): the seed is
    hashed, to 31 bits."""
    digest = hashlib.blake2b(str(seed).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") >> 1


class VLLMSampler:
    """Samples and greedy answers through `calls` (its engine's SamplingParams class: `params`); `prompts` decides
    which samples stopped blank."""

    def __init__(self, calls: EngineCalls, params: Any, prompts: Prompts) -> None:
        self.calls, self.SamplingParams, self.prompts = calls, params, prompts

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
        """ns[i] rows after prompt i in one engine call: prompt i is one request seeded with request_seed(seeds[i]).
        The engine batches and bounds its KV cache itself, so `batch_tokens` is not used."""
        if not prompts:
            return []
        params = [
            self.SamplingParams(
                n=n, temperature=temperature, top_p=1.0, top_k=0, max_tokens=max_new_tokens, seed=request_seed(seed),
                stop=["\n"],
            )
            for n, seed in zip(ns, seeds)
        ]  # fmt: skip
        return self._complete(prompts, params, max_new_tokens, progress)

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        params = [self.SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=["\n"])] * len(prompts)
        return [rows[0] for rows in self._complete(prompts, params, max_new_tokens)]

    def _complete(
        self, prompts: list[list[int]], params: list[Any], max_new_tokens: int, progress: Progress | None = None
    ) -> list[list[list[int]]]:
        """Generated token ids per prompt and sample; a sample that stopped blank (`stopped_blank`) is continued
        from its newline, with its own seed, until it holds text or its budget is spent."""
        outs = self.calls.run(prompts, params, progress)
        rows = [[list(o.token_ids) for o in out.outputs] for out in outs]
        for _ in range(max_new_tokens):
            blank = [
                (i, j)
                for i, out in enumerate(outs)
                for j, o in enumerate(out.outputs)
                if stopped_blank(self.prompts, rows[i][j], o.finish_reason, o.stop_reason, max_new_tokens)
            ]
            if not blank:
                break
            again = []
            for i, j in blank:
                p = params[i]
                again.append(p.clone())
                again[-1].n, again[-1].seed = 1, restart_seed(p.seed, j, len(rows[i][j]))
                again[-1].max_tokens = max_new_tokens - len(rows[i][j])
            more = self.calls.run([prompts[i] + rows[i][j] for i, j in blank], again)
            for (i, j), out in zip(blank, more):
                rows[i][j] += list(out.outputs[0].token_ids)
                outs[i].outputs[j] = out.outputs[0]
        return rows
