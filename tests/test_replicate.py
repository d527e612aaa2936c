"""experiments/replicate.py: answer aliases, bootstrap, loss curves, per-query feedback values, and
--part feedback end to end on a tiny real run (2 training and 2 dev queries per kind)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import yaml

_PATH = Path(__file__).resolve().parents[1] / "experiments" / "replicate.py"
_spec = importlib.util.spec_from_file_location("replicate", _PATH)
rep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rep)


def test_alias_answer_scores():
    assert rep.alias_answer_scores("The Beatles", ["Beatles", "the fab four"]) == (1.0, 1.0)
    assert rep.alias_answer_scores("It was the Fab Four.", ["Beatles", "the fab four"]) == (0.0, 1.0)
    assert rep.alias_answer_scores("The Rolling Stones", ["Beatles"]) == (0.0, 0.0)


def test_paired_bootstrap():
    same = rep.paired_bootstrap([1.0, 0.0, 1.0], [1.0, 0.0, 1.0])
    assert same["diff"] == same["lo"] == same["hi"] == 0.0 and same["n"] == 3
    better = rep.paired_bootstrap([1.0] * 50, [0.0] * 25 + [1.0] * 25)
    assert better["diff"] == 0.5 and 0.3 < better["lo"] <= better["diff"] <= better["hi"] < 0.7


def test_loss_curve_means_equal_spans_of_steps(tmp_path):
    import json

    (tmp_path / "train").mkdir()
    rows = [{"step": s - 1, "task": t, "loss": float(s)} for s in range(1, 6) for t in ("a", "b")]  # logged from 0
    rows[-1]["loss"] = 1.0  # the fifth step, task b
    (tmp_path / "train" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    curve = rep.loss_curve(tmp_path, windows=2)  # spans of 3 steps: 1-3 and 4-5
    assert curve == [
        {"first_step": 1, "last_step": 3, "loss": 2.0},
        {"first_step": 4, "last_step": 5, "loss": (4 + 4 + 5 + 1) / 4},
    ]


def test_per_query_feedback_values():
    icl = [
        {"query_id": "i1", "task": "icl", "target": "positive", "positive_ids": []},
        {"query_id": "i2", "task": "icl", "target": "negative", "positive_ids": []},
        {"query_id": "c1", "task": "chat", "target": "hi", "positive_ids": []},
    ]
    answers = {"i1": "Positive.", "i2": "positive", "c1": "hello"}
    assert rep.per_query_feedback("icl", icl, {}, {"answers": answers}) == {"i1": 1.0, "i2": 0.0}
    scored = {"c1": (-6.0, 3), "i1": (-1.0, 1)}
    assert rep.per_query_feedback("chat", icl, {}, {"target_logprobs": scored}) == {"c1": -2.0}
    tools = [
        {"query_id": "t1", "task": "tool", "target": "", "positive_ids": ["k2"]},
        {"query_id": "t2", "task": "tool", "target": "", "positive_ids": []},
    ]
    ranking = {"t1": [("k1", 0.9), ("k2", 0.8)], "t2": [("k1", 0.9)]}
    values = rep.per_query_feedback("tool", tools, ranking, {})
    assert list(values) == ["t1"] and abs(values["t1"] - 1 / math.log2(3)) < 1e-12


@pytest.mark.slow
def test_part_feedback_labels_trains_each_variant_and_compares_them_per_kind(tmp_path):
    out = tmp_path / "fb"
    argv = ["--part", "feedback", "--out", str(out), "--fb-queries", "2", "--fb-dev", "2", "--fb-steps", "2",
            "--mt-pool", "3", "--top-k", "2", "--n-samples", "2", "--per-candidate-samples", "0",
            "--batch-size", "2", "--executor", "local", "--shards", "1", "--seed", "0"]  # fmt: skip
    assert rep.main(argv) == 0
    fb = json.loads((out / "results-feedback.json").read_text())["feedback"]
    kinds = rep.FB_KINDS
    assert {k: fb["counts"][k]["train"] for k in kinds} == dict.fromkeys(kinds, 2)
    assert set(fb["label_by_task"]) == set(kinds) and all(v["queries"] == 2 for v in fb["label_by_task"].values())

    # one model per kind and variant, trained on that kind alone with that reward and loss, plus the multi-task one
    for kind in kinds:
        for name, (reward, loss) in rep.FB_VARIANTS.items():
            config = yaml.safe_load((out / "feedback" / f"{name}_{kind}" / "train" / "config.yaml").read_text())
            assert (config["reward"], config["loss"], config["task_weights"]) == (reward, {kind: loss}, {kind: 1.0})
            curve = fb["loss_curves"][f"{name}_{kind}"]
            assert [(c["first_step"], c["last_step"]) for c in curve] == [(1, 1), (2, 2)]
            assert all(math.isfinite(c["loss"]) for c in curve)
    config = yaml.safe_load((out / "feedback" / "multitask" / "train" / "config.yaml").read_text())
    assert config["reward"] == "rank" and config["loss"] == dict.fromkeys(kinds, "graded")
    assert set(fb["models"]) == {"base", "multitask"} | {f"{n}_{k}" for n in rep.FB_VARIANTS for k in kinds}

    # each kind's metric for each of its four models, the per-query means beside it, and the five paired intervals
    for kind in kinds:
        assert set(fb["metrics"][kind]) == {"base", "multitask", f"rank_graded_{kind}", f"likelihood_kl_{kind}"}
        means = fb["per_query_means"][kind]
        assert set(means) == set(fb["metrics"][kind]) and all(math.isfinite(v) for v in means.values())
        if rep.FB_METRIC[kind] == "target_logprob_per_token":
            assert all(v < 0 for v in means.values())  # a mean token log-probability
        else:  # the per-query values average to the evaluator's own figure
            metric = rep.FB_METRIC[kind]
            assert all(abs(means[m] - fb["metrics"][kind][m][metric]) < 1e-12 for m in means)
        rows = {k: v for k, v in fb["paired_bootstrap_95"].items() if k.startswith(f"{kind} ")}
        assert len(rows) == 5 and all(v["lo"] <= v["diff"] <= v["hi"] for v in rows.values())
    text = (out / "results-feedback.md").read_text()
    assert "| kind | metric | train q | dev q | base | rank + graded | likelihood + KL | multi-task |" in text
    assert "## Wall time of each step" in text
