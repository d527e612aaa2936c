"""The transformers backend: sampling, greedy answers and shared-prefix scoring of fixed continuations.

Sampling gives each sample of a prompt its own generator, seeded from the prompt's seed and the sample's index, and
picks tokens by the Gumbel-max trick. So a prompt's samples do not depend on which other prompts share the call,
their order, or how the call is split into generate batches: the label stage can sample a whole block of queries at
once and get what it would get query by query (up to float32 rounding of the logits, which moves a pick with a
probability near 1e-6 a token).

Scored text is the prompt's ids followed by the continuation tokenized on its own (no special tokens added): the
samples were generated after exactly those prompt ids, the desired output and every sample share one boundary, and
vLLM scores the same prompt_token_ids + completion ids. One joint string could merge tokens across the boundary."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from lemb.stages.llm.base import LLMBackend, Progress, check_reduce, reduced
from lemb.stages.models import resolve_model_path
from lemb.vocabulary import DEFAULT_LLM


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


def _reduce(logprobs: torch.Tensor, reduce: str) -> tuple[float, int]:
    return reduced(float(logprobs.double().sum()), len(logprobs), reduce)


# Tokens per scoring forward pass, padding included (LabelConfig.score_batch_tokens = 0 takes these). On one CPU
# thread a matmul is near its best from a few hundred rows on; larger passes only cost memory.
SCORE_BATCH_TOKENS = {"cpu": 4096, "cuda": 32768}
HEAD_POSITIONS = 2048  # positions whose vocabulary logits are held at once (2048 x 128k float32 = 1 GiB)
# KV tokens one sampling generate call holds: sum over its prompts of n * (padded prompt + max_new_tokens). On one
# CPU thread a decoding step of the default model costs 18, 14, 12 and 16 ms a row at 32, 64, 128 and 256 rows of
# 200 cached tokens (attention and cache copies grow past ~100 rows): 16k tokens is within 10% of the best and holds
# 0.7 GiB of float32 KV for the default 135M model (0.9 GiB for a 1.5B GQA model). A GPU decodes faster the more
# rows share a step: 64k tokens are 1.75 GiB of bf16 KV for a 1.5B GQA model, 8 GiB for an 8B one.
SAMPLE_BATCH_TOKENS = {"cpu": 16384, "cuda": 65536}


class _Packed:
    """One prompt and its continuations as a single row: prompt ids, then each continuation's input tokens (all
    but its last, which is only a target), with per-token segment (0 prompt, j + 1 continuation j) and position."""

    def __init__(self, prompt: list[int], continuations: list[list[int]], offset: int = 0) -> None:
        n = len(prompt)
        self.continuations = continuations
        self.ids = prompt + [t for c in continuations for t in c[:-1]]
        self.segment = torch.tensor([0] * n + [j + 1 for j, c in enumerate(continuations) for _ in c[:-1]])
        end = offset + n  # positions go on from `offset` tokens of a cached prefix
        self.positions = torch.tensor(
            list(range(offset, end)) + [end + k for c in continuations for k in range(len(c) - 1)]
        )
        self.tail = len(self.ids) - n  # continuation input tokens
        self.heads = [c[0] for c in continuations]
        self.targets = [t for c in continuations for t in c[1:]]


def _common_prefix(seqs: list[list[int]], limit: int) -> int:
    """Length of the longest prefix all of `seqs` share, at most `limit`."""
    n = 0
    while n < limit and all(s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


def _length_batches(
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


class TransformersBackend(LLMBackend):
    """A causal LM run with transformers in eval mode; every method is gradient-free."""

    def __init__(
        self,
        model: str = DEFAULT_LLM,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        device: str | None = None,
    ) -> None:
        path = resolve_model_path(model, "LLM")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # scoring passes its own 4-D attention mask, which the sdpa and eager attentions honour (flash kernels don't)
        load = {"dtype": getattr(torch, dtype), "trust_remote_code": trust_remote_code}
        try:
            self.model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", **load)
        except ValueError:  # an architecture without sdpa support
            self.model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", **load)
        self.model.to(self.device).eval().requires_grad_(False)
        self._open(model, path, trust_remote_code, eos=self.model.generation_config.eos_token_id)
        pad = self.tokenizer.pad_token_id
        self.pad_id = self.eos_ids[0] if pad is None else pad
        # generate() fills whatever a call leaves unset from the model's generation_config.json (a repetition
        # penalty, top_k, a temperature that warns under greedy decoding): only the stop tokens are kept, so both
        # methods decode from the model's own logits, as vLLM does with generation_config="vllm".
        self.model.generation_config = GenerationConfig(
            bos_token_id=self.model.generation_config.bos_token_id, eos_token_id=self.eos_ids, pad_token_id=self.pad_id
        )
        self.prefilled_tokens = 0  # tokens scoring ran through the model (padding excluded), for benchmarks
        text_config = self.model.config.get_text_config()
        self.sliding_window = getattr(text_config, "sliding_window", None) or None
        self.own_head = self._head_reproduces_logits()

    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, seqs))
        # Left padding keeps every prompt's last token at the end, where generation continues.
        ids = torch.tensor([[self.pad_id] * (width - len(s)) + s for s in seqs], device=self.device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=self.device)
        return ids, mask

    def _generate(self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, **decoding) -> list[str]:
        out = self.model.generate(
            ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id, do_sample=False,
            stopping_criteria=StoppingCriteriaList([_LineStop(self.tokenizer, ids.shape[1])]),
            **decoding,
        )  # fmt: skip
        return self._texts(out[:, ids.shape[1] :].tolist())

    def _sample_batch_tokens(self, batch_tokens: int | None) -> int:
        return batch_tokens or SAMPLE_BATCH_TOKENS.get(self.device.type, SAMPLE_BATCH_TOKENS["cuda"])

    @torch.inference_mode()
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
        """ns[i] samples of each prompt i, a function of (prompt i, ns[i], seeds[i], max_new_tokens, temperature).

        Sample j of prompt i draws its Gumbel noise from a generator seeded by (seeds[i], j) (`_GumbelMax`), whatever
        else runs in the batch.
        Prompts of similar length share a generate call of at most `batch_tokens` KV tokens (sum over its prompts
        of ns[i] x (padded prompt + max_new_tokens); a prompt over the budget runs alone). Within a call each
        prompt is prefilled once and its cache repeated for its samples (prefill dominates on a CPU; decoding is
        memory-bound there for a few rows, so rows sharing a step are nearly free).
        """
        self._check_sampling(user_messages, ns, seeds)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, not {temperature}; greedy() is the temperature-0 answer")
        out: list[list[str]] = [[] for _ in user_messages]
        asked = [i for i, n in enumerate(ns) if n > 0]
        if not asked:
            return out
        prompts = [self._encode_prompt(user_messages[i]) for i in asked]
        budget = self._sample_batch_tokens(batch_tokens)
        weights = [ns[i] for i in asked]
        cost = [w * (len(p) + max_new_tokens) for w, p in zip(weights, prompts)]  # KV tokens, for `progress`
        finished = 0
        for batch in _length_batches([len(p) for p in prompts], budget, weights=weights, extra=max_new_tokens):
            batch.sort()  # the call's own order (the samples do not depend on it)
            ids, mask = self._left_pad([prompts[k] for k in batch])
            counts = torch.tensor([weights[k] for k in batch], device=self.device)
            rows = torch.repeat_interleave(torch.arange(len(batch), device=self.device), counts)
            past = None
            if ids.shape[1] > 1:
                # each prompt is prefilled once; its cache is repeated for its rows
                positions = (mask[:, :-1].cumsum(-1) - 1).clamp(min=0)
                past = self.model(
                    ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions, use_cache=True, logits_to_keep=1
                ).past_key_values
                past.batch_select_indices(rows)
            generators = [_row_generator(seeds[asked[k]], j, self.device) for k in batch for j in range(weights[k])]
            sampler = _GumbelMax(generators, temperature)
            texts = self._generate(
                ids[rows], mask[rows], max_new_tokens, past_key_values=past,
                logits_processor=LogitsProcessorList([sampler]),
            )  # fmt: skip
            start = 0
            for k in batch:
                out[asked[k]] = texts[start : start + weights[k]]
                start += weights[k]
            finished += sum(cost[k] for k in batch)
            if progress:
                progress(finished / sum(cost))
        return out

    @torch.inference_mode()
    def greedy(self, user_messages: list[str], max_new_tokens: int) -> list[str]:
        if not user_messages:
            return []
        ids, mask = self._left_pad([self._encode_prompt(m) for m in user_messages])
        return self._generate(ids, mask, max_new_tokens)

    def _batch_tokens(self, batch_tokens: int | None) -> int:
        return batch_tokens or SCORE_BATCH_TOKENS.get(self.device.type, SCORE_BATCH_TOKENS["cuda"])

    @torch.inference_mode()
    def score_many(
        self,
        items: Sequence[tuple[str, list[str]]],
        reduce: str = "mean",
        batch_tokens: int | None = None,
        progress: Progress | None = None,
    ) -> list[list[tuple[float, int]]]:
        """(mean or sum token log-probability, token count) of each item's continuations after its rendered prompt.

        Each item is one packed row: its prompt once, then every continuation's input tokens, with an attention mask
        that lets a continuation see the prompt and its own earlier tokens only, and positions that restart after
        the prompt for each continuation. So the prompt's tokens are processed once, no continuation is padded, and
        vocabulary logits are computed only where a continuation token is predicted. The items' common prefix (the
        chat template's header, say) runs once for the whole call and is read from its KV cache. Rows of similar
        length share a forward pass of at most `batch_tokens` tokens (padding included; a longer row runs alone).
        """
        check_reduce(reduce)
        prompts = [self._encode_prompt(m) for m, _ in items]
        conts = [self._encode_continuations(c) for _, c in items]
        window = self.sliding_window
        if window and any(len(p) + max(map(len, c), default=0) > window for p, c in zip(prompts, conts)):
            # a custom mask would let tokens see past the model's attention window: the model's own masks instead
            return [self.score_naive(m, c, reduce) for m, c in items]
        if not prompts:
            return []
        shared = _common_prefix(prompts, limit=min(map(len, prompts)) - 1)  # every row keeps its prompt's last token
        prefix = None
        if shared:
            prefix = self.model(torch.tensor([prompts[0][:shared]], device=self.device), logits_to_keep=1)
        rows = [_Packed(p[shared:], c, offset=shared) for p, c in zip(prompts, conts)]
        self.prefilled_tokens += shared + sum(len(r.ids) for r in rows)
        results: list[list[tuple[float, int]]] = [[] for _ in rows]
        finished, total = 0, sum(len(r.ids) for r in rows)
        for batch in _length_batches([len(r.ids) for r in rows], self._batch_tokens(batch_tokens)):
            cache = None if prefix is None else copy.deepcopy(prefix.past_key_values)  # a forward appends to it
            for i, lps in zip(batch, self._score_rows([rows[i] for i in batch], cache, shared)):
                results[i] = [_reduce(lp, reduce) for lp in lps]
            finished += sum(len(rows[i].ids) for i in batch)
            if progress:
                progress(finished / total)
        return results

    def _score_rows(self, rows: list[_Packed], cache: Any, shared: int) -> list[list[torch.Tensor]]:
        """Per row, the token log-probabilities of each continuation, from one forward pass over the left-padded
        rows after the `shared` cached prefix tokens (left padding puts every row's end at the same place; padding
        attends only to itself)."""
        width, dev, b = max(len(r.ids) for r in rows), self.device, len(rows)
        ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        segment = torch.full((b, width), -1, dtype=torch.long)  # -1 padding, 0 prompt, j + 1 continuation j
        positions = torch.zeros((b, width), dtype=torch.long)
        for k, r in enumerate(rows):
            ids[k, width - len(r.ids) :] = torch.tensor(r.ids)
            segment[k, width - len(r.ids) :] = r.segment
            positions[k, width - len(r.ids) :] = r.positions
        order = torch.arange(width)
        allowed = (order[None, :] <= order[:, None]) & (segment[:, None, :] >= 0)
        allowed &= (segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None])
        allowed |= torch.eye(width, dtype=torch.bool)
        allowed = torch.cat([(segment >= 0)[:, :, None].expand(b, width, shared), allowed], dim=2)  # the prefix
        dtype = self.model.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
        if cache is not None:
            cache.batch_repeat_interleave(b)
        inputs = {
            "input_ids": ids.to(dev), "attention_mask": mask.to(dev), "position_ids": positions.to(dev),
            "past_key_values": cache, "use_cache": cache is not None,
        }  # fmt: skip
        keep = max(r.tail for r in rows) + 1  # rows end together: their predicting positions are the last ones
        if self.own_head:
            hidden = self.model.get_decoder()(**inputs).last_hidden_state[:, width - keep :]
        else:
            logits = self.model(**inputs, logits_to_keep=keep).logits
        # the prompt's last token predicts every continuation's first; a continuation's input token its next one
        picked = [(hidden if self.own_head else logits)[k, keep - r.tail - 1 :] for k, r in enumerate(rows)]
        out: list[list[torch.Tensor]] = []
        start = 0
        while start < len(rows):  # vocabulary-sized rows, so at most HEAD_POSITIONS positions at a time
            end, held = start + 1, len(picked[start])
            while end < len(rows) and held + len(picked[end]) <= HEAD_POSITIONS:
                held += len(picked[end])
                end += 1
            chunk, block = rows[start:end], torch.cat(picked[start:end])
            logprobs = torch.log_softmax((self._logits(block) if self.own_head else block).float(), dim=-1)
            for r, lp in zip(chunk, logprobs.split([r.tail + 1 for r in chunk])):
                heads = lp[0, r.heads]
                tails = lp[1:].gather(-1, torch.tensor(r.targets, device=dev)[:, None]).squeeze(-1)
                sizes = [len(c) - 1 for c in r.continuations]
                out.append([torch.cat([h[None], t]) for h, t in zip(heads, tails.split(sizes))])
            start = end
        return out

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output head on final hidden states as a plain 2-D matmul (the model's own forward slices a 3-D
        tensor, several times slower on a CPU). Only used where `_head_reproduces_logits` held."""
        return self.model.get_output_embeddings()(hidden)

    @torch.inference_mode()
    def _head_reproduces_logits(self) -> bool:
        """Whether decoder + output head give the model's logits (no scaling or capping after the head, as
        Granite, Cohere and Gemma 2 apply): checked once on a short input; otherwise scoring takes the model's
        own logits."""
        ids = torch.tensor(
            [self.tokenizer("The capital of France is Paris.")["input_ids"][:8] or [0]], device=self.device
        )
        try:
            hidden = self.model.get_decoder()(input_ids=ids).last_hidden_state[0]
            mine = self._logits(hidden).float()
        except (AttributeError, NotImplementedError, TypeError):
            return False
        theirs = self.model(input_ids=ids).logits[0].float()
        return mine.shape == theirs.shape and bool(torch.allclose(mine, theirs, atol=1e-3, rtol=1e-3))

    @torch.inference_mode()
    def score_naive(
        self, user_message: str, continuations: list[str], reduce: str = "mean", batch_size: int = 32
    ) -> list[tuple[float, int]]:
        """Reference for score(): every prompt + continuation runs as its own full sequence (same tokens)."""
        check_reduce(reduce)
        prompt = self._encode_prompt(user_message)
        conts = self._encode_continuations(continuations)
        n, results = len(prompt), []
        for start in range(0, len(conts), batch_size):
            chunk = conts[start : start + batch_size]
            seqs = [prompt + c for c in chunk]
            width = max(map(len, seqs))
            ids = torch.tensor([s + [self.pad_id] * (width - len(s)) for s in seqs], device=self.device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=self.device)
            logp = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            for r, c in enumerate(chunk):
                targets = torch.tensor(c, device=self.device)[:, None]
                results.append(_reduce(logp[r, n - 1 : n - 1 + len(c)].gather(-1, targets).squeeze(-1), reduce))
        return results
