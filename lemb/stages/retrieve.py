"""`lemb retrieve`: embed keys and queries (task instructions prepended), faiss top-K per query.

Two sharded steps under `<run>/retrieve/`: `keys/` (key embeddings, with each key's text as `key_template` renders
it, and its title) and `candidates/` (top-K rows per query, partitioned by query id). A candidate row carries
everything the label stage needs (query text, target, positive ids and grades, the rendered key text and the title),
so no later stage opens the query file or the corpus, and the LLM's prompts hold the text that was embedded.
Queries of `chat` / `lrlm` rank their own history instead of a shared corpus.

The same two steps rank held-out queries for `lemb eval`: there is one implementation of encode -> index -> top-K.
Eval takes the run's `retrieve/keys` instead of embedding the corpus again when their shards record the key
embeddings it would compute (lemb/stages/key_reuse.py).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lemb.data import schemas
from lemb.data.readers import iter_keys, iter_queries
from lemb.data.tasks import key_template, render_key
from lemb.errors import InputError
from lemb.files import remove
from lemb.pipeline.config import RetrieveConfig
from lemb.pipeline.executor import Stage, executor_for
from lemb.pipeline.layout import RunLayout
from lemb.pipeline.lock import StageLock
from lemb.pipeline.shards import ShardPlan, partition
from lemb.stages.encoder import Encoder
from lemb.stages.index import TaskIndex, indexes_from_shards
from lemb.stages.instructions import Instructions, resolve_instructions
from lemb.stages.key_reuse import IDENTITY, CorpusDigest, key_identity, reuse_problem
from lemb.stages.models import check_model
from lemb.vocabulary import PER_QUERY_TASKS

log = logging.getLogger(__name__)
ENCODE_BLOCK = 256  # texts encoded between two progress reports (a few seconds of a CPU worker)


class _EncodingStage(Stage):
    def __init__(self, config: RetrieveConfig, instructions: Instructions) -> None:
        super().__init__()
        self.config = config
        self.instructions = instructions  # resolved once, in the driver, for the embedder of `config`

    def setup(self) -> None:
        self.encoder = Encoder(self.config.embedder, self.config.max_length, self.config.batch_size)

    def fingerprint(self) -> dict[str, Any]:
        return {"instructions": self.instructions.table}

    def metadata(self) -> dict[str, str]:
        return {"lemb.embedder": self.config.embedder, "lemb.instructions": json.dumps(self.instructions.describe())}

    def _encode(self, texts: list[str], instruction: str) -> np.ndarray:
        """Encode in blocks of similar length, longest first, reporting progress after each block: the bar moves
        every few seconds, and each block pads as little as one call over all the texts would."""
        if not texts:
            return self.encoder.encode([], instruction)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = None
        for start in range(0, len(order), ENCODE_BLOCK):
            block = order[start : start + ENCODE_BLOCK]
            emb = self.encoder.encode([texts[i] for i in block], instruction)
            if out is None:
                out = np.empty((len(texts), emb.shape[1]), dtype=emb.dtype)
            out[block] = emb
            self.advance(len(block))
        return out

    def _count_truncated(self) -> None:
        self.counters["encoded_texts"] = self.encoder.encoded
        self.counters["truncated_texts"] = self.encoder.truncated
        self.encoder.encoded = self.encoder.truncated = 0


class EmbedKeys(_EncodingStage):
    name = "retrieve/keys"
    unit = "keys"
    required_columns = ("key_id", "task", "text", "title")
    output_schema = schemas.KEY_EMBEDDING

    def __init__(self, config: RetrieveConfig, instructions: Instructions, identity: dict[str, Any]) -> None:
        super().__init__(config, instructions)
        self.identity = identity  # what the embeddings are a function of, recorded in every shard (key_reuse.py)

    def metadata(self) -> dict[str, str]:
        return {**super().metadata(), IDENTITY: json.dumps(self.identity)}

    def process(self, table: pa.Table) -> pa.Table:
        parts = []
        for task, part in split_by_task(table):
            template = key_template(self.config.key_template, task)
            fields = zip(part.column("text").to_pylist(), part.column("title").to_pylist())
            texts = [render_key(template, text, title) for text, title in fields]
            emb = self._encode(texts, self.instructions.key(task))
            vectors = pa.FixedSizeListArray.from_arrays(emb.reshape(-1), emb.shape[1]).cast(pa.list_(pa.float32()))
            keys = part.select(["key_id", "task"]).append_column("text", pa.array(texts, pa.string()))
            parts.append(keys.append_column("title", part.column("title")).append_column("embedding", vectors))
        self._count_truncated()
        return pa.concat_tables(parts).cast(self.output_schema)


def split_by_task(table: pa.Table) -> Iterator[tuple[str, pa.Table]]:
    """(task, its rows) for each task in the table, in task order."""
    for task in sorted(set(table.column("task").to_pylist())):
        yield task, table.filter(pc.equal(table.column("task"), task))


def history_index(encoder: Encoder, query: dict[str, Any], key_instruction: str) -> TaskIndex:
    """A query's own history as its candidate pool (chat, lrlm)."""
    ids = [schemas.history_key_id(query["query_id"], i) for i in range(len(query["history"]))]
    return TaskIndex.exact(ids, encoder.encode(query["history"], key_instruction))


class SearchQueries(_EncodingStage):
    name = "retrieve/candidates"
    unit = "queries"
    required_columns = ("query_id", "task", "text", "target", "positive_ids", "history", "relevance")
    output_schema = schemas.CANDIDATE

    def __init__(self, config: RetrieveConfig, instructions: Instructions, keys_dir: str | None) -> None:
        super().__init__(config, instructions)
        self.keys_dir = keys_dir

    def setup(self) -> None:
        super().setup()
        self.indexes: dict[str, TaskIndex] = {}
        if self.keys_dir is None:
            return
        c = self.config
        options = {"nprobe": c.nprobe, "hnsw_m": c.hnsw_m, "ef_search": c.ef_search}
        self.indexes = indexes_from_shards(Path(self.keys_dir), c.index, **options)

    def _rank(self, q: np.ndarray, task: str, query: dict[str, Any]) -> tuple[list[str], list[float]]:
        if task in PER_QUERY_TASKS:
            index = history_index(self.encoder, query, self.instructions.key(task))
        else:
            index = self.indexes[task]
        top_ids, top_scores = index.search(q, self.config.top_k)
        if len(top_ids) < self.config.top_k:
            self.counters["queries_short_of_top_k"] += 1  # the pool holds fewer keys than top_k
        if self.config.add_positives:
            missing = [p for p in query["positive_ids"] if p not in top_ids and p in index.position][: len(top_ids)]
            if missing:  # the lowest-ranked candidates make room for the known positives
                keep = len(top_ids) - len(missing)
                top_ids = top_ids[:keep] + missing
                top_scores = top_scores[:keep] + [index.score(q, p) for p in missing]
                self.counters["positives_added"] += len(missing)
        return top_ids, top_scores

    def process(self, table: pa.Table) -> pa.Table:
        out: dict[str, list] = {name: [] for name in self.output_schema.names}
        for task, part in split_by_task(table):
            rows = part.to_pylist()
            q_emb = self._encode([r["text"] for r in rows], self.instructions.query(task))
            for query, q in zip(rows, q_emb):
                ids, scores = self._rank(q, task, query)
                n = len(ids)
                out["query_id"] += [query["query_id"]] * n
                out["task"] += [task] * n
                out["key_id"] += ids
                out["retrieval_rank"] += list(range(1, n + 1))
                out["retrieval_score"] += scores
                out["query_text"] += [query["text"]] * n
                out["target"] += [query["target"]] * n
                out["positive_ids"] += [query["positive_ids"]] * n
                out["relevance"] += [query["relevance"]] * n
                if task in PER_QUERY_TASKS:
                    out["key_text"] += [query["history"][int(k.rsplit("#h", 1)[1])] for k in ids]
                else:
                    out["key_text"] += [None] * n  # filled from the key shards below
                out["key_title"] += [None] * n
        self._count_truncated()
        loose = pa.schema([f.with_nullable(True) for f in self.output_schema])  # key texts are filled in next
        return self._attach_key_texts(pa.table(out, schema=loose)).cast(self.output_schema)

    def _attach_key_texts(self, table: pa.Table) -> pa.Table:
        """Corpus keys' text and title, read from the key shards one shard at a time (only the keys needed)."""
        missing = pc.is_null(table.column("key_text"))
        if self.keys_dir is None or not pc.any(missing).as_py():
            return table
        needed = pa.array(sorted(set(table.filter(missing).column("key_id").to_pylist())), pa.string())
        found = []
        for path in sorted(Path(self.keys_dir).glob("part-*.parquet")):
            keys = pq.read_table(path, columns=["key_id", "text", "title"])
            found.append(keys.filter(pc.is_in(keys.column("key_id"), needed)))
        texts = pa.concat_tables(found)
        at = pc.index_in(table.column("key_id"), texts.column("key_id"))
        key_text = pc.coalesce(table.column("key_text"), pc.take(texts.column("text"), at))
        key_title = pc.if_else(missing, pc.take(texts.column("title"), at), table.column("key_title"))
        table = table.set_column(table.schema.get_field_index("key_text"), "key_text", key_text)
        return table.set_column(table.schema.get_field_index("key_title"), "key_title", key_title)


def _check_positives(
    plan: ShardPlan, key_tasks: set[str], positive_task: dict[str, str], path: str, corpus: str | None
) -> None:
    """Shared-pool tasks need keys; a positive or graded id must name a key of the query's own task or a history item.

    Read from the query input shards one at a time. `key_tasks`: the tasks the corpus has keys for;
    `positive_task`: the task of each positive id found in it."""
    for shard in plan.inputs:
        table = pq.read_table(shard, columns=["query_id", "task", "positive_ids", "relevance", "history"])
        lengths = pc.list_value_length(table.column("history")).to_pylist()
        for q, n_history in zip(table.select(["query_id", "task", "positive_ids", "relevance"]).to_pylist(), lengths):
            where = f"query_id {q['query_id']!r}"
            if q["task"] in PER_QUERY_TASKS:
                valid = {schemas.history_key_id(q["query_id"], i) for i in range(n_history or 0)}
                is_key = valid.__contains__
            elif q["task"] not in key_tasks:
                problem = f"no keys of task {q['task']!r} in the corpus" if corpus else "needs a corpus (--corpus)"
                raise InputError(path, where, "task", problem)
            else:
                is_key = lambda p, task=q["task"]: positive_task.get(p) == task  # noqa: E731
            # `relevance` first: the reader fills positive_ids from it when they are left out (and else requires
            # them to be its ids graded > 0), so an id in both came from `relevance`, the field the user wrote
            for field, ids in (("relevance", schemas.grades(q["relevance"])), ("positive_ids", q["positive_ids"])):
                bad = [p for p in ids if not is_key(p)]
                if bad:
                    raise InputError(path, where, field, f"{bad[0]!r} is not in the corpus ({q['task']} keys)")


def _partition_queries(config: RetrieveConfig, folder: Path) -> tuple[ShardPlan, set[str]]:
    """Stream the queries into per-shard input files; return the plan and the positive ids of shared-pool queries
    (the only key ids the driver keeps while the corpus streams by)."""
    wanted: set[str] = set()

    def batches():
        for batch in iter_queries(config.queries):
            columns = (batch.column(c).to_pylist() for c in ("task", "positive_ids", "relevance"))
            for task, ids, graded in zip(*columns):
                if task not in PER_QUERY_TASKS:
                    wanted.update(ids, (k for k, _ in graded or ()))
            yield batch

    schema = schemas.QUERY.append(pa.field(schemas.WHERE, pa.string(), nullable=False))
    return partition(batches(), "query_id", config.shards, folder, config.queries, schema), wanted


def _partition_corpus(config: RetrieveConfig, wanted: set[str], folder: Path) -> tuple[ShardPlan, set, dict, str]:
    """Stream the corpus into per-shard input files, noting each task with keys, the task of each wanted id and a
    digest of the records."""
    key_tasks: set[str] = set()
    positive_task: dict[str, str] = {}
    digest = CorpusDigest()

    def batches():
        for batch in iter_keys(config.corpus):
            ids, tasks = batch.column("key_id").to_pylist(), batch.column("task").to_pylist()
            key_tasks.update(tasks)
            positive_task.update((k, t) for k, t in zip(ids, tasks) if k in wanted)
            digest.update(ids, tasks, batch.column("text").to_pylist(), batch.column("title").to_pylist())
            yield batch

    schema = schemas.KEY.append(pa.field(schemas.WHERE, pa.string(), nullable=False))
    plan = partition(batches(), "key_id", config.shards, folder, config.corpus, schema)
    return plan, key_tasks, positive_task, digest.hexdigest()


def _warn_short_pools(stats: dict[str, Any], top_k: int) -> None:
    short = int(stats.get("queries_short_of_top_k", 0))
    if short:
        log.warning("top_k %d is larger than the candidate pool of %d queries: they have fewer candidates "
                    "(counted as queries_short_of_top_k in the stage stats)", top_k, short)  # fmt: skip


def truncation_counts(stats: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """{step: (texts cut at max_length, texts encoded)} of the steps in a retrieve's stats that encoded texts."""
    steps = {"keys": EmbedKeys.name, "candidates": SearchQueries.name}
    return {name: (int(stats[step].get("truncated_texts", 0)), int(stats[step].get("encoded_texts", 0)))
            for step, name in steps.items() if step in stats}  # fmt: skip


def truncation_line(counts: dict[str, tuple[int, int]], max_length: int) -> str | None:
    """ "3 of 10 texts cut at max_length 256 (...)": the sum over `counts` ({part: (cut, encoded)}), with each
    part's own; None when no text was cut."""
    cut, total = (sum(c[i] for c in counts.values()) for i in (0, 1))
    if not cut:
        return None
    parts = "; ".join(f"{name} {c:,} of {n:,}" for name, (c, n) in counts.items())
    return f"{cut:,} of {total:,} texts cut at max_length {max_length} ({parts}; truncated_texts in the stage stats)"


def _take_keys(reuse_keys: Path | None, identity: dict[str, Any], stats: dict[str, Any], name: str) -> Path | None:
    """`reuse_keys` when its shards hold the key embeddings of `identity`, else None; why, in `stats` and the log."""
    if reuse_keys is None:
        return None
    problem = reuse_problem(reuse_keys, identity)
    stats["keys_reuse"] = {"from": str(reuse_keys), "reused": problem is None, "why_not": problem}
    stage, whose = reuse_keys.parent.name, f" for {name}" if name else ""
    if problem:
        log.info("embedding the keys%s: %s's key embeddings do not fit (%s)", whose, stage, problem)
    else:
        log.info("reusing %s's key embeddings%s (same model, template, instructions, max_length and corpus)", stage,
                 whose)  # fmt: skip
    return None if problem else reuse_keys


def retrieve(
    config: RetrieveConfig,
    progress: bool = True,
    out: Path | None = None,
    summary: bool = True,
    reuse_keys: Path | None = None,
    name: str = "",
) -> dict[str, Any]:
    """Run both steps into `out` (default `<run>/retrieve`); returns their stats.

    Queries and corpus stream through the record checks into per-shard input files (a hidden folder beside the
    output, removed at the end), so neither the driver nor a worker holds more than a shard of either; every
    input is validated before anything is embedded. `summary`: warn of short candidate pools and of texts cut at
    max_length, once for the stage (eval ranks to a fixed depth and sums its own). `reuse_keys`: a finished keys
    folder to rank over instead of embedding the corpus, taken only if its shards record these key embeddings
    (`stats["keys_reuse"]` says whether, and why not; `name` is what the log calls this ranking)."""
    check_model(config.embedder, "embedder", config.max_length)  # a bad model fails here, not in every worker
    instructions = resolve_instructions(config.instructions, config.embedder)
    log.info("%s embeds with instructions %s: %s", config.embedder, instructions.name, instructions.source)
    out = RunLayout(config.run).retrieve if out is None else out
    staging = out / ".input"
    inputs = [Path(p) for p in (config.queries, config.corpus) if p]
    executor = executor_for(config.cluster, config.restart, progress)
    stats: dict[str, Any] = {"instructions": instructions.describe()}
    with StageLock(out, "retrieve"):  # a process refused here touches nothing: the staging files are the holder's
        try:
            queries, wanted = _partition_queries(config, staging / "queries")
            keys_dir = None
            if config.corpus:
                plan, key_tasks, positive_task, corpus = _partition_corpus(config, wanted, RunLayout.keys_in(staging))
                _check_positives(queries, key_tasks, positive_task, config.queries, config.corpus)
                identity = key_identity(config.embedder, config.key_template, instructions, config.max_length, corpus)
                keys_dir = _take_keys(reuse_keys, identity, stats, name)
                if keys_dir is None:
                    keys_dir = RunLayout.keys_in(out)
                    embed = EmbedKeys(config, instructions, identity)
                    stats["keys"] = executor.run(embed, plan, keys_dir, config, inputs, "key_id")
                elif RunLayout.keys_in(out).resolve() != keys_dir.resolve():  # what an earlier run here embedded
                    remove(RunLayout.keys_in(out))  # is not what its candidates are ranked over
            else:
                _check_positives(queries, set(), {}, config.queries, None)
            search = SearchQueries(config, instructions, str(keys_dir) if keys_dir else None)
            stats["candidates"] = executor.run(
                search, queries, RunLayout.candidates_in(out), config, inputs, "query_id"
            )
            if summary:
                _warn_short_pools(stats["candidates"], config.top_k)
                line = truncation_line(truncation_counts(stats), config.max_length)
                if line:
                    log.warning("retrieve: %s", line)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return stats
