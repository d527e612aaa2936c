"""experiments/pool_size.py: sub-pools of a stored sample pool are exact draws, and their rewards are the label
stage's own over the kept samples."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "experiments" / "pool_size.py"
sys.path.insert(0, str(_PATH.parent))
_spec = importlib.util.spec_from_file_location("pool_size", _PATH)
pool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pool)


def test_subpool_counts_take_n_of_the_drawn_samples_without_replacement():
    # 6 drawn: "a" three times, "b" once, two copies of the desired output (dropped by the label stage)
    assert pool.subpool_counts([3, 1], 4, 6, 6, "s") == [3, 1]  # all of them: the stored pool
    once = pool.subpool_counts([3, 1], 4, 6, 2, "s")
    assert once == pool.subpool_counts([3, 1], 4, 6, 2, "s") and sum(once) <= 2 and once[0] <= 3 and once[1] <= 1
    draws = np.array([pool.subpool_counts([3, 1], 4, 6, 2, f"s{i}") for i in range(4000)])
    # hypergeometric means: 2 * 3/6 of "a", 2 * 1/6 of "b"; P(no competitor) = C(2,2)/C(6,2) = 1/15
    assert draws[:, 0].mean() == pytest.approx(1.0, abs=0.05)
    assert draws[:, 1].mean() == pytest.approx(1 / 3, abs=0.03)
    assert (draws.sum(axis=1) == 0).mean() == pytest.approx(1 / 15, abs=0.015)
    with pytest.raises(ValueError):
        pool.subpool_counts([3, 1], 4, 6, 7, "s")


def _rows():
    base = {"query_id": "q", "task": "qa", "skip_reason": None, "samples": ["a", "b", "c"],
            "sample_counts": [2, 1, 1], "pool_size": 4, "baseline_target_logprob": -2.0,
            "baseline_sample_logprobs": [-1.0, -3.0, -2.5]}  # fmt: skip
    return [
        base | {"key_id": "k1", "target_logprob": -1.5, "sample_logprobs": [-1.0, -2.0, -1.5]},
        base | {"key_id": "k2", "target_logprob": -0.5, "sample_logprobs": [-1.0, -0.7, -0.2]},
    ]


def test_subpool_rows_recompute_rank_and_reward_over_the_kept_samples_by_hand():
    full = pool.subpool_rows(_rows(), drawn=4, n=4, seed="x", tie_tolerance=1e-6)
    # k1: one sample tied ("c"), two above ("a" x2): rank 1 + 2 + 0.5 = 3.5, reward (4 + 1 - 3.5) / 4
    assert full[0]["rank"] == 3.5 and full[0]["reward"] == pytest.approx(0.375)
    # k2: "c" above only: rank 2, reward 3 / 4
    assert full[1]["rank"] == 2.0 and full[1]["reward"] == pytest.approx(0.75)
    for seed in ("x", "y", "z", "w"):
        cut = pool.subpool_rows(_rows(), drawn=4, n=2, seed=seed, tie_tolerance=1e-6)
        counts = pool.subpool_counts([2, 1, 1], 4, 4, 2, f"{seed}:q:2")
        kept = {s: c for s, c in zip("abc", counts) if c}
        assert all(r["sample_counts"] == list(kept.values()) and r["samples"] == list(kept) for r in cut)
        for r, original in zip(cut, _rows()):
            lp = dict(zip("abc", original["sample_logprobs"]))
            above = sum(c for s, c in kept.items() if lp[s] > original["target_logprob"] + 1e-6)
            tied = sum(c for s, c in kept.items() if abs(lp[s] - original["target_logprob"]) <= 1e-6)
            assert r["pool_size"] == 2 and r["rank"] == 1 + above + 0.5 * tied
            assert r["reward"] == pytest.approx((2 + 1 - r["rank"]) / 2)


@pytest.mark.slow
def test_pool_size_study_on_a_tiny_real_run(tiny_data, tmp_path):
    import json

    from lemb.pipeline.config import LabelConfig, RetrieveConfig, load_config
    from lemb.stages.label import label
    from lemb.stages.retrieve import retrieve

    run = tmp_path / "run"
    common = {"run": str(run), "executor": "local"}
    retrieve(load_config(RetrieveConfig, queries=str(tiny_data["queries"]), corpus=str(tiny_data["corpus"]),
                         top_k=3, **common), progress=False)  # fmt: skip
    label(load_config(LabelConfig, n_samples=6, per_candidate_samples=0, **common), progress=False)
    out = tmp_path / "out"
    argv = ["--run", str(run), "--dev", str(tiny_data["queries"]), "--corpus", str(tiny_data["corpus"]),
            "--out", str(out), "--sizes", "2", "6", "--tolerances", "0", "0.5", "--train-tolerances", "0",
            "--steps", "2", "--batch-size", "2", "--group-size", "3"]  # fmt: skip
    assert pool.main(argv) == 0
    results = json.loads((out / "results-pool-size.json").read_text())
    assert set(results["variants"]) == {"pool2_tol1e-06", "pool6_tol1e-06", "pool6_tol0", "pool6_tol0.5"}
    assert results["drawn"] == 6
    small, full = results["variants"]["pool2_tol1e-06"], results["variants"]["pool6_tol1e-06"]
    loose = results["variants"]["pool6_tol0.5"]
    assert "dev_ndcg@10" not in loose  # not among --train-tolerances: label-side figures only
    assert loose["agreement"]["qa"]["rank"]["tied_pair_share"] >= full["agreement"]["qa"]["rank"]["tied_pair_share"]
    assert small["mean_distinct_samples"] <= 2 < full["mean_distinct_samples"] <= 6
    assert small["est_label_seconds_per_query"] < full["est_label_seconds_per_query"]
    assert all(0 <= v["dev_ndcg@10"] <= 1 for n, v in results["variants"].items() if n != "pool6_tol0.5")
    assert "ndcg@10: pool2_tol1e-06 - pool6_tol1e-06" in results["paired_bootstrap_95"]


def test_a_label_run_with_per_candidate_samples_is_refused(labelled_run):
    with pytest.raises(SystemExit, match="sub-pools need m = 0"):
        pool.label_setup(labelled_run / "label")
