"""The vLLM backend against the transformers backend, with the real default model (float32 on CPU)."""

from __future__ import annotations

import pytest

from lemb.data.tasks import build_prompt
from lemb.errors import ConfigError
from lemb.pipeline import config as config_module
from lemb.pipeline.config import LabelConfig, load_config
from lemb.pipeline.executor import set_threads
from lemb.stages.llm import load_llm
from lemb.stages.llm.hf import TransformersBackend
from lemb.vocabulary import DEFAULT_LLM
from tests.conftest import sample_one
from tests.stages.test_llm import CONTINUATIONS, PROMPT

pytest.importorskip("vllm")

CONTEXT = "Quelm is the seat of government of Zorbia, and its largest city."
QUESTION = "What is the capital of Zorbia?"


@pytest.fixture(scope="module")
def vllm_backend():
    set_threads(1)
    return load_llm("vllm", DEFAULT_LLM)


@pytest.fixture(scope="module")
def transformers_backend() -> TransformersBackend:
    return TransformersBackend(DEFAULT_LLM)


@pytest.fixture(scope="module")
def pool(vllm_backend) -> list[str]:
    prompts = [build_prompt("qa", QUESTION, None), build_prompt("qa", QUESTION, CONTEXT)]
    samples = vllm_backend.sample_many(prompts, [6, 3], max_new_tokens=16, temperature=1.0, seeds=[11, 12])
    return [s for per_prompt in samples for s in per_prompt if s]


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_prompts_samples_do_not_depend_on_the_rest_of_the_call(vllm_backend) -> None:
    """Each prompt is its own seeded request: alone or among prompts of other lengths, in any position, it gets the
    same samples (the label stage samples a block of queries in one call)."""
    short, medium = "Name a colour.", build_prompt("qa", QUESTION, CONTEXT)
    messages, seeds = [PROMPT, short, medium], [7, 8, 9]
    assert len(set(vllm_backend.prompt_lengths(messages))) == 3
    kw = {"max_new_tokens": 12, "temperature": 1.0}
    alone = [sample_one(vllm_backend, m, 4, seed=seed, **kw) for m, seed in zip(messages, seeds)]
    assert vllm_backend.sample_many(messages, [4, 4, 4], seeds=seeds, **kw) == alone
    assert vllm_backend.sample_many(messages[::-1], [4, 4, 4], seeds=seeds[::-1], **kw) == alone[::-1]
    assert vllm_backend.sample_many([short, PROMPT], [4, 4], seeds=[8, 7], **kw) == [alone[1], alone[0]]
    assert sample_one(vllm_backend, PROMPT, 4, seed=70, **kw) != alone[0]
    # consecutive seeds are hashed apart: prompt 8's samples are not prompt 7's shifted by one
    assert sample_one(vllm_backend, PROMPT, 4, seed=8, **kw)[:3] != alone[0][1:]
    assert len(set(alone[0])) > 1  # n samples of one prompt are not copies
    assert all("\n" not in t and t == t.strip() for t in alone[0] + alone[1] + alone[2])
    assert vllm_backend.sample_many(messages[:2], [0, 4], seeds=seeds[:2], **kw) == [[], alone[1]]
    assert vllm_backend.sample_many(messages[:2], [0, 0], seeds=seeds[:2], **kw) == [[], []]


def test_prompt_lengths_match_transformers(vllm_backend, transformers_backend) -> None:
    messages = [PROMPT, "Hi", build_prompt("qa", QUESTION, CONTEXT)]
    assert vllm_backend.prompt_lengths(messages) == transformers_backend.prompt_lengths(messages)


@pytest.mark.slow
def test_scoring_just_sampled_prompts_does_not_compute_them_again(vllm_backend, monkeypatch) -> None:
    """The sampling requests leave each prompt's full KV blocks in the prefix cache: score_many's prefill of those
    prompts, and its scoring requests, compute only each prompt's last partial block; the prefill of prompts never
    sampled computes them whole."""
    block = vllm_backend.engine.llm_engine.vllm_config.cache_config.block_size
    computed = []  # per engine call of score_many: prompt tokens computed, not read from the cache
    run = vllm_backend.calls.run

    def recorded(prompts, params, *rest):
        before = vllm_backend.prefilled_tokens
        outs = run(prompts, params, *rest)
        computed.append(vllm_backend.prefilled_tokens - before)
        return outs

    def fresh(tag: str) -> list[str]:  # prompts this engine has not seen
        return [f"{tag} {k}. {PROMPT}" for k in range(3)]

    continuations = ["Quelm", "Paris"]
    n_cont = sum(len(c) for c in vllm_backend.prompts.continuations(continuations))
    sampled, unseen = fresh("Sampled prompt"), fresh("Unseen prompt")
    vllm_backend.sample_many(sampled, [2, 2, 2], max_new_tokens=8, temperature=1.0, seeds=[1, 2, 3])
    monkeypatch.setattr(vllm_backend.calls, "run", recorded)
    cost = {}
    for name, messages in [("sampled", sampled), ("unseen", unseen)]:
        computed.clear()
        vllm_backend.score_many([(m, continuations) for m in messages])
        prefill, scoring = computed
        cost[name] = (prefill, scoring - len(messages) * n_cont)  # the scoring requests' prompt tokens
    total = sum(vllm_backend.prompt_lengths(sampled))
    assert total > 3 * 3 * block  # long prompts: whole blocks to be read from the cache
    assert cost["sampled"][0] <= 3 * block and cost["sampled"][1] <= 3 * block, cost
    assert cost["unseen"][0] > total / 2, cost  # the control: without the sampling, the prefill computes them
    assert cost["unseen"][1] <= 3 * block, cost


def test_greedy_matches_transformers(vllm_backend, transformers_backend) -> None:
    prompts = ["Context: The capital of Zorbia is Quelm.\n\nWhat is the capital of Zorbia?", "Hi"]
    assert vllm_backend.greedy(prompts, 16) == transformers_backend.greedy(prompts, 16)


def test_missing_vllm_is_one_line_naming_the_install(monkeypatch) -> None:
    import lemb.vocabulary as vocabulary

    monkeypatch.setattr(vocabulary, "vllm_installed", lambda: False)
    monkeypatch.setattr(config_module, "vllm_installed", lambda: False)
    assert vocabulary.default_backend() == "transformers"
    with pytest.raises(ConfigError, match="backend 'vllm' needs vllm, which is not installed; install it with"):
        load_config(LabelConfig, backend="vllm")


def test_progress_follows_finished_requests_and_generated_tokens_are_counted(vllm_backend) -> None:
    messages = [PROMPT, "Name a colour.", build_prompt("qa", QUESTION, CONTEXT)]
    seen: list[float] = []
    before = vllm_backend.generated_tokens
    samples = vllm_backend.sample_many(messages, [2, 2, 2], 8, 1.0, [1, 2, 3], progress=seen.append)
    assert len(seen) == 3 and seen == sorted(seen) and seen[-1] == pytest.approx(1.0)
    counted = vllm_backend.generated_tokens - before
    words = sum(len(vllm_backend.tokenizer(s, add_special_tokens=False)["input_ids"]) for r in samples for s in r)
    assert words <= counted <= 6 * 8
    seen.clear()
    vllm_backend.score_many([(m, ["blue", "red"]) for m in messages], progress=seen.append)
    # the prompts' prefill (3 requests), then the 6 scoring requests
    assert len(seen) == 9 and seen == sorted(seen) and seen[-1] == pytest.approx(1.0) and 0 < seen[2] < 1
