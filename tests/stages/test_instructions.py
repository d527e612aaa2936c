"""Which instructions an embedder is used with: its own (saved by lemb, its prompts, its authors'), else none."""

from __future__ import annotations

import json

import pytest

from lemb.data.tasks import INSTRUCTION_PRESETS
from lemb.stages.instructions import ST_CONFIG, model_instructions, resolve_instructions
from lemb.vocabulary import TASKS

LLM_EMBEDDER = INSTRUCTION_PRESETS["llm-embedder"]


def _model_folder(path, prompts=None):
    """A folder as sentence-transformers saves one; only its prompts matter here."""
    path.mkdir(parents=True)
    (path / ST_CONFIG).write_text(json.dumps({"prompts": prompts} if prompts is not None else {"__version__": {}}))
    return str(path)


def test_the_default_base_has_no_instructions():
    found = resolve_instructions("auto", "all-minilm-l6-v2")
    assert found.table == dict.fromkeys(TASKS, ("", "")) and found.name == "none"
    assert found.source == "none (the model has no instructions)"


def test_a_preset_or_none_applies_to_every_embedder(tmp_path):
    saved = _model_folder(tmp_path / "trained", {"qa_query": "Q: ", "qa_key": "K: "})
    for model in ("all-minilm-l6-v2", saved):
        assert resolve_instructions("llm-embedder", model).table == LLM_EMBEDDER
        assert resolve_instructions("none", model).name == "none"


def test_a_lemb_trained_model_is_used_with_the_table_it_saved(tmp_path):
    prompts = {f"{t}_{side}": f"{t} {side}: " for t in TASKS for side in ("query", "key")}
    found = model_instructions(_model_folder(tmp_path / "m", prompts))
    assert found.table["tool"] == ("tool query: ", "tool key: ") and found.name == "custom"
    assert found.source == "saved with the model by lemb train"
    # a model trained on the preset is recognised as that preset
    preset = {f"{t}_{s}": LLM_EMBEDDER[t][i] for t in TASKS for i, s in enumerate(("query", "key"))}
    assert model_instructions(_model_folder(tmp_path / "p", preset)).name == "llm-embedder"


def test_a_model_with_its_own_prompts_is_used_with_them(tmp_path):
    found = model_instructions(_model_folder(tmp_path / "e5", {"query": "query: ", "passage": "passage: "}))
    assert found.table == dict.fromkeys(TASKS, ("query: ", "passage: "))
    assert found.source == "the model's own prompts"
    only_query = model_instructions(_model_folder(tmp_path / "q", {"query": "Find: "}))
    assert only_query.table["qa"] == ("Find: ", "")


@pytest.mark.parametrize(
    ("folder", "preset"),
    [("llm-embedder", "llm-embedder"), ("bge-base-en", "bge"), ("bge-small-en-v1.5", "bge"), ("bge-m3", "none")],
)
def test_known_models_get_their_authors_instructions(tmp_path, folder, preset):
    found = model_instructions(_model_folder(tmp_path / folder))
    assert found.name == preset


def test_a_table_sets_its_tasks_and_the_others_follow_the_model(tmp_path):
    model = _model_folder(tmp_path / "bge-small-en-v1.5")
    found = resolve_instructions({"tool": ["Tool? ", "Tool: "]}, model)
    assert found.table["tool"] == ("Tool? ", "Tool: ")
    assert found.table["qa"] == INSTRUCTION_PRESETS["bge"]["qa"]
    assert found.name == "custom" and "others: preset 'bge'" in found.source
    assert found.prompts()["tool_query"] == "Tool? " and found.prompts()["qa_key"] == ""


def test_hub_ids_without_a_network_follow_their_names(monkeypatch):
    import lemb.stages.instructions as instructions

    monkeypatch.setattr(instructions, "_hub_reachable", lambda: False)  # no file of theirs in the cache either
    assert resolve_instructions("auto", "BAAI/llm-embedder").table == LLM_EMBEDDER
    assert resolve_instructions("auto", "BAAI/bge-small-en-v1.5").name == "bge"
    assert resolve_instructions("auto", "sentence-transformers/all-mpnet-base-v2").name == "none"


def test_unknown_presets_and_tasks_are_refused_from_python_too(tmp_path):
    with pytest.raises(ValueError, match="unknown instruction preset 'bert'"):
        resolve_instructions("bert", "all-minilm-l6-v2")
    with pytest.raises(ValueError, match="instructions: unknown task 'poem'"):
        resolve_instructions({"poem": ["a", "b"]}, "all-minilm-l6-v2")


def test_a_model_trained_on_some_tasks_has_no_instruction_for_the_others(tmp_path):
    found = model_instructions(_model_folder(tmp_path / "m", {"qa_query": "Q: ", "qa_key": "K: "}))
    assert found.table["qa"] == ("Q: ", "K: ") and found.table["tool"] == ("", "")


def test_prompts_under_unknown_names_are_reported_not_used(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="lemb.stages.instructions"):
        found = model_instructions(_model_folder(tmp_path / "nomic", {"search_query": "search_query: "}))
    assert found.name == "none" and "['search_query'] but none named query" in caplog.text


def test_eval_entries_set_instructions_per_embedder(tiny_data, tmp_path):
    from lemb.errors import ConfigError
    from lemb.pipeline.config import EvalConfig, load_config
    from lemb.trainer.evaluate import evaluate_run

    with pytest.raises(ConfigError, match=r"embedders\[b\] must be a model or \{model: M, instructions: I\}"):
        load_config(EvalConfig, queries="q.jsonl", embedders={"b": {"name": "all-minilm-l6-v2"}})
    with pytest.raises(ConfigError, match=r"embedders\[b\]: instructions: unknown preset 'bert'"):
        load_config(EvalConfig, queries="q.jsonl", embedders={"b": {"model": "x", "instructions": "bert"}})
    embedders = {"plain": "all-minilm-l6-v2",
                 "handicapped": {"model": "all-minilm-l6-v2", "instructions": "llm-embedder"}}  # fmt: skip
    files = {"queries": str(tiny_data["queries"]), "corpus": str(tiny_data["corpus"])}
    config = load_config(EvalConfig, run=str(tmp_path / "run"), executor="local", answer_k=0, embedders=embedders,
                         **files)  # fmt: skip
    evaluate_run(config, progress=False)
    saved = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert saved["plain"]["embedded_with"]["instructions"]["name"] == "none"
    assert saved["handicapped"]["embedded_with"]["instructions"]["source"] == "preset 'llm-embedder' (setting)"
    tags = {n: (tmp_path / "run" / "eval" / n / "run.trec").read_text().split()[5] for n in embedders}
    assert tags == {"plain": "plain|instructions=none|keys={title}:_{text}",
                    "handicapped": "handicapped|instructions=llm-embedder|keys={title}:_{text}"}  # fmt: skip
    scores = {n: (tmp_path / "run" / "eval" / n / "run.trec").read_text().split()[4] for n in embedders}
    assert scores["plain"] != scores["handicapped"]  # the same model, embedded two ways
