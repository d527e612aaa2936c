import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lemb.data import schemas
from lemb.errors import LembError, StageConflict
from lemb.pipeline.shards import (
    ShardPlan,
    finish_stage,
    open_stage,
    partition_table,
    read_stage,
    shard_of,
    shard_path,
    stage_files,
    verify_shard,
    write_shard,
)


def _plan(ids, n, folder):
    return partition_table(pa.table({"query_id": ids}), "query_id", n, folder)


def test_plan_is_deterministic_and_partitions_ids(tmp_path):
    ids = [f"q{i}" for i in range(50)]
    a, b = _plan(ids, 4, tmp_path / "a"), _plan(list(reversed(ids)), 4, tmp_path / "b")
    assert a.describe() == b.describe()
    shards = [a.shard_ids(i, "query_id") for i in range(4)]
    assert sorted(x for shard in shards for x in shard) == sorted(ids)
    assert all(shard_of(x, 4) == s for s, shard in enumerate(shards) for x in shard)
    assert sum(1 for shard in shards if shard) > 1


def test_plan_of_a_finished_stage_counts_items_per_shard(tmp_path):
    open_stage(tmp_path, "s", {}, "h", [], _plan(["a", "b"], 2, tmp_path / "in"))
    rows = _candidates(3).set_column(0, "query_id", pa.array(["q1", "q1", "q2"]))
    write_shard(tmp_path, 0, rows, schemas.CANDIDATE, {}, {})
    with pytest.raises(LembError, match="incomplete"):
        ShardPlan.of_stage(tmp_path, "query_id")
    write_shard(tmp_path, 1, _candidates(0), schemas.CANDIDATE, {}, {})
    plan = ShardPlan.of_stage(tmp_path, "query_id")
    assert [plan.rows(i) for i in range(2)] == [3, 0] and [plan.items(i) for i in range(2)] == [2, 0]
    assert plan.inputs == [shard_path(tmp_path, 0), shard_path(tmp_path, 1)]


def _candidates(n):
    return pa.table(
        {
            "query_id": [f"q{i}" for i in range(n)],
            "task": ["qa"] * n,
            "key_id": ["k"] * n,
            "retrieval_rank": [1] * n,
            "retrieval_score": [0.5] * n,
            "query_text": ["q"] * n,
            "target": ["t"] * n,
            "positive_ids": [["k"]] * n,
            "relevance": [None] * n,
            "key_text": ["a key"] * n,
            "key_title": [None] * n,
        },
        schema=schemas.CANDIDATE,
    )


def test_write_shard_is_atomic_and_carries_metadata(tmp_path):
    path = write_shard(tmp_path, 3, _candidates(5), schemas.CANDIDATE, {"lemb.llm": "x"}, {"rows_out": 5})
    assert path == shard_path(tmp_path, 3)
    meta = pq.read_schema(path).metadata
    assert meta[b"lemb.llm"] == b"x"
    assert not list(tmp_path.glob(".*tmp*"))
    # a table that does not fit the schema fails and leaves nothing behind
    bad = pa.table({"query_id": ["q"], "task": ["qa"]})
    with pytest.raises((ValueError, KeyError, pa.ArrowInvalid)):
        write_shard(tmp_path, 4, bad, schemas.CANDIDATE, {}, {})
    assert not shard_path(tmp_path, 4).exists()
    assert not list(tmp_path.glob(".*tmp*"))


def test_failure_after_the_temporary_file_is_written_leaves_nothing(tmp_path, monkeypatch):
    import lemb.files as files

    real_replace = files.os.replace

    def failing_replace(src, dst):
        if str(dst).endswith(".parquet"):
            assert Path(src).exists()  # the temporary file was fully written when the rename failed
            raise OSError("disk went away")
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk went away"):
        write_shard(tmp_path, 0, _candidates(3), schemas.CANDIDATE, {}, {"rows_out": 3})
    assert not shard_path(tmp_path, 0).exists()
    assert not list(tmp_path.glob(".*.parquet.tmp-*"))


def test_open_stage_skips_done_and_refuses_changed_config(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("x\n")
    plan = _plan([f"q{i}" for i in range(20)], 2, tmp_path / "in")
    stage = tmp_path / "stage"
    assert open_stage(stage, "s", {"top_k": 8}, "h1", [inp], plan) == set()
    write_shard(stage, 0, _candidates(2), schemas.CANDIDATE, {}, {"rows_out": 2, "rows_in": 2})
    (stage / ".part-00001.parquet.tmp-999").write_text("half")  # left by a killed process
    assert open_stage(stage, "s", {"top_k": 8}, "h1", [inp], plan) == {0}
    assert not (stage / ".part-00001.parquet.tmp-999").exists()
    with pytest.raises(StageConflict, match=r"top_k: 8 -> 4.*--restart"):
        open_stage(stage, "s", {"top_k": 4}, "h2", [inp], plan)
    assert shard_path(stage, 0).exists()  # refusing touches nothing
    assert open_stage(stage, "s", {"top_k": 4}, "h2", [inp], plan, restart=True) == set()
    assert json.loads((stage / "_manifest.json").read_text())["config_hash"] == "h2"


def test_changed_input_is_named(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("x\n")
    plan = _plan(["a"], 1, tmp_path / "in")
    open_stage(tmp_path / "s", "s", {}, "h", [inp], plan)
    write_shard(tmp_path / "s", 0, _candidates(1), schemas.CANDIDATE, {}, {"rows_out": 1})
    inp.write_text("changed content\n")
    with pytest.raises(StageConflict, match="input changed"):
        open_stage(tmp_path / "s", "s", {}, "h", [inp], plan)


def test_a_stage_that_finished_no_shard_takes_other_settings_without_restart(tmp_path):
    """A first try that failed before any shard (a model that did not load, a bad template) leaves only its
    manifest: the fixed command runs as it is, without --restart."""
    plan = _plan([f"q{i}" for i in range(20)], 2, tmp_path / "in")
    stage = tmp_path / "stage"
    open_stage(stage, "label", {"dtype": "foo"}, "h1", [], plan)
    assert open_stage(stage, "label", {"dtype": "float32"}, "h2", [], plan) == set()
    assert json.loads((stage / "_manifest.json").read_text())["config"] == {"dtype": "float32"}
    write_shard(stage, 0, _candidates(2), schemas.CANDIDATE, {}, {"rows_out": 2})
    with pytest.raises(StageConflict, match=r"dtype: 'float32' -> 'bfloat16'"):  # now there is work to keep
        open_stage(stage, "label", {"dtype": "bfloat16"}, "h3", [], plan)


def test_output_without_manifest_is_not_taken_as_done(tmp_path):
    stage = tmp_path / "stage"
    stage.mkdir()
    write_shard(stage, 0, _candidates(2), schemas.CANDIDATE, {}, {})  # e.g. left by a --restart killed midway
    plan = _plan(["q0", "q1"], 1, tmp_path / "in")
    assert open_stage(stage, "s", {}, "h", [], plan) == set()
    assert not shard_path(stage, 0).exists()


def test_read_stage_refuses_incomplete_stage(tmp_path):
    plan = _plan([f"q{i}" for i in range(20)], 2, tmp_path / "in")
    open_stage(tmp_path, "s", {}, "h", [], plan)
    write_shard(tmp_path, 0, _candidates(3), schemas.CANDIDATE, {}, {"rows_out": 3})
    with pytest.raises(LembError, match="incomplete"):
        read_stage(tmp_path)
    write_shard(tmp_path, 1, _candidates(2), schemas.CANDIDATE, {}, {"rows_out": 2})
    assert read_stage(tmp_path).num_rows == 5
    stats = finish_stage(tmp_path, 2, [])
    assert stats["rows_out"] == 5 and stats["shards_done"] == 2


def _finished_stage(tmp_path):
    plan = _plan([f"q{i}" for i in range(20)], 2, tmp_path / "in")
    stage = tmp_path / "stage"
    open_stage(stage, "label", {}, "h", [], plan)
    for i in range(2):
        write_shard(stage, i, _candidates(3 + i), schemas.CANDIDATE, {}, {"rows_out": 3 + i})
    finish_stage(stage, 2, [])
    return stage, plan


def test_a_shard_damaged_after_it_was_written_is_refused_shown_and_redone(tmp_path):
    from lemb.pipeline.status import run_status

    stage, plan = _finished_stage(tmp_path)
    assert verify_shard(stage, 0) is None and verify_shard(stage, 1) is None
    good = shard_path(stage, 1).read_bytes()
    damaged = shard_path(stage, 0)
    damaged.write_bytes(damaged.read_bytes()[:-40])  # truncated: the footer is gone
    assert "bytes where" in verify_shard(stage, 0)
    with pytest.raises(LembError, match=r"part-00000.parquet: damaged: .* bytes where .*rerun `lemb label`"):
        stage_files(stage)
    assert "shard 0: DAMAGED" in run_status(tmp_path) and "1/2" in run_status(tmp_path)
    # a shard replaced by another stage's file of other columns, or one with other rows
    other = pa.table({"query_id": ["q0", "q1", "q2"]})
    pq.write_table(other, damaged)
    assert verify_shard(stage, 0) is not None
    # the stage's rerun redoes exactly the damaged shard
    assert open_stage(stage, "label", {}, "h", [], plan) == {1}
    assert not damaged.exists() and shard_path(stage, 1).read_bytes() == good


def test_a_shard_rewritten_with_the_same_size_but_other_rows_or_columns_is_found(tmp_path, monkeypatch):
    import lemb.pipeline.shards as shards

    stage, _ = _finished_stage(tmp_path)
    record = json.loads((stage / "part-00000.stats.json").read_text())["shard"]
    real_size = shards.Path.stat

    def same_size(path, *a, **k):  # a file of other content but the recorded size
        result = real_size(path, *a, **k)
        if path.name == "part-00000.parquet":
            return type("S", (), {"st_size": record["bytes"], "st_mode": result.st_mode})()
        return result

    pq.write_table(_candidates(5), shard_path(stage, 0))
    monkeypatch.setattr(shards.Path, "stat", same_size)
    assert verify_shard(stage, 0) == "5 rows where 3 were written"
    pq.write_table(_candidates(3).drop_columns(["key_title"]), shard_path(stage, 0))
    assert verify_shard(stage, 0) == "its columns or types differ from those it was written with"


def test_a_full_disk_while_a_shard_is_written_leaves_no_temporary_file(tmp_path, monkeypatch):
    import errno

    import lemb.pipeline.shards as shards

    def fill_the_disk(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 half a shard")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards.pq, "write_table", fill_the_disk)
    with pytest.raises(LembError, match=r"part-00000.parquet: cannot write \(No space left on device; \d+ MiB free"):
        write_shard(tmp_path, 0, _candidates(3), schemas.CANDIDATE, {}, {"rows_out": 3})
    assert list(tmp_path.iterdir()) == []


def test_one_flipped_byte_in_a_finished_shard_is_found_everywhere_it_is_read(labelled_run, tmp_path):
    """Same size, same footer, one changed byte inside a data page: status, inspect, the next stage and the stage's
    own rerun all treat the shard as damaged."""
    import shutil

    from typer.testing import CliRunner

    from lemb.cli import app
    from lemb.pipeline.status import run_status

    run = tmp_path / "run"
    shutil.copytree(labelled_run, run)
    label = run / "label"
    shard = shard_path(label, 0)
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    assert pq.ParquetFile(shard).metadata.num_rows > 0  # the footer still reads: only the content hash sees it
    assert verify_shard(label, 0).startswith("its content differs from what was written")
    status = run_status(run)
    assert "shard 0: DAMAGED, its content differs" in status and "1/2" in status
    result = CliRunner().invoke(app, ["inspect", str(label)])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "part-00000.parquet: damaged: its content differs" in result.stderr
    with pytest.raises(LembError, match=r"part-00000.parquet: damaged: its content differs.*rerun `lemb label`"):
        stage_files(label)  # what train, rescore and eval read through
    manifest = json.loads((label / "_manifest.json").read_text())
    plan = ShardPlan.of_stage(run / "retrieve" / "candidates", "query_id")
    inputs = [run / "retrieve" / "candidates" / "_manifest.json"]
    assert open_stage(label, "label", manifest["config"], manifest["config_hash"], inputs, plan) == {1}
    assert not shard.exists()  # the rerun redoes exactly that shard


def test_inspect_on_a_file_that_is_not_parquet_or_is_cut_is_one_line(labelled_run, tmp_path):
    from typer.testing import CliRunner

    from lemb.cli import app

    not_parquet = tmp_path / "notes.parquet"
    not_parquet.write_text("a text file\n")
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(shard_path(labelled_run / "label", 0).read_bytes()[:-200])
    for path in (not_parquet, cut):
        result = CliRunner().invoke(app, ["inspect", str(path)])
        assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
        assert result.stderr.startswith(f"error: {path}: not a readable Parquet file or shard folder (")
