"""`lemb eval`: retrieval metrics and the LLM's answer accuracy, for each embedder, on held-out queries.

Retrieval metrics (ir-measures over pytrec_eval) use the queries' known positives: R@1, R@5,
RR@10 (MRR@10) and nDCG@10. The LLM answers greedily with the top-`answer_k` retrieved candidates
in its prompt; both answer and target are normalised SQuAD-style. `answer_em` is strict exact match;
`answer_accuracy` counts an answer correct when the normalised target is the answer or a whole-word
span of it, the accuracy of Lost in the Middle (Liu et al., TACL 2024) and PopQA (Mallen et al.,
ACL 2023): small chat models answer in sentences ("The capital of Zorbia is Quelm."), which strict
exact match scores as wrong.
"""

from __future__ import annotations

import logging
import re
import string
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa

from lemb.data.readers import key_texts, read_keys, read_queries
from lemb.data.schemas import PER_QUERY_TASKS
from lemb.data.tasks import build_prompt, instructions, task_spec
from lemb.pipeline.config import EvalConfig
from lemb.pipeline.executor import set_threads
from lemb.stages.encoder import Encoder
from lemb.stages.index import TaskIndex
from lemb.stages.retrieve import check_positives, history_index

log = logging.getLogger(__name__)
RETRIEVAL_MEASURES = {"recall@1": "R@1", "recall@5": "R@5", "mrr@10": "RR@10", "ndcg@10": "nDCG@10"}
DEPTH = 10


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, collapse whitespace (SQuAD / NQ convention)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def rank_queries(
    encoder: Encoder, queries: list[dict], keys: pa.Table | None, preset: Any, depth: int = DEPTH
) -> dict[str, list[tuple[str, float]]]:
    """Top-`depth` (key_id, score) per query, searching the query's task pool or its own history."""
    indexes: dict[str, TaskIndex] = {}
    if keys is not None:
        for task in sorted(set(keys.column("task").to_pylist())):
            part = keys.filter(pa.compute.equal(keys.column("task"), task))
            vectors = encoder.encode(part.column("text").to_pylist(), instructions(preset, task)[1])
            indexes[task] = TaskIndex.exact(part.column("key_id").to_pylist(), vectors)
    ranking = {}
    for task in sorted({q["task"] for q in queries}):
        part = [q for q in queries if q["task"] == task]
        q_emb = encoder.encode([q["text"] for q in part], instructions(preset, task)[0])
        for q, vec in zip(part, q_emb):
            index = (
                history_index(encoder, q, instructions(preset, task)[1]) if task in PER_QUERY_TASKS else indexes[task]
            )
            ids, scores = index.search(vec, depth)
            ranking[q["query_id"]] = list(zip(ids, scores))
    return ranking


def retrieval_metrics(ranking: dict[str, list[tuple[str, float]]], queries: list[dict]) -> dict[str, float]:
    import ir_measures

    qrels = [ir_measures.Qrel(q["query_id"], p, 1) for q in queries for p in q["positive_ids"]]
    if not qrels:
        return {}
    run = [ir_measures.ScoredDoc(qid, kid, s) for qid, found in ranking.items() for kid, s in found]
    measures = [ir_measures.parse_measure(m) for m in RETRIEVAL_MEASURES.values()]
    judged = {q["query_id"] for q in queries if q["positive_ids"]}
    per_query: dict[str, dict[str, float]] = defaultdict(dict)
    for m in ir_measures.iter_calc(measures, qrels, run):
        per_query[str(m.measure)][m.query_id] = m.value
    # queries with positives but no retrieved keys count as 0 (pytrec_eval would leave them out)
    return {
        name: sum(per_query[m].get(q, 0.0) for q in judged) / len(judged) for name, m in RETRIEVAL_MEASURES.items()
    }


class AnswerJudge:
    """Greedy answers of the LLM, cached by (query, candidates in the prompt) across embedders."""

    def __init__(self, llm: Any, key_text: dict[str, str], max_new_tokens: int) -> None:
        self.llm, self.key_text, self.max_new_tokens = llm, key_text, max_new_tokens
        self.cache: dict[tuple[str, tuple[str, ...]], str] = {}

    def answers(self, queries: list[dict], ranking: dict[str, list[tuple[str, float]]], k: int) -> dict[str, str]:
        todo = {}
        for q in queries:
            chosen = tuple(kid for kid, _ in ranking[q["query_id"]][:k])
            if (q["query_id"], chosen) not in self.cache:
                context = "\n".join(self.key_text[kid] for kid in chosen) if chosen else None
                todo[(q["query_id"], chosen)] = build_prompt(q["task"], q["text"], context)
        task_of = {q["query_id"]: q["task"] for q in queries}
        for task in sorted({task_of[qid] for qid, _ in todo}):  # each task answers within its own token budget
            keys = [key for key in todo if task_of[key[0]] == task]
            budget = min(task_spec(task).max_new_tokens, self.max_new_tokens)
            self.cache.update(zip(keys, self.llm.greedy([todo[key] for key in keys], max_new_tokens=budget)))
        return {
            q["query_id"]: self.cache[(q["query_id"], tuple(kid for kid, _ in ranking[q["query_id"]][:k]))]
            for q in queries
        }


def answer_metrics(queries: list[dict], answers: dict[str, str]) -> dict[str, float]:
    judged = [q for q in queries if q["target"]]
    if not judged:
        return {}
    pairs = [(normalize_answer(answers[q["query_id"]]), normalize_answer(q["target"])) for q in judged]
    exact = [answer == target for answer, target in pairs]
    contains = [f" {target} " in f" {answer} " for answer, target in pairs]
    return {"answer_accuracy": float(np.mean(contains)), "answer_em": float(np.mean(exact))}


def evaluate(config: EvalConfig, embedders: dict[str, str], progress: bool = True) -> dict[str, Any]:
    """{embedder name: {"all": metrics, "<task>": metrics}} plus per-query rankings and answers."""
    set_threads(config.threads)
    queries = read_queries(config.queries)
    keys = read_keys(config.corpus) if config.corpus else None
    check_positives(queries, keys, config.queries)
    records = queries.to_pylist()
    key_text = key_texts(records, keys)
    judge = None
    if config.answer_k > 0:
        from lemb.stages.llm import TransformersLLM

        judge = AnswerJudge(TransformersLLM(config.llm), key_text, config.max_new_tokens)
    results: dict[str, Any] = {}
    details: dict[str, Any] = {}
    for name, model in embedders.items():
        log.info("evaluating %s (%s) on %d queries", name, model, len(records))
        ranking = rank_queries(
            Encoder(model, config.max_length, config.batch_size), records, keys, config.instructions
        )
        answers = judge.answers(records, ranking, config.answer_k) if judge else {}
        by_task: dict[str, dict[str, float]] = {}
        for task in ["all", *sorted({q["task"] for q in records})]:
            part = records if task == "all" else [q for q in records if q["task"] == task]
            metrics = retrieval_metrics(ranking, part)
            metrics.update(answer_metrics(part, answers) if answers else {})
            metrics["queries"] = len(part)
            by_task[task] = metrics
        results[name] = by_task
        details[name] = {"ranking": ranking, "answers": answers}
    return {"metrics": results, "details": details}
