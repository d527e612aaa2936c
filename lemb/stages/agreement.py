"""`lemb inspect RUN/label --agreement`: how well each reward orders a query's candidates the way its known
positives do, recomputed from the label shards (no LLM), beside the base retrieval order as the reference.

Per task and per order (retrieval, then each reward kind), over the queries of the task:

- gold first: the share of queries with a positive among their candidates whose top candidate is a positive;
  candidates tied at the top split the credit (g positives among k tied count g / k, the chance that a random
  tie-break puts a positive first);
- MRR: the reciprocal rank of the first positive, its expectation over random tie-breaks;
- tied pairs: the share of candidate pairs of a query with equal values (rank and improvement rewards take equal
  values on purpose; log-likelihoods tie within the label stage's tie tolerance);
- no signal: queries whose candidates all tie (every candidate has the same value, or the label stage found no
  competing sample), so that a loss learns nothing from them.

A task whose queries have no positives is reported as such: agreement with gold is not defined there, and the
ties and no-signal counts still are.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lemb.data.schemas import by_query
from lemb.files import write_json
from lemb.pipeline.shards import stage_files
from lemb.stages.label import labelled_tie_tolerance
from lemb.stages.reward import row_reward
from lemb.vocabulary import REWARDS

ORDERS = ("retrieval", *REWARDS)
COLUMNS = (
    "query_id", "task", "key_id", "retrieval_rank", "positive_ids", "skip_reason", "target_logprob",
    "sample_logprobs", "sample_counts", "baseline_target_logprob", "baseline_sample_logprobs",
)  # fmt: skip
EXACT = 1e-9  # rank and improvement rewards are multiples of 1 / (2N): equal or at least that far apart


@dataclass
class Agreement:
    queries: int = 0
    with_positive: int = 0
    gold_first: float = 0.0  # sums while counting, means once finished
    mrr: float = 0.0
    pairs: int = 0
    tied_pairs: int = 0
    no_signal: int = 0

    def add(self, values: list[float], positive: list[bool], tol: float) -> None:
        self.queries += 1
        ties = [[abs(a - b) <= tol for b in values] for a in values]
        n = len(values)
        tied = sum(ties[i][j] for i in range(n) for j in range(i + 1, n))
        self.pairs += n * (n - 1) // 2
        self.tied_pairs += tied
        if tied == n * (n - 1) // 2:
            self.no_signal += 1
        if any(positive):
            self.with_positive += 1
            first, rr = _expected_first_and_rr(values, positive, ties)
            self.gold_first += first
            self.mrr += rr

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        m = self.with_positive
        out["gold_first"] = self.gold_first / m if m else None
        out["mrr"] = self.mrr / m if m else None
        out["tied_pair_share"] = self.tied_pairs / self.pairs if self.pairs else None
        return out


def _expected_first_and_rr(values: list[float], positive: list[bool], ties: list[list[bool]]) -> tuple[float, float]:
    """Under a random order of tied candidates: the chance that a positive comes first, and the expected
    reciprocal rank of the first positive. `ties[i][j]`: candidates i and j tie."""
    order = sorted(range(len(values)), key=lambda i: -values[i])
    groups: list[list[int]] = []
    for i in order:  # consecutive candidates tied with their group's first one
        if groups and ties[groups[-1][0]][i]:
            groups[-1].append(i)
        else:
            groups.append([i])
    above = 0
    for g_index, group in enumerate(groups):
        k, g = len(group), sum(positive[i] for i in group)
        if g:
            # the first positive sits at place j of the group with probability C(k - j, g - 1) / C(k, g)
            rr = sum(math.comb(k - j, g - 1) / (above + j) for j in range(1, k - g + 2)) / math.comb(k, g)
            return (g / k if g_index == 0 else 0.0), rr
        above += k
    return 0.0, 0.0


def agreement(label_dir: Path) -> dict[str, Any]:
    """Agreement of each order with the positives, per task, read from a finished label stage shard by shard."""
    shards = ((path, pq.read_table(path, columns=list(COLUMNS))) for path in stage_files(label_dir))
    return {"label": str(label_dir), **tally_agreement(shards)}  # stage_files refuses a missing or unfinished stage


def tally_agreement(shards: Iterable[tuple[Any, pa.Table]], tie_tolerance: float | None = None) -> dict[str, Any]:
    """`agreement` over (source, reward table) pairs; `tie_tolerance`: the shards' own (labelled with) if None."""
    tallies: dict[str, dict[str, Agreement]] = defaultdict(lambda: {o: Agreement() for o in ORDERS})
    tolerance = tie_tolerance
    for source, shard in shards:
        meta = shard.schema.metadata or {}
        tol = labelled_tie_tolerance(meta, source) if tie_tolerance is None else tie_tolerance
        tolerance = tol if tolerance is None else tolerance
        for rows in by_query(shard.select(list(COLUMNS)).to_pylist()):
            positives = set(rows[0]["positive_ids"] or [])
            positive = [r["key_id"] in positives for r in rows]
            tally = tallies[rows[0]["task"]]
            tally["retrieval"].add([-float(r["retrieval_rank"]) for r in rows], positive, EXACT)
            for kind in REWARDS:
                rewards = [row_reward(kind, r, tol, source) for r in rows]
                values = [0.0] * len(rows) if None in rewards else [float(v) for v in rewards]
                tally[kind].add(values, positive, tol if kind == "likelihood" else EXACT)
    tasks = {task: {o: a.summary() for o, a in by_order.items()} for task, by_order in sorted(tallies.items())}
    return {"tie_tolerance": tolerance, "tasks": tasks}


def agreement_table(report: dict[str, Any]) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    head = f"{'task':<10}{'order':<13}{'queries':>8}{'w/ gold':>9}{'gold first':>12}{'MRR':>8}{'tied pairs':>12}"
    lines = [f"{report['label']}: agreement of each order with the known positives", head + f"{'no signal':>11}"]
    for task, by_order in report["tasks"].items():
        for order, a in by_order.items():
            lines.append(
                f"{task:<10}{order:<13}{a['queries']:>8}{a['with_positive']:>9}{pct(a['gold_first']):>12}"
                f"{pct(a['mrr']):>8}{pct(a['tied_pair_share']):>12}{a['no_signal']:>11}"
            )
        if not by_order["retrieval"]["with_positive"]:
            lines.append(f"{task:<10}(no query of this task has a positive: agreement with gold is not defined)")
    return "\n".join(lines)


def agreement_report(label_dir: Path, json_out: Path | None = None) -> str:
    """`lemb inspect LABEL --agreement`: the table, and the report as JSON where asked."""
    report = agreement(label_dir)
    if json_out:
        write_json(json_out, report)
    return agreement_table(report)
