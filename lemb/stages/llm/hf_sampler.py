"""Sampling and greedy decoding with transformers' `generate`, on token ids.

Each sample of a prompt has its own generator, seeded from the prompt's seed and the sample's index, and picks tokens
by the Gumbel-max trick. So a prompt's samples do not depend on which other prompts share the call, their order, or
how the call is split into generate batches: the label stage can sample a whole block of queries at once and get
what it would get query by query (up to float32 rounding of the logits, which moves a pick with a probability near
1e-6 a token)."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from lemb.stages.llm.base import Progress, length_batches

# KV tokens one sampling generate call holds: sum over its prompts of n * (padded prompt + max_new_tokens). On one
# CPU thread a decoding step of the default model costs 18, 14, 12 and 16 ms a row at 32, 64, 128 and 256 rows of
# 200 cached tokens (attention and cache copies grow past ~100 rows): 16k tokens is within 10% of the best and holds
# 0.7 GiB of float32 KV for the default 135M model (0.9 GiB for a 1.5B GQA model). A GPU decodes faster the more
# rows share a step: 64k tokens are 1.75 GiB of bf16 KV for a 1.5B GQA model, 8 GiB for an 8B one.
SAMPLE_BATCH_TOKENS = {"cpu": 16384, "cuda": 65536}


class _LineStop(StoppingCriteria):
    """Ends a row once its text holds a newline after a non-blank character: everything after it is cut anyway."""

    def __init__(self, tokenizer, prompt_len: int) -> None:
        self.tokenizer, self.prompt_len = tokenizer, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        return torch.tensor(["\n" in t.lstrip() for t in texts], dtype=torch.bool, device=input_ids.device)


class _GumbelMax(LogitsProcessor):
    """Per-row sampling by the Gumbel-max trick: a row's token at each step is argmax(logits / temperature + g), with
    g standard Gumbel noise over the vocabulary drawn from the row's own generator, which is exactly a draw from
    softmax(logits / temperature). Only that token is left finite, so generate's greedy pick takes it. A row's tokens
    depend on its logits and its own generator alone, never on the other rows of the batch.

    Why not the inverse CDF of one uniform a step: a token in the long tail of the vocabulary owns a slice of the
    cumulative distribution about as narrow as float32 rounding, so a 1e-6 change in the logits (another batch's
    padding) moves the pick whenever the uniform lands in the tail (measured: 6 of 168 samples of 16 tokens on 24
    NQ queries differed batched vs per query). The top two Gumbel-perturbed logits are typically O(1) apart, so such
    a change flips a pick with a probability near 1e-6."""

    def __init__(self, generators: list[torch.Generator], temperature: float) -> None:
        self.generators, self.temperature = generators, temperature

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # every row draws once a step, finished or not, so a row's t-th draw is the same in any batch
        noise = torch.stack([torch.rand(scores.shape[-1], generator=g, device=g.device) for g in self.generators])
        gumbel = -torch.log(-torch.log(noise))  # a 0 draw gives -inf: never picked
        token = (scores.float() / self.temperature + gumbel.to(scores.device)).argmax(-1, keepdim=True)
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)


def _row_generator(seed: int, row: int, device: torch.device) -> torch.Generator:
    """The generator of a prompt's row-th sample: a function of (seed, row) alone, so asking for more samples keeps
    the first ones."""
    digest = hashlib.blake2b(f"{seed}\x1f{row}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "big") >> 1)


class HFSampler:
    """Samples and greedy answers of a causal LM in eval mode, whose generation_config holds only its stop tokens."""

    def __init__(self, model: Any, tokenizer: Any, eos_ids: list[int], pad_id: int, device: torch.device) -> None:
        self.model, self.tokenizer, self.eos_ids, self.pad_id, self.device = model, tokenizer, eos_ids, pad_id, device

    @torch.inference_mode()
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
        """ns[i] rows after prompt i, a function of (prompt i, ns[i], seeds[i], max_new_tokens, temperature).

        Sample j of prompt i draws its Gumbel noise from a generator seeded by (seeds[i], j) (`_GumbelMax`), whatever
        else runs in the batch.
        Prompts of similar length share a generate call of at most `batch_tokens` KV tokens (sum over its prompts
        of ns[i] x (padded prompt + max_new_tokens); a prompt over the budget runs alone). Within a call each
        prompt is prefilled once and its cache repeated for its samples (prefill dominates on a CPU; decoding is
        memory-bound there for a few rows, so rows sharing a step are nearly free).
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, not {temperature}; greedy() is the temperature-0 answer")
        out: list[list[list[int]]] = [[] for _ in prompts]
        budget = batch_tokens or SAMPLE_BATCH_TOKENS.get(self.device.type, SAMPLE_BATCH_TOKENS["cuda"])
        cost = [n * (len(p) + max_new_tokens) for n, p in zip(ns, prompts)]  # KV tokens, for `progress`
        finished = 0
        for batch in length_batches([len(p) for p in prompts], budget, weights=ns, extra=max_new_tokens):
            batch.sort()  # the call's own order (the samples do not depend on it)
            ids, mask = self._left_pad([prompts[k] for k in batch])
            counts = torch.tensor([ns[k] for k in batch], device=self.device)
            rows = torch.repeat_interleave(torch.arange(len(batch), device=self.device), counts)
            generators = [_row_generator(seeds[k], j, self.device) for k in batch for j in range(ns[k])]
            generated = self._generate(
                ids[rows], mask[rows], max_new_tokens, past_key_values=self._prefill(ids, mask, rows),
                logits_processor=LogitsProcessorList([_GumbelMax(generators, temperature)]),
            )  # fmt: skip
            start = 0
            for k in batch:
                out[k] = generated[start : start + ns[k]]
                start += ns[k]
            finished += sum(cost[k] for k in batch)
            if progress:
                progress(finished / sum(cost))
        return out

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> Any:
        """The KV cache of every prompt but its last token, computed once a prompt and repeated for its `rows` (None
        for prompts of one token)."""
        if ids.shape[1] <= 1:
            return None
        positions = (mask[:, :-1].cumsum(-1) - 1).clamp(min=0)
        past = self.model(
            ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions, use_cache=True, logits_to_keep=1
        ).past_key_values
        past.batch_select_indices(rows)
        return past

    @torch.inference_mode()
    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        ids, mask = self._left_pad(prompts)
        return self._generate(ids, mask, max_new_tokens)

    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, seqs))
        # Left padding keeps every prompt's last token at the end, where generation continues.
        ids = torch.tensor([[self.pad_id] * (width - len(s)) + s for s in seqs], device=self.device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=self.device)
        return ids, mask

    def _generate(self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, **decoding) -> list[list[int]]:
        """The new token ids of each row, padded after its end (`pad_id`) where it stopped before the others."""
        out = self.model.generate(
            ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id, do_sample=False,
            stopping_criteria=StoppingCriteriaList([_LineStop(self.tokenizer, ids.shape[1])]),
            **decoding,
        )  # fmt: skip
        return out[:, ids.shape[1] :].tolist()
