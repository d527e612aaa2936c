"""SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) stop a stage cleanly: finished shards kept, in-flight
work abandoned without leftovers, workers stopped, one line saying how to resume, exit 128 + signal."""

import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest


def _ray_processes() -> set[int]:
    found = set()
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "ray" in cmd and ("raylet" in cmd or "ray::" in cmd or "gcs_server" in cmd or "dashboard" in cmd):
            found.add(p.pid)
    return found


def _interrupt_when(cmd, ready, signum, timeout=300):
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while proc.poll() is None and not ready() and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the stage ended before it could be interrupted"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _lemb(*args):
    return [sys.executable, "-m", "lemb.cli", *args, "--quiet"]


def _no_leftovers(stage_dir):
    return not list(stage_dir.glob(".*.tmp-*")) and not list(stage_dir.glob("part-*.progress.json"))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_label_on_ray_stops_cleanly_and_resumes(labelled_run, tmp_path, signum):
    run = tmp_path / "run"
    shutil.copytree(labelled_run / "retrieve", run / "retrieve")
    stage = run / "label"
    cmd = _lemb("label", "--run", str(run), "--executor", "ray", "--workers", "1", "--n-samples", "3",
                "--per-candidate-samples", "1")  # fmt: skip
    before = _ray_processes()
    code, err = _interrupt_when(cmd, lambda: any(stage.glob("part-*.progress.json")), signum)
    assert code == 128 + signum, err[-2000:]
    name = signal.Signals(signum).name
    assert f"interrupted ({name}): finished work is kept; run the same command again to resume" in err
    assert _no_leftovers(stage)
    deadline = time.time() + 30
    while _ray_processes() - before and time.time() < deadline:  # the local cluster goes with its driver
        time.sleep(0.5)
    assert not _ray_processes() - before
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list(stage.glob("part-*.parquet"))) == 2


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_retrieve_stops_cleanly(tiny_data, tmp_path, signum):
    run = tmp_path / "run"
    cmd = _lemb("retrieve", "--run", str(run), "--queries", str(tiny_data["queries"]), "--corpus",
                str(tiny_data["corpus"]), "--executor", "local", "--top-k", "2", "--shards", "2")  # fmt: skip
    code, err = _interrupt_when(cmd, lambda: any((run / "retrieve").rglob("part-*.progress.json")), signum)
    assert code == 128 + signum and f"interrupted ({signal.Signals(signum).name})" in err, err[-2000:]
    retrieve = run / "retrieve"  # stopped before any shard finished: nothing of it may be left but finished work
    assert not retrieve.exists() or all(_no_leftovers(d) for d in retrieve.iterdir() if d.is_dir())
    assert not (retrieve / ".input").exists()  # the per-shard input files are removed too


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_train_stops_cleanly_keeping_its_checkpoint(labelled_run, tmp_path, signum):
    run = tmp_path / "run"
    shutil.copytree(labelled_run / "retrieve", run / "retrieve")
    shutil.copytree(labelled_run / "label", run / "label")
    train = _lemb("train", "--run", str(run), "--steps", "400", "--batch-size", "2", "--save-every", "1")
    checkpoint = run / "train" / "checkpoint.pt"
    code, err = _interrupt_when(train, checkpoint.exists, signum)
    assert code == 128 + signum and f"interrupted ({signal.Signals(signum).name})" in err, err[-2000:]
    assert "run the same command with --resume to resume" in err  # without --resume a rerun is refused
    leftovers = [p.name for p in (run / "train").iterdir() if p.name.startswith(".")]
    assert checkpoint.exists() and leftovers == [], leftovers  # the texts file and any temporary file are gone
    assert os.path.getsize(checkpoint) > 0
