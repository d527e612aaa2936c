"""A run folder moved with its data, driven from another working directory, is the same run."""

import json
import shutil
import subprocess
import sys

import pytest

from lemb.pipeline.shards import input_fingerprint


def _lemb(cwd, *args):
    return subprocess.run([sys.executable, "-m", "lemb.cli", *args], cwd=cwd, capture_output=True, text=True)


@pytest.mark.slow
def test_a_moved_run_and_its_data_resume_from_another_directory(labelled_run, tiny_data, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(labelled_run, moved / "run")
    data = moved / "data"
    data.mkdir()
    for name in ("queries", "corpus"):
        shutil.copy(tiny_data[name], data / tiny_data[name].name)
    before = {p: p.stat().st_mtime_ns for p in (moved / "run").rglob("part-*.parquet")}
    other_cwd = tmp_path / "somewhere" / "else"
    other_cwd.mkdir(parents=True)
    # relative paths from a working directory the first run never saw
    common = ["--executor", "local", "--quiet"]
    retrieve = _lemb(other_cwd, "retrieve", "--run", "../../elsewhere/run", "--queries", "../../elsewhere/data/"
                     + tiny_data["queries"].name, "--corpus", str(data / tiny_data["corpus"].name), "--top-k", "2",
                     "--shards", "2", *common)  # fmt: skip
    assert retrieve.returncode == 0, retrieve.stderr[-2000:]
    label = _lemb(other_cwd, "label", "--run", str(moved / "run"), "--n-samples", "3", "--per-candidate-samples",
                  "1", *common)  # fmt: skip
    assert label.returncode == 0, label.stderr[-2000:]
    assert "already done" in retrieve.stderr + label.stderr
    after = {p: p.stat().st_mtime_ns for p in (moved / "run").rglob("part-*.parquet")}
    assert after == before  # nothing was redone
    # an input whose content changed is still told apart, wherever it lies
    edited = data / tiny_data["queries"].name
    edited.write_text(edited.read_text().replace("Zorbia", "Zorbya"))
    again = _lemb(other_cwd, "retrieve", "--run", str(moved / "run"), "--queries", str(edited), "--corpus",
                  str(data / tiny_data["corpus"].name), "--top-k", "2", "--shards", "2", *common)  # fmt: skip
    assert again.returncode == 1 and "input changed since the first run" in again.stderr


def test_the_fingerprint_follows_content_not_place_or_time(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text(json.dumps({"x": 1}) * 10000)
    b = tmp_path / "sub" / "b.jsonl"
    b.parent.mkdir()
    shutil.copy(a, b)  # a copy: other path, other mtime
    fa, fb = input_fingerprint([a])[0], input_fingerprint([b])[0]
    assert (fa["size"], fa["content"]) == (fb["size"], fb["content"]) and fa["path"] != fb["path"]
    b.write_text(json.dumps({"x": 2}) + json.dumps({"x": 1}) * 9999)  # same size, other first bytes
    assert input_fingerprint([b])[0]["content"] != fa["content"]
