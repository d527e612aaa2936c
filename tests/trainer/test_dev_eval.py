"""Dev evaluation while training (`lemb train --dev --eval-every --keep`): `lemb eval`'s retrieval metrics on held-out
queries, logged per evaluation, and the best model kept."""

import json
import shutil

import pytest

from lemb.errors import ConfigError, InputError
from lemb.pipeline.config import EvalConfig, TrainConfig, load_config
from lemb.stages.encoder import load_embedder
from lemb.stages.instructions import resolve_instructions
from lemb.trainer.dev_eval import DevEvaluator, load_dev
from lemb.trainer.recipe import train
from lemb.vocabulary import DEFAULT_EMBEDDER
from tests.conftest import CORPUS, QUERIES, write_jsonl

# held-out questions over the tiny corpus: several near-duplicates compete, so the ranks move while training
DEV = [
    {"query_id": "d1", "task": "qa", "text": "Which city governs Zorbia?", "target": "Quelm", "positive_ids": ["k1"]},
    {"query_id": "d2", "task": "qa", "text": "Name Vantra's capital.", "target": "Plok", "positive_ids": ["k3"]},
    {
        "query_id": "d3",
        "task": "qa",
        "text": "Which animal stands for Zorbia?",
        "target": "glimmerfox",
        "positive_ids": ["k4"],
    },  # fmt: skip
    {
        "query_id": "d4",
        "task": "tool",
        "text": "Trains leaving a Zorbian station",
        "target": "zorb_rail.timetable",
        "positive_ids": ["t2"],
    },  # fmt: skip
    {
        "query_id": "d5",
        "task": "chat",
        "text": "Do I like the sea?",
        "target": "yes",
        "positive_ids": ["d5#h0"],
        "history": ["User: I love the sea.", "User: my cat is grumpy.", "User: Quelm is rainy."],
    },  # fmt: skip
    {"query_id": "d6", "task": "qa", "text": "No known answer", "target": "", "positive_ids": []},
]


@pytest.fixture
def dev_files(tmp_path):
    return write_jsonl(tmp_path / "dev.jsonl", DEV), write_jsonl(tmp_path / "corpus.jsonl", CORPUS)


def test_dev_scores_are_lemb_evals_retrieval_metrics(tmp_path, dev_files):
    """The same numbers `lemb eval` computes for the same model on the same queries (its retrieve-stage ranking)."""
    from lemb.trainer.evaluate import per_query_retrieval, rank

    dev_path, corpus = dev_files
    instructions = resolve_instructions("llm-embedder", DEFAULT_EMBEDDER)
    evaluator = DevEvaluator(load_dev(dev_path, corpus, "{title}: {text}"), instructions, keep_metric="qa/recall@1")
    model = load_embedder(DEFAULT_EMBEDDER, 256)
    model.train()
    scores = evaluator(model)
    assert model.training  # back in training mode
    cfg = load_config(EvalConfig, run=str(tmp_path / "run"), queries=str(dev_path), corpus=str(corpus),
                      executor="local", instructions="llm-embedder", shards=1)  # fmt: skip
    ranked = rank(cfg, DEFAULT_EMBEDDER, tmp_path / "run" / "eval" / "base", progress=False)
    for task in ("qa", "tool", "chat"):
        queries = [q for q in ranked.queries if q["task"] == task]
        for name, values in per_query_retrieval(ranked.ranking, queries, ("recall@1", "ndcg@10", "mrr@10")).items():
            assert scores[f"dev/{task}/{name}"] == pytest.approx(sum(values.values()) / len(values), abs=1e-6)
    every = per_query_retrieval(ranked.ranking, ranked.queries, ("ndcg@10",))["ndcg@10"]
    assert scores["dev/all/ndcg@10"] == pytest.approx(sum(every.values()) / len(every), abs=1e-6)
    assert len(every) == 5  # the query without positives is left out
    assert "dev/tool/ndcg@5" in scores and "dev/qa/recall@100" in scores  # each task's own metrics
    assert scores["dev_seconds"] > 0


def test_dev_sets_that_cannot_be_scored_are_one_line(tmp_path, dev_files):
    dev_path, corpus = dev_files
    with pytest.raises(ConfigError, match=r"dev queries of \['qa', 'tool'\] rank over a corpus: pass --corpus"):
        load_dev(dev_path, None, "{text}")
    unjudged = write_jsonl(tmp_path / "none.jsonl", [DEV[-1]])
    with pytest.raises(InputError, match="none.jsonl.*positive_ids.*no dev query has known positives"):
        load_dev(unjudged, corpus, "{text}")
    only_qa = write_jsonl(tmp_path / "qa-corpus.jsonl", [k for k in CORPUS if k["task"] == "qa"])
    with pytest.raises(InputError, match="qa-corpus.jsonl.*no key of task tool"):
        load_dev(dev_path, only_qa, "{text}")
    with pytest.raises(ConfigError, match="keep best needs dev queries"):
        load_config(TrainConfig, keep="best")
    with pytest.raises(ConfigError, match="keep_metric must be TASK/METRIC"):
        load_config(TrainConfig, keep_metric="ndcg@10")


def _train(labelled_run, run, **settings):
    for stage in ("retrieve", "label"):
        if not (run / stage).exists():
            shutil.copytree(labelled_run / stage, run / stage)
    defaults = {"steps": 6, "batch_size": 2, "group_size": 2, "lr": 1e-3, "warmup": 0.0}
    config = load_config(TrainConfig, run=str(run), **{**defaults, **settings})
    train(config, progress=False)
    return [json.loads(line) for line in (run / "train" / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_eval_every_logs_dev_metrics_and_keep_best_saves_the_best_step(labelled_run, tmp_path, dev_files):
    from sentence_transformers import SentenceTransformer

    dev_path, corpus = dev_files
    plain = _train(labelled_run, tmp_path / "plain")
    dev = {"dev": str(dev_path), "corpus": str(corpus), "eval_every": 2, "keep_metric": "all/mrr@10"}
    last = _train(labelled_run, tmp_path / "last", **dev)
    # scoring the dev set changes nothing of the training: the same losses step for step
    assert [r["loss"] for r in last] == [r["loss"] for r in plain]
    evaluated = [r for r in last if "dev/all/mrr@10" in r]
    assert [r["step"] for r in evaluated] == [1, 3, 5]  # every 2 steps, the last included
    assert all({"dev/qa/ndcg@10", "dev/tool/ndcg@5", "dev/chat/recall@1", "dev_seconds"} <= set(r) for r in evaluated)
    assert not any("dev/all/mrr@10" in r for r in plain)

    best = _train(labelled_run, tmp_path / "best", **{**dev, "eval_every": 1}, keep="best")
    values = [r["dev/all/mrr@10"] for r in best]
    kept = values.index(max(values))  # the first step with the best score
    stats = json.loads((tmp_path / "best" / "train" / "_stats.json").read_text())["dev"]
    assert stats["step"] == kept + 1 and stats["keep"] == "best" and stats["metric"] == "all/mrr@10"
    assert stats["scores"]["dev/all/mrr@10"] == max(values)
    assert not (tmp_path / "best" / "train" / "best.pt").exists()  # the model folder supersedes it
    # the saved model is the kept step's: scoring it again gives the logged scores of that step
    saved = SentenceTransformer(str(tmp_path / "best" / "train" / "model"), device="cpu")
    again = DevEvaluator(load_dev(dev_path, corpus, "{title}: {text}"), resolve_instructions("auto", DEFAULT_EMBEDDER),
                         keep_metric="all/mrr@10")(saved)  # fmt: skip
    for name, value in best[kept].items():
        if name.startswith("dev/"):
            assert again[name] == pytest.approx(value, abs=1e-5), name
    card = (tmp_path / "best" / "train" / "model" / "README.md").read_text()
    assert f"the model saved is the best (step {kept + 1}, by all/mrr@10)" in card
    if kept != len(values) - 1:  # the last step scored lower: keep last saves other weights
        last_model = SentenceTransformer(str(tmp_path / "last" / "train" / "model"), device="cpu")
        assert not (last_model.encode(["Quelm"]) == saved.encode(["Quelm"])).all()


@pytest.mark.slow
def test_keep_metric_of_a_task_without_dev_queries_is_one_line(labelled_run, tmp_path, dev_files):
    dev_path, corpus = dev_files
    qa_only = write_jsonl(tmp_path / "qa.jsonl", [q for q in QUERIES if q["task"] == "qa"])
    with pytest.raises(ConfigError, match=r"keep_metric 'tool/ndcg@5' names task tool, which has no judged query"):
        _train(labelled_run, tmp_path / "run", dev=str(qa_only), corpus=str(corpus), keep="best",
               keep_metric="tool/ndcg@5")  # fmt: skip


@pytest.mark.slow
def test_a_resumed_keep_best_run_saves_the_model_of_an_uninterrupted_one(labelled_run, tmp_path, dev_files):
    from sentence_transformers import SentenceTransformer

    from lemb.trainer.recipe import TrainRecipe

    dev_path, corpus = dev_files
    settings = {"dev": str(dev_path), "corpus": str(corpus), "eval_every": 1, "keep": "best",
                "keep_metric": "all/mrr@10", "save_every": 3}  # fmt: skip
    whole = _train(labelled_run, tmp_path / "whole", **settings)
    run = tmp_path / "cut"
    _train(labelled_run, run, **{**settings, "steps": 1})  # copies the stages; replaced by the cut run below
    recipe = TrainRecipe(load_config(TrainConfig, run=str(run), steps=6, batch_size=2, group_size=2, lr=1e-3,
                                     warmup=0.0, restart=True, **settings))  # fmt: skip
    recipe.setup()
    recipe.train(progress=False)  # every step done, the checkpoint of step 3 left, the model never saved
    recipe.cleanup()
    resumed = _train(labelled_run, run, resume=True, **settings)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole]
    stats = [json.loads((folder / "train" / "_stats.json").read_text())["dev"] for folder in (tmp_path / "whole", run)]
    assert stats[0]["step"] == stats[1]["step"]
    assert {k: v for k, v in stats[0]["scores"].items() if k.startswith("dev/")} == {
        k: v for k, v in stats[1]["scores"].items() if k.startswith("dev/")
    }
    texts = ["Quelm", "Which city governs Zorbia?"]
    folders = (tmp_path / "whole", run)
    models = [SentenceTransformer(str(folder / "train" / "model"), device="cpu") for folder in folders]
    assert (models[0].encode(texts) == models[1].encode(texts)).all()
