"""Converters of the real shared data: counts from each SOURCES.md, unique ids, resolvable positives, valid records."""

from __future__ import annotations

from pathlib import Path

import pytest

from lemb.data import schemas, sources
from lemb.data.readers import read_keys, read_queries, write_jsonl
from lemb.errors import InputError

# Beside the clone: /work/shared/data here, a copy at the same relative position in CI.
DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="module")
def data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA}")
    return DATA


def check(queries: list[dict], keys: list[dict], tmp_path: Path, task: str) -> None:
    """Schema fields, unique ids, every positive resolvable, and the lemb reader accepts the records."""
    assert queries
    assert all(list(q) == schemas.QUERY.names and q["task"] == task for q in queries)
    assert all(list(k) == schemas.KEY.names and k["task"] == task for k in keys)
    assert len({q["query_id"] for q in queries}) == len(queries)
    key_ids = {k["key_id"] for k in keys}
    assert len(key_ids) == len(keys)
    for q in queries:
        own = {schemas.history_key_id(q["query_id"], i) for i in range(len(q["history"]))}
        assert set(q["positive_ids"]) <= key_ids | own, q["query_id"]
    read_queries(write_jsonl(queries, tmp_path / "queries.jsonl"))
    if keys:
        read_keys(write_jsonl(keys, tmp_path / "keys.jsonl"))


def test_nq_oracle(data, tmp_path):
    queries, keys = sources.knowledge_qa_nq_oracle(data / "knowledge_qa")
    assert (len(queries), len(keys)) == (1615, 2600)  # SOURCES.md: 1,615 questions, 2,600 passages
    assert all(len(q["positive_ids"]) == 1 and q["target"] for q in queries)
    check(queries, keys, tmp_path, "qa")
    assert sources.knowledge_qa_nq_oracle(data / "knowledge_qa" / "nq_oracle", limit=10)[0] == queries[:10]


@pytest.mark.parametrize(
    "dataset, n_queries, n_keys, labels",
    [
        ("sst2", 872, 6911, {"positive", "negative"}),  # 6,920 train lines, 9 repeated
        ("trec", 500, 5381, {"abbreviation", "description", "entity", "person", "location", "number"}),  # 5,452 lines
        ("cb", 56, 250, {"true", "false", "neither"}),
        ("rte", 277, 2488, {"true", "false"}),  # 2,490 lines, 2 repeated
    ],
)
def test_icl(data, tmp_path, dataset, n_queries, n_keys, labels):
    queries, keys = sources.icl(data / "icl", dataset)
    assert (len(queries), len(keys)) == (n_queries, n_keys)
    assert {q["target"] for q in queries} == labels
    assert all(not q["positive_ids"] for q in queries)
    assert all(k["text"].rsplit("\n", 1)[1] in labels for k in keys)
    assert all(k["key_id"].startswith(f"{dataset}-train-") for k in keys)
    assert all(q["query_id"].startswith(f"{dataset}-") for q in queries)
    check(queries, keys, tmp_path, "icl")


def test_icl_refuses_unlabelled_and_leaking_splits(data):
    with pytest.raises(InputError, match="unlabelled"):
        sources.icl(data / "icl", "rte", query_split="test")
    with pytest.raises(ValueError, match="both 'train'"):
        sources.icl(data / "icl", "cb", query_split="train")


def test_msc_one_query_per_episode(data, tmp_path):
    queries, keys = sources.msc(data / "conv_memory" / "msc" / "session_3_test.jsonl")
    assert len(queries) == 501 and keys == []  # SOURCES.md: 501 episodes
    first = queries[0]
    assert first["text"] == "Did you check out that new gym in town?"
    assert first["target"].startswith("Yeah, I did.")
    # Two previous sessions of 12 turns: 12 exchanges, in the toy chat.json's "Speaker 1/Speaker 2" form.
    assert len(first["history"]) == 12
    assert all(h.startswith("Speaker 1: ") and "\nSpeaker 2: " in h for h in first["history"])
    check(queries, keys, tmp_path, "chat")


def test_msc_every_turn(data, tmp_path):
    queries, _ = sources.msc(data / "conv_memory" / "msc" / "session_3_test.jsonl", max_episodes=5, every_turn=True)
    episode = [q for q in queries if q["query_id"].startswith("msc-session_3_test-0-")]
    assert len(episode) == 6  # 12 current-session turns
    # Each exchange of the current session joins the history of the next query.
    assert [len(q["history"]) for q in episode] == list(range(12, 18))
    assert episode[1]["history"][-1] == f"Speaker 1: {episode[0]['text']}\nSpeaker 2: {episode[0]['target']}"
    check(queries, [], tmp_path, "chat")


def test_gutenberg(data, tmp_path):
    queries, keys = sources.gutenberg(data / "long_context_lm", chunk_words=96, history_chunks=32, max_queries=200)
    assert len(queries) == 200 and keys == []
    assert all(2 <= len(q["history"]) <= 32 for q in queries)
    assert all(0 < len(q["target"].split()) <= 48 for q in queries)
    assert queries[0]["history"][0].startswith("Produced by") and "Gutenberg" not in queries[0]["history"][0]
    # Query i's history ends at chunk i-2: chunk i-1 is left out.
    later = queries[50]
    index = int(later["query_id"].rsplit("-", 1)[1])
    assert later["history"][-1] == queries[index - 2 - 3]["text"]  # queries start at chunk 3
    check(queries, keys, tmp_path, "lrlm")


@pytest.mark.parametrize(
    "hub, n_queries, n_keys", [("torchhub", 186, 94), ("tensorflowhub", 688, 80), ("huggingface", 911, 895)]
)
def test_gorilla(data, tmp_path, hub, n_queries, n_keys):
    queries, keys = sources.gorilla_apibench(data / "tool_retrieval" / "gorilla_apibench", hub)
    assert (len(queries), len(keys)) == (n_queries, n_keys)  # every eval item matched; keys unique by api_call
    assert all(len(q["positive_ids"]) == 1 and q["target"] and "###" not in q["text"] for q in queries)
    by_id = {k["key_id"]: k for k in keys}
    exact = sum(q["target"] in by_id[q["positive_ids"][0]]["text"] for q in queries)
    assert exact >= {"huggingface": 834}.get(hub, n_queries)  # SOURCES.md: 834/911 HF items match by api_call
    check(queries, keys, tmp_path, "tool")


def test_toolalpaca(data, tmp_path):
    queries, keys = sources.toolalpaca(data / "tool_retrieval" / "toolalpaca")
    assert len(queries) == 214  # SOURCES.md: 214 instructions
    assert len(keys) == 94  # functions of the 21 APIs, without the OpenAPI "components" entries
    assert sum(not q["positive_ids"] for q in queries) == 5  # AviationAPI functions missing from its docs
    assert all(q["target"] for q in queries)
    check(queries, keys, tmp_path, "tool")


def test_trec_cast(data, tmp_path):
    path = data / "conv_search" / "trec_cast" / "2021" / "2021_manual_evaluation_topics_v1.0.json"
    queries, keys = sources.trec_cast(path)
    assert len(queries) == 239 and len(keys) == 235  # SOURCES.md: 239 turns; 235 distinct passages
    assert all(len(q["positive_ids"]) == 1 and q["target"] is None for q in queries)
    assert queries[0]["history"] == [] and len(queries[1]["history"]) == 2  # utterance + canonical passage
    # the raw utterance comes first in the text, then its context, latest first
    assert queries[1]["text"].split("\n") == [queries[1]["text"].split("\n")[0], *reversed(queries[1]["history"])]
    rewritten, _ = sources.trec_cast(path, utterance="manual", with_responses=False)
    assert rewritten[2]["text"] == "How deadly is lobular carcinoma in situ?" and len(rewritten[2]["history"]) == 2
    check(queries, keys, tmp_path, "convsearch")


def test_converters_are_deterministic(data):
    a = sources.toolalpaca(data / "tool_retrieval" / "toolalpaca")
    assert a == sources.toolalpaca(data / "tool_retrieval" / "toolalpaca")
    path = data / "conv_search" / "trec_cast" / "2021" / "2021_manual_evaluation_topics_v1.0.json"
    assert sources.trec_cast(path) == sources.trec_cast(path)
