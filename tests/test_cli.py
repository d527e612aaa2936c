"""The `lemb` command: bad input exits 1 with one line naming file, id and field, and writes nothing."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from lemb.cli import app
from tests.conftest import CORPUS, QUERIES, write_jsonl

runner = CliRunner()


def _retrieve(tmp_path, queries, corpus):
    q = write_jsonl(tmp_path / "q.jsonl", queries) if isinstance(queries, list) else queries
    c = write_jsonl(tmp_path / "c.jsonl", corpus) if isinstance(corpus, list) else corpus
    run = tmp_path / "run"
    result = runner.invoke(
        app, ["retrieve", "--queries", str(q), "--corpus", str(c), "--run", str(run), "--executor", "local", "--quiet"]
    )
    return result, run


@pytest.mark.parametrize(
    "queries, corpus, message",
    [
        ("missing.jsonl", CORPUS, "missing.jsonl: file: not found"),
        (
            [{k: v for k, v in QUERIES[0].items() if k != "text"}],
            CORPUS,
            "q.jsonl: line 1 (query_id 'q1'), field 'text': missing",
        ),
        ([{**QUERIES[0], "text": ""}], CORPUS, "field 'text': empty text"),
        ([{**QUERIES[0], "task": "poem"}], CORPUS, "field 'task': unknown task 'poem'"),
        (QUERIES, CORPUS + [CORPUS[0]], "c.jsonl: line 7, field 'key_id': duplicate id 'k1'"),
        (
            [{**QUERIES[0], "positive_ids": ["nope"]}],
            CORPUS,
            "query_id 'q1', field 'positive_ids': 'nope' is not in the corpus",
        ),
    ],
)
def test_bad_input_one_line_and_nothing_written(tmp_path, queries, corpus, message):
    if isinstance(queries, str):
        queries = tmp_path / queries
    result, run = _retrieve(tmp_path, queries, corpus)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not run.exists()


def test_bad_settings_one_line(tmp_path):
    result = runner.invoke(app, ["train", "--run", str(tmp_path), "--steps", "0", "--lr", "-1"])
    assert result.exit_code == 1
    assert "steps must be >= 1" in result.stderr and "lr must be > 0" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_label_before_retrieve_says_what_to_run(tmp_path):
    result = runner.invoke(app, ["label", "--run", str(tmp_path / "r"), "--executor", "local"])
    assert result.exit_code == 1 and "run `lemb retrieve" in result.stderr


def test_entry_point_runs_as_a_process(tmp_path):
    out = subprocess.run([sys.executable, "-m", "lemb.cli", "status", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 1 and out.stderr.strip() == f"error: {tmp_path}: no stage output here"


def test_status_and_inspect_on_a_run(labelled_run):
    result = runner.invoke(app, ["status", str(labelled_run)])
    assert result.exit_code == 0
    assert "label" in result.stdout and "2/2" in result.stdout
    result = runner.invoke(app, ["inspect", str(labelled_run / "label"), "--top", "2"])
    assert result.exit_code == 0
    assert "8 rows in 2 shard(s)" in result.stdout and "reward distribution" in result.stdout
    # the top and bottom pairs come with the texts a person reads: the query, the key and the desired output
    import polars as pl

    rows = pl.read_parquet(sorted((labelled_run / "label").glob("part-*.parquet"))).filter(
        pl.col("reward").is_not_null()
    )
    best = rows.sort("reward", descending=True).row(0, named=True)
    top = result.stdout.split("top 2 by reward:")[1].split("bottom 2 by reward:")[0]
    assert f"{best['query_id']} / {best['key_id']}: reward {best['reward']:.3f}" in top
    assert f"query  {' '.join(best['query_text'].split())[:60]}" in top and f"target {best['target']}" in top
    assert "key    " in top and top.count("query  ") == 2
    # label drew the reward histogram as it finished
    assert (labelled_run / "label" / "rewards.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "command", [["retrieve", "--embedder", "./no/such/model"], ["label", "--llm", "/no/such/llm"]]
)
def test_missing_model_path_is_one_line(tmp_path, command, labelled_run):
    q = write_jsonl(tmp_path / "q.jsonl", QUERIES)
    c = write_jsonl(tmp_path / "c.jsonl", CORPUS)
    run = tmp_path / "run"
    if command[0] == "label":
        import shutil

        shutil.copytree(labelled_run / "retrieve", run / "retrieve")
        args = [*command, "--run", str(run), "--executor", "local"]
    else:
        args = [*command, "--queries", str(q), "--corpus", str(c), "--run", str(run), "--executor", "local"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0 and "path not found" in result.stderr
    assert not (run / command[0]).exists() or command[0] == "retrieve" and not run.exists()


def test_long_texts_are_truncated_counted_and_warned_once(tmp_path, caplog):
    long_corpus = CORPUS + [
        {"key_id": f"long{i}", "task": "qa", "text": "word " * 400, "title": None} for i in range(3)
    ]
    c = write_jsonl(tmp_path / "c.jsonl", long_corpus)
    q = write_jsonl(tmp_path / "q.jsonl", QUERIES)
    run = tmp_path / "run"
    with caplog.at_level("WARNING", logger="lemb"):
        result = runner.invoke(
            app,
            [
                "retrieve",
                "--queries",
                str(q),
                "--corpus",
                str(c),
                "--run",
                str(run),
                "--executor",
                "local",
                "--shards",
                "1",
                "--quiet",
            ],
        )
    assert result.exit_code == 0, result.stderr
    stats = json.loads((run / "retrieve" / "keys" / "_stats.json").read_text())
    assert stats["truncated_texts"] == 3
    assert sum("truncated" in r.message for r in caplog.records) == 1


def test_an_embedder_item_without_a_name_is_one_line(tmp_path):
    result = runner.invoke(app, ["eval", "--run", str(tmp_path), "--queries", "q.jsonl", "--embedder", "bad"])
    assert result.exit_code == 1 and result.stderr.strip() == "error: --embedder 'bad': expected NAME=MODEL"


def test_version():
    import lemb

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"lemb {lemb.__version__}"


def test_status_shows_a_running_or_stopped_training_run(tmp_path):
    import json
    import os

    from lemb.pipeline.lock import StageLock

    train = tmp_path / "run" / "train"
    train.mkdir(parents=True)
    rows = [{"step": 0, "task": "qa", "loss": 0.9}, {"step": 1, "task": "qa", "loss": 0.75}]
    (train / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with StageLock(train, "train"):  # as `lemb train` holds it while it runs
        result = runner.invoke(app, ["status", str(tmp_path / "run")])
        assert result.exit_code == 0, result.output
        assert f"running (pid {os.getpid()} on " in result.output and "2 steps done, loss 0.7500" in result.output
    (train / "checkpoint.pt").write_bytes(b"weights")
    result = runner.invoke(app, ["status", str(tmp_path / "run")])
    assert "stopped: 2 steps done, loss 0.7500; checkpoint of " in result.output
    assert "lemb train --resume continues it" in result.output


def test_only_lemb_errors_become_one_line():
    """A path the user named that does not exist is one line; a FileNotFoundError from anywhere else is a bug and
    keeps its traceback (it once became a bare `error: <path>` line that hid where it came from)."""
    import typer

    from lemb.commands import user_errors
    from lemb.errors import NotFound

    def command(error: Exception) -> typer.Typer:
        app_ = typer.Typer()

        @app_.command()
        @user_errors
        def run() -> None:
            raise error

        return app_

    named = runner.invoke(command(NotFound("embedder path not found: ./m")), [])
    assert named.exit_code == 1 and named.stderr == "error: embedder path not found: ./m\n"
    bug = runner.invoke(command(FileNotFoundError(2, "No such file", "run/retrieve/.input/x.parquet")), [])
    assert isinstance(bug.exception, FileNotFoundError) and "error:" not in bug.stderr
