"""Tiny real runs of retrieve and label with the default models."""

import json

import polars as pl
import pytest

from lemb.errors import InputError
from lemb.pipeline.config import RetrieveConfig, load_config
from lemb.pipeline.shards import read_stage
from lemb.stages.label import build_work, derive_seed
from lemb.stages.retrieve import retrieve
from lemb.stages.reward import reward_from_logprobs
from tests.conftest import CORPUS, QUERIES, write_jsonl


def test_retrieve_writes_top_k_with_positives_and_history_candidates(labelled_run):
    cands = pl.from_arrow(read_stage(labelled_run / "retrieve" / "candidates"))
    assert cands.group_by("query_id").len().sort("query_id")["len"].to_list() == [2, 2, 2, 2]
    # positives were put among the candidates; chat candidates are the query's own history
    for q in QUERIES:
        ids = cands.filter(pl.col("query_id") == q["query_id"])["key_id"].to_list()
        assert set(q["positive_ids"]) <= set(ids)
    assert all(k.startswith("q3#h") for k in cands.filter(pl.col("task") == "chat")["key_id"])
    ranks = cands.sort(["query_id", "retrieval_rank"]).group_by("query_id", maintain_order=True).agg("retrieval_rank")
    assert all(r == [1, 2] for r in ranks["retrieval_rank"].to_list())
    assert (labelled_run / "retrieve" / "config.yaml").exists()


def test_label_rewards_follow_the_definition(labelled_run):
    df = pl.from_arrow(read_stage(labelled_run / "label"))
    assert df.height == 8  # rows out == rows in: nothing dropped
    labelled = df.filter(pl.col("n_samples") > 0)
    assert labelled.height > 0
    for row in labelled.iter_rows(named=True):
        t, scores, counts = row["target_logprob"], row["sample_logprobs"], row["sample_counts"]
        n = sum(counts)
        assert n == row["n_samples"] and len(scores) == len(counts) == len(row["samples"])
        rank = (
            1
            + sum(c for s, c in zip(scores, counts) if s > t + 1e-6)
            + 0.5 * sum(c for s, c in zip(scores, counts) if abs(s - t) <= 1e-6)
        )
        assert row["rank"] == pytest.approx(rank)
        assert row["reward"] == pytest.approx((n + 1 - rank) / n)
        # training re-reads the shard: the recomputed reward is exactly the stored one
        kw = {k: row[k] for k in ("sample_logprobs", "baseline_target_logprob", "baseline_sample_logprobs")}
        assert reward_from_logprobs("rank", t, counts=counts, **kw) == row["reward"]
        assert row["baseline_rank"] >= 1
        assert 0.0 <= row["reward"] <= 1.0
    # the gold passage for "capital of Zorbia" gives the desired output a better reward than the distractor
    q1 = df.filter(pl.col("query_id") == "q1").sort("key_id")
    assert q1.filter(pl.col("key_id") == "k1")["reward"][0] > q1.filter(pl.col("key_id") != "k1")["reward"][0]
    stats = json.loads((labelled_run / "label" / "_stats.json").read_text())
    assert stats["rows_in"] == stats["rows_out"] == 8


def test_label_provenance_in_shard_metadata(labelled_run):
    import pyarrow.parquet as pq

    meta = pq.read_schema(next((labelled_run / "label").glob("part-*.parquet"))).metadata
    assert meta[b"lemb.llm"] == b"smollm2-135m-instruct"
    assert json.loads(meta[b"lemb.sampling"])["n"] == 3
    assert b"lemb.prompt_templates" in meta and b"lemb.version" in meta


def test_seeds_are_per_query():
    assert derive_seed(0, "q1") == derive_seed(0, "q1")
    assert len({derive_seed(0, "q1"), derive_seed(1, "q1"), derive_seed(0, "q2")}) == 3


def test_candidate_absent_from_corpus_is_named(labelled_run, tmp_path):
    # the same run, read against a corpus that lacks k3
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [k for k in CORPUS if k["key_id"] != "k3"])
    cfg = (labelled_run / "retrieve" / "config.yaml").read_text()
    run = tmp_path / "run"
    (run / "retrieve").mkdir(parents=True)
    import shutil

    shutil.copytree(labelled_run / "retrieve" / "candidates", run / "retrieve" / "candidates")
    import yaml

    settings = yaml.safe_load(cfg)
    settings["corpus"] = str(corpus)
    (run / "retrieve" / "config.yaml").write_text(yaml.safe_dump(settings))
    with pytest.raises(InputError, match=r"query_id 'q2', field 'key_id': 'k3' is not in the corpus"):
        build_work(run)


def test_query_without_needed_target_is_refused(tiny_data, tmp_path):
    queries = write_jsonl(tmp_path / "q.jsonl", [{**QUERIES[0], "target": None}])
    run = tmp_path / "run"
    common = {"run": str(run), "executor": "local", "shards": 1}
    retrieve(
        load_config(RetrieveConfig, queries=str(queries), corpus=str(tiny_data["corpus"]), top_k=1, **common), False
    )
    with pytest.raises(InputError, match=r"query_id 'q1', field 'target': task qa needs a desired output"):
        build_work(run)
    assert not (run / "label").exists()


def test_positive_not_in_corpus_fails_before_writing(tiny_data, tmp_path):
    queries = write_jsonl(tmp_path / "q.jsonl", [{**QUERIES[0], "positive_ids": ["k99"]}])
    run = tmp_path / "run"
    cfg = load_config(
        RetrieveConfig, queries=str(queries), corpus=str(tiny_data["corpus"]), run=str(run), executor="local"
    )
    with pytest.raises(InputError, match=r"q.jsonl: query_id 'q1', field 'positive_ids': 'k99' is not in the corpus"):
        retrieve(cfg, False)
    assert not run.exists()


def test_retrieve_resume_redoes_only_missing_shard(labelled_run, tiny_data, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(labelled_run / "retrieve", run / "retrieve")  # the session fixture stays untouched
    cand_dir = run / "retrieve" / "candidates"
    before = read_stage(cand_dir).sort_by([("query_id", "ascending"), ("retrieval_rank", "ascending")])
    victim = sorted(cand_dir.glob("part-*.parquet"))[0]
    others = {p: p.stat().st_mtime_ns for p in cand_dir.glob("part-*.parquet") if p != victim}
    victim.unlink()
    settings = {"run": str(run), "executor": "local", "shards": 2, "top_k": 2}
    retrieve(
        load_config(RetrieveConfig, queries=str(tiny_data["queries"]), corpus=str(tiny_data["corpus"]), **settings),
        False,
    )
    after = read_stage(cand_dir).sort_by([("query_id", "ascending"), ("retrieval_rank", "ascending")])
    assert after.equals(before)
    assert all(p.stat().st_mtime_ns == m for p, m in others.items())
