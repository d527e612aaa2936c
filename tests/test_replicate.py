"""Pure logic of experiments/replicate.py: the id-hash split, reward-gold agreement, answer aliases, bootstrap."""

import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "experiments" / "replicate.py"
_spec = importlib.util.spec_from_file_location("replicate", _PATH)
rep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rep)


def test_split_is_stable_disjoint_and_prefix_closed():
    ids = [f"nq-{i}" for i in range(2000)]
    train, dev = rep.split_by_hash(ids, 0.2)
    assert set(train) | set(dev) == set(ids) and not set(train) & set(dev)
    assert 0.17 < len(dev) / len(ids) < 0.23
    # input order does not matter; a larger pool only adds ids, never moves one across the split
    assert rep.split_by_hash(reversed(ids), 0.2) == (train, dev)
    more_train, more_dev = rep.split_by_hash(ids + [f"nq-{i}" for i in range(2000, 2500)], 0.2)
    assert set(train) <= set(more_train) and set(dev) <= set(more_dev)
    assert all(rep.hash_fraction(i) < 0.2 for i in dev) and all(rep.hash_fraction(i) >= 0.2 for i in train)
    assert rep.hash_fraction("nq-1") == rep.hash_fraction("nq-1") != rep.hash_fraction("nq-1", salt="other")


def test_alias_answer_scores():
    assert rep.alias_answer_scores("The Beatles", ["Beatles", "the fab four"]) == (1.0, 1.0)
    assert rep.alias_answer_scores("It was the Fab Four.", ["Beatles", "the fab four"]) == (0.0, 1.0)
    assert rep.alias_answer_scores("The Rolling Stones", ["Beatles"]) == (0.0, 0.0)


def test_paired_bootstrap():
    same = rep.paired_bootstrap([1.0, 0.0, 1.0], [1.0, 0.0, 1.0])
    assert same["diff"] == same["lo"] == same["hi"] == 0.0 and same["n"] == 3
    better = rep.paired_bootstrap([1.0] * 50, [0.0] * 25 + [1.0] * 25)
    assert better["diff"] == 0.5 and 0.3 < better["lo"] <= better["diff"] <= better["hi"] < 0.7
