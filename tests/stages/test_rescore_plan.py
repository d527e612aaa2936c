"""`lemb rescore` (rewards from stored log-probabilities) and `lemb label --dry-run` (plan and cost)."""

import math
import shutil

import polars as pl
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from lemb.cli import app
from lemb.data import schemas
from lemb.errors import InputError, LembError
from lemb.pipeline.config import LabelConfig, load_config
from lemb.pipeline.shards import read_stage, write_shard
from lemb.stages.label_plan import format_plan, param_count, plan_label
from lemb.stages.models import resolve_model_path
from lemb.stages.rescore import rescore
from lemb.stages.reward import rank_of_target


def test_rescore_recomputes_each_reward_from_the_stored_logprobs(labelled_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(labelled_run, run)
    label = pl.from_arrow(read_stage(run / "label")).sort(["query_id", "key_id"])
    same = rescore(run, "rank")
    assert pl.from_arrow(read_stage_dir(run / "rescore" / "rank")).sort(["query_id", "key_id"]).equals(label)
    assert same["rows"] == 8 and same["rows_with_reward"] == label["reward"].is_not_null().sum()
    # a stage like the others: a manifest, per-shard stats, seen by `lemb status`; a rerun redoes nothing
    from lemb.pipeline.status import run_status

    assert "rescore/rank" in run_status(run) and (run / "rescore" / "rank" / "_manifest.json").exists()
    written = {p: p.stat().st_mtime_ns for p in (run / "rescore" / "rank").glob("part-*.parquet")}
    assert rescore(run, "rank") == same
    assert {p: p.stat().st_mtime_ns for p in (run / "rescore" / "rank").glob("part-*.parquet")} == written

    rescore(run, "likelihood")
    rescore(run, "improvement")
    likelihood = pl.from_arrow(read_stage_dir(run / "rescore" / "likelihood")).sort(["query_id", "key_id"])
    improvement = pl.from_arrow(read_stage_dir(run / "rescore" / "improvement")).sort(["query_id", "key_id"])
    for row, lik, imp in zip(label.iter_rows(named=True), likelihood["reward"], improvement["reward"]):
        if row["skip_reason"] is not None:
            assert lik is None and imp is None
            continue
        assert lik == row["target_logprob"]
        base = rank_of_target(row["baseline_target_logprob"], row["baseline_sample_logprobs"], row["sample_counts"])
        assert imp == base - row["rank"]
    meta = pq.read_schema(run / "rescore" / "likelihood" / "part-00000.parquet").metadata
    assert meta[b"lemb.reward"] == b"likelihood" and b"lemb.llm" in meta


def read_stage_dir(folder):
    import pyarrow as pa

    return pa.concat_tables([pq.read_table(f) for f in sorted(folder.glob("part-*.parquet"))])


def test_rescore_names_the_file_row_and_field_of_a_bad_logprob(labelled_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(labelled_run, run)
    shard = run / "label" / "part-00000.parquet"
    table = pq.read_table(shard)
    rows = table.to_pylist()
    bad = next(r for r in rows if r["skip_reason"] is None)
    bad["target_logprob"] = math.nan
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    write_shard(run / "label", 0, table.from_pylist(rows, schema=table.schema), schemas.REWARD, meta, {})
    with pytest.raises(InputError, match=rf"part-00000.parquet: query_id '{bad['query_id']}'.*'target_logprob'"):
        rescore(run, "rank")
    assert not (run / "rescore").exists()  # refused before any shard: no manifest, lock or folder left behind
    with pytest.raises(LembError, match="known rewards are rank, likelihood, improvement"):
        rescore(run, "perplexity")


def test_rescore_refuses_a_run_without_labels(tmp_path):
    result = CliRunner().invoke(app, ["rescore", str(tmp_path), "--reward", "rank"])
    assert result.exit_code == 1
    assert "no stage output here" in result.output


def test_dry_run_counts_the_plan_and_writes_nothing(labelled_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(labelled_run / "retrieve", run / "retrieve")
    cfg = load_config(LabelConfig, run=str(run), executor="local", n_samples=3, per_candidate_samples=1)
    plan = plan_label(cfg, calibrate=0)
    # 4 queries with 2 candidates each, all with a desired output: a bare prompt and 2 candidate prompts each
    assert (plan["queries"], plan["queries_with_target"], plan["pairs"], plan["prompts"]) == (4, 4, 8, 12)
    assert plan["samples"] == 4 * (3 + 1 * 2)
    assert plan["prompt_tokens"] > 12 * 20
    assert plan["parameters"] == param_count(resolve_model_path(cfg.llm, "LLM")) > 100_000_000
    result = CliRunner().invoke(app, ["label", "--run", str(run), "--dry-run", "--calibrate", "0"])
    assert result.exit_code == 0, result.output
    assert "(query, candidate) pairs" in result.output and "12" in result.output
    assert not (run / "label").exists()


@pytest.mark.slow
def test_dry_run_calibrates_on_this_machine(labelled_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(labelled_run / "retrieve", run / "retrieve")
    cfg = load_config(
        LabelConfig, run=str(run), executor="local", backend="transformers", n_samples=2, per_candidate_samples=1
    )
    plan = plan_label(cfg, calibrate=1)
    cal = plan["calibration"]
    assert cal["queries_timed"] == 1 and cal["seconds_per_query"] > 0
    assert 0 < cal["pool_per_query"] <= 2 + 2 * 1
    assert plan["wall_seconds"] >= cal["seconds_per_query"] * 4
    assert plan["flops"] == pytest.approx(2 * plan["parameters"] * plan["llm_tokens"], rel=1e-3)
    assert "estimated wall time" in format_plan(plan)
    assert not (run / "label").exists()
