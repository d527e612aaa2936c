"""One process per stage folder: a second one is refused at once, naming the holder; a killed holder frees it."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from lemb.errors import LembError
from lemb.pipeline.lock import StageLock

HOLD = "import sys, time; from lemb.pipeline.lock import StageLock\nwith StageLock(sys.argv[1], 'label'):\n" \
       "    print('held', flush=True); time.sleep(600)"  # fmt: skip


def test_a_second_process_is_refused_and_a_killed_holder_releases_the_lock(tmp_path):
    stage = tmp_path / "run" / "label"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(stage)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LembError, match=rf"another `lemb label` is running on this folder \(pid {holder.pid} on "):
            with StageLock(stage, "label"):
                pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with StageLock(stage, "label"):  # the kernel released the dead holder's lock
        assert json.loads((tmp_path / "run" / ".label.lock").read_text())["pid"] == os.getpid()
    with StageLock(stage, "label"):  # and this process's own, on leaving
        pass


@pytest.mark.slow
def test_label_and_a_restart_on_the_same_run_cannot_mix_their_shards(labelled_run, tmp_path):
    """The corruption this prevents: a `--restart` with other settings rewrote the manifest under a running label,
    which went on writing its shards into the new folder."""
    run = tmp_path / "run"
    shutil.copytree(labelled_run / "retrieve", run / "retrieve")

    def label(*args):
        cmd = [sys.executable, "-m", "lemb.cli", "label", "--run", str(run), "--executor", "local", "--quiet",
               "--per-candidate-samples", "1", *args]  # fmt: skip
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = label("--n-samples", "2")
    deadline = time.time() + 120
    while not (run / "label" / "_manifest.json").exists() and time.time() < deadline:
        time.sleep(0.1)
    started = time.time()
    second = label("--n-samples", "3", "--restart")
    _, err = second.communicate(timeout=120)
    assert second.returncode == 1
    assert f"another `lemb label` is running on this folder (pid {first.pid} on " in err
    assert len(err.strip().splitlines()) == 1 and time.time() - started < 60  # one line, before any work
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    manifest = json.loads((run / "label" / "_manifest.json").read_text())
    assert manifest["config"]["n_samples"] == 2
    for part in sorted((run / "label").glob("part-*.parquet")):
        assert json.loads(pq.read_schema(part).metadata[b"lemb.sampling"])["n"] == 2


def test_a_refused_retrieve_leaves_the_running_ones_staging_files(tiny_data, tmp_path):
    from lemb.pipeline.config import RetrieveConfig, load_config
    from lemb.stages.retrieve import retrieve

    out = tmp_path / "run" / "retrieve"
    staged = out / ".input" / "keys" / "input-00000.parquet"  # what the running retrieve reads next
    staged.parent.mkdir(parents=True)
    staged.write_bytes(b"PAR1")
    config = load_config(RetrieveConfig, run=str(tmp_path / "run"), queries=str(tiny_data["queries"]),
                         corpus=str(tiny_data["corpus"]), executor="local")  # fmt: skip
    with StageLock(out, "retrieve"):  # the running one
        with pytest.raises(LembError, match="another"):
            retrieve(config, progress=False)
    assert staged.read_bytes() == b"PAR1"


def _tree(root):
    """Every file and folder under `root` (hidden ones included) with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


REFUSED = {  # command -> the folder its lock guards
    "retrieve": (["retrieve"], "retrieve"),
    "retrieve --restart": (["retrieve", "--restart", "--top-k", "1"], "retrieve"),
    "label": (["label", "--n-samples", "3", "--per-candidate-samples", "1"], "label"),
    "label --restart": (["label", "--restart", "--n-samples", "2"], "label"),
    "train": (["train", "--steps", "2"], "train"),
    "train --restart": (["train", "--steps", "2", "--restart"], "train"),
    "rescore": (["rescore"], "rescore/rank"),
    "eval": (["eval", "--embedder", "base=all-minilm-l6-v2"], "eval"),
}


@pytest.mark.parametrize("command", list(REFUSED))
def test_a_command_refused_by_the_lock_touches_nothing(labelled_run, tiny_data, tmp_path, command):
    """Whatever phase the holder is in, every file of the run stays as it was: the lock is the first thing each
    stage (and --restart) takes, before it creates, moves or removes anything."""
    from typer.testing import CliRunner

    from lemb.cli import app

    run = tmp_path / "run"
    shutil.copytree(labelled_run, run)
    args, folder = REFUSED[command]
    data = ["--queries", str(tiny_data["queries"]), "--corpus", str(tiny_data["corpus"])]
    if args[0] in ("retrieve", "eval"):
        args = [*args, *data, "--shards", "2", "--executor", "local"]
    elif args[0] == "label":
        args = [*args, "--executor", "local"]
    args = [args[0], str(run)] + args[1:] if args[0] == "rescore" else [args[0], "--run", str(run), *args[1:]]
    with StageLock(run / folder, args[0]):
        before = _tree(run)
        result = CliRunner().invoke(app, [*args, "--quiet"] if args[0] not in ("rescore",) else args)
        assert result.exit_code == 1, result.output
        assert "is running on this folder" in result.output
        assert _tree(run) == before
