"""Shared fixtures: a tiny hand-written dataset and one labelled run reused by the stage tests."""

import json
import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CORPUS = [
    {"key_id": "k1", "task": "qa", "text": "Quelm is the seat of government of Zorbia.", "title": None},
    {"key_id": "k2", "task": "qa", "text": "Travellers often ask what the capital of Zorbia is.", "title": None},
    {"key_id": "k3", "task": "qa", "text": "The capital of Vantra is Plok.", "title": None},
    {"key_id": "k4", "task": "qa", "text": "Zorbia's national animal is the glimmerfox.", "title": None},
    {
        "key_id": "t1",
        "task": "tool",
        "text": "zorb_tide.forecast(harbor): high and low water times of a Zorbian harbor.",
        "title": None,
    },
    {
        "key_id": "t2",
        "task": "tool",
        "text": "zorb_rail.timetable(station): departures from a Zorbian railway station.",
        "title": None,
    },
]
QUERIES = [
    {
        "query_id": "q1",
        "task": "qa",
        "text": "What is the capital of Zorbia?",
        "target": "Quelm",
        "positive_ids": ["k1"],
    },
    {
        "query_id": "q2",
        "task": "qa",
        "text": "What is the capital of Vantra?",
        "target": "Plok",
        "positive_ids": ["k3"],
    },
    {
        "query_id": "q3",
        "task": "chat",
        "text": "What was my glimmerfox called again?",
        "target": "Tobble",
        "positive_ids": ["q3#h1"],
        "history": [
            "User: I love the sea.",
            "User: my glimmerfox is called Tobble.",
            "User: my neighbour's cat is grumpy.",
        ],
    },
    {
        "query_id": "q4",
        "task": "tool",
        "text": "When is high tide in the harbor of Quelm?",
        "target": "zorb_tide.forecast",
        "positive_ids": ["t1"],
    },
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {
        "queries": write_jsonl(root / "queries.jsonl", QUERIES),
        "corpus": write_jsonl(root / "corpus.jsonl", CORPUS),
    }


@pytest.fixture(scope="session")
def labelled_run(tiny_data, tmp_path_factory):
    """retrieve + label on the tiny data with the real default models (in-process executor)."""
    from lemb.pipeline.config import LabelConfig, RetrieveConfig, load_config
    from lemb.stages.label import label
    from lemb.stages.retrieve import retrieve

    run = tmp_path_factory.mktemp("run")
    common = {"run": str(run), "executor": "local"}
    retrieve(
        load_config(
            RetrieveConfig,
            queries=str(tiny_data["queries"]),
            corpus=str(tiny_data["corpus"]),
            top_k=2,
            shards=2,
            **common,
        ),
        progress=False,
    )
    label(load_config(LabelConfig, n_samples=3, per_candidate_samples=1, **common), progress=False)
    return run


def sample_one(llm, user_message, n, max_new_tokens, temperature, seed):
    """n samples of one prompt through the backend's `sample_many`."""
    return llm.sample_many([user_message], [n], max_new_tokens, temperature, [seed])[0]


@pytest.fixture(scope="session")
def llm_server(tmp_path_factory):
    """A real vLLM OpenAI-compatible server of the default LLM (the installed cpu extra), stopped at the end."""
    from tests.llm_server import VLLMServer

    server = VLLMServer(tmp_path_factory.mktemp("vllm-server") / "server.log").start()
    yield server
    server.stop()
