"""Rewards as pure functions over log-probabilities (DESIGN.md, "Rank-aware reward").

The rank-aware reward asks where the desired output O stands among the LLM's own outputs when a
candidate is in the prompt: r = (N + 1 - rank) / N over a pool of N samples, with half credit for
ties. The likelihood reward (arXiv version of the paper, REPLUG) and the improvement over the
no-candidate prompt are recomputed from the same stored log-probabilities.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from lemb.errors import InputError
from lemb.vocabulary import REWARDS

LOGPROB_FIELDS = ("target_logprob", "sample_logprobs", "baseline_target_logprob", "baseline_sample_logprobs")
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Whitespace/case normalisation used to drop copies of the desired output from the pool."""
    return _SPACE.sub(" ", text).strip().lower()


def build_pool(samples: Sequence[str], target: str) -> tuple[list[str], list[int], dict[str, int]]:
    """Distinct competitors of `target` and their multiplicities, plus counts of what was dropped.

    Empty samples and samples equal to the target (after normalisation) are dropped; samples that
    normalise to the same text are one competitor counted by multiplicity (scored once).
    """
    target_norm = normalize(target)
    counts: Counter[str] = Counter()
    first_form: dict[str, str] = {}
    dropped = {"empty": 0, "equal_to_target": 0}
    for sample in samples:
        norm = normalize(sample)
        if not norm:
            dropped["empty"] += 1
        elif norm == target_norm:
            dropped["equal_to_target"] += 1
        else:
            first_form.setdefault(norm, sample.strip())
            counts[norm] += 1
    distinct = list(first_form)
    return [first_form[n] for n in distinct], [counts[n] for n in distinct], dropped


def rank_of_target(
    target_score: float, sample_scores: Sequence[float], counts: Sequence[int], tie_tolerance: float = 1e-6
) -> float:
    """1 + #samples scoring above the target + 0.5 * #samples tied with it (weighted by multiplicity)."""
    above = sum(c for s, c in zip(sample_scores, counts, strict=True) if s > target_score + tie_tolerance)
    tied = sum(c for s, c in zip(sample_scores, counts, strict=True) if abs(s - target_score) <= tie_tolerance)
    return 1.0 + above + 0.5 * tied


def rank_reward(rank: float, pool_size: int) -> float:
    """(N + 1 - rank) / N: 1.0 when O beats every sample, 0.0 when every sample beats O."""
    if pool_size <= 0:
        raise ValueError("rank reward needs at least one pooled sample")
    return (pool_size + 1 - rank) / pool_size


def reward_from_logprobs(
    kind: str,
    target_logprob: float,
    sample_logprobs: Sequence[float],
    counts: Sequence[int],
    baseline_target_logprob: float,
    baseline_sample_logprobs: Sequence[float],
    tie_tolerance: float = 1e-6,
) -> float:
    """Any of the REWARDS from the raw log-probabilities kept in a reward shard."""
    if kind == "likelihood":
        return float(target_logprob)
    n = int(sum(counts))
    rank = rank_of_target(target_logprob, sample_logprobs, counts, tie_tolerance)
    if kind == "rank":
        return rank_reward(rank, n)
    if kind == "improvement":
        return rank_of_target(baseline_target_logprob, baseline_sample_logprobs, counts, tie_tolerance) - rank
    raise ValueError(f"unknown reward kind {kind!r}; known: {', '.join(REWARDS)}")


def row_reward(kind: str, row: Mapping[str, Any], tie_tolerance: float, source: object) -> float | None:
    """The `kind` reward of one reward-shard row, recomputed from its log-probabilities; None for a row without
    signal (`skip_reason` set). A log-probability that is missing or not finite is an InputError naming `source`,
    the row's query and key, and the field: whichever reward is asked for, none is computed from it."""
    if row.get("skip_reason") is not None:
        return None
    for name in LOGPROB_FIELDS:
        values = row[name] if isinstance(row[name], list) else [row[name]]
        if any(v is None or not math.isfinite(v) for v in values):
            where = f"query_id {row['query_id']!r}, key_id {row['key_id']!r}"
            raise InputError(source, where, name, f"not a finite log-probability ({row[name]})")
    return reward_from_logprobs(
        kind, row["target_logprob"], row["sample_logprobs"], row["sample_counts"], row["baseline_target_logprob"],
        row["baseline_sample_logprobs"], tie_tolerance,
    )  # fmt: skip
