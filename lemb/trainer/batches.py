"""Training groups from reward shards, and the homogeneous per-task batch sampler."""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from lemb.errors import InputError, LembError
from lemb.stages.reward import is_finite, reward_from_logprobs
from lemb.trainer.losses import other_queries_mask

log = logging.getLogger(__name__)


@dataclass
class Group:
    """One query and its candidates, as the loss sees them."""

    query_id: str
    task: str
    query: str
    keys: list[str]
    key_ids: list[str]
    rewards: list[float]
    positive: list[bool]


def _reward(kind: str, row: dict, tie_tol: float, source: str) -> float:
    value = reward_from_logprobs(
        kind, row["target_logprob"], row["sample_logprobs"], row["sample_counts"], row["baseline_target_logprob"],
        row["baseline_sample_logprobs"], tie_tol,
    )  # fmt: skip
    if not is_finite(value):
        raise InputError(
            source, f"query_id {row['query_id']!r}, key_id {row['key_id']!r}", "reward", f"not finite ({value})"
        )
    return float(value)


def _choose(rows: list[dict], positives: set[str], group_size: int) -> tuple[list[dict], int]:
    """Known positives first (retrieve put them at the bottom), then the best retrieval ranks; count positives cut."""
    rows = sorted(rows, key=lambda r: (r["key_id"] not in positives, r["retrieval_rank"]))
    kept = rows[:group_size]
    return sorted(kept, key=lambda r: r["retrieval_rank"]), sum(r["key_id"] in positives for r in rows[group_size:])


def build_groups(
    rewards: pa.Table,
    queries: dict[str, dict],
    key_text: dict[str, str],
    reward_kind: str,
    group_size: int,
    source: str,
    tie_tol: float = 1e-6,
    positives_only: frozenset[str] = frozenset(),
) -> tuple[list[Group], Counter[str]]:
    """One group per query with a training signal; queries without one are counted, never dropped silently.

    Tasks in `positives_only` (trained contrastively) need known positives, not rewards.
    """
    by_query: dict[str, list[dict]] = defaultdict(list)
    for row in rewards.to_pylist():
        by_query[row["query_id"]].append(row)
    groups, skipped = [], Counter()
    for qid in sorted(by_query):
        q = queries.get(qid)
        if q is None:
            raise InputError(source, f"query_id {qid!r}", "query_id", "not in the query file")
        positives = set(q["positive_ids"])
        rows, cut = _choose(by_query[qid], positives, group_size)
        skipped["positives_beyond_group_size"] += cut
        contrastive = q["task"] in positives_only
        if contrastive and not positives & {r["key_id"] for r in rows}:
            skipped["no_positive_among_candidates"] += 1
            continue
        if not contrastive and rows[0]["n_samples"] == 0:
            skipped[rows[0]["skip_reason"] or "no_signal"] += 1
            continue
        for r in rows:
            if r["key_id"] not in key_text:
                raise InputError(source, f"query_id {qid!r}", "key_id", f"{r['key_id']!r} is not in the corpus")
        values = [0.0] * len(rows) if contrastive else [_reward(reward_kind, r, tie_tol, source) for r in rows]
        groups.append(
            Group(
                qid,
                q["task"],
                q["text"],
                [key_text[r["key_id"]] for r in rows],
                [r["key_id"] for r in rows],
                values,
                [r["key_id"] in positives for r in rows],
            )
        )
    return groups, +skipped


class TaskBatchSampler:
    """Every batch holds queries of one task; tasks are drawn by size (or set weights).

    Each task walks through seeded permutations of its queries, epoch after epoch: every query is
    drawn exactly once per epoch (a query that would repeat within one batch at an epoch boundary
    is deferred to the task's next batch). Batches are generated in step order and cached, so the
    sequence is a pure function of (seed, step) and a resumed run draws what an uninterrupted one would.
    """

    def __init__(self, groups: list[Group], batch_size: int, weights: dict[str, float] | None, seed: int) -> None:
        self.by_task: dict[str, list[int]] = defaultdict(list)
        for i, g in enumerate(groups):
            self.by_task[g.task].append(i)
        present = sorted(self.by_task)
        if weights:
            left_out = [t for t in present if weights.get(t, 0.0) <= 0]
            if left_out:
                log.warning("tasks without a positive weight are not trained: %s", ", ".join(left_out))
            present = [t for t in present if weights.get(t, 0.0) > 0]
            if not present:
                raise LembError(
                    f"task_weights {weights} give no weight to any task in the data ({sorted(self.by_task)})"
                )
        self.tasks = present
        raw = [float(weights[t]) if weights else float(len(self.by_task[t])) for t in self.tasks]
        self.probs = np.asarray(raw) / sum(raw)
        self.batch_size = batch_size
        self.seed = seed
        self._batches: list[list[int]] = []
        self._cursor: Counter[int] = Counter()  # per task: position in its stream of epochs
        self._deferred: dict[int, list[int]] = defaultdict(list)
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _item(self, task_index: int, position: int) -> int:
        pool = self.by_task[self.tasks[task_index]]
        epoch, pos = divmod(position, len(pool))
        if (task_index, epoch) not in self._perms:
            self._perms[(task_index, epoch)] = np.random.default_rng([self.seed, epoch, task_index]).permutation(
                len(pool)
            )
        return pool[self._perms[(task_index, epoch)][pos]]

    def _next_batch(self, step: int) -> list[int]:
        t = int(np.random.default_rng([self.seed, step]).choice(len(self.tasks), p=self.probs))
        size = min(self.batch_size, len(self.by_task[self.tasks[t]]))
        out, self._deferred[t] = self._deferred[t], []
        while len(out) < size:
            item = self._item(t, self._cursor[t])
            self._cursor[t] += 1
            (self._deferred[t] if item in out else out).append(item)
        return out

    def batch(self, step: int) -> list[int]:
        while len(self._batches) <= step:
            self._batches.append(self._next_batch(len(self._batches)))
        return self._batches[step]


def collate(groups: list[Group], group_size: int) -> dict[str, torch.Tensor | list]:
    """Pad every group to `group_size`; mark in-batch keys that are also one of the query's own candidates."""
    b = len(groups)
    valid = torch.zeros(b, group_size, dtype=torch.bool)
    rewards = torch.zeros(b, group_size)
    positive = torch.zeros(b, group_size, dtype=torch.bool)
    keys, ids = [], []
    for i, g in enumerate(groups):
        n = len(g.keys)
        valid[i, :n] = True
        rewards[i, :n] = torch.tensor(g.rewards)
        positive[i, :n] = torch.tensor(g.positive)
        keys += g.keys + [""] * (group_size - n)
        ids += g.key_ids + [None] * (group_size - n)
    codes: dict[str, int] = {}
    column_code = torch.tensor([codes.setdefault(k, len(codes)) if k is not None else -1 for k in ids])
    own = column_code.reshape(b, group_size)  # each query's own candidates, -1 at padding
    shared = (column_code[None, None, :] == own[:, :, None]) & (own[:, :, None] >= 0)
    in_batch = other_queries_mask(b, group_size, valid, True) & ~shared.any(dim=1)
    return {
        "queries": [g.query for g in groups],
        "keys": keys,
        "valid": valid,
        "rewards": rewards,
        "positive": positive,
        "in_batch_mask": in_batch,
    }
