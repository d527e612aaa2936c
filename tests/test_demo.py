"""`lemb demo --size tiny`: the whole pipeline on a local Ray cluster with the default models."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_tiny_demo_end_to_end_on_ray(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "lemb.cli", "demo", "--size", "tiny", "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "base vs trained" in proc.stdout and "| ndcg@10 |" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"base", "trained"}
    for name in ("base", "trained"):
        for key in ("recall@1", "ndcg@10", "answer_accuracy"):
            assert 0.0 <= metrics[name][key] <= 1.0
        assert set(metrics[name]["per_task"]) == {"qa", "tool", "chat"}
    # the distractors fool the base embedder; the LLM's rewards teach the trained one to look past them
    assert metrics["trained"]["ndcg@10"] > metrics["base"]["ndcg@10"]
    assert (out / "report.md").read_text().count("|") > 10
    assert (out / "rewards.png").stat().st_size > 1000 and (out / "loss.png").stat().st_size > 1000
    # every stage ran through the shard protocol and finished all its shards
    for stage in ("retrieve/keys", "retrieve/candidates", "label"):
        stats = json.loads((out / "run" / stage / "_stats.json").read_text())
        assert stats["shards_done"] == stats["shards"] and stats["shards_failed"] == 0
    label_stats = json.loads((out / "run" / "label" / "_stats.json").read_text())
    assert label_stats["rows_in"] == label_stats["rows_out"]
