"""experiments/fair_base.py: each arm embedded as trained, on a tiny real run with the default models."""

import importlib.util
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

_DIR = Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(_DIR))
_spec = importlib.util.spec_from_file_location("fair_base", _DIR / "fair_base.py")
fair_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fair_base)


@pytest.mark.slow
def test_each_arm_is_ranked_with_the_instructions_it_was_trained_with(labelled_run, tiny_data, tmp_path):
    from lemb.data.tasks import INSTRUCTION_PRESETS
    from lemb.pipeline.shards import stage_files
    from lemb.stages.encoder import Encoder

    out = tmp_path / "fair"
    argv = ["--run", str(labelled_run), "--dev", str(tiny_data["queries"]), "--corpus", str(tiny_data["corpus"]),
            "--out", str(out), "--steps", "2", "--batch-size", "2", "--group-size", "2"]  # fmt: skip
    assert fair_base.main(argv) == 0
    results = json.loads((out / "results-fair-base.json").read_text())
    assert set(results["arms"]) == set(fair_base.ARMS)
    assert {a: (v["trained_with"], v["scored_with"]) for a, v in results["arms"].items()} == {
        "base": (None, "none"),
        "base_llm_embedder": (None, "llm-embedder"),
        "trained_none": ("none", "none"),
        "trained_llm_embedder": ("llm-embedder", "llm-embedder"),
    }
    assert "ndcg@10: trained_none - base" in results["paired_bootstrap_95"]
    assert set(results["per_query"]["base"]["ndcg@10"]) == {"q1", "q2"}  # the qa queries with a positive
    # the trained models saved the instructions they were trained with, and their rankings used them
    for arm, preset in (("trained_none", "none"), ("trained_llm_embedder", "llm-embedder")):
        prompts = json.loads((out / arm / "train" / "model" / "config_sentence_transformers.json").read_text())
        assert prompts["prompts"]["qa_query"] == INSTRUCTION_PRESETS[preset]["qa"][0]
        row = pq.read_table(stage_files(out / arm / "rank" / "candidates")[0]).to_pylist()[0]
        encoder = Encoder(str(out / arm / "train" / "model"))
        q_instruction, k_instruction = INSTRUCTION_PRESETS[preset]["qa"]
        query = encoder.encode([row["query_text"]], q_instruction)[0]
        key = encoder.encode([row["key_text"]], k_instruction)[0]
        assert abs(row["retrieval_score"] - float(query @ key)) < 1e-5
    # a rerun reads every finished arm back instead of training it again
    before = (out / "trained_none" / "train" / "model" / "model.safetensors").stat().st_mtime
    assert fair_base.main(argv) == 0
    assert (out / "trained_none" / "train" / "model" / "model.safetensors").stat().st_mtime == before
