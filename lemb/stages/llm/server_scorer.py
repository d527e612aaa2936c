"""Scoring through OpenAI-compatible servers, on token ids: one request per (prompt, continuation) with
`prompt_logprobs: 0` and `max_tokens: 1`, which returns the log-probability of every prompt token; the
continuation's are kept. (vLLM does not read its prefix cache for such requests, so each one computes its whole
prompt; the in-process engine reads it, see vllm_scorer.py.)"""

from __future__ import annotations

from lemb.errors import ConfigError
from lemb.stages.llm.base import Progress
from lemb.stages.llm.server_client import ServerClient


class ServerScorer:
    """Summed log-probabilities through `client`: every (prompt, continuation) pair one request, all in flight
    together. An error names the item's index."""

    def __init__(self, client: ServerClient) -> None:
        self.client = client

    def score(
        self,
        prompts: list[list[int]],
        continuations: list[list[list[int]]],
        batch_tokens: int | None,
        progress: Progress | None,
    ) -> list[list[float]]:
        """The summed log-probability of each continuation after its prompt (`batch_tokens` unused)."""
        pairs = [(i, c) for i, cs in enumerate(continuations) for c in cs]
        jobs = [self._score(i, prompts[i], c) for i, c in pairs]
        sums = self.client.call(self.client.gather(jobs, [float(len(c)) for _, c in pairs], progress))
        totals: list[list[float]] = [[] for _ in prompts]
        for (i, _), total in zip(pairs, sums):
            totals[i].append(total)
        return totals

    async def _score(self, index: int, prompt: list[int], continuation: list[int]) -> float:
        """Sum of the continuation's token log-probabilities after the prompt."""
        reply = await self.client.post(
            {"prompt": prompt + continuation, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}, index
        )
        self.client.prefilled_tokens += reply.get("usage", {}).get("prompt_tokens", 0)
        rows = reply["choices"][0].get("prompt_logprobs")
        if rows is None:
            raise ConfigError("the LLM server returned no prompt_logprobs: the server backend needs vLLM's "
                              "OpenAI-compatible server")  # fmt: skip
        return sum(float(row[str(token)]["logprob"]) for row, token in zip(rows[len(prompt) :], continuation,
                                                                             strict=True))  # fmt: skip
