"""All six task kinds from the shared real data, in one run: convert -> retrieve -> label -> train -> eval.

Two queries per kind keep it cheap (one model load per stage); the assertions check what each kind
must do differently: chat / lrlm candidates are the query's own history, convsearch (no desired
output) trains contrastively on its positive, and every task reports its own metrics.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from lemb.data.readers import read_keys, read_queries
from lemb.data.schemas import history_key_id
from lemb.data.tasks import task_spec
from lemb.vocabulary import TASKS

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SOURCES = ["nq_oracle", "sst2", "msc", "gutenberg", "toolalpaca", "trec_cast"]
pytestmark = pytest.mark.slow


def lemb(*args: str) -> str:
    """One CLI command in its own process, as a user runs it (an in-process vLLM engine would inherit the
    distributed state that earlier tests' engines left in the test process)."""
    result = subprocess.run([sys.executable, "-m", "lemb.cli", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA}")
    root = tmp_path_factory.mktemp("six")
    data, run = root / "data", root / "run"
    lemb("convert", *SOURCES, "--data", str(DATA), "--out", str(data), "--limit", "2", "--max-keys", "12")
    local = ["--run", str(run), "--executor", "local", "--quiet"]
    files = ["--queries", str(data / "queries.jsonl"), "--corpus", str(data / "corpus.jsonl")]
    lemb("retrieve", *files, "--top-k", "2", "--shards", "2", *local)
    lemb("label", "--n-samples", "2", "--per-candidate-samples", "0", *local)
    # tasks are drawn at random per batch; with seed 2 the first 12 batches hold every task
    (root / "train.yaml").write_text(yaml.safe_dump({"seed": 2}))
    lemb("train", "--steps", "12", "--batch-size", "2", "--config", str(root / "train.yaml"), *local[:2], "--quiet")
    lemb("eval", *files, "--shards", "2", *local)
    return run


@pytest.mark.slow
def test_candidates_are_own_history_or_same_task_corpus(run):
    data = run.parent / "data"
    queries = {q["query_id"]: q for q in read_queries(data / "queries.jsonl").to_pylist()}
    task_of_key = {k["key_id"]: k["task"] for k in read_keys(data / "corpus.jsonl").to_pylist()}
    candidates = pl.read_parquet(run / "retrieve" / "candidates" / "*.parquet").to_dicts()
    assert {c["task"] for c in candidates} == set(TASKS)
    for c in candidates:
        q = queries[c["query_id"]]
        if q["task"] in ("chat", "lrlm"):
            own = {history_key_id(q["query_id"], i) for i in range(len(q["history"]))}
            assert c["key_id"] in own, c
        else:
            assert task_of_key[c["key_id"]] == q["task"], c


def test_rewards_per_kind(run):
    rewards = pl.read_parquet(run / "label" / "*.parquet")
    for task in ("qa", "icl", "chat", "lrlm", "tool"):
        part = rewards.filter(pl.col("task") == task)
        assert part.height >= 2
        assert part["target_logprob"].is_finite().all()  # the desired output was scored under every candidate
    convsearch = rewards.filter(pl.col("task") == "convsearch")
    assert set(convsearch["skip_reason"]) == {"no_target"}  # CAsT has passages, no desired output


def test_one_model_trains_on_all_six(run):
    stats = json.loads((run / "train" / "_stats.json").read_text())
    assert stats["groups_per_task"] == {t: 2 for t in sorted(TASKS)}  # convsearch trains on its positives alone
    log = [json.loads(line) for line in (run / "train" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 12 and all(math.isfinite(row["loss"]) for row in log)
    assert {row["task"] for row in log} == set(TASKS)
    # InfoNCE of a positive against in-batch keys is never exactly 0 (graded losses are, when rewards tie)
    assert all(row["loss"] > 0 for row in log if row["task"] == "convsearch")


def test_each_task_reports_its_own_metrics(run):
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    report = (run / "eval" / "report.md").read_text()
    for name in ("base", "trained"):
        per_task = metrics[name]["per_task"]
        assert set(per_task) == set(TASKS)
        for task, values in per_task.items():
            reported = set(values) - {"queries"}
            assert reported and reported <= set(task_spec(task).metrics), (task, values)
            assert all(math.isfinite(v) for v in values.values())
        assert set(per_task["qa"]) >= {"recall@1", "ndcg@10", "answer_accuracy"}
        assert set(per_task["icl"]) == {"answer_accuracy", "answer_em", "queries"}
        assert per_task["chat"]["perplexity"] > 1 and per_task["lrlm"]["perplexity"] > 1
        assert 0 <= per_task["tool"]["ndcg@5"] <= 1 and 0 <= per_task["convsearch"]["ndcg@3"] <= 1
    for task in TASKS:
        assert f"## {task} (2 queries)" in report
    assert "| perplexity |" in report and "| ndcg@3 |" in report and "| ndcg@5 |" in report


def test_perplexity_is_of_the_target_with_the_top_retrieved_history_item(run):
    from lemb.data.tasks import build_prompt
    from lemb.stages.llm.hf import TransformersBackend

    details = json.loads((run / "eval" / "details.json").read_text())["trained"]
    queries = read_queries(run.parent / "data" / "queries.jsonl").to_pylist()
    q = next(q for q in queries if q["task"] == "lrlm")
    top = details["ranking"][q["query_id"]][0][0]
    prompt = build_prompt("lrlm", q["text"], q["history"][int(top.rsplit("#h", 1)[1])])
    expected = TransformersBackend().score(prompt, [q["target"]], reduce="sum")[0]
    assert details["target_logprobs"][q["query_id"]] == pytest.approx(list(expected), rel=1e-6)
