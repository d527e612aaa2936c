"""A stable split of records into train and held-out by a hash of their ids (`lemb convert --dev-fraction`).

An id goes to the held-out side when the first 32 bits of sha256("<salt>:<id>"), read as a fraction of 2**32, fall
below the fraction: a record's side depends on its id alone, so adding or removing other records never moves it,
and the same data split twice gives the same two sets on any machine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

# the salt of the splits in RESULTS.md (experiments/replicate.py), so that `lemb convert` reproduces them
SPLIT_SALT = "lemb-replicate"


def hash_fraction(item_id: str, salt: str = SPLIT_SALT) -> float:
    """A stable number in [0, 1) for an id: the first 32 bits of sha256("<salt>:<id>")."""
    return int(hashlib.sha256(f"{salt}:{item_id}".encode()).hexdigest()[:8], 16) / 2**32


def split_by_hash(ids: Iterable[str], dev_fraction: float, salt: str = SPLIT_SALT) -> tuple[list[str], list[str]]:
    """(train ids, dev ids), each ordered by hash: an id is dev when hash_fraction(id) < dev_fraction."""
    ordered = sorted(ids, key=lambda i: (hash_fraction(i, salt), i))
    dev = [i for i in ordered if hash_fraction(i, salt) < dev_fraction]
    dev_set = set(dev)
    return [i for i in ordered if i not in dev_set], dev
