from __future__ import annotations

import os

import pytest
import torch

from lemb.pipeline.config import DEFAULT_LLM
from lemb.pipeline.executor import set_threads
from lemb.stages.llm import TransformersLLM, clean_sample, resolve_llm_path

PROMPT = (
    "Context: Quelm is the capital and largest city of Zorbia, a small landlocked country in the northern "
    "highlands. Founded in the twelfth century as a river crossing, it grew into a trading town known for wool "
    "and copper. Today about 400,000 people live there.\n\nQuestion: What is the capital of Zorbia?"
)
CONTINUATIONS = [
    "Quelm",
    "The capital of Zorbia is Quelm.",
    "Paris",
    "I don't know.",
    "It is the city of Quelm, home to the national parliament and the royal palace of Zorbia.",
    "Copper",
]


@pytest.fixture(scope="module")
def llm() -> TransformersLLM:
    set_threads(1)
    return TransformersLLM(DEFAULT_LLM)


@pytest.fixture(scope="module")
def shared_scores(llm: TransformersLLM) -> dict[str, list[tuple[float, int]]]:
    return {reduce: llm.score(PROMPT, CONTINUATIONS, reduce=reduce) for reduce in ("mean", "sum")}


def test_clean_sample_cuts_at_newline_after_first_non_blank() -> None:
    assert clean_sample("\n\n  Quelm is it.\nMore text\n") == "Quelm is it."
    assert clean_sample(" \n ") == ""
    assert clean_sample("one line ") == "one line"


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_shared_prefix_scores_match_naive(llm, shared_scores, reduce: str) -> None:
    naive = llm.score_naive(PROMPT, CONTINUATIONS, reduce=reduce)
    shared = shared_scores[reduce]
    assert [n for _, n in shared] == [n for _, n in naive]
    assert 1 in [n for _, n in shared], "a one-token continuation must be covered"
    assert len({n for _, n in shared}) >= 4, "continuations must differ in length"
    for (a, _), (b, _) in zip(shared, naive):
        assert a == pytest.approx(b, abs=1e-4)


def test_mean_is_sum_over_tokens(shared_scores) -> None:
    for (mean, n), (total, _) in zip(shared_scores["mean"], shared_scores["sum"]):
        assert mean == pytest.approx(total / n, abs=1e-6)


def test_chunking_does_not_change_scores(llm, shared_scores) -> None:
    chunked = llm.score(PROMPT, CONTINUATIONS, reduce="sum", batch_size=2)
    for (a, na), (b, nb) in zip(chunked, shared_scores["sum"]):
        assert na == nb
        assert a == pytest.approx(b, abs=1e-4)


def test_the_answer_in_context_outscores_a_wrong_one(shared_scores) -> None:
    mean = dict(zip(CONTINUATIONS, (s for s, _ in shared_scores["mean"])))
    assert mean["Quelm"] > mean["Paris"]


def test_empty_continuation_is_refused(llm) -> None:
    with pytest.raises(ValueError, match="continuation 1"):
        llm.score(PROMPT, ["Quelm", "", "Paris"])


def test_sample_is_reproducible_per_seed(llm) -> None:
    first = llm.sample(PROMPT, n=4, max_new_tokens=12, temperature=1.0, seed=7)
    torch.rand(5)  # unrelated use of the global RNG must not matter
    again = llm.sample(PROMPT, n=4, max_new_tokens=12, temperature=1.0, seed=7)
    other = llm.sample(PROMPT, n=4, max_new_tokens=12, temperature=1.0, seed=8)
    assert len(first) == 4
    assert first == again
    assert first != other
    for text in first + other:
        assert "\n" not in text and text == text.strip()


def test_greedy_reads_the_context(llm) -> None:
    answers = llm.greedy(
        [
            "Context: The capital of Zorbia is Quelm.\n\nWhat is the capital of Zorbia?",
            "Hi",  # a shorter prompt in the same batch exercises left padding
        ],
        max_new_tokens=16,
    )
    assert len(answers) == 2
    assert "Quelm" in answers[0]
    assert all("\n" not in a for a in answers)


def test_render_uses_the_chat_template(llm) -> None:
    text = llm.render("Hello")
    assert "Hello" in text and text.endswith("assistant\n")


def test_resolve_llm_path(tmp_path) -> None:
    missing = os.path.join(str(tmp_path), "no-such-model")
    with pytest.raises(FileNotFoundError, match="no-such-model") as info:
        resolve_llm_path(missing)
    assert missing in str(info.value)
    with pytest.raises(FileNotFoundError):
        resolve_llm_path("./also-missing")
    assert resolve_llm_path(str(tmp_path)) == str(tmp_path)
    assert resolve_llm_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert os.path.isfile(os.path.join(resolve_llm_path(DEFAULT_LLM), "config.json"))


def test_sample_many_shares_each_prompt_prefill_correctly(llm) -> None:
    # near-zero temperature makes sampling greedy: the prefilled, left-padded, repeated cache must give the
    # same tokens as plain greedy decoding of each prompt
    prompts = ["Name a colour.", "Background: Quelm is the capital of Zorbia.\n\nWhat is the capital of Zorbia?"]
    pools = llm.sample_many(prompts, [2, 1], max_new_tokens=8, temperature=1e-5, seed=3)
    greedy = llm.greedy(prompts, max_new_tokens=8)
    assert [len(p) for p in pools] == [2, 1]
    assert pools[0] == [greedy[0], greedy[0]] and pools[1] == [greedy[1]]
    hot = llm.sample_many(prompts, [3, 3], max_new_tokens=8, temperature=1.0, seed=3)
    assert hot == llm.sample_many(prompts, [3, 3], max_new_tokens=8, temperature=1.0, seed=3)
    assert llm.sample_many(prompts, [0, 0], 8, 1.0, 3) == [[], []]
