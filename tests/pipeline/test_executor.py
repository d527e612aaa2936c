"""The executor: data errors are recorded by shard and id; dead workers are retried a bounded number of times."""

import json
import os
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from lemb.data import schemas
from lemb.errors import LembError
from lemb.pipeline.config import RunSettings
from lemb.pipeline.executor import Stage, run_stage
from lemb.pipeline.shards import read_stage


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
        return pa.table(
            {
                "query_id": ids,
                "task": ["qa"] * n,
                "key_id": ids,
                "retrieval_rank": [1] * n,
                "retrieval_score": [1.0] * n,
            },
            schema=schemas.CANDIDATE,
        )


def _work(ids):
    return pa.table({"query_id": ids})


def _run(tmp_path, ids, executor, factory=EchoStage, **settings):
    cfg = RunSettings(run=str(tmp_path), executor=executor, shards=3, **settings)
    return run_stage(factory, _work(ids), "query_id", tmp_path / "echo", cfg, {}, "h", [], progress=False)


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
    import functools

    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    marker = str(tmp_path / "died")
    ids = [f"q{i}" for i in range(12)]
    factory = functools.partial(EchoStage, marker)
    try:
        stats = _run(tmp_path, ids, "ray", factory, workers=1, max_retries=2)
        assert Path(marker).exists()  # the worker did die once, and the shard was redone on a fresh one
        assert stats["rows_out"] == 12 and stats["shards_done"] == 3
        assert sorted(read_stage(tmp_path / "echo").column("query_id").to_pylist()) == sorted(ids)
        with pytest.raises(LembError, match="ValueError: row 'bad' has no text"):
            _run(tmp_path / "second", ids + ["bad"], "ray", EchoStage, workers=1)
        assert (tmp_path / "second" / "echo" / "_failures.jsonl").exists()
    finally:
        ray.shutdown()


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
