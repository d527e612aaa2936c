"""Shared-prefix scoring of fixed continuations with transformers, on token ids.

Each item (a prompt and its continuations) is one packed row: its prompt once, then every continuation's input
tokens, with an attention mask that lets a continuation see the prompt and its own earlier tokens only, and positions
that restart after the prompt for each continuation. So the prompt's tokens are processed once, no continuation is
padded, and vocabulary logits are computed only where a continuation token is predicted. The items' common prefix
(the chat template's header, say) runs once for the whole call and is read from its KV cache."""

from __future__ import annotations

import copy
from typing import Any

import torch

from lemb.stages.llm.base import Progress, length_batches

# Tokens per scoring forward pass, padding included (LabelConfig.score_batch_tokens = 0 takes these). On one CPU
# thread a matmul is near its best from a few hundred rows on; larger passes only cost memory.
SCORE_BATCH_TOKENS = {"cpu": 4096, "cuda": 32768}
HEAD_POSITIONS = 2048  # positions whose vocabulary logits are held at once (2048 x 128k float32 = 1 GiB)


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


def _total(logprobs: torch.Tensor) -> float:
    return float(logprobs.double().sum())


class HFScorer:
    """Summed log-probabilities of continuations under a causal LM in eval mode (sdpa or eager attention, which honour
    the packed rows' 4-D masks)."""

    def __init__(self, model: Any, tokenizer: Any, pad_id: int, device: torch.device) -> None:
        self.model, self.pad_id, self.device = model, pad_id, device
        self.prefilled_tokens = 0  # tokens run through the model (padding excluded), for benchmarks
        self.sliding_window = getattr(model.config.get_text_config(), "sliding_window", None) or None
        self.own_head = self._head_reproduces_logits(tokenizer)

    @torch.inference_mode()
    def score(
        self,
        prompts: list[list[int]],
        continuations: list[list[list[int]]],
        batch_tokens: int | None,
        progress: Progress | None,
    ) -> list[list[float]]:
        """The summed log-probability of each continuation after its prompt, from packed rows (module notes). Rows of
        similar length share a forward pass of at most `batch_tokens` tokens (padding included; a longer row runs
        alone)."""
        window = self.sliding_window
        if window and any(len(p) + max(map(len, c), default=0) > window for p, c in zip(prompts, continuations)):
            # a custom mask would let tokens see past the model's attention window: the model's own masks instead
            return [self.naive(p, c) for p, c in zip(prompts, continuations)]
        if not prompts:
            return []
        shared = _common_prefix(prompts, limit=min(map(len, prompts)) - 1)  # every row keeps its prompt's last token
        prefix = None
        if shared:
            prefix = self.model(torch.tensor([prompts[0][:shared]], device=self.device), logits_to_keep=1)
        rows = [_Packed(p[shared:], c, offset=shared) for p, c in zip(prompts, continuations)]
        self.prefilled_tokens += shared + sum(len(r.ids) for r in rows)
        results: list[list[float]] = [[] for _ in rows]
        finished, total = 0, sum(len(r.ids) for r in rows)
        budget = batch_tokens or SCORE_BATCH_TOKENS.get(self.device.type, SCORE_BATCH_TOKENS["cuda"])
        for batch in length_batches([len(r.ids) for r in rows], budget):
            cache = None if prefix is None else copy.deepcopy(prefix.past_key_values)  # a forward appends to it
            for i, lps in zip(batch, self._score_rows([rows[i] for i in batch], cache, shared)):
                results[i] = [_total(lp) for lp in lps]
            finished += sum(len(rows[i].ids) for i in batch)
            if progress:
                progress(finished / total)
        return results

    def _score_rows(self, rows: list[_Packed], cache: Any, shared: int) -> list[list[torch.Tensor]]:
        """Per row, the token log-probabilities of each continuation, from one forward pass over the left-padded
        rows after the `shared` cached prefix tokens."""
        keep = max(r.tail for r in rows) + 1  # rows end together: their predicting positions are the last ones
        last = self._last_positions(self._inputs(rows, cache, shared), keep)
        # the prompt's last token predicts every continuation's first; a continuation's input token its next one
        picked = [last[k, keep - r.tail - 1 :] for k, r in enumerate(rows)]
        out: list[list[torch.Tensor]] = []
        start = 0
        while start < len(rows):  # vocabulary-sized rows, so at most HEAD_POSITIONS positions at a time
            end, held = start + 1, len(picked[start])
            while end < len(rows) and held + len(picked[end]) <= HEAD_POSITIONS:
                held += len(picked[end])
                end += 1
            chunk = rows[start:end]
            logprobs = torch.log_softmax(self._vocabulary(torch.cat(picked[start:end])).float(), dim=-1)
            for r, lp in zip(chunk, logprobs.split([r.tail + 1 for r in chunk])):
                heads = lp[0, r.heads]
                tails = lp[1:].gather(-1, torch.tensor(r.targets, device=self.device)[:, None]).squeeze(-1)
                sizes = [len(c) - 1 for c in r.continuations]
                out.append([torch.cat([h[None], t]) for h, t in zip(heads, tails.split(sizes))])
            start = end
        return out

    def _inputs(self, rows: list[_Packed], cache: Any, shared: int) -> dict[str, Any]:
        """The forward pass's inputs: the rows left-padded (every row's end at the same place), and a mask that lets
        a token see the cached prefix, its prompt and its own continuation's earlier tokens (padding only itself)."""
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
        return {
            "input_ids": ids.to(dev), "attention_mask": mask.to(dev), "position_ids": positions.to(dev),
            "past_key_values": cache, "use_cache": cache is not None,
        }  # fmt: skip

    def _last_positions(self, inputs: dict[str, Any], keep: int) -> torch.Tensor:
        """The last `keep` positions of every row: final hidden states where `own_head` (`_vocabulary` applies the
        head), else the model's own logits."""
        if self.own_head:
            hidden = self.model.get_decoder()(**inputs).last_hidden_state
            return hidden[:, hidden.shape[1] - keep :]
        return self.model(**inputs, logits_to_keep=keep).logits

    def _vocabulary(self, last: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of positions `_last_positions` returned."""
        return self._logits(last) if self.own_head else last

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output head on final hidden states as a plain 2-D matmul (the model's own forward slices a 3-D
        tensor, several times slower on a CPU). Only used where `_head_reproduces_logits` held."""
        return self.model.get_output_embeddings()(hidden)

    @torch.inference_mode()
    def _head_reproduces_logits(self, tokenizer: Any) -> bool:
        """Whether decoder + output head give the model's logits (no scaling or capping after the head, as
        Granite, Cohere and Gemma 2 apply): checked once on a short input; otherwise scoring takes the model's
        own logits."""
        ids = torch.tensor([tokenizer("The capital of France is Paris.")["input_ids"][:8] or [0]], device=self.device)
        try:
            hidden = self.model.get_decoder()(input_ids=ids).last_hidden_state[0]
            mine = self._logits(hidden).float()
        except (AttributeError, NotImplementedError, TypeError):
            return False
        theirs = self.model(input_ids=ids).logits[0].float()
        return mine.shape == theirs.shape and bool(torch.allclose(mine, theirs, atol=1e-3, rtol=1e-3))

    @torch.inference_mode()
    def naive(self, prompt: list[int], continuations: list[list[int]], batch_size: int = 32) -> list[float]:
        """Reference for score(): every prompt + continuation runs as its own full sequence (same tokens)."""
        n, results = len(prompt), []
        for start in range(0, len(continuations), batch_size):
            chunk = continuations[start : start + batch_size]
            seqs = [prompt + c for c in chunk]
            width = max(map(len, seqs))
            ids = torch.tensor([s + [self.pad_id] * (width - len(s)) for s in seqs], device=self.device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=self.device)
            logp = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            for r, c in enumerate(chunk):
                targets = torch.tensor(c, device=self.device)[:, None]
                results.append(_total(logp[r, n - 1 : n - 1 + len(c)].gather(-1, targets).squeeze(-1)))
        return results
