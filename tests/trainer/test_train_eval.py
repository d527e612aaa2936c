"""A tiny real training run and evaluation on the labelled fixture run."""

import json

import pyarrow.parquet as pq
import pytest
import torch

from lemb.data.tasks import INSTRUCTION_PRESETS
from lemb.pipeline.config import EvalConfig, TrainConfig, load_config
from lemb.pipeline.shards import stage_files
from lemb.stages.encoder import Encoder
from lemb.trainer.evaluate import evaluate_run, normalize_answer
from lemb.trainer.recipe import train
from lemb.vocabulary import TASKS


@pytest.fixture(scope="module")
def trained(labelled_run):
    """Trained with the LLM-Embedder instructions, which the base (no instructions of its own) is not used with."""
    config = load_config(TrainConfig, run=str(labelled_run), steps=6, batch_size=2, group_size=2, lr=5e-5,
                         instructions="llm-embedder")  # fmt: skip
    return labelled_run, train(config, progress=False)


@pytest.mark.slow
def test_trained_model_loads_in_both_libraries_with_instructions(trained):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    _, path = trained
    st = SentenceTransformer(str(path), device="cpu")
    assert st.prompts["qa_query"] == "Represent this query for retrieving relevant documents: "
    assert {n for n in st.prompts if n.endswith(("_query", "_key"))} == {
        f"{t}_{s}" for t in TASKS for s in ("query", "key")
    }
    emb = st.encode(["hello"], normalize_embeddings=True)
    hf = AutoModel.from_pretrained(str(path))
    tok = AutoTokenizer.from_pretrained(str(path))
    with torch.no_grad():
        out = hf(**tok(["hello"], return_tensors="pt")).last_hidden_state.mean(1)
    torch.testing.assert_close(
        torch.nn.functional.normalize(out, dim=-1)[0], torch.from_numpy(emb[0]), atol=1e-5, rtol=1e-4
    )


def test_training_changed_weights_and_logged_loss(trained):
    from sentence_transformers import SentenceTransformer

    from lemb.stages.encoder import load_embedder

    run, path = trained
    base = load_embedder("all-minilm-l6-v2").encode(["What is the capital of Zorbia?"])
    new = SentenceTransformer(str(path), device="cpu").encode(["What is the capital of Zorbia?"])
    assert abs(base - new).max() > 1e-4
    log = [json.loads(line) for line in (run / "train" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 6 and all(row["loss"] == row["loss"] for row in log)
    assert json.loads((run / "train" / "_stats.json").read_text())["groups"] >= 3
    # the loss curve is drawn as the model is saved, one PNG beside the log
    assert (run / "train" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_training_log_rows_and_tensorboard_events(labelled_run, tmp_path, caplog):
    import logging
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    for stage in ("retrieve", "label"):
        shutil.copytree(labelled_run / stage, run / stage)
    with caplog.at_level(logging.INFO, logger="lemb"):
        train(load_config(TrainConfig, run=str(run), steps=4, batch_size=2, group_size=2, warmup=0.5), progress=False)
    assert "trackers: --report-to tensorboard,wandb,mlflow" in caplog.text  # how to turn them on, when off
    # by default the model trains as its base is used: all-MiniLM-L6-v2 without instructions, saved as such
    assert "training with instructions none: none (the model has no instructions)" in caplog.text
    saved = json.loads((run / "train" / "model" / "config_sentence_transformers.json").read_text())["prompts"]
    assert saved == {f"{t}_{s}": "" for t in TASKS for s in ("query", "key")}
    assert json.loads((run / "train" / "_stats.json").read_text())["instructions"]["name"] == "none"
    rows = [json.loads(line) for line in (run / "train" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and not (run / "train" / "tensorboard").exists()
    assert all(
        1 <= r["queries"] <= 2 and r["examples_per_s"] > 0 and r["task"] in ("qa", "chat", "tool") for r in rows
    )
    assert [r["elapsed_s"] for r in rows] == sorted(r["elapsed_s"] for r in rows)
    assert [r["lr"] for r in rows] == pytest.approx([1e-5, 2e-5, 2e-5, 1e-5])  # the rate each step used (warm-up 2)

    train(load_config(TrainConfig, run=str(run), steps=4, batch_size=2, group_size=2, report_to="tensorboard",
                      warmup=0.5), progress=False)  # fmt: skip
    assert not (run / "train" / "tensorboard").exists()  # execution-only: the finished run is not trained again
    train(load_config(TrainConfig, run=str(run), steps=4, batch_size=2, group_size=2, report_to="tensorboard",
                      warmup=0.5, restart=True), progress=False)  # fmt: skip
    events = EventAccumulator(str(run / "train" / "tensorboard"))
    events.Reload()
    rows = [json.loads(line) for line in (run / "train" / "log.jsonl").read_text().splitlines()]
    assert [e.step for e in events.Scalars("loss/all")] == [0, 1, 2, 3]
    assert [e.value for e in events.Scalars("loss/all")] == pytest.approx([r["loss"] for r in rows])
    for task in {r["task"] for r in rows}:
        assert [e.step for e in events.Scalars(f"loss/{task}")] == [r["step"] for r in rows if r["task"] == task]
    assert {"lr", "examples_per_s", "queries", "elapsed_s"} <= set(events.Tags()["scalars"])
    assert [e.value for e in events.Scalars("lr")] == pytest.approx([r["lr"] for r in rows])
    config = events.Tensors("config/text_summary")[0]  # the resolved config, as text at step 0
    assert config.step == 0 and '"report_to": "tensorboard"' in config.tensor_proto.string_val[0].decode()
    train(load_config(TrainConfig, run=str(run), steps=2, batch_size=2, group_size=2, restart=True), progress=False)
    assert not (run / "train" / "tensorboard").exists()  # a fresh run without events leaves none of the last one


@pytest.mark.slow
def test_eval_writes_metrics_report_and_plots(trained, tiny_data):
    run, _ = trained
    cfg = load_config(
        EvalConfig, run=str(run), queries=str(tiny_data["queries"]), corpus=str(tiny_data["corpus"]), executor="local"
    )
    metrics = evaluate_run(cfg, progress=False)
    assert set(metrics) == {"base", "trained"}
    # each embedder as it is meant to be used: the base (no instructions of its own) without any, the trained model
    # with the instructions it saved; the scores in its ranking are those of exactly these texts
    saved = json.loads((run / "eval" / "metrics.json").read_text())
    assert saved["base"]["embedded_with"]["instructions"]["name"] == "none"
    assert saved["trained"]["embedded_with"]["instructions"]["name"] == "llm-embedder"
    assert saved["trained"]["embedded_with"]["instructions"]["source"] == "saved with the model by lemb train"
    assert saved["trained"]["embedded_with"]["key_template"] == "{title}: {text}"
    for name, model in (("base", "all-minilm-l6-v2"), ("trained", str(run / "train" / "model"))):
        rows = [r for p in stage_files(run / "eval" / name / "candidates") for r in pq.read_table(p).to_pylist()]
        row = next(r for r in rows if r["task"] == "qa")
        q_instruction, k_instruction = INSTRUCTION_PRESETS["none" if name == "base" else "llm-embedder"]["qa"]
        encoder = Encoder(model)
        query, key = (
            encoder.encode([row["query_text"]], q_instruction)[0],
            encoder.encode([row["key_text"]], k_instruction)[0],
        )
        assert row["retrieval_score"] == pytest.approx(float(query @ key), abs=1e-5)
    assert (
        "| base | `all-minilm-l6-v2` | none: none (the model has no instructions)"
        in (run / "eval" / "report.md").read_text()
    )
    for name in metrics:
        for key in ("recall@1", "recall@5", "mrr@10", "ndcg@10", "answer_accuracy"):
            assert 0.0 <= metrics[name]["all"][key] <= 1.0
        assert set(metrics[name]) == {"all", "qa", "chat", "tool"}
    # every query has its positive among 2-6 keys: recall@5 must be perfect
    assert metrics["base"]["all"]["recall@5"] == 1.0
    assert saved["base"]["recall@1"] == metrics["base"]["all"]["recall@1"]
    assert (run / "eval" / "report.md").read_text().startswith("# lemb evaluation")
    assert (run / "eval" / "rewards.png").stat().st_size > 1000 and (run / "eval" / "loss.png").stat().st_size > 1000
    # each embedder ranked the queries through the retrieve stage itself
    for name in ("base", "trained"):
        assert (run / "eval" / name / "candidates" / "_manifest.json").exists()
    # each ranking as a TREC run beside its qrels: trec_eval's measures over them equal lemb's
    import pytrec_eval

    details = json.loads((run / "eval" / "details.json").read_text())
    for name in ("base", "trained"):
        lines = [line.split() for line in (run / "eval" / name / "run.trec").read_text().splitlines()]
        tag = f"{name}|instructions={'none' if name == 'base' else 'llm-embedder'}|keys={{title}}:_{{text}}"
        assert all(len(f) == 6 and f[1] == "Q0" and f[5] == tag for f in lines)
        order = {}
        for qid, _, key, rank, score, _ in lines:
            order.setdefault(qid, []).append((int(rank), key, float(score)))
        assert {q: [k for _, k, _ in sorted(v)] for q, v in order.items()} == {
            q: [k for k, _ in hits] for q, hits in details[name]["ranking"].items()
        }
        qrels, trec_run = {}, {}
        for qid, _, key, grade in (f.split() for f in (run / "eval" / name / "qrels.trec").read_text().splitlines()):
            qrels.setdefault(qid, {})[key] = int(grade)
        for qid, hits in order.items():
            trec_run[qid] = {key: score for _, key, score in hits}
        found = pytrec_eval.RelevanceEvaluator(qrels, {"recall.1"}).evaluate(trec_run)
        mean = sum(m["recall_1"] for m in found.values()) / len(found)
        assert mean == pytest.approx(metrics[name]["all"]["recall@1"])


def test_normalize_answer():
    assert normalize_answer("The  Quelm!") == "quelm"
    assert normalize_answer("An apple, a day") == "apple day"


def test_answer_metrics_strict_and_whole_word():
    from lemb.trainer.evaluate import answer_metrics

    queries = [{"query_id": str(i), "target": t} for i, t in enumerate(["Quelm", "Plok", "Tobble", "Ra"])]
    answers = {"0": "Quelm.", "1": "The capital of Vantra is Plok.", "2": "I do not know.", "3": "Rain"}
    m = answer_metrics(queries, answers)
    assert m["answer_em"] == 0.25  # only "Quelm." is exactly the target
    assert m["answer_accuracy"] == 0.5  # "Plok" is a whole-word span; "Ra" inside "Rain" is not


def test_tensorboard_missing_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    import sys

    from lemb.errors import MissingDependency
    from lemb.trainer.tracking import TrainLog

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(MissingDependency, match=r"pip install 'lemb\[tensorboard\]'"):
        TrainLog(tmp_path / "log.jsonl", 0, enabled=True, trackers=["tensorboard"])
    assert not (tmp_path / "log.jsonl").exists()
