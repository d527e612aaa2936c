"""Sampling through OpenAI-compatible servers, on token ids: one `/v1/completions` request per prompt with its `n`
samples, seeded with the seed the in-process vLLM engine gives the same prompt (`request_seed`), every sampling
setting sent explicitly (a server started with `--generation-config auto` fills whatever a request leaves unset from
the model's generation_config.json: a repetition penalty, a top-k), the generated token ids returned
(`return_token_ids`, a vLLM field)."""

from __future__ import annotations

from typing import Any

from lemb.errors import ConfigError
from lemb.stages.llm.base import Progress, restart_seed, stopped_blank
from lemb.stages.llm.prompts import Prompts
from lemb.stages.llm.server_client import ServerClient
from lemb.stages.llm.vllm_sampler import request_seed


def _sampling(temperature: float, max_tokens: int) -> dict[str, Any]:
    """Every setting that shapes a sample, explicit (what the in-process engine's SamplingParams say)."""
    return {
        "temperature": temperature, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
        "presence_penalty": 0.0, "frequency_penalty": 0.0, "max_tokens": max_tokens, "stop": ["\n"],
        "return_token_ids": True, "skip_special_tokens": True,
    }  # fmt: skip


def _token_ids(choice: dict[str, Any]) -> list[int]:
    ids = choice.get("token_ids")
    if ids is None:
        raise ConfigError("the LLM server returned no token ids: the server backend needs vLLM's OpenAI-compatible"
                          " server (its return_token_ids field)")  # fmt: skip
    return list(ids)


class ServerSampler:
    """Samples and greedy answers through `client`; `prompts` decides which samples stopped blank."""

    def __init__(self, client: ServerClient, prompts: Prompts) -> None:
        self.client, self.prompts = client, prompts

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
        """ns[i] rows after prompt i: one request per prompt, seeded with request_seed(seeds[i]) as the in-process
        vLLM engine seeds it, so a prompt's samples do not depend on the call (`batch_tokens` unused)."""
        jobs = [
            self._complete(i, p, n, request_seed(seed), temperature, max_new_tokens)
            for i, (p, n, seed) in enumerate(zip(prompts, ns, seeds))
        ]
        return self.client.call(self.client.gather(jobs, [float(n) for n in ns], progress))

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        jobs = [self._complete(i, p, 1, None, 0.0, max_new_tokens) for i, p in enumerate(prompts)]
        return [rows[0] for rows in self.client.call(self.client.gather(jobs, [1.0] * len(jobs), None))]

    async def _complete(
        self, index: int, prompt: list[int], n: int, seed: int | None, temperature: float, max_new_tokens: int
    ) -> list[list[int]]:
        """Generated token ids of a prompt's n samples, a sample that stopped blank continued (`stopped_blank`)."""
        extra = {} if seed is None else {"seed": seed}
        reply = await self.client.post({"prompt": prompt, "n": n, **extra, **_sampling(temperature, max_new_tokens)},
                                       index)  # fmt: skip
        self.client.prefilled_tokens += reply.get("usage", {}).get("prompt_tokens", 0)
        choices = sorted(reply["choices"], key=lambda c: c["index"])
        rows = []
        for j, choice in enumerate(choices):
            row = _token_ids(choice)
            while stopped_blank(self.prompts, row, choice.get("finish_reason"), choice.get("stop_reason"),
                                max_new_tokens):  # fmt: skip
                again = {"prompt": prompt + row, "n": 1, **_sampling(temperature, max_new_tokens - len(row))}
                if seed is not None:
                    again["seed"] = restart_seed(seed, j, len(row))
                choice = (await self.client.post(again, index))["choices"][0]
                row += _token_ids(choice)
            rows.append(row)
        return rows
