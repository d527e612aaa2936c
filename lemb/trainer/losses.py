"""Distillation losses over embeddings: graded (ACL 2024 LLM-Embedder), KL, and contrastive.

Every loss is a pure function of query embeddings, candidate embeddings and labels, so tests call
it with random tensors.

| input      | shape     | meaning                                                         |
|------------|-----------|-----------------------------------------------------------------|
| q          | (B, d)    | query embeddings (any norm: cosine similarity is taken here)    |
| k          | (B, M, d) | M candidate embeddings per query                                |
| rewards    | (B, M)    | reward of each candidate (graded, KL); positives mask (contrastive) |
| valid      | (B, M)    | False for padding candidates                                     |

`in_batch=True` adds every valid key of the other queries in the batch to each denominator; an
explicit `in_batch_mask` (B, B*M) can narrow that set (the collator drops keys that are also one of
the query's own candidates, which would otherwise be false negatives).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from lemb.vocabulary import LOSSES

NEG_INF = float("-inf")


def similarities(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    """(B, B*M) scaled cosine similarity of every query with every candidate in the batch."""
    q = F.normalize(q, dim=-1)
    keys = F.normalize(k, dim=-1).reshape(-1, k.shape[-1])
    return q @ keys.T / tau


def own_scores(scores: torch.Tensor, batch: int, group: int) -> torch.Tensor:
    """(B, M): each query's scores with its own candidates, out of the (B, B*M) matrix."""
    return scores.reshape(batch, batch, group)[torch.arange(batch), torch.arange(batch)]


def other_queries_mask(
    batch: int, group: int, valid: torch.Tensor, in_batch: bool, in_batch_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, B*M) True where column is a valid key of another query and in-batch keys are on."""
    if in_batch and in_batch_mask is not None:
        return in_batch_mask
    owner = torch.arange(batch, device=valid.device).repeat_interleave(group)
    other = owner[None, :] != torch.arange(batch, device=valid.device)[:, None]
    return other & valid.reshape(1, -1) if in_batch else torch.zeros_like(other)


def graded_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    rewards: torch.Tensor,
    valid: torch.Tensor,
    *,
    tau: float,
    alpha: float,
    in_batch: bool = True,
    in_batch_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """L = -sum_i w_i log(e^{s_i} / (e^{s_i} + sum_{r_j < r_i} e^{s_j} + sum_{in-batch k} e^{s_k})), w = softmax(r/a).

    Candidates tied with C_i are neither its positives nor its negatives. Mean over queries.
    """
    batch, group = rewards.shape
    scores = similarities(q, k, tau)  # (B, B*M)
    own = own_scores(scores, batch, group)
    # denominator members for candidate (i, m): own candidates with strictly lower reward, plus other queries' keys
    lower = (rewards[:, None, :] < rewards[:, :, None]) & valid[:, None, :]  # (B, M, M)
    self_term = torch.eye(group, dtype=torch.bool, device=q.device)[None].expand(batch, -1, -1)
    own_mask = lower | self_term
    own_logits = own[:, None, :].expand(-1, group, -1).masked_fill(~own_mask, NEG_INF)
    other_mask = other_queries_mask(batch, group, valid, in_batch, in_batch_mask)  # (B, B*M)
    other_logits = scores.masked_fill(~other_mask, NEG_INF)[:, None, :].expand(-1, group, -1)
    log_denominator = torch.logsumexp(torch.cat([own_logits, other_logits], dim=-1), dim=-1)  # (B, M)
    log_prob = own - log_denominator
    weights = torch.softmax((rewards / alpha).masked_fill(~valid, NEG_INF), dim=-1)
    per_query = -(weights * log_prob.masked_fill(~valid, 0.0)).sum(-1)
    return per_query.mean()


def kl_loss(
    q: torch.Tensor, k: torch.Tensor, rewards: torch.Tensor, valid: torch.Tensor, *, tau: float, alpha: float
) -> torch.Tensor:
    """KL(softmax(r/alpha) || softmax(s)) over each query's own candidates (REPLUG-style distillation)."""
    batch, group = rewards.shape
    own = own_scores(similarities(q, k, tau), batch, group)
    teacher = torch.log_softmax((rewards / alpha).masked_fill(~valid, NEG_INF), dim=-1)
    student = torch.log_softmax(own.masked_fill(~valid, NEG_INF), dim=-1)
    terms = teacher.exp() * (teacher - student)
    return terms.masked_fill(~valid, 0.0).sum(-1).mean()


def contrastive_loss(
    q: torch.Tensor,
    k: torch.Tensor,
    positive: torch.Tensor,
    valid: torch.Tensor,
    *,
    tau: float,
    in_batch: bool = True,
    in_batch_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE: each positive against the query's non-positive candidates and (optionally) in-batch keys.

    Averaged over the positives of each query, then over queries that have one.
    """
    batch, group = positive.shape
    positive = positive.bool() & valid
    scores = similarities(q, k, tau)
    own = own_scores(scores, batch, group)
    negatives = valid & ~positive
    neg_own = own.masked_fill(~negatives, NEG_INF)  # (B, M)
    other = scores.masked_fill(~other_queries_mask(batch, group, valid, in_batch, in_batch_mask), NEG_INF)
    log_neg = torch.logsumexp(torch.cat([neg_own, other], dim=-1), dim=-1)  # (B,)
    log_prob = own - torch.logaddexp(own, log_neg[:, None])
    n_pos = positive.sum(-1)
    per_query = -(log_prob.masked_fill(~positive, 0.0)).sum(-1) / n_pos.clamp(min=1)
    has_pos = n_pos > 0
    if not has_pos.any():
        return scores.sum() * 0.0
    return per_query[has_pos].mean()


LossFn = Callable[[torch.Tensor, torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]


def make_loss(name: str, tau: float, alpha: float, in_batch: bool) -> LossFn:
    """A task's loss, built once: a function of the query and key embeddings and the collated batch (its
    `rewards`, `valid`, `positive` and `in_batch_mask` tensors)."""
    if name == "graded":
        return lambda q, k, b: graded_loss(q, k, b["rewards"], b["valid"], tau=tau, alpha=alpha, in_batch=in_batch,
                                           in_batch_mask=b["in_batch_mask"])  # fmt: skip
    if name == "kl":
        return lambda q, k, b: kl_loss(q, k, b["rewards"], b["valid"], tau=tau, alpha=alpha)
    if name == "contrastive":
        return lambda q, k, b: contrastive_loss(q, k, b["positive"], b["valid"], tau=tau, in_batch=in_batch,
                                                in_batch_mask=b["in_batch_mask"])  # fmt: skip
    raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}")
