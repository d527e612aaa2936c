"""experiments/loss_settings.py: the one-at-a-time variants and a tiny real sweep on the shared labelled run."""

import importlib.util
import json
import sys
from pathlib import Path

_DIR = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(_DIR))
_spec = importlib.util.spec_from_file_location("loss_settings", _DIR / "loss_settings.py")
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def test_variants_change_one_setting_at_a_time_and_skip_the_default_value():
    point = {"alpha": 0.1, "tau": 0.01, "group_size": 8}
    got = sweep.variants(point, {"alpha": [0.03, 0.1, 1.0], "tau": [0.05], "group_size": []})
    assert got == {"default": {}, "alpha=0.03": {"alpha": 0.03}, "alpha=1": {"alpha": 1.0}, "tau=0.05": {"tau": 0.05}}


def test_a_tiny_sweep_trains_each_variant_and_compares_it_with_the_defaults(labelled_run, tiny_data, tmp_path):
    out = tmp_path / "sweep"
    argv = ["--run", str(labelled_run), "--dev", str(tiny_data["queries"]), "--corpus", str(tiny_data["corpus"]),
            "--out", str(out), "--alphas", "0.5", "--taus", "--group-sizes", "--steps", "2", "--batch-size", "2",
            "--group-size", "2"]  # fmt: skip
    assert sweep.main(argv) == 0
    results = json.loads((out / "results-loss-settings.json").read_text())
    assert set(results["variants"]) == {"default", "alpha=0.5"}
    assert results["variants"]["alpha=0.5"]["alpha"] == 0.5 and results["variants"]["default"]["alpha"] == 0.1
    assert all(0 <= v["ndcg@10"] <= 1 and 0 <= v["recall@1"] <= 1 for v in results["variants"].values())
    assert set(results["paired_bootstrap_95"]) == {"ndcg@10: alpha=0.5 - default", "recall@1: alpha=0.5 - default"}
    logged = (out / "alpha_0.5" / "train" / "config.yaml").read_text()
    assert "alpha: 0.5" in logged


def test_a_rerun_with_another_value_reuses_the_finished_variants(labelled_run, tiny_data, tmp_path):
    out = tmp_path / "sweep"
    argv = [
        "--run",
        str(labelled_run),
        "--dev",
        str(tiny_data["queries"]),
        "--corpus",
        str(tiny_data["corpus"]),
        "--out",
        str(out),
        "--taus",
        "--group-sizes",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--group-size",
        "2",
    ]
    assert sweep.main([*argv, "--alphas"]) == 0
    first = json.loads((out / "results-loss-settings.json").read_text())
    kept = {p: p.stat().st_mtime_ns for p in (out / "default").rglob("*") if p.is_file()}
    assert sweep.main([*argv, "--alphas", "0.5"]) == 0
    second = json.loads((out / "results-loss-settings.json").read_text())
    assert {
        p: p.stat().st_mtime_ns for p in (out / "default").rglob("*") if p.is_file()
    } == kept  # neither trained nor ranked again
    assert second["variants"]["default"] == first["variants"]["default"]
    assert second["variants"]["default"]["train_s"] > 0 and set(second["variants"]) == {"default", "alpha=0.5"}
    assert "default/train" not in second["seconds"] and "alpha=0.5/train" in second["seconds"]
