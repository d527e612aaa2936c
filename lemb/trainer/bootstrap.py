"""The paired bootstrap: how far a difference between two embedders' metrics on the same queries can be trusted.

The queries are drawn with replacement, the same draw for both arms (paired), `resamples` times; the 95% interval is
the 2.5th and 97.5th percentiles of the difference over the draws (the percentile bootstrap, Efron and Tibshirani,
"An Introduction to the Bootstrap", 1993, ch. 13). The statistic is the mean of per-query values unless given:
perplexity, pooled over every target token, passes its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

RESAMPLES = 2000
# a metrics row's comparison with the reference embedder: {"against": name, "metrics": {metric: paired_bootstrap()}}
INTERVALS = "paired_bootstrap_95"
DRAWN_VALUES = 1 << 22  # query indices drawn at once (32 MiB): memory stays bounded whatever the number of queries


def paired_bootstrap(
    a: Sequence,
    b: Sequence,
    resamples: int = RESAMPLES,
    seed: int = 0,
    statistic: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, float]:
    """{"diff": statistic(a) - statistic(b), "lo", "hi": its 95% interval, "n": the number of paired queries}.

    | input | shape | meaning |
    |---|---|---|
    | a, b | (n,) or (n, k) | per-query values of the two arms, row i of both for the same query |
    | statistic | (draws, n, ...) -> (draws,) | the metric of each draw of queries; default: the mean |

    With the mean, each draw averages the per-query differences; `seed` fixes the draws, which are the same for any
    split of them into blocks."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired values must have one shape, got {a.shape} and {b.shape}")
    n = len(a)
    if n == 0:
        return {"diff": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    if statistic is None:
        diff = a - b

        def draw(rows: np.ndarray) -> np.ndarray:
            return diff[rows].mean(axis=1)
    else:

        def draw(rows: np.ndarray) -> np.ndarray:
            return statistic(a[rows]) - statistic(b[rows])

    rng = np.random.default_rng(seed)
    block = max(1, DRAWN_VALUES // n)
    draws = [draw(rng.integers(0, n, size=(min(block, resamples - start), n))) for start in range(0, resamples, block)]
    lo, hi = np.percentile(np.concatenate(draws), [2.5, 97.5])
    whole = draw(np.arange(n)[None, :])[0]  # every query once: the observed difference
    return {"diff": float(whole), "lo": float(lo), "hi": float(hi), "n": n}


def compare(
    results: dict[str, dict[str, dict[str, Any]]],
    per_query: dict[str, dict[str, dict[str, Any]]],
    queries: list[dict],
    reference: str,
    statistics: dict[str, Callable[[np.ndarray], np.ndarray]] | None = None,
) -> None:
    """Add to each metrics row ("all" or a task) of every embedder but `reference` the paired bootstrap of each of
    its metrics against `reference`'s, over the row's queries that both have a value for (key `INTERVALS`).

    `results`: {embedder: {row: {metric: value}}}; `per_query`: {embedder: {metric: {query_id: value}}};
    `queries`: the query records (their task picks the row); `statistics`: {metric: statistic} where a metric is
    not the mean of its per-query values."""
    ids: dict[str, list[str]] = {"all": [q["query_id"] for q in queries]}
    for q in queries:
        ids.setdefault(q["task"], []).append(q["query_id"])
    for name, rows in results.items():
        if name == reference:
            continue
        for row, metrics in rows.items():
            found = {}
            for metric in metrics:
                mine, theirs = per_query[name].get(metric, {}), per_query[reference].get(metric, {})
                paired = [i for i in ids.get(row, []) if i in mine and i in theirs]
                if paired:
                    found[metric] = paired_bootstrap([mine[i] for i in paired], [theirs[i] for i in paired],
                                                     statistic=(statistics or {}).get(metric))  # fmt: skip
            metrics[INTERVALS] = {"against": reference, "metrics": found}
