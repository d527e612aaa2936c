"""The vLLM backend against the transformers backend, with the real default model (float32 on CPU)."""

from __future__ import annotations

import pytest

from lemb.data.tasks import build_prompt
from lemb.errors import ConfigError
from lemb.pipeline import config as config_module
from lemb.pipeline.config import DEFAULT_LLM, LabelConfig, load_config
from lemb.pipeline.executor import set_threads
from lemb.stages.llm import TransformersLLM, load_llm
from tests.stages.test_llm import CONTINUATIONS, PROMPT

pytest.importorskip("vllm")

CONTEXT = "Quelm is the seat of government of Zorbia, and its largest city."
QUESTION = "What is the capital of Zorbia?"


@pytest.fixture(scope="module")
def vllm_backend():
    set_threads(1)
    return load_llm("vllm", DEFAULT_LLM)


@pytest.fixture(scope="module")
def transformers_backend() -> TransformersLLM:
    return TransformersLLM(DEFAULT_LLM)


@pytest.fixture(scope="module")
def pool(vllm_backend) -> list[str]:
    prompts = [build_prompt("qa", QUESTION, None), build_prompt("qa", QUESTION, CONTEXT)]
    samples = vllm_backend.sample_many(prompts, [6, 3], max_new_tokens=16, temperature=1.0, seed=11)
    return [s for per_prompt in samples for s in per_prompt if s]


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_logprobs_of_target_and_samples_match_transformers(vllm_backend, transformers_backend, pool, reduce) -> None:
    continuations = ["Quelm", *pool]
    assert len(continuations) >= 6
    messages = [build_prompt("qa", QUESTION, None), build_prompt("qa", QUESTION, CONTEXT), PROMPT]
    got = vllm_backend.score_many([(m, continuations) for m in messages], reduce=reduce)
    for message, scores in zip(messages, got):
        ref = transformers_backend.score(message, continuations, reduce=reduce)
        assert [n for _, n in scores] == [n for _, n in ref]
        assert max(abs(a - b) for (a, _), (b, _) in zip(scores, ref)) <= 1e-3


def test_scoring_again_reads_the_cache_and_gives_the_same_numbers(vllm_backend) -> None:
    # the second call finds whole KV blocks of the long continuations cached: those requests must be rerun
    first = vllm_backend.score(PROMPT, CONTINUATIONS, reduce="sum")
    assert vllm_backend.score(PROMPT, CONTINUATIONS, reduce="sum") == first


def test_samples_are_a_function_of_prompts_and_seed(vllm_backend) -> None:
    prompts = [PROMPT, "Name a colour."]
    first = vllm_backend.sample_many(prompts, [4, 2], max_new_tokens=12, temperature=1.0, seed=7)
    alone = vllm_backend.sample_many([PROMPT], [4], max_new_tokens=12, temperature=1.0, seed=7)
    assert [len(p) for p in first] == [4, 2]
    assert first == vllm_backend.sample_many(prompts, [4, 2], max_new_tokens=12, temperature=1.0, seed=7)
    assert first[0] == alone[0]  # what else is in the batch does not matter
    assert first != vllm_backend.sample_many(prompts, [4, 2], max_new_tokens=12, temperature=1.0, seed=8)
    assert len(set(first[0])) > 1  # n samples of one prompt are not copies
    assert all("\n" not in t and t == t.strip() for t in first[0] + first[1])
    assert vllm_backend.sample_many(prompts, [0, 0], 12, 1.0, 7) == [[], []]


def test_greedy_matches_transformers(vllm_backend, transformers_backend) -> None:
    prompts = ["Context: The capital of Zorbia is Quelm.\n\nWhat is the capital of Zorbia?", "Hi"]
    assert vllm_backend.greedy(prompts, 16) == transformers_backend.greedy(prompts, 16)


def test_missing_vllm_is_one_line_naming_the_install(monkeypatch) -> None:
    monkeypatch.setattr(config_module, "vllm_installed", lambda: False)
    assert config_module.default_backend() == "transformers"
    with pytest.raises(ConfigError, match="backend 'vllm' needs vllm, which is not installed; install it with"):
        load_config(LabelConfig, backend="vllm")
