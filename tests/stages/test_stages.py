"""Tiny real runs of retrieve and label with the default models."""

import json

import polars as pl
import pytest

from lemb.errors import InputError
from lemb.pipeline.config import RetrieveConfig, load_config
from lemb.pipeline.shards import read_stage
from lemb.stages.label import candidates_plan, derive_seed
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
    assert (labelled_run / "retrieve" / "candidates" / "config.yaml").exists()
    # every row carries what label needs: query text, target, positives, the key's text
    corpus = {k["key_id"]: k["text"] for k in CORPUS}
    queries = {q["query_id"]: q for q in QUERIES}
    for row in cands.iter_rows(named=True):
        q = queries[row["query_id"]]
        assert (row["query_text"], row["target"], row["positive_ids"]) == (q["text"], q["target"], q["positive_ids"])
        if row["task"] == "chat":
            assert row["key_text"] == q["history"][int(row["key_id"].split("#h")[1])]
        else:
            assert row["key_text"] == corpus[row["key_id"]]


def test_label_rewards_follow_the_definition(labelled_run):
    df = pl.from_arrow(read_stage(labelled_run / "label"))
    assert df.height == 8  # rows out == rows in: nothing dropped
    labelled = df.filter(pl.col("pool_size") > 0)
    assert labelled.height > 0
    for row in labelled.iter_rows(named=True):
        t, scores, counts = row["target_logprob"], row["sample_logprobs"], row["sample_counts"]
        n = sum(counts)
        assert n == row["pool_size"] and len(scores) == len(counts) == len(row["samples"])
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


def test_query_without_needed_target_is_refused(tiny_data, tmp_path):
    queries = write_jsonl(tmp_path / "q.jsonl", [{**QUERIES[0], "target": None}])
    run = tmp_path / "run"
    common = {"run": str(run), "executor": "local", "shards": 1}
    retrieve(
        load_config(RetrieveConfig, queries=str(queries), corpus=str(tiny_data["corpus"]), top_k=1, **common), False
    )
    with pytest.raises(
        InputError, match=r"part-00000.parquet: query_id 'q1', field 'target': task qa needs a desired"
    ):
        candidates_plan(run)
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


def _relabel(source_run, run, **settings):
    """Label a copy of `source_run`'s candidates, with the raw input readers disabled: label reads its shards only."""
    import shutil

    import lemb.data.readers as readers
    from lemb.pipeline.config import LabelConfig
    from lemb.stages.label import label

    shutil.copytree(source_run / "retrieve", run / "retrieve")
    real = readers._iter_raw
    readers._iter_raw = lambda *a, **k: (_ for _ in ()).throw(AssertionError("label read a raw input file"))
    try:
        common = {"run": str(run), "executor": "local", "n_samples": 3, "per_candidate_samples": 1}
        label(load_config(LabelConfig, **common, **settings), progress=False)
    finally:
        readers._iter_raw = real
    return pl.from_arrow(read_stage(run / "label")).sort(["query_id", "retrieval_rank"])


def _assert_same_labels(a, b):
    """Batched and per-query labels: the same pools (a float32 logit can differ by ~1e-6 with the batch's padding,
    which flips a sampled token only when its uniform falls that close to a cumulative-probability boundary: rare,
    so at most one query in four may differ, where a wrong seed would change every pool); wherever the pools are
    equal, the same rewards; every log-probability within 1e-5."""
    assert a.select("query_id", "key_id").equals(b.select("query_id", "key_id"))
    for col in ("target_logprob", "baseline_target_logprob"):  # these do not depend on the pool
        assert max(abs(x - y) for x, y in zip(a[col].drop_nulls(), b[col].drop_nulls())) <= 1e-5
    rows = list(zip(a.iter_rows(named=True), b.iter_rows(named=True)))
    labelled = [(x, y) for x, y in rows if x["samples"] is not None]
    equal = [(x, y) for x, y in labelled if (x["samples"], x["sample_counts"]) == (y["samples"], y["sample_counts"])]
    assert labelled and 4 * len(equal) >= 3 * len(labelled)
    for x, y in equal:
        assert x["reward"] == y["reward"] and x["rank"] == y["rank"]
        assert max(abs(p - q) for p, q in zip(x["sample_logprobs"], y["sample_logprobs"])) <= 1e-5


@pytest.mark.slow
def test_batched_labelling_equals_labelling_each_query_alone_transformers(labelled_run, tmp_path):
    batched = _relabel(labelled_run, tmp_path / "batched", backend="transformers")
    alone = _relabel(labelled_run, tmp_path / "alone", backend="transformers", block_tokens=1)
    assert batched.filter(pl.col("pool_size") > 0).height > 0
    _assert_same_labels(batched, alone)


@pytest.mark.slow
def test_batched_labelling_equals_labelling_each_query_alone_default_backend(labelled_run, tmp_path):
    # the fixture run labelled in blocks with the default backend (vLLM where installed)
    batched = pl.from_arrow(read_stage(labelled_run / "label")).sort(["query_id", "retrieval_rank"])
    _assert_same_labels(batched, _relabel(labelled_run, tmp_path / "alone", block_tokens=1))


def test_top_k_above_the_pool_warns_with_the_count(tiny_data, tmp_path, caplog):
    run = tmp_path / "run"
    cfg = load_config(
        RetrieveConfig, queries=str(tiny_data["queries"]), corpus=str(tiny_data["corpus"]), top_k=50, run=str(run),
        executor="local", shards=1,
    )  # fmt: skip
    with caplog.at_level("WARNING", logger="lemb.stages.retrieve"):
        stats = retrieve(cfg, False)
    assert stats["candidates"]["queries_short_of_top_k"] == len(QUERIES)
    assert f"top_k 50 is larger than the candidate pool of {len(QUERIES)} queries" in caplog.text
    cands = pl.from_arrow(read_stage(run / "retrieve" / "candidates"))
    pools = {t: sum(k["task"] == t for k in CORPUS) for t in {k["task"] for k in CORPUS}}
    for q in QUERIES:  # each query has its whole pool: every key of its task, or its whole history
        n = len(q["history"]) if q["task"] == "chat" else pools[q["task"]]
        assert cands.filter(pl.col("query_id") == q["query_id"]).height == n
