"""experiments/replicate.py --part feedback end to end on a tiny real run: 2 training and 2 dev queries per kind."""

import importlib.util
import json
import math
from pathlib import Path

import yaml

_PATH = Path(__file__).resolve().parents[1] / "experiments" / "replicate.py"
_spec = importlib.util.spec_from_file_location("replicate", _PATH)
rep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rep)


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
