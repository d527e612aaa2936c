"""Training groups from reward shards (texts read per batch), and the homogeneous per-task batch sampler."""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from lemb.data.schemas import by_query
from lemb.errors import LembError
from lemb.stages.reward import row_reward
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


# what grouping reads of a label shard; the texts stay on disk until a batch needs them
SIGNAL_COLUMNS = (
    "query_id", "task", "key_id", "retrieval_rank", "target_logprob", "sample_logprobs", "sample_counts",
    "baseline_target_logprob", "baseline_sample_logprobs", "pool_size", "skip_reason", "positive_ids",
)  # fmt: skip
TEXT_COLUMNS = ("query_text", "key_text", "key_id")


def _choose(rows: list[dict], positives: set[str], group_size: int) -> tuple[list[dict], int]:
    """Known positives first (retrieve put them at the bottom), then the best retrieval ranks; count positives cut."""
    rows = sorted(rows, key=lambda r: (r["key_id"] not in positives, r["retrieval_rank"]))
    kept = rows[:group_size]
    return sorted(kept, key=lambda r: r["retrieval_rank"]), sum(r["key_id"] in positives for r in rows[group_size:])


class LabelledGroups:
    """The training groups of a label stage: per group its task, reward and positive flag per candidate, and the
    positions of its rows in a text table; a `Group` (with its texts) is built only when a batch draws it. The text
    table is memory-mapped from an Arrow file for a run's shards, so the trainer's memory does not grow with the
    total text of the job.

    `rows[g, j]`: row of group g's j-th candidate in `texts` (-1: padding); `texts` has TEXT_COLUMNS."""

    def __init__(self, query_ids: list[str], tasks: list[str], rows: np.ndarray, rewards: np.ndarray,
                 positive: np.ndarray, texts: pa.Table) -> None:  # fmt: skip
        self.query_ids, self.tasks, self.rows, self.rewards, self.positive = query_ids, tasks, rows, rewards, positive
        self.texts = texts

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, g: int) -> Group:
        n = int((self.rows[g] >= 0).sum())
        picked = self.texts.take(pa.array(self.rows[g, :n]))
        return Group(
            self.query_ids[g], self.tasks[g], picked.column("query_text")[0].as_py(),
            picked.column("key_text").to_pylist(), picked.column("key_id").to_pylist(),
            self.rewards[g, :n].tolist(), self.positive[g, :n].tolist(),
        )  # fmt: skip


def build_groups(
    rewards: pa.Table | list[pa.Table],
    reward_kind: str,
    group_size: int,
    source: str,
    *,
    tie_tolerance: float,
    positives_only: frozenset[str] = frozenset(),
    texts_file: Path | None = None,
) -> tuple[LabelledGroups, Counter[str]]:
    """One group per query with a training signal; queries without one are counted, never dropped silently.

    `rewards`: reward rows (`schemas.REWARD`), as one table or shard by shard (each query within one shard, as the
    label stage writes them). Tasks in `positives_only` (trained contrastively) need known positives, not rewards.
    The chosen rows' texts are kept in memory, or written to `texts_file` and memory-mapped from it."""
    tables = [rewards] if isinstance(rewards, pa.Table) else rewards
    ids, tasks, rows, values, flags = [], [], [], [], []
    skipped: Counter[str] = Counter()
    texts = _TextSink(texts_file)
    offset = 0
    for table in tables:
        signal = table.select(list(SIGNAL_COLUMNS)).to_pylist()
        for i, r in enumerate(signal):
            r["_row"] = i
        chosen_rows: list[int] = []
        for query_rows in by_query(signal):
            qid, task = query_rows[0]["query_id"], query_rows[0]["task"]
            positives = set(query_rows[0]["positive_ids"] or [])
            chosen, cut = _choose(query_rows, positives, group_size)
            skipped["positives_beyond_group_size"] += cut
            contrastive = task in positives_only
            if contrastive and not positives & {r["key_id"] for r in chosen}:
                skipped["no_positive_among_candidates"] += 1
                continue
            if not contrastive and chosen[0]["pool_size"] == 0:
                skipped[chosen[0]["skip_reason"] or "no_signal"] += 1
                continue
            reward = [0.0] * len(chosen)
            if not contrastive:
                reward = [float(row_reward(reward_kind, r, tie_tolerance, source)) for r in chosen]
            ids.append(qid)
            tasks.append(task)
            pad = group_size - len(chosen)
            rows.append([offset + len(chosen_rows) + j for j in range(len(chosen))] + [-1] * pad)
            values.append(reward + [0.0] * pad)
            flags.append([r["key_id"] in positives for r in chosen] + [False] * pad)
            chosen_rows += [r["_row"] for r in chosen]
        texts.add(table.select(list(TEXT_COLUMNS)).take(pa.array(chosen_rows, pa.int64())))
        offset += len(chosen_rows)
    arrays = (np.asarray(rows, dtype=np.int64).reshape(-1, group_size),
              np.asarray(values, dtype=np.float64).reshape(-1, group_size),
              np.asarray(flags, dtype=bool).reshape(-1, group_size))  # fmt: skip
    return LabelledGroups(ids, tasks, *arrays, texts.table()), +skipped


class _TextSink:
    """The chosen rows' texts, kept in memory or written shard by shard to an Arrow file (so no more than one
    shard's texts are held) and memory-mapped from it once complete."""

    schema = pa.schema([pa.field(c, pa.string()) for c in TEXT_COLUMNS])

    def __init__(self, path: Path | None) -> None:
        self.path, self.parts = path, []
        if path is not None:
            self.file = pa.OSFile(str(path), "wb")
            self.writer = pa.ipc.new_file(self.file, self.schema)

    def add(self, part: pa.Table) -> None:
        if self.path is None:
            self.parts.append(part.cast(self.schema))
        else:
            self.writer.write_table(part.cast(self.schema))

    def table(self) -> pa.Table:
        if self.path is None:
            return pa.concat_tables(self.parts) if self.parts else self.schema.empty_table()
        self.writer.close()
        self.file.close()
        return pa.ipc.open_file(pa.memory_map(str(self.path))).read_all()  # zero-copy: pages read per batch


class TaskBatchSampler:
    """Every batch holds queries of one task; tasks are drawn by size (or set weights).

    Each task walks through seeded permutations of its queries, epoch after epoch: every query is
    drawn exactly once per epoch (a query that would repeat within one batch at an epoch boundary
    is deferred to the task's next batch). Batches are generated in step order and cached, so the
    sequence is a pure function of (seed, step) and a resumed run draws what an uninterrupted one would.
    """

    def __init__(self, tasks: list[str], batch_size: int, weights: dict[str, float] | None, seed: int) -> None:
        """`tasks[i]`: the task of group i."""
        self.by_task: dict[str, list[int]] = defaultdict(list)
        for i, task in enumerate(tasks):
            self.by_task[task].append(i)
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
