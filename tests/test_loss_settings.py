"""experiments/loss_settings.py: the one-at-a-time variants and a tiny real sweep on the shared labelled run."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_DIR = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(_DIR))
_spec = importlib.util.spec_from_file_location("loss_settings", _DIR / "loss_settings.py")
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def test_variants_change_one_setting_at_a_time_and_skip_the_default_value():
    point = {"alpha": 0.1, "tau": 0.01, "group_size": 8}
    got = sweep.variants(point, {"alpha": [0.03, 0.1, 1.0], "tau": [0.05], "group_size": []})
    assert got == {
        "reference": {},
        "alpha=0.03": {"alpha": 0.03},
        "alpha=1": {"alpha": 1.0},
        "tau=0.05": {"tau": 0.05},
    }


@pytest.mark.slow
def test_a_tiny_sweep_trains_each_variant_and_compares_it_with_the_reference(labelled_run, tiny_data, tmp_path):
    out = tmp_path / "sweep"
    argv = ["--run", str(labelled_run), "--dev", str(tiny_data["queries"]), "--corpus", str(tiny_data["corpus"]),
            "--out", str(out), "--alphas", "0.5", "--taus", "--group-sizes", "--steps", "2", "--batch-size", "2",
            "--group-size", "2"]  # fmt: skip
    assert sweep.main(argv) == 0
    results = json.loads((out / "results-loss-settings.json").read_text())
    assert set(results["variants"]) == {"reference", "alpha=0.5"}
    assert results["variants"]["alpha=0.5"]["alpha"] == 0.5 and results["variants"]["reference"]["alpha"] == 0.1
    assert all(0 <= v["ndcg@10"] <= 1 and 0 <= v["recall@1"] <= 1 for v in results["variants"].values())
    assert set(results["paired_bootstrap_95"]) == {"ndcg@10: alpha=0.5 - reference", "recall@1: alpha=0.5 - reference"}
    assert set(results["per_query"]["reference"]["ndcg@10"]) == {"q1", "q2"}  # the qa queries only
    logged = (out / "alpha_0.5" / "train" / "config.yaml").read_text()
    assert "alpha: 0.5" in logged


@pytest.mark.slow
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
    kept = {p: p.stat().st_mtime_ns for p in (out / "reference").rglob("*") if p.is_file()}
    assert sweep.main([*argv, "--alphas", "0.5"]) == 0
    second = json.loads((out / "results-loss-settings.json").read_text())
    assert {
        p: p.stat().st_mtime_ns for p in (out / "reference").rglob("*") if p.is_file()
    } == kept  # neither trained nor ranked again
    assert second["variants"]["reference"] == first["variants"]["reference"]
    assert second["variants"]["reference"]["train_s"] > 0 and set(second["variants"]) == {"reference", "alpha=0.5"}
    assert "reference/train" not in second["seconds"] and "alpha=0.5/train" in second["seconds"]

    # a finished variant is never reused for other settings: another reference tau in the same --out is refused
    refused = r"reference/dev-metrics.json: made for \(task, pool, settings\) \('qa', None, "
    with pytest.raises(SystemExit, match=refused):
        sweep.main([*argv, "--alphas", "--tau", "0.02"])

    # a later sweep in another --out joins this one's variants from its JSON, without training them again
    later = tmp_path / "later"
    later_argv = [a if a != str(out) else str(later) for a in argv]
    (later / "reference").mkdir(parents=True)
    (later / "reference" / "dev-metrics.json").write_text((out / "reference" / "dev-metrics.json").read_text())
    assert (
        sweep.main([*later_argv, "--alphas", "--taus", "0.02", "--join", str(out / "results-loss-settings.json")]) == 0
    )
    joined = json.loads((later / "results-loss-settings.json").read_text())
    assert set(joined["variants"]) == {"reference", "alpha=0.5", "tau=0.02"}
    assert joined["variants"]["alpha=0.5"]["from"] == str(out / "results-loss-settings.json")
    assert joined["per_query"]["alpha=0.5"] == second["per_query"]["alpha=0.5"]
    assert not (later / "alpha_0.5").exists()
    assert "recall@1: alpha=0.5 - reference" in joined["paired_bootstrap_95"]


@pytest.mark.slow
def test_a_sweep_on_another_task_trains_and_scores_that_task_only(labelled_run, tiny_data, tmp_path):
    out = tmp_path / "sweep"
    argv = ["--run", str(labelled_run), "--dev", str(tiny_data["queries"]), "--corpus", str(tiny_data["corpus"]),
            "--out", str(out), "--task", "tool", "--alphas", "--taus", "0.02", "--group-sizes", "--steps", "2",
            "--batch-size", "1", "--group-size", "2"]  # fmt: skip
    assert sweep.main(argv) == 0
    results = json.loads((out / "results-loss-settings.json").read_text())
    assert results["task"] == "tool" and set(results["variants"]) == {"reference", "tau=0.02"}
    assert set(results["per_query"]["tau=0.02"]["ndcg@10"]) == {"q4"}
    assert [json.loads(line)["key_id"] for line in (out / "data-tool" / "corpus.jsonl").read_text().splitlines()] == [
        "t1",
        "t2",
    ]
    steps = [json.loads(line) for line in (out / "tau_0.02" / "train" / "log.jsonl").read_text().splitlines()]
    assert {row["task"] for row in steps} == {"tool"}
    assert "tau: 0.02" in (out / "tau_0.02" / "train" / "config.yaml").read_text()
    with pytest.raises(SystemExit, match="no reward rows of task 'lrlm'"):
        sweep.main([*argv, "--task", "lrlm"])


@pytest.mark.slow
def test_a_sweep_on_a_sub_pool_trains_on_the_cut_rewards(labelled_run, tiny_data, tmp_path, monkeypatch):
    from lemb.pipeline.config import LabelConfig, RetrieveConfig, load_config
    from lemb.stages.label import label
    from lemb.stages.retrieve import retrieve

    run = tmp_path / "run"  # a pool of 6 samples of the bare prompt, no per-candidate samples
    common = {"run": str(run), "executor": "local"}
    retrieve(load_config(RetrieveConfig, queries=str(tiny_data["queries"]), corpus=str(tiny_data["corpus"]),
                         top_k=2, **common), progress=False)  # fmt: skip
    label(load_config(LabelConfig, n_samples=6, per_candidate_samples=0, **common), progress=False)
    seen = []
    real_train_on = sweep.train_on
    monkeypatch.setattr(
        sweep, "train_on", lambda tables, *a, **k: seen.append(tables) or real_train_on(tables, *a, **k)
    )
    out = tmp_path / "sweep"
    argv = ["--run", str(run), "--dev", str(tiny_data["queries"]), "--corpus", str(tiny_data["corpus"]),
            "--out", str(out), "--alphas", "--taus", "--group-sizes", "--steps", "1", "--batch-size", "2",
            "--group-size", "2"]  # fmt: skip
    assert sweep.main([*argv, "--pool", "2"]) == 0
    pools = [p for t in seen[0] for p in t.column("pool_size").to_pylist() if p is not None]
    assert pools and max(pools) <= 2  # the label run's pools hold up to 6
    assert json.loads((out / "results-loss-settings.json").read_text())["pool"] == 2
    with pytest.raises(SystemExit, match="made for \\(task, pool, settings\\) \\('qa', 2,"):
        sweep.main(argv)  # the full pool's reference is not the sub-pool's
    with pytest.raises(SystemExit, match="sub-pools need m = 0"):  # 1 sample per candidate: no exact sub-pool
        sweep.main([*argv, "--run", str(labelled_run), "--out", str(tmp_path / "other"), "--pool", "2"])
