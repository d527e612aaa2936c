"""Training groups from reward shards, and the homogeneous per-task batch sampler."""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from lemb.errors import InputError
from lemb.stages.reward import is_finite, reward_from_logprobs

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


def build_groups(
    rewards: pa.Table,
    queries: dict[str, dict],
    key_text: dict[str, str],
    reward_kind: str,
    group_size: int,
    source: str,
) -> tuple[list[Group], Counter[str]]:
    """Groups of at most `group_size` candidates (best retrieval ranks first); queries without signal are counted."""
    by_query: dict[str, list[dict]] = defaultdict(list)
    for row in rewards.to_pylist():
        by_query[row["query_id"]].append(row)
    groups, skipped = [], Counter()
    for qid in sorted(by_query):
        rows = sorted(by_query[qid], key=lambda r: r["retrieval_rank"])[:group_size]
        if rows[0]["n_samples"] == 0:
            skipped[rows[0]["skip_reason"] or "no_signal"] += 1
            continue
        values = []
        for r in rows:
            value = reward_from_logprobs(
                reward_kind,
                r["target_logprob"],
                r["sample_logprobs"],
                r["sample_counts"],
                r["baseline_target_logprob"],
                r["baseline_sample_logprobs"],
            )
            if not is_finite(value):
                raise InputError(source, f"query_id {qid!r}, key_id {r['key_id']!r}", "reward", f"not finite ({value})")
            values.append(float(value))
        q = queries[qid]
        positives = set(q["positive_ids"])
        groups.append(
            Group(
                qid, q["task"], q["text"], [key_text[r["key_id"]] for r in rows], [r["key_id"] for r in rows], values,
                [r["key_id"] in positives for r in rows],
            )
        )
    return groups, skipped


class TaskBatchSampler:
    """Every batch holds queries of one task; tasks are drawn by size (or set weights).

    The sequence of batches is a pure function of (seed, step), so a resumed run draws exactly the
    batches an uninterrupted one would.
    """

    def __init__(self, groups: list[Group], batch_size: int, weights: dict[str, float] | None, seed: int) -> None:
        self.by_task: dict[str, list[int]] = defaultdict(list)
        for i, g in enumerate(groups):
            self.by_task[g.task].append(i)
        self.tasks = sorted(self.by_task)
        raw = [float(weights.get(t, 0.0)) if weights else float(len(self.by_task[t])) for t in self.tasks]
        self.probs = np.asarray(raw) / sum(raw)
        self.batch_size = batch_size
        self.seed = seed
        self._seq: list[int] = []
        self._draw_index: list[int] = []
        self._counts: Counter[int] = Counter()

    def _task_at(self, step: int) -> int:
        return int(np.random.default_rng([self.seed, step]).choice(len(self.tasks), p=self.probs))

    def _draws_before(self, step: int) -> int:
        """How many batches of the task drawn at `step` came before it (prefix counts, extended lazily)."""
        while len(self._seq) <= step:
            t = self._task_at(len(self._seq))
            self._seq.append(t)
            self._draw_index.append(self._counts[t])
            self._counts[t] += 1
        return self._draw_index[step]

    def batch(self, step: int) -> list[int]:
        task_index = self._task_at(step)
        pool = self.by_task[self.tasks[task_index]]
        draws = self._draws_before(step)
        if len(pool) <= self.batch_size:  # a task smaller than a batch: all of it, never a query twice
            return [pool[i] for i in np.random.default_rng([self.seed, draws, task_index]).permutation(len(pool))]
        out: list[int] = []
        d = draws * self.batch_size
        # each task cycles through its queries in epochs of a seeded permutation
        while len(out) < self.batch_size:
            epoch, pos = divmod(d, len(pool))
            item = pool[np.random.default_rng([self.seed, epoch, task_index]).permutation(len(pool))[pos]]
            if item not in out:  # at an epoch boundary the next epoch may repeat a query
                out.append(item)
            d += 1
        return out


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
    owner = torch.arange(b).repeat_interleave(group_size)
    in_batch = (owner[None, :] != torch.arange(b)[:, None]) & valid.reshape(1, -1)
    for i, g in enumerate(groups):
        own = set(g.key_ids)
        for col, key_id in enumerate(ids):
            if key_id in own:
                in_batch[i, col] = False
    return {
        "queries": [g.query for g in groups],
        "keys": keys,
        "valid": valid,
        "rewards": rewards,
        "positive": positive,
        "in_batch_mask": in_batch,
    }
