"""`lemb inspect RUN/label --agreement` against hand-computed figures and on a real labelled run."""

import json
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from lemb.data import schemas
from lemb.pipeline.shards import shard_path, write_shard
from lemb.stages.agreement import agreement, agreement_table


def _row(query_id, task, key_id, rank, target_lp, positives, baseline_lp=-2.5, samples=(-1.0, -2.0), skip=None):
    counted = skip is None
    return {name: None for name in schemas.REWARD.names} | {
        "query_id": query_id, "task": task, "key_id": key_id, "retrieval_rank": rank,
        "target_logprob": target_lp if counted else None, "target_tokens": 1,
        "samples": ["a", "b"], "sample_counts": [1, 1], "sample_logprobs": list(samples) if counted else None,
        "baseline_target_logprob": baseline_lp if counted else None,
        "baseline_sample_logprobs": list(samples) if counted else None,
        "pool_size": 2 if counted else 0, "skip_reason": skip, "query_text": "q", "target": "t",
        "positive_ids": positives, "key_text": key_id,
    }  # fmt: skip


HAND = [
    # qa A: the positive k1 is retrieved second; its target log-prob beats both samples (rank 1, reward 1)
    _row("A", "qa", "k0", 1, -3.0, ["k1"]),
    _row("A", "qa", "k1", 2, -0.5, ["k1"]),
    _row("A", "qa", "k2", 3, -1.5, ["k1"]),
    # qa B: both candidates give the target the same log-prob: every reward ties them
    _row("B", "qa", "k4", 1, -3.0, ["k5"]),
    _row("B", "qa", "k5", 2, -3.0, ["k5"]),
    # tool D: three tied candidates, two of them positive
    _row("D", "tool", "t1", 1, -3.0, ["t2", "t3"]),
    _row("D", "tool", "t2", 2, -3.0, ["t2", "t3"]),
    _row("D", "tool", "t3", 3, -3.0, ["t2", "t3"]),
    # chat C: no positives; E: the label stage found no competing sample
    _row("C", "chat", "c1", 1, -0.5, []),
    _row("C", "chat", "c2", 2, -1.5, []),
    _row("E", "chat", "c1", 1, None, [], skip="no_competing_samples"),
    _row("E", "chat", "c3", 2, None, [], skip="no_competing_samples"),
]


@pytest.fixture()
def label_copy(labelled_run, tmp_path):
    label = tmp_path / "label"
    shutil.copytree(labelled_run / "label", label)
    return label


def _rewrite(label, index, table):
    meta = {k.decode(): v.decode() for k, v in pq.read_schema(shard_path(label, index)).metadata.items()}
    write_shard(label, index, table, schemas.REWARD, meta, {"rows_out": table.num_rows})


def test_agreement_matches_hand_computed_figures(label_copy):
    _rewrite(label_copy, 0, pa.Table.from_pylist(HAND, schema=schemas.REWARD))
    _rewrite(label_copy, 1, schemas.REWARD.empty_table())
    tasks = agreement(label_copy)["tasks"]
    qa, tool, chat = tasks["qa"], tasks["tool"], tasks["chat"]
    # retrieval: the positive is second in both qa queries
    assert qa["retrieval"]["gold_first"] == 0.0 and qa["retrieval"]["no_signal"] == 0
    assert qa["retrieval"]["mrr"] == 0.5 and qa["retrieval"]["tied_pair_share"] == 0.0
    # rank: A puts k1 first (1, 1); B ties its two candidates: gold first 1/2, expected RR (1 + 1/2) / 2
    assert qa["rank"]["gold_first"] == pytest.approx((1 + 0.5) / 2)
    assert qa["rank"]["mrr"] == pytest.approx((1 + 0.75) / 2)
    assert qa["rank"]["tied_pairs"] == 1 and qa["rank"]["pairs"] == 4 and qa["rank"]["no_signal"] == 1
    # likelihood and improvement order A the same way; B's log-probs are equal
    for kind in ("likelihood", "improvement"):
        assert qa[kind]["gold_first"] == pytest.approx(0.75) and qa[kind]["mrr"] == pytest.approx(0.875)
    # two positives among three tied candidates: first place 2/3; RR 1 w.p. 2/3, 1/2 w.p. 1/3
    assert tool["rank"]["gold_first"] == pytest.approx(2 / 3)
    assert tool["rank"]["mrr"] == pytest.approx(2 / 3 + 1 / 6)
    assert tool["rank"]["tied_pair_share"] == 1.0 and tool["rank"]["no_signal"] == 1
    assert tool["retrieval"]["gold_first"] == 0.0 and tool["retrieval"]["mrr"] == 0.5
    # no positives: gold figures undefined, ties and signal still counted (E has none)
    assert chat["rank"]["with_positive"] == 0 and chat["rank"]["gold_first"] is None and chat["rank"]["mrr"] is None
    assert chat["rank"]["no_signal"] == 1 and chat["rank"]["tied_pairs"] == 1 and chat["retrieval"]["no_signal"] == 0
    assert "chat      (no query of this task has a positive" in agreement_table(agreement(label_copy))


def test_agreement_on_a_real_run_through_the_cli(label_copy, tmp_path):
    # the real run, with the chat task's positives removed (a task without gold)
    shards = sorted(label_copy.glob("part-*.parquet"))
    for index, path in enumerate(shards):
        table = pq.read_table(path)
        chat = pc.equal(table["task"], "chat")
        positives = pc.if_else(chat, pa.scalar([], pa.list_(pa.string())), table["positive_ids"])
        _rewrite(label_copy, index, table.set_column(table.schema.get_field_index("positive_ids"), "positive_ids",
                                                      positives))  # fmt: skip
    out = tmp_path / "agreement.json"
    cmd = [sys.executable, "-m", "lemb.cli", "inspect", str(label_copy), "--agreement", "--json", str(out)]
    shown = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    report = json.loads(out.read_text())
    assert set(report["tasks"]) == {"qa", "chat", "tool"}
    assert "chat      (no query of this task has a positive" in shown
    rows = pa.concat_tables([pq.read_table(p) for p in shards]).to_pylist()
    for task, by_order in report["tasks"].items():
        task_rows = [r for r in rows if r["task"] == task]
        queries = {r["query_id"] for r in task_rows}
        assert by_order["rank"]["queries"] == len(queries)
        if task == "chat":
            assert by_order["rank"]["gold_first"] is None
            continue
        # the retrieval order's gold first is the share of queries whose top-ranked candidate is a positive
        top = [r for r in task_rows if r["retrieval_rank"] == 1]
        assert by_order["retrieval"]["gold_first"] == sum(r["key_id"] in r["positive_ids"] for r in top) / len(top)
        # gold first under the rank reward, from the reward column the label stage stored (ties split)
        credit = []
        for q in queries:
            q_rows = [r for r in task_rows if r["query_id"] == q]
            if not set(q_rows[0]["positive_ids"]) & {r["key_id"] for r in q_rows}:
                continue
            values = [r["reward"] if r["reward"] is not None else 0.0 for r in q_rows]
            tied = [r for r, v in zip(q_rows, values) if abs(v - max(values)) <= 1e-9]
            credit.append(sum(r["key_id"] in r["positive_ids"] for r in tied) / len(tied))
        assert by_order["rank"]["gold_first"] == pytest.approx(sum(credit) / len(credit))
        assert by_order["rank"]["with_positive"] == len(credit)
