"""The task table: instruction overrides, and the per-task evaluation metrics with their reference formulas."""

from __future__ import annotations

import math

import pytest

from lemb.data.tasks import METRICS, TASK_SPECS
from lemb.errors import ConfigError
from lemb.pipeline.config import RetrieveConfig, TrainConfig, load_config
from lemb.trainer.evaluate import perplexity, retrieval_metrics
from lemb.vocabulary import TASKS


def test_bad_instruction_tables_are_config_errors():
    with pytest.raises(ConfigError, match=r"instructions\[qa\] must be \[query_instruction, key_instruction\]"):
        load_config(RetrieveConfig, queries="q.jsonl", instructions={"qa": "Query: "})
    with pytest.raises(ConfigError, match="instructions: unknown task 'poem'"):
        load_config(TrainConfig, instructions={"poem": ["a", "b"]})
    assert load_config(TrainConfig, instructions={"tool": ["a", "b"]}).instructions == {"tool": ["a", "b"]}
    with pytest.raises(ConfigError, match="instructions: unknown preset 'bert'; known: auto, llm-embedder, bge, none"):
        load_config(TrainConfig, instructions="bert")
    assert load_config(TrainConfig).instructions == "auto"


def test_every_task_reports_known_metrics_paper_measure_first():
    assert set(TASK_SPECS) == set(TASKS)
    for spec in TASK_SPECS.values():
        assert spec.metrics and all(m.split("@")[0] + ("@k" if "@" in m else "") in METRICS for m in spec.metrics)
    first = {t: s.metrics[0] for t, s in TASK_SPECS.items()}
    assert first == {
        "qa": "recall@1",
        "icl": "answer_accuracy",
        "chat": "perplexity",
        "lrlm": "perplexity",
        "tool": "ndcg@5",
        "convsearch": "ndcg@3",
    }


def test_perplexity_pools_tokens():
    # two targets: 2 tokens at -1 each, 2 tokens at -2 each -> mean -1.5 per token
    assert perplexity({"a": (-2.0, 2), "b": (-4.0, 2)})["perplexity"] == pytest.approx(math.exp(1.5))
    assert perplexity({}) == {}


def test_retrieval_metrics_at_the_tasks_depths():
    queries = [
        {"query_id": "q1", "positive_ids": ["k2"]},
        {"query_id": "q2", "positive_ids": ["k9"]},  # not retrieved: counts as 0
        {"query_id": "q3", "positive_ids": []},  # no positives: not judged
    ]
    ranking = {
        "q1": [("k1", 0.9), ("k2", 0.8), ("k3", 0.7)],
        "q2": [("k1", 0.9)],
        "q3": [("k1", 0.9)],
    }
    m = retrieval_metrics(ranking, queries, ("ndcg@3", "recall@1", "recall@5", "perplexity"))
    assert set(m) == {"ndcg@3", "recall@1", "recall@5"}  # non-retrieval names are left to the LLM metrics
    assert m["ndcg@3"] == pytest.approx((1 / math.log2(3)) / 2)
    assert m["recall@1"] == 0.0 and m["recall@5"] == 0.5
