"""The id-hash split of `lemb convert --dev-fraction` (and of experiments/replicate.py)."""

import hashlib

from lemb.data.split import SPLIT_SALT, hash_fraction, split_by_hash


def test_hash_fraction_is_the_first_32_bits_of_the_salted_sha256():
    digest = hashlib.sha256(f"{SPLIT_SALT}:nq-7".encode()).digest()
    assert hash_fraction("nq-7") == int.from_bytes(digest[:4], "big") / 2**32
    assert hash_fraction("nq-1") != hash_fraction("nq-1", salt="other")


def test_split_is_stable_disjoint_and_prefix_closed():
    ids = [f"nq-{i}" for i in range(2000)]
    train, dev = split_by_hash(ids, 0.2)
    assert set(train) | set(dev) == set(ids) and not set(train) & set(dev)
    assert 0.17 < len(dev) / len(ids) < 0.23
    # input order does not matter; a larger pool only adds ids, never moves one across the split
    assert split_by_hash(reversed(ids), 0.2) == (train, dev)
    more_train, more_dev = split_by_hash(ids + [f"nq-{i}" for i in range(2000, 2500)], 0.2)
    assert set(train) <= set(more_train) and set(dev) <= set(more_dev)
    assert all(hash_fraction(i) < 0.2 for i in dev) and all(hash_fraction(i) >= 0.2 for i in train)
    # each side is ordered by the hash
    assert [hash_fraction(i) for i in dev] == sorted(hash_fraction(i) for i in dev)
