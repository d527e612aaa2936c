"""The executor: data errors are recorded by shard and id; dead workers are retried a bounded number of times."""

import json
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet  # noqa: F401  (pa.parquet)
import pytest

from lemb.data import schemas
from lemb.errors import LembError
from lemb.pipeline.config import Cluster
from lemb.pipeline.executor import Stage, executor_for
from lemb.pipeline.shards import partition_table, read_stage


class EchoStage(Stage):
    """Copies query ids to candidate rows; fails on id 'bad'; dies (like an OOM kill) once per `die_marker`."""

    name = "echo"
    required_columns = ("query_id",)
    output_schema = schemas.CANDIDATE

    def __init__(self, die_marker: str | None = None) -> None:
        super().__init__()
        self.die_marker = die_marker

    def process(self, table: pa.Table) -> pa.Table:
        ids = table.column("query_id").to_pylist()
        if "bad" in ids:
            raise ValueError("row 'bad' has no text")
        if self.die_marker and "q3" in ids and not Path(self.die_marker).exists():
            Path(self.die_marker).write_text("died once")
            os._exit(1)  # the worker process dies: an infrastructure failure, not a data error
        self.counters["echoed"] += len(ids)
        n = len(ids)
        self.advance(n)
        return pa.table(
            {
                "query_id": ids,
                "task": ["qa"] * n,
                "key_id": ids,
                "retrieval_rank": [1] * n,
                "retrieval_score": [1.0] * n,
                "query_text": ids,
                "target": ids,
                "positive_ids": [[]] * n,
                "relevance": [None] * n,
                "key_text": ids,
                "key_title": [None] * n,
            },
            schema=schemas.CANDIDATE,
        )

    def metadata(self) -> dict[str, str]:
        return {"lemb.echo": "set up" if getattr(self, "ready", False) else "never set up"}

    def setup(self) -> None:
        self.ready = True


def _work(ids):
    return pa.table({"query_id": ids})


def _run(tmp_path, ids, executor, stage=None, **settings):
    cluster = Cluster(executor=executor, **settings)
    plan = partition_table(_work(ids), "query_id", 3, tmp_path / "input")
    return executor_for(cluster, progress=False).run(
        stage or EchoStage(), plan, tmp_path / "echo", cluster, [], "query_id"
    )


def test_local_data_error_is_recorded_and_the_other_shards_finish(tmp_path):
    ids = [f"q{i}" for i in range(12)] + ["bad"]
    with pytest.raises(LembError, match=r"echo: 1 shard\(s\) failed .* ValueError: row 'bad' has no text"):
        _run(tmp_path, ids, "local")
    failures = [json.loads(line) for line in (tmp_path / "echo" / "_failures.jsonl").read_text().splitlines()]
    assert len(failures) == 1 and "bad" in failures[0]["ids"]
    stats = json.loads((tmp_path / "echo" / "_stats.json").read_text())
    assert stats["shards_failed"] == 1 and stats["shards_done"] == 2
    # rows out + rows of failed shards == rows in: nothing silently dropped
    assert stats["rows_out"] + len(failures[0]["ids"]) == len(ids)
    # a rerun on the same input skips the finished shards and fails again on the same shard only
    done = {p: p.stat().st_mtime_ns for p in (tmp_path / "echo").glob("part-*.parquet")}
    with pytest.raises(LembError, match="1 shard"):
        _run(tmp_path, ids, "local")
    assert all(p.stat().st_mtime_ns == m for p, m in done.items())


@pytest.mark.slow
def test_ray_retries_a_dead_worker_and_records_data_errors(tmp_path):
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    marker = str(tmp_path / "died")
    ids = [f"q{i}" for i in range(12)]
    try:
        stats = _run(tmp_path, ids, "ray", EchoStage(marker), workers=1, max_retries=2)
        assert Path(marker).exists()  # the worker did die once, and the shard was redone on a fresh one
        assert stats["rows_out"] == 12 and stats["shards_done"] == 3
        assert sorted(read_stage(tmp_path / "echo").column("query_id").to_pylist()) == sorted(ids)
        with pytest.raises(LembError, match="ValueError: row 'bad' has no text"):
            _run(tmp_path / "second", ids + ["bad"], "ray", EchoStage(), workers=1)
        assert (tmp_path / "second" / "echo" / "_failures.jsonl").exists()
    finally:
        ray.shutdown()


class BrokenSetupStage(EchoStage):
    def setup(self) -> None:
        raise ValueError("no model at /models/x on this node")


@pytest.mark.slow
def test_ray_worker_whose_setup_raises_stops_the_stage_in_one_line(tmp_path):
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        with pytest.raises(LembError, match=r"^echo: worker setup failed: ValueError: no model at /models/x") as err:
            _run(tmp_path, [f"q{i}" for i in range(6)], "ray", BrokenSetupStage(), workers=2)
        assert "\n" not in str(err.value)
        assert not list((tmp_path / "echo").glob("part-*.parquet"))
    finally:
        ray.shutdown()


def test_every_shard_takes_the_worker_path_and_the_run_is_recorded(tmp_path):
    # 2 ids over 3 shards: at least one shard is empty; it too is written by a set-up stage
    stats = _run(tmp_path, ["q1", "q2"], "local")
    stage_dir = tmp_path / "echo"
    files = sorted(stage_dir.glob("part-*.parquet"))
    assert len(files) == 3 and stats["shards_done"] == 3 and stats["rows_out"] == 2
    assert any(pa.parquet.read_metadata(f).num_rows == 0 for f in files)
    for f in files:
        assert pa.parquet.read_schema(f).metadata[b"lemb.echo"] == b"set up"
    manifest = json.loads((stage_dir / "_manifest.json").read_text())
    assert [s["items"] for s in manifest["plan"]] == [pa.parquet.read_metadata(f).num_rows for f in files]
    assert (stage_dir / "config.yaml").exists() and not list(stage_dir.glob("*.progress.json"))


def test_workers_hide_library_deprecations_but_not_lemb_warnings():
    import logging
    import warnings

    from lemb.pipeline.executor import quiet_libraries

    level = logging.getLogger("torch._library").level
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_libraries()
        warnings.warn_explicit("old API", FutureWarning, "dispatcher.py", 1, module="vllm.triton_utils.dispatcher")
        warnings.warn_explicit("old API", DeprecationWarning, "x.py", 1, module="torch.distributed")
        warnings.warn_explicit("lemb says", FutureWarning, "config.py", 1, module="lemb.pipeline.config")
        warnings.warn_explicit("a real problem", UserWarning, "y.py", 1, module="transformers.x")
    assert [str(w.message) for w in seen] == ["lemb says", "a real problem"]
    assert logging.getLogger("torch._library").getEffectiveLevel() == logging.ERROR
    logging.getLogger("torch._library").setLevel(level)


@pytest.mark.slow
def test_running_shards_report_progress_to_the_bar_and_to_status(labelled_run, tmp_path):
    import shutil

    from lemb.pipeline.executor import _Bar, _ShardProgress
    from lemb.pipeline.shards import ShardPlan, shard_path
    from lemb.pipeline.status import run_status
    from lemb.stages.label import LabelStage

    run = tmp_path / "run"
    shutil.copytree(labelled_run, run)
    stage_dir = run / "label"
    plan = ShardPlan.of_stage(run / "retrieve" / "candidates", "query_id")
    shard_path(stage_dir, 0).unlink()  # shard 0 is "running" again
    progress = _ShardProgress(stage_dir, 0, total=plan.items(0))
    progress.advance(1)
    progress._write()  # the worker writes at most once a second; here at once
    status = run_status(run)
    assert f"shard 0: 1/{plan.items(0)} done" in status and "pid" in status and "gone" not in status
    # the worker that wrote it died (killed for memory, its node lost): status says so rather than "running"
    import json
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record = json.loads(progress.path.read_text()) | {"pid": int(dead.stdout)}
    progress.path.write_text(json.dumps(record))
    assert f"(pid {int(dead.stdout)} on" in run_status(run) and "that process is gone" in run_status(run)
    bar = _Bar(LabelStage.__new__(LabelStage), plan, stage_dir, [0, 1], enabled=False)
    assert bar.done() == 1 + plan.items(1)  # shard 1 is finished: all of its queries count


@pytest.mark.slow
def test_more_gpus_per_worker_than_the_cluster_has_is_one_line_not_a_wait(tmp_path):
    import ray

    try:
        with pytest.raises(LembError, match=r"^echo: num_gpus 1000 per worker, but the Ray cluster has \d+ GPUs$"):
            _run(tmp_path, ["q1", "q2"], "ray", num_gpus=1000.0)
        assert not list((tmp_path / "echo").glob("part-*.parquet"))
        with pytest.raises(LembError, match=r"^echo: threads 1000 per worker, but the Ray cluster has \d+ CPUs"):
            _run(tmp_path, ["q1", "q2"], "ray", threads=1000)
        assert not (tmp_path / "echo").exists()  # nothing finished: no manifest left to trip the fixed command
    finally:
        ray.shutdown()


def test_an_address_where_no_ray_cluster_answers_is_one_line(tmp_path):
    from tests.llm_server import free_port

    with pytest.raises(LembError, match=r"^cannot reach the Ray cluster at 127\.0\.0\.1:\d+ \(.*\); start it with"):
        _run(tmp_path, ["q1"], "ray", address=f"127.0.0.1:{free_port()}")


@pytest.mark.slow
def test_a_quiet_stage_on_a_local_ray_cluster_prints_no_ray_warning(tiny_data, tmp_path):
    """Ray warns on each start that it turned token authentication on (unless RAY_AUTH_MODE is set): not for quiet."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    data = ["--queries", str(tiny_data["queries"]), "--corpus", str(tiny_data["corpus"])]
    args = [sys.executable, "-m", "lemb.cli", "retrieve", *data, "--run", str(tmp_path / "run"), "--top-k", "2"]
    proc = subprocess.run([*args, "--quiet"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "candidates:" in proc.stdout and (tmp_path / "run" / "retrieve" / "candidates").is_dir()
    assert "Token authentication" not in proc.stderr and "WARNING" not in proc.stderr, proc.stderr
