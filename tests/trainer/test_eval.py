"""lemb eval: recall@100 at eval_depth, the paired bootstrap, one truncation count per stage, and retrieve's key
embeddings reused only when they are the ones eval would compute (tiny real runs with the default models)."""

import json
import logging
import math
import re
import shutil

import numpy as np
import pytest

from lemb.pipeline.config import EvalConfig, RetrieveConfig, load_config
from lemb.pipeline.shards import read_stage, shard_path
from lemb.stages.encoder import load_embedder
from lemb.stages.key_reuse import model_content
from lemb.stages.models import resolve_model_path
from lemb.stages.retrieve import retrieve
from lemb.trainer import bootstrap
from lemb.trainer.bootstrap import INTERVALS, compare, paired_bootstrap
from lemb.trainer.evaluate import Ranked, TaskEvaluator, evaluate_run, pooled_perplexity, retrieval_metrics
from lemb.trainer.report import metrics_json, table, write_report
from tests.conftest import CORPUS, QUERIES, write_jsonl

# ---------------------------------------------------------------- the paired bootstrap, by hand


def test_identical_arms_give_zero_and_a_constant_difference_gives_itself():
    a = [0.2, 0.9, 0.4, 1.0, 0.0]
    assert paired_bootstrap(a, a) == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "n": 5}
    shifted = paired_bootstrap([x + 0.25 for x in a], a)
    assert shifted["n"] == 5
    assert shifted["diff"] == pytest.approx(0.25) and shifted["lo"] == pytest.approx(0.25)
    assert shifted["hi"] == pytest.approx(0.25)
    # two queries, differences 1 and 0: a draw's mean is 0, 1/2 or 1 (probability 1/4, 1/2, 1/4), so the 2.5th and
    # 97.5th percentiles over 2,000 draws are 0 and 1
    assert paired_bootstrap([1.0, 0.0], [0.0, 0.0]) == {"diff": 0.5, "lo": 0.0, "hi": 1.0, "n": 2}
    empty = paired_bootstrap([], [])
    assert empty["n"] == 0 and math.isnan(empty["diff"])
    with pytest.raises(ValueError, match="one shape"):
        paired_bootstrap([1.0], [1.0, 2.0])


def test_the_draws_do_not_depend_on_how_they_are_split_into_blocks(monkeypatch):
    rng = np.random.default_rng(3)
    a, b = rng.random(37), rng.random(37)
    # the percentile bootstrap written out: 2,000 draws of 37 query indices at once, mean difference of each draw
    rows = np.random.default_rng(0).integers(0, 37, size=(2000, 37))
    lo, hi = np.percentile((a - b)[rows].mean(axis=1), [2.5, 97.5])
    whole = paired_bootstrap(a, b)
    assert (whole["lo"], whole["hi"]) == (lo, hi) and whole["diff"] == pytest.approx((a - b).mean())
    monkeypatch.setattr(bootstrap, "DRAWN_VALUES", 37 * 7)  # 7 draws a block, the last one shorter
    assert paired_bootstrap(a, b) == whole


def test_perplexity_is_bootstrapped_pooled_over_tokens():
    # (summed log-probability, tokens) per query; pooled: exp(-(-2 - 6) / (2 + 2)) = e^2 for b
    a, b = [[-1.0, 2], [-3.0, 2]], [[-2.0, 2], [-6.0, 2]]
    found = paired_bootstrap(a, b, statistic=pooled_perplexity)
    assert found["diff"] == pytest.approx(math.exp(1) - math.exp(2)) and found["n"] == 2
    assert found["lo"] <= found["diff"] <= found["hi"]
    assert paired_bootstrap(a, a, statistic=pooled_perplexity)["hi"] == 0.0


# ---------------------------------------------------------------- recall@100 and the intervals in metrics.json

QA = [
    {"query_id": "a", "task": "qa", "text": "", "target": "", "positive_ids": ["k49", "k109"], "relevance": {}},
    {"query_id": "b", "task": "qa", "text": "", "target": "", "positive_ids": ["k0"], "relevance": {}},
    {"query_id": "c", "task": "qa", "text": "", "target": "", "positive_ids": ["k3"], "relevance": {}},
]
# `a` finds one positive at rank 50 and the other at rank 110; `b` its positive first; `c` its positive at rank 4
DEEP = {q["query_id"]: [(f"k{i}", 1.0 - i / 200) for i in range(120)] for q in QA}


def test_recall_at_100_by_hand_and_left_out_of_a_shallower_ranking():
    assert retrieval_metrics(DEEP, QA, ("recall@100",)) == {"recall@100": pytest.approx((0.5 + 1 + 1) / 3)}
    deep, _ = TaskEvaluator().run(Ranked(DEEP, QA, {}, depth=100))
    shallow, _ = TaskEvaluator().run(Ranked({q: hits[:10] for q, hits in DEEP.items()}, QA, {}, depth=10))
    assert deep["qa"]["recall@100"] == pytest.approx(2.5 / 3) and "recall@100" not in shallow["qa"]
    # the depth-10 metrics of the deep ranking are those of its first ten keys
    assert {m: v for m, v in deep["qa"].items() if m != "recall@100"} == shallow["qa"]
    assert deep["qa"]["recall@5"] == pytest.approx(2 / 3) and deep["qa"]["mrr@10"] == pytest.approx((1 + 1 / 4) / 3)


def test_metrics_json_and_the_report_carry_each_difference_with_its_interval_and_query_count(tmp_path):
    # "trained" finds c's positive first instead of fourth: recall@1 +1 on one query of three
    better = {**DEEP, "c": [("k3", 1.0)] + [h for h in DEEP["c"] if h[0] != "k3"]}
    results, per_query = {}, {}
    for name, ranking in (("base", DEEP), ("trained", better)):
        results[name], details = TaskEvaluator().run(Ranked(ranking, QA, {}, depth=100))
        per_query[name] = details["per_query"]
    assert per_query["trained"]["recall@1"] == {"a": 0.0, "b": 1.0, "c": 1.0}
    compare(results, per_query, QA, "base")
    saved = metrics_json(results)
    assert INTERVALS not in saved["base"] and saved["trained"]["recall@1"] == pytest.approx(2 / 3)
    intervals = saved["trained"][INTERVALS]
    assert intervals["against"] == "base" and intervals["resamples"] == 2000
    recall = intervals["all"]["recall@1"]
    assert recall["diff"] == pytest.approx(1 / 3) and recall["n"] == 3
    assert (recall["lo"], recall["hi"]) == (0.0, 1.0)  # a draw holds c 0, 1, 2 or 3 times of 3
    assert intervals["per_task"]["qa"]["recall@100"] == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "n": 3}
    assert set(saved["trained"]["per_task"]["qa"]) == set(saved["base"]["per_task"]["qa"])  # numbers only
    lines = table({n: results[n]["all"] for n in results}, list(results)).splitlines()
    assert lines[0] == "| metric | base | trained | trained - base, 95% interval (queries) |"
    assert "| recall@1 | 0.333 | 0.667 | +0.333 [+0.000, +1.000] (3) |" in lines
    write_report(tmp_path / "run", tmp_path / "eval", results)
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| recall@100 | 0.833 | 0.833 | +0.000 [+0.000, +0.000] (3) |" in report
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == json.loads(json.dumps(saved))


def test_model_content_follows_the_bytes_not_the_size(tmp_path):
    original = resolve_model_path("all-minilm-l6-v2", "embedder")
    copy = tmp_path / "model"
    shutil.copytree(original, copy)
    assert model_content(str(copy)) == model_content("all-minilm-l6-v2")
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight, the size unchanged
    weights.write_bytes(bytes(data))
    assert model_content(str(copy)) != model_content("all-minilm-l6-v2")


# ---------------------------------------------------------------- tiny real runs


def _retrieve(run, data, **settings):
    config = load_config(RetrieveConfig, run=str(run), queries=str(data["queries"]), corpus=str(data["corpus"]),
                         executor="local", **{"shards": 2, **settings})  # fmt: skip
    return retrieve(config, progress=False)


def _eval(run, data, embedders=None, progress=False, **settings):
    config = load_config(EvalConfig, run=str(run), queries=str(data["queries"]), corpus=str(data["corpus"]),
                         executor="local", answer_k=settings.pop("answer_k", 0),
                         embedders=embedders or {"base": "all-minilm-l6-v2"}, **settings)  # fmt: skip
    return evaluate_run(config, progress=progress)


@pytest.fixture(scope="module")
def retrieved(tiny_data, tmp_path_factory):
    """A run whose retrieve stage embedded the tiny corpus with the defaults (all-MiniLM-L6-v2, no instructions)."""
    run = tmp_path_factory.mktemp("retrieved") / "run"
    _retrieve(run, tiny_data)
    return run


@pytest.mark.slow
def test_eval_reuses_retrieve_keys_when_they_fit_and_compares_with_the_base(retrieved, tiny_data, tmp_path, caplog,
                                                                           capfd):  # fmt: skip
    run = tmp_path / "run"
    shutil.copytree(retrieved, run)
    embedders = {
        "base": "all-minilm-l6-v2",
        "handicapped": {"model": "all-minilm-l6-v2", "instructions": "llm-embedder"},
    }
    with caplog.at_level(logging.INFO, logger="lemb"):
        metrics = _eval(run, tiny_data, embedders, progress=True, answer_k=1)
    assert "reusing retrieve's key embeddings for base (same model, template, instructions" in caplog.text
    assert "embedding the keys for handicapped: retrieve's key embeddings do not fit (instructions differs)" in (
        caplog.text
    )
    assert not (run / "eval" / "base" / "keys").exists() and (run / "eval" / "handicapped" / "keys").exists()
    # the LLM's part has its own bar, with a rate
    bar = r"eval/llm base: 100%\|.*\| 3/3 \[[0-9:]+<[0-9:]+, +[0-9.]+(s/ prompts| prompts/s)\]"  # elapsed<ETA, rate
    assert re.search(bar, capfd.readouterr().err)
    # each metric's difference from the base over the queries both have it for, with its interval
    saved = json.loads((run / "eval" / "metrics.json").read_text())["handicapped"][INTERVALS]
    assert saved["against"] == "base"
    for metric, found in saved["all"].items():
        assert found["diff"] == pytest.approx(metrics["handicapped"]["all"][metric] - metrics["base"]["all"][metric])
        assert found["lo"] <= found["diff"] <= found["hi"]
    assert saved["all"]["recall@1"]["n"] == 4 and saved["all"]["answer_accuracy"]["n"] == 2
    chat = saved["per_task"]["chat"]["perplexity"]
    assert chat["n"] == 1 and chat["diff"] == pytest.approx(
        metrics["handicapped"]["chat"]["perplexity"] - metrics["base"]["chat"]["perplexity"]
    )


@pytest.mark.slow
def test_reused_keys_rank_as_embedding_them_again_does(retrieved, tiny_data, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(retrieved, run)
    reused = _eval(run, tiny_data)
    assert not (run / "eval" / "base" / "keys").exists()
    caplog.clear()  # only the second eval's records (the lemb logger may already log INFO in a full run)
    with caplog.at_level(logging.INFO, logger="lemb"):
        embedded = _eval(tmp_path / "fresh", tiny_data)  # a run without a retrieve stage
    assert "key embeddings" not in caplog.text and (tmp_path / "fresh" / "eval" / "base" / "keys").exists()
    assert reused["base"].keys() == embedded["base"].keys()
    for row, values in reused["base"].items():
        assert values == pytest.approx(embedded["base"][row]), row
    assert "recall@100" in reused["base"]["qa"] and "recall@100" not in reused["base"]["tool"]
    rankings = [(folder / "eval" / "base" / "run.trec").read_text() for folder in (run, tmp_path / "fresh")]
    assert [line.split()[:4] for line in rankings[0].splitlines()] == [
        line.split()[:4] for line in rankings[1].splitlines()
    ]
    # ranked 100 deep: every qa key (4 of them) is in each qa query's list
    assert sum(line.startswith("q1 ") for line in rankings[0].splitlines()) == 4


def _changed_corpus(run, data, tmp_path):
    corpus = [dict(k, text=k["text"] + " Also a port.") if k["key_id"] == "k4" else k for k in CORPUS]
    return {**data, "corpus": write_jsonl(tmp_path / "corpus.jsonl", corpus)}


def _damaged_keys(run, data, tmp_path):
    shard = shard_path(run / "retrieve" / "keys", 0)
    content = bytearray(shard.read_bytes())
    content[len(content) // 2] ^= 1
    shard.write_bytes(bytes(content))
    return data


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"key_template": "{text}"}, "template differs"),
        ({"max_length": 128}, "max_length differs"),
        (_changed_corpus, "corpus differs"),
        (_damaged_keys, "no finished key embeddings there"),
    ],
    ids=["template", "max_length", "corpus", "damaged"],
)
def test_eval_embeds_the_keys_again_when_anything_they_depend_on_differs(
    change, why, retrieved, tiny_data, tmp_path, caplog
):
    run = tmp_path / "run"
    shutil.copytree(retrieved, run)
    settings = change if isinstance(change, dict) else {}
    data = tiny_data if settings else change(run, tiny_data, tmp_path)
    with caplog.at_level(logging.INFO, logger="lemb"):
        _eval(run, data, **settings)
    assert f"embedding the keys for base: retrieve's key embeddings do not fit ({why}" in caplog.text
    assert "reusing" not in caplog.text
    keys = read_stage(run / "eval" / "base" / "keys", ["key_id", "text"]).to_pylist()
    assert len(keys) == len(CORPUS)
    if change is _changed_corpus:  # the ranking is over the new texts
        assert {r["key_id"]: r["text"] for r in keys}["k4"].endswith("Also a port.")


def _cut(tokenizer, texts, max_length):
    return sum(len(ids) > max_length for ids in tokenizer(texts, add_special_tokens=True)["input_ids"])


@pytest.mark.slow
def test_each_stage_reports_one_truncation_count_summed_over_its_shards(tiny_data, tmp_path, caplog):
    tokenizer = load_embedder("all-minilm-l6-v2").tokenizer
    keys = [k["text"] for k in CORPUS]  # no titles: a key is its text
    queries = [q["text"] for q in QUERIES] + [h for q in QUERIES for h in q.get("history", [])]
    cut_keys, cut_queries = _cut(tokenizer, keys, 12), _cut(tokenizer, queries, 12)
    assert 0 < cut_keys < len(keys) and 0 < cut_queries < len(queries)  # some cut, some not, in every step
    with caplog.at_level(logging.WARNING, logger="lemb"):
        stats = _retrieve(tmp_path / "run", tiny_data, max_length=12, shards=3)
    assert (stats["keys"]["truncated_texts"], stats["keys"]["encoded_texts"]) == (cut_keys, len(keys))
    found = stats["candidates"]
    assert (found["truncated_texts"], found["encoded_texts"]) == (cut_queries, len(queries))
    lines = [r.getMessage() for r in caplog.records if "cut at max_length" in r.getMessage()]
    assert lines == [
        f"retrieve: {cut_keys + cut_queries} of {len(keys) + len(queries)} texts cut at max_length 12 (retrieve/keys "
        f"{cut_keys} of {len(keys)}; retrieve/candidates {cut_queries} of {len(queries)}; truncated_texts in the "
        "stage stats)"
    ]
    caplog.clear()
    embedders = {"base": "all-minilm-l6-v2", "again": "all-minilm-l6-v2"}
    with caplog.at_level(logging.WARNING, logger="lemb"):
        _eval(tmp_path / "run", tiny_data, embedders, max_length=12)  # retrieve's keys reused: queries only
    lines = [r.getMessage() for r in caplog.records if "cut at max_length" in r.getMessage()]
    assert lines == [
        f"eval: {2 * cut_queries} of {2 * len(queries)} texts cut at max_length 12 (base {cut_queries} of "
        f"{len(queries)}; again {cut_queries} of {len(queries)}; truncated_texts in the stage stats)"
    ]
