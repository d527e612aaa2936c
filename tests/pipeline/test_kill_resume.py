"""kill -9 `lemb retrieve` and `lemb label` at several points; a rerun finishes with the same shards."""

import shutil
import signal
import subprocess
import sys
import time

import polars as pl
import pyarrow.parquet as pq
import pytest

from lemb.pipeline.shards import read_stage
from lemb.vocabulary import default_backend


def _run_until(cmd, ready, extra_wait=0.0, timeout=300):
    """Start `cmd`, kill -9 it once `ready()` holds (plus `extra_wait` seconds); True if it was killed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while proc.poll() is None and not ready() and time.time() < deadline:
        time.sleep(0.02)
    if extra_wait:
        time.sleep(extra_wait)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return killed


def _shards(stage_dir):
    return sorted(stage_dir.glob("part-*.parquet"))


def _table(stage_dir, keys):
    df = pl.from_arrow(read_stage(stage_dir)).sort(keys)
    assert df.select(keys).is_duplicated().sum() == 0
    return df


def _kill_at_three_points_then_finish(cmd, stage_dir):
    manifest = stage_dir / "_manifest.json"
    kills = 0
    kills += _run_until(cmd, manifest.exists)  # before the first shard
    first = lambda: len(_shards(stage_dir)) >= 1  # noqa: E731
    kills += _run_until(cmd, first)  # between shards
    n_done = len(_shards(stage_dir))
    kills += _run_until(cmd, lambda: len(_shards(stage_dir)) > n_done)  # in the next shard's work
    assert kills >= 2, "the stage finished before it could be interrupted"
    subprocess.run(cmd, check=True, capture_output=True)
    assert not list(stage_dir.glob(".*tmp*"))


def _lemb(command, run, *args):
    """`lemb COMMAND --run RUN ARGS`, in-process executor, no progress bars."""
    return [sys.executable, "-m", "lemb.cli", command, "--run", str(run), "--executor", "local", "--quiet", *args]


@pytest.mark.slow
def test_retrieve_killed_and_rerun_equals_uninterrupted(tiny_data, tmp_path):
    def cmd(run):
        return _lemb("retrieve", run, "--queries", str(tiny_data["queries"]), "--corpus", str(tiny_data["corpus"]),
                     "--top-k", "2", "--shards", "4")  # fmt: skip

    subprocess.run(cmd(tmp_path / "ref"), check=True, capture_output=True)
    _kill_at_three_points_then_finish(cmd(tmp_path / "killed"), tmp_path / "killed" / "retrieve" / "candidates")
    for step, keys in (("keys", ["key_id"]), ("candidates", ["query_id", "retrieval_rank"])):
        ref = _table(tmp_path / "ref" / "retrieve" / step, keys)
        got = _table(tmp_path / "killed" / "retrieve" / step, keys)
        assert got.equals(ref)


@pytest.mark.slow
def test_label_killed_and_rerun_equals_uninterrupted(labelled_run, tmp_path):
    def cmd(run):
        return _lemb("label", run, "--n-samples", "3", "--per-candidate-samples", "1")

    for name in ("ref", "killed"):
        shutil.copytree(labelled_run / "retrieve", tmp_path / name / "retrieve")
    subprocess.run(cmd(tmp_path / "ref"), check=True, capture_output=True)
    _kill_at_three_points_then_finish(cmd(tmp_path / "killed"), tmp_path / "killed" / "label")
    keys = ["query_id", "key_id"]
    ref, got = _table(tmp_path / "ref" / "label", keys), _table(tmp_path / "killed" / "label", keys)
    assert got.height == ref.height == 8
    assert got.equals(ref)  # same samples, log-probabilities and rewards
    # the default backend ran: vLLM where it is installed (as `make install` does), else transformers
    backend = pq.read_schema(tmp_path / "killed" / "label" / "part-00000.parquet").metadata[b"lemb.backend"]
    assert backend.decode() == default_backend()


@pytest.mark.slow
def test_label_worker_killed_inside_a_block_is_retried_and_equals_uninterrupted(labelled_run, tmp_path):
    """kill -9 a Ray label worker while its shard's one block is under way (its progress file shows part of the
    block's queries done: the backend's calls report their batches)."""
    import json
    import os

    config = tmp_path / "label.yaml"
    config.write_text("block_tokens: 10000000\nn_samples: 3\nper_candidate_samples: 1\n")  # a shard is one block

    def cmd(run, executor):
        return [sys.executable, "-m", "lemb.cli", "label", "--run", str(run), "--executor", executor, "--workers",
                "1", "--quiet", "--config", str(config)]  # fmt: skip

    for name in ("ref", "killed"):
        shutil.copytree(labelled_run / "retrieve", tmp_path / name / "retrieve")
    subprocess.run(cmd(tmp_path / "ref", "local"), check=True, capture_output=True)
    stage_dir = tmp_path / "killed" / "label"
    proc = subprocess.Popen(cmd(tmp_path / "killed", "ray"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed = None
    deadline = time.time() + 300
    while proc.poll() is None and killed is None and time.time() < deadline:
        for path in stage_dir.glob("part-*.progress.json"):
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if 0 < state["done"] < state["total"] and state["done"] % 1:  # part of a block done
                os.kill(state["pid"], signal.SIGKILL)
                killed = state
                break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=600)
    assert killed is not None, "no shard was caught inside its block"
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"retry 1 of" in err  # the driver saw the worker die and ran the shard again
    keys = ["query_id", "key_id"]
    assert _table(stage_dir, keys).equals(_table(tmp_path / "ref" / "label", keys))
