"""FlagEmbedding llm_embedder format: the official toy files read, validate and round-trip; the writer's rules."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from lemb.data import schemas
from lemb.data.flagembedding import fe_key_id, read_flagembedding, write_flagembedding
from lemb.data.readers import read_keys, read_queries, write_jsonl
from lemb.errors import InputError

TOY = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "llm_embedder_toy"

# (task, keys after dedup by text, candidate pairs, pairs with a teacher score)
TOY_COUNTS = [
    ("qa", 808, 808, 808),  # 1 pos + 100 neg per query, all scored
    ("icl", 160, 160, 160),  # 3 pos + 17 neg
    ("chat", 0, 74, 74),  # candidates are the history items
    ("lrlm", 0, 512, 512),  # 64 earlier chunks each, listed as neg
    ("tool", 210, 223, 0),  # no teacher_scores; some tools shared between queries
    ("convsearch", 201, 239, 0),  # 1 pos + 32 neg, minus repeated passages
]


@pytest.fixture(scope="module")
def toy() -> Path:
    if not TOY.is_dir():
        pytest.skip(f"toy files not found at {TOY}")
    return TOY


@pytest.mark.parametrize("task, n_keys, n_pairs, n_scored", TOY_COUNTS)
def test_toy_files_read_and_validate(toy, tmp_path, task, n_keys, n_pairs, n_scored):
    queries, keys, scores = read_flagembedding(toy / f"{task}.json")
    assert len(queries) == 8 and all(q["task"] == task for q in queries)  # SOURCES.md: 8 lines per task
    assert (len(keys), len(scores), sum(v is not None for v in scores.values())) == (n_keys, n_pairs, n_scored)
    assert len({q["query_id"] for q in queries}) == 8
    key_ids = {k["key_id"] for k in keys}
    assert all(k["key_id"] == fe_key_id(k["text"]) for k in keys)
    for q in queries:
        own = {schemas.history_key_id(q["query_id"], i) for i in range(len(q["history"]))}
        assert set(q["positive_ids"]) <= key_ids | own
        assert {kid for qid, kid in scores if qid == q["query_id"]} <= key_ids | own
    read_queries(write_jsonl(queries, tmp_path / "q.jsonl"))
    if keys:
        read_keys(write_jsonl(keys, tmp_path / "k.jsonl"))


@pytest.mark.parametrize("task", [t[0] for t in TOY_COUNTS])
def test_toy_files_round_trip(toy, tmp_path, task):
    queries, keys, scores = read_flagembedding(toy / f"{task}.json")
    write_flagembedding(queries, keys, scores, tmp_path / f"{task}.json")
    queries2, keys2, scores2 = read_flagembedding(tmp_path / f"{task}.json")
    assert queries2 == queries
    assert {k["key_id"]: k for k in keys2} == {k["key_id"]: k for k in keys}
    assert scores2 == scores


def test_toy_details(toy):
    qa, _, qa_scores = read_flagembedding(toy / "qa.json")
    first = json.loads((toy / "qa.json").read_text().splitlines()[0])
    assert qa[0]["query_id"] == f"qa-{first['query_id']}" and qa[0]["target"] == first["answers"][0]
    assert qa_scores[(qa[0]["query_id"], fe_key_id(first["pos"][0]))] == first["teacher_scores"][0]
    chat, _, chat_scores = read_flagembedding(toy / "chat.json")
    line = json.loads((toy / "chat.json").read_text().splitlines()[1])
    assert chat[1]["history"] == line["history"] and chat[1]["positive_ids"] == []
    assert [chat_scores[("chat-1", schemas.history_key_id("chat-1", i))] for i in range(8)] == line["teacher_scores"]
    lrlm, _, _ = read_flagembedding(toy / "lrlm.json")
    assert len(lrlm[0]["history"]) == 64 and lrlm[0]["target"]
    tool, _, _ = read_flagembedding(toy / "tool.json", task="tool")
    assert tool[0]["query_id"] == "tool-49635" and tool[0]["target"] is None and len(tool[0]["positive_ids"]) == 4


def test_task_argument_fills_and_checks(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"query": "q?", "pos": ["a"], "neg": ["b"]}) + "\n")
    queries, keys, _ = read_flagembedding(path, task="qa")
    assert queries[0]["query_id"] == "qa-0" and len(keys) == 2
    with pytest.raises(InputError, match="missing; pass task="):
        read_flagembedding(path)
    path.write_text(json.dumps({"query": "q?", "pos": ["a"], "task": "tool"}) + "\n")
    with pytest.raises(InputError, match="'tool' in a file read as 'qa'"):
        read_flagembedding(path, task="qa")
    path.write_text(json.dumps({"query": "q?", "pos": ["a"], "task": "qa", "teacher_scores": [1.0, 2.0]}) + "\n")
    with pytest.raises(InputError, match="2 scores for 1 candidates"):
        read_flagembedding(path)


KEYS = [{"key_id": k, "task": "icl", "text": f"demo {k}", "title": None} for k in ("a", "b", "c", "d")]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_writer_pos_from_rewards_or_known_positives(tmp_path):
    queries = [
        {"query_id": "q1", "task": "icl", "text": "x", "target": "yes", "positive_ids": [], "history": []},
        {"query_id": "q2", "task": "icl", "text": "y", "target": None, "positive_ids": ["c"], "history": []},
    ]
    rewards = {("q1", "a"): 0.25, ("q1", "b"): 0.75, ("q1", "c"): 0.75, ("q2", "a"): 0.9, ("q2", "c"): 0.1}
    out = _lines(write_flagembedding(queries, KEYS, rewards, tmp_path / "out.json"))
    # No known positive: the highest rewards (ties kept) are pos; teacher_scores follow pos + neg.
    assert out[0]["pos"] == ["demo b", "demo c"] and out[0]["neg"] == ["demo a"]
    assert out[0]["teacher_scores"] == [0.75, 0.75, 0.25] and out[0]["answers"] == ["yes"]
    # A known positive stays pos even when another candidate scores higher.
    assert out[1]["pos"] == ["demo c"] and out[1]["neg"] == ["demo a"] and out[1]["teacher_scores"] == [0.1, 0.9]
    assert "answers" not in out[1]


def test_writer_takes_reward_rows_and_tables(tmp_path):
    queries = [{"query_id": "q1", "task": "icl", "text": "x", "target": "yes", "positive_ids": [], "history": []}]
    rows = [{"query_id": "q1", "key_id": "a", "reward": 0.5}, {"query_id": "q1", "key_id": "b", "reward": 1.0}]
    a = _lines(write_flagembedding(queries, KEYS, rows, tmp_path / "a.json"))
    b = _lines(
        write_flagembedding(
            pa.Table.from_pylist(queries), pa.Table.from_pylist(KEYS), pa.Table.from_pylist(rows), tmp_path / "b.json"
        )
    )
    assert a == b and a[0]["pos"] == ["demo b"] and a[0]["teacher_scores"] == [1.0, 0.5]


def test_writer_refuses_partial_rewards_and_unknown_keys(tmp_path):
    queries = [{"query_id": "q1", "task": "icl", "text": "x", "target": "yes", "positive_ids": [], "history": []}]
    with pytest.raises(ValueError, match="1 of 2 candidates have no reward"):
        write_flagembedding(queries, KEYS, {("q1", "a"): 0.5, ("q1", "b"): None}, tmp_path / "x.json")
    with pytest.raises(ValueError, match="'zz' is not among the keys"):
        write_flagembedding(queries, KEYS, {("q1", "zz"): 0.5}, tmp_path / "x.json")


def test_writer_chat_candidate_subset_round_trips(tmp_path):
    hi, dog = "Speaker 1: hi\nSpeaker 2: hello", "Speaker 1: I have a dog\nSpeaker 2: nice"
    history = [hi, dog, hi]
    queries = [
        {
            "query_id": "c1",
            "task": "chat",
            "text": "What pet do I have?",
            "target": "A dog.",
            "positive_ids": [],
            "history": history,
            "relevance": None,
        }
    ]
    # Retrieval kept two of the three history items (one of them a repeated text).
    rewards = {("c1", schemas.history_key_id("c1", 2)): 0.2, ("c1", schemas.history_key_id("c1", 1)): 0.9}
    path = write_flagembedding(queries, [], rewards, tmp_path / "chat.json")
    line = _lines(path)[0]
    assert line["history"] == history and line["pos"] == [] and line["teacher_scores"] == [0.2, 0.9]
    queries2, keys2, scores2 = read_flagembedding(path)
    assert queries2 == queries and keys2 == [] and scores2 == rewards
    # The whole history, scored in order, is written as the toy chat.json writes it.
    full = {(("c1", schemas.history_key_id("c1", i))): float(i) for i in range(3)}
    line = _lines(write_flagembedding(queries, [], full, tmp_path / "full.json"))[0]
    assert set(line) == {"query_id", "task", "query", "answers", "history", "teacher_scores"}
