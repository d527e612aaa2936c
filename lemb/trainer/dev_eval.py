"""Dev evaluation while training: each task's retrieval metrics on held-out queries, every `eval_every` steps.

The metrics are `lemb eval`'s (`per_query_retrieval`, ir-measures over pytrec_eval) without the LLM: each task's
retrieval metrics of its `TaskSpec`, and R@1, R@5, MRR@10 and nDCG@10 over every dev query with known positives (the
"all" row). The model being trained ranks the queries exactly (inner product over every dev key of the query's task,
or over the query's own history for chat and lrlm) in eval mode, without gradients, and goes back to training mode:
an evaluation touches neither the weights nor any random state, so a run with dev evaluation trains exactly as one
without. Its cost is embedding the dev corpus and queries once per evaluation (`dev_seconds` in the log row).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lemb.data.readers import read_keys, read_queries
from lemb.data.schemas import grades, history_key_id
from lemb.data.tasks import key_template, render_key, task_spec
from lemb.errors import ConfigError, InputError
from lemb.stages.instructions import Instructions
from lemb.trainer.evaluate import RETRIEVAL_METRICS, retrieval_metrics, within
from lemb.vocabulary import PER_QUERY_TASKS

log = logging.getLogger(__name__)
DEV_DEPTH = 100  # keys ranked per dev query: every metric up to @100 is exact
PREFIX = "dev/"  # a log row's dev metrics are named dev/TASK/METRIC and dev/all/METRIC


@dataclass
class DevSet:
    """Held-out queries (as `lemb eval` holds them, with their history) and, per task, the keys they rank over,
    rendered with the run's key template."""

    queries: list[dict[str, Any]]
    keys: dict[str, tuple[list[str], list[str]]]  # task -> (key ids, rendered texts)

    @property
    def tasks(self) -> list[str]:
        return sorted({q["task"] for q in self.queries})


def load_dev(queries: str | Path, corpus: str | Path | None, template: Any) -> DevSet:
    """Read and check the dev records: one line naming the file for a dev set that cannot be scored."""
    records = read_queries(queries).to_pylist()
    judged = [q for q in records if q["positive_ids"]]
    if not judged:
        raise InputError(queries, "file", "positive_ids", "no dev query has known positives: nothing to score")
    shared = sorted({q["task"] for q in judged} - set(PER_QUERY_TASKS))
    if shared and corpus is None:
        raise ConfigError(f"TrainConfig: the dev queries of {shared} rank over a corpus: pass --corpus")
    keys: dict[str, tuple[list[str], list[str]]] = {}
    if shared:
        for k in read_keys(corpus).to_pylist():
            if k["task"] in shared:
                ids, texts = keys.setdefault(k["task"], ([], []))
                ids.append(k["key_id"])
                texts.append(render_key(key_template(template, k["task"]), k["text"], k["title"]))
        empty = [t for t in shared if t not in keys]
        if empty:
            raise InputError(corpus, "file", "task", f"no key of task {empty[0]}, which dev queries rank over")
    queries_out = [
        {"query_id": q["query_id"], "task": q["task"], "text": q["text"], "history": q["history"] or [],
         "positive_ids": q["positive_ids"] or [], "relevance": grades(q["relevance"])}
        for q in judged
    ]  # fmt: skip
    left_out = len(records) - len(judged)
    if left_out:
        log.info("dev: %d of %d queries have no known positives and are left out", left_out, len(records))
    return DevSet(queries_out, keys)


def metric_names(task: str | None, extra: str | None = None) -> tuple[str, ...]:
    """A task's dev metrics: the retrieval metrics of its spec, the "all" row's, and `extra` (the kept metric);
    `task` None: the "all" row's and `extra`."""
    spec = task_spec(task).metrics if task is not None else ()
    retrieval = [m for m in spec if m.partition("@")[0] in ("recall", "ndcg", "mrr")]
    names = dict.fromkeys([*retrieval, *RETRIEVAL_METRICS, *([extra] if extra else [])])
    return within(tuple(names), DEV_DEPTH)


class DevEvaluator:
    """Scores a model on a DevSet: {"dev/TASK/METRIC": value, "dev/all/METRIC": value}."""

    def __init__(self, dev: DevSet, instructions: Instructions, batch_size: int = 64, keep_metric: str = "") -> None:
        self.dev = dev
        self.instructions = instructions
        self.batch_size = batch_size
        self.extra = keep_metric.partition("/")[2] or None

    def _encode(self, model: Any, texts: list[str], instruction: str) -> torch.Tensor:
        return model.encode(
            [instruction + t for t in texts], prompt="", batch_size=self.batch_size, normalize_embeddings=True,
            convert_to_tensor=True, show_progress_bar=False,
        ).float()  # fmt: skip

    def _rank(self, model: Any, task: str, queries: list[dict[str, Any]]) -> dict[str, list[tuple[str, float]]]:
        q_emb = self._encode(model, [q["text"] for q in queries], self.instructions.query(task))
        key_instruction = self.instructions.key(task)
        if task not in PER_QUERY_TASKS:
            ids, texts = self.dev.keys[task]
            scores = q_emb @ self._encode(model, texts, key_instruction).T
            pools = [(ids, row) for row in scores]
        else:  # each query ranks its own history
            pools = []
            for q, e in zip(queries, q_emb):
                ids = [history_key_id(q["query_id"], i) for i in range(len(q["history"]))]
                pools.append((ids, self._encode(model, q["history"], key_instruction) @ e))
        ranking = {}
        for q, (ids, row) in zip(queries, pools):
            top = torch.topk(row, min(DEV_DEPTH, len(ids)))
            ranking[q["query_id"]] = [(ids[i], float(s)) for s, i in zip(top.values.tolist(), top.indices.tolist())]
        return ranking

    def __call__(self, model: Any) -> dict[str, float]:
        """Score `model` on the dev set; it comes back in the training mode it had, weights and RNG untouched."""
        start = time.perf_counter()
        training = model.training
        by_task = {t: [q for q in self.dev.queries if q["task"] == t] for t in self.dev.tasks}
        try:
            with torch.no_grad():
                ranking = {}
                for task, queries in by_task.items():
                    ranking.update(self._rank(model, task, queries))
        finally:
            model.train(training)  # encode() leaves the model in eval mode
        out: dict[str, float] = {}
        for task, queries in [*by_task.items(), (None, self.dev.queries)]:
            for name, value in retrieval_metrics(ranking, queries, metric_names(task, self.extra)).items():
                out[f"{PREFIX}{task or 'all'}/{name}"] = value
        out["dev_seconds"] = round(time.perf_counter() - start, 3)
        return out
