"""`lemb retrieve`: embed keys and queries (task instructions prepended), faiss top-K per query.

Two sharded steps under `<run>/retrieve/`: `keys/` (key embeddings) and `candidates/` (top-K rows
per query). Queries of `chat` / `lrlm` rank their own history instead of a shared corpus.
"""

from __future__ import annotations

import functools
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from lemb.data import schemas
from lemb.data.readers import iter_keys, read_queries
from lemb.data.tasks import instructions
from lemb.errors import InputError
from lemb.pipeline.config import RetrieveConfig, config_hash, save_config, to_dict
from lemb.pipeline.executor import Stage, run_stage
from lemb.pipeline.shards import ShardPlan, partition
from lemb.stages.encoder import Encoder, resolve_embedder_path
from lemb.stages.index import TaskIndex, indexes_from_shards

log = logging.getLogger(__name__)


class EmbedKeys(Stage):
    name = "retrieve/keys"
    required_columns = ("key_id", "task", "text")
    output_schema = schemas.KEY_EMBEDDING

    def __init__(self, config: RetrieveConfig) -> None:
        super().__init__()
        self.config = config

    def setup(self) -> None:
        self.encoder = Encoder(self.config.embedder, self.config.max_length, self.config.batch_size)

    def process(self, table: pa.Table) -> pa.Table:
        rows = table.to_pylist()
        out = {"key_id": [], "task": [], "embedding": []}
        for task in sorted({r["task"] for r in rows}):
            part = [r for r in rows if r["task"] == task]
            emb = self.encoder.encode([r["text"] for r in part], instructions(self.config.instructions, task)[1])
            out["key_id"] += [r["key_id"] for r in part]
            out["task"] += [task] * len(part)
            out["embedding"] += list(emb)
        self.counters["truncated_texts"] = self.encoder.truncated
        self.encoder.truncated = 0
        return pa.table(out, schema=self.output_schema)


def history_index(encoder: Encoder, query: dict[str, Any], key_instruction: str) -> TaskIndex:
    """A query's own history as its candidate pool (chat, lrlm)."""
    ids = [schemas.history_key_id(query["query_id"], i) for i in range(len(query["history"]))]
    return TaskIndex.exact(ids, encoder.encode(query["history"], key_instruction))


class SearchQueries(Stage):
    name = "retrieve/candidates"
    required_columns = ("query_id", "task", "text", "positive_ids", "history")
    output_schema = schemas.CANDIDATE

    def __init__(self, config: RetrieveConfig, keys_dir: str | None) -> None:
        super().__init__()
        self.config = config
        self.keys_dir = keys_dir

    def setup(self) -> None:
        self.encoder = Encoder(self.config.embedder, self.config.max_length, self.config.batch_size)
        self.indexes: dict[str, TaskIndex] = {}
        if self.keys_dir is None:
            return
        c = self.config
        options = {"nprobe": c.nprobe, "hnsw_m": c.hnsw_m, "ef_search": c.ef_search}
        self.indexes = indexes_from_shards(Path(self.keys_dir), c.index, **options)

    def _rank(self, q: np.ndarray, task: str, query: dict[str, Any]) -> tuple[list[str], list[float]]:
        if task in schemas.PER_QUERY_TASKS:
            index = history_index(self.encoder, query, instructions(self.config.instructions, task)[1])
        else:
            index = self.indexes[task]
        top_ids, top_scores = index.search(q, self.config.top_k)
        if self.config.add_positives:
            missing = [p for p in query["positive_ids"] if p not in top_ids and p in index.position][: len(top_ids)]
            if missing:  # the lowest-ranked candidates make room for the known positives
                keep = len(top_ids) - len(missing)
                top_ids = top_ids[:keep] + missing
                top_scores = top_scores[:keep] + [index.score(q, p) for p in missing]
                self.counters["positives_added"] += len(missing)
        return top_ids, top_scores

    def process(self, table: pa.Table) -> pa.Table:
        rows = table.to_pylist()
        out: dict[str, list] = {name: [] for name in self.output_schema.names}
        for task in sorted({r["task"] for r in rows}):
            part = [r for r in rows if r["task"] == task]
            q_emb = self.encoder.encode([r["text"] for r in part], instructions(self.config.instructions, task)[0])
            for query, q in zip(part, q_emb):
                ids, scores = self._rank(q, task, query)
                out["query_id"] += [query["query_id"]] * len(ids)
                out["task"] += [task] * len(ids)
                out["key_id"] += ids
                out["retrieval_rank"] += list(range(1, len(ids) + 1))
                out["retrieval_score"] += scores
        self.counters["truncated_texts"] = self.encoder.truncated
        self.encoder.truncated = 0
        return pa.table(out, schema=self.output_schema)


def positive_ids(queries: pa.Table) -> set[str]:
    """Positive ids of the shared-pool queries: the only key ids the driver keeps while the corpus streams by."""
    out: set[str] = set()
    for task, ids in zip(queries.column("task").to_pylist(), queries.column("positive_ids").to_pylist()):
        if task not in schemas.PER_QUERY_TASKS:
            out.update(ids)
    return out


def tasks_of(ids: list[str], tasks: list[str], wanted: set[str]) -> dict[str, str]:
    """The task of each key id in `wanted`."""
    return {k: t for k, t in zip(ids, tasks) if k in wanted}


def check_positives(queries: pa.Table, key_tasks: set[str], positive_task: dict[str, str], path: str) -> None:
    """Shared-pool tasks need keys; a positive id must name a key of the query's own task or a history item.

    `key_tasks`: the tasks the corpus has keys for; `positive_task`: the task of each positive id found in it."""
    for q in queries.to_pylist():
        if q["task"] in schemas.PER_QUERY_TASKS:
            valid = {schemas.history_key_id(q["query_id"], i) for i in range(len(q["history"]))}
            bad = [p for p in q["positive_ids"] if p not in valid]
        elif q["task"] not in key_tasks:
            raise InputError(
                path, f"query_id {q['query_id']!r}", "task", f"no keys of task {q['task']!r} in the corpus"
            )
        else:
            bad = [p for p in q["positive_ids"] if positive_task.get(p) != q["task"]]
        if bad:
            problem = f"{bad[0]!r} is not in the corpus ({q['task']} keys)"
            raise InputError(path, f"query_id {q['query_id']!r}", "positive_ids", problem)


def check_positives_in(queries: pa.Table, keys: pa.Table | None, path: str) -> None:
    """check_positives against a corpus already in memory."""
    if keys is None:
        return check_positives(queries, set(), {}, path)
    wanted = positive_ids(queries)
    ids, tasks = keys.column("key_id").to_pylist(), keys.column("task").to_pylist()
    check_positives(queries, set(tasks), tasks_of(ids, tasks, wanted), path)


def partition_corpus(config: RetrieveConfig, queries: pa.Table, folder: Path) -> ShardPlan:
    """Stream the corpus into per-shard input files, validating every record and the queries' positives on
    the way: the driver holds one batch of keys at a time, plus the positive ids of the queries."""
    wanted = positive_ids(queries)
    key_tasks: set[str] = set()
    positive_task: dict[str, str] = {}

    def batches():
        for batch in iter_keys(config.corpus):
            tasks = batch.column("task").to_pylist()
            key_tasks.update(tasks)
            positive_task.update(tasks_of(batch.column("key_id").to_pylist(), tasks, wanted))
            yield batch

    plan = partition(batches(), "key_id", config.shards, folder, config.corpus)
    check_positives(queries, key_tasks, positive_task, config.queries)
    return plan


def retrieve(config: RetrieveConfig, progress: bool = True) -> dict[str, Any]:
    """Run both steps; returns their stats. Inputs are validated in full before anything is written.

    The corpus is streamed into per-shard input files (a hidden folder beside the stage output, removed at
    the end), so neither the driver nor a worker holds more than a shard of it; the queries are read whole."""
    resolve_embedder_path(config.embedder)  # a missing model fails here, not in every worker
    queries = read_queries(config.queries)
    out = Path(config.run) / "retrieve"
    table = {t: instructions(config.instructions, t) for t in schemas.TASKS}
    settings, digest = to_dict(config), config_hash(config, {"instructions": table})
    inputs = [config.queries, config.corpus]
    stats: dict[str, Any] = {}
    keys_dir = None
    staging = out / ".keys-input"
    new_dirs = [d for d in (out.parent, out) if not d.exists()]  # removed again if a bad input stops the run
    try:
        if config.corpus:
            plan = partition_corpus(config, queries, staging)
            keys_dir = out / "keys"
            factory = functools.partial(EmbedKeys, config)
            stats["keys"] = run_stage(factory, plan, "key_id", keys_dir, config, settings, digest, inputs, progress)
        else:
            check_positives(queries, set(), {}, config.queries)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for d in reversed(new_dirs):
            if d.exists() and not any(d.iterdir()):
                d.rmdir()
    factory = functools.partial(SearchQueries, config, str(keys_dir) if keys_dir else None)
    stats["candidates"] = run_stage(
        factory, queries, "query_id", out / "candidates", config, settings, digest, inputs, progress
    )
    save_config(config, out)
    return stats
