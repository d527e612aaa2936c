"""Retrieval metrics score the ranked list in the order the LLM sees it, ties included, as pytrec_eval does."""

import math

import pytest

from lemb.trainer.evaluate import retrieval_metrics

# q1: k1 and k2 tie on score, k1 listed first (the order retrieve gave them, and the LLM's prompt order);
# q2: its two keys tie, the positive second, a second positive never retrieved; q3 retrieves nothing
RANKING = {
    "q1": [("k1", 0.5), ("k2", 0.5), ("k3", 0.1)],
    "q2": [("k5", 0.9), ("k4", 0.9)],
    "q3": [],
}
QUERIES = [
    {"query_id": "q1", "positive_ids": ["k2"]},
    {"query_id": "q2", "positive_ids": ["k4", "k9"]},
    {"query_id": "q3", "positive_ids": ["k7"]},
]


def test_metrics_follow_the_list_order_under_ties_by_hand():
    m = retrieval_metrics(RANKING, QUERIES, ("recall@1", "recall@5", "mrr@10", "ndcg@10"))
    gain = 1 / math.log2(3)  # a positive in second place
    assert m["recall@1"] == 0.0
    assert m["recall@5"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert m["mrr@10"] == pytest.approx((0.5 + 0.5 + 0) / 3)  # R@1 = 0 and RR = 1/2 agree on q1
    assert m["ndcg@10"] == pytest.approx((gain + gain / (1 + gain) + 0) / 3)


# the same lists judged with grades: q1's tied pair graded 3 and 1, q2 with a grade-0 judgment that counts as not
# relevant, q4 judged only with grade 0 (no positive: not scored)
GRADED = [
    {"query_id": "q1", "positive_ids": ["k1", "k2"], "relevance": {"k1": 1, "k2": 3, "k3": 0}},
    {"query_id": "q2", "positive_ids": ["k4", "k9"], "relevance": {"k4": 2, "k9": 1, "k5": 0}},
    {"query_id": "q3", "positive_ids": ["k7"], "relevance": {"k7": 2}},
    {"query_id": "q4", "positive_ids": [], "relevance": {"k1": 0}},
]


@pytest.mark.parametrize("queries", [QUERIES, GRADED], ids=["binary", "graded"])
def test_metrics_equal_pytrec_eval_on_the_same_list(queries):
    import pytrec_eval

    qrels = {q["query_id"]: q.get("relevance") or {p: 1 for p in q["positive_ids"]} for q in queries}
    qrels = {q: judged for q, judged in qrels.items() if any(g > 0 for g in judged.values())}
    # the list order as strictly decreasing scores; a query that retrieved nothing is absent from the run
    run = {q: {k: float(len(found) - i) for i, (k, _) in enumerate(found)} for q, found in RANKING.items() if found}
    measures = {"recall.1", "recall.5", "recip_rank", "ndcg_cut.3", "ndcg_cut.10"}
    scored = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    want = {
        name: sum(scored.get(q, {}).get(key, 0.0) for q in qrels) / len(qrels)  # absent queries count 0
        for name, key in (("recall@1", "recall_1"), ("recall@5", "recall_5"), ("mrr@10", "recip_rank"),
                          ("ndcg@3", "ndcg_cut_3"), ("ndcg@10", "ndcg_cut_10"))
    }  # fmt: skip
    got = retrieval_metrics(RANKING, queries, tuple(want))
    for name in want:
        assert got[name] == pytest.approx(want[name], abs=1e-12), name


def test_graded_ndcg_by_hand():
    # q1: k1 (grade 1) first, k2 (grade 3) second; ideal order 3, 1; the gain is the grade (trec_eval's nDCG)
    m = retrieval_metrics({"q1": RANKING["q1"]}, GRADED[:1], ("ndcg@10", "recall@1", "mrr@10"))
    assert m["ndcg@10"] == pytest.approx((1 + 3 / math.log2(3)) / (3 + 1 / math.log2(3)))
    assert m["recall@1"] == 0.5 and m["mrr@10"] == 1.0
