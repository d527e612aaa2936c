from __future__ import annotations

import os

import pytest
import torch

import lemb.stages.llm.hf_scorer as scorer_module
from lemb.pipeline.executor import set_threads
from lemb.stages.llm.base import LLMBackend, RequestRefused, length_batches
from lemb.stages.llm.hf import TransformersBackend
from lemb.stages.llm.hf_scorer import _common_prefix, _Packed
from lemb.stages.llm.prompts import Prompts, clean_sample
from lemb.stages.models import resolve_model_path
from lemb.vocabulary import DEFAULT_LLM
from tests.conftest import sample_one

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
def llm() -> TransformersBackend:
    set_threads(1)
    return TransformersBackend(DEFAULT_LLM)


@pytest.fixture(scope="module")
def shared_scores(llm: TransformersBackend) -> dict[str, list[tuple[float, int]]]:
    return {reduce: llm.score(PROMPT, CONTINUATIONS, reduce=reduce) for reduce in ("mean", "sum")}


def test_clean_sample_cuts_at_newline_after_first_non_blank() -> None:
    assert clean_sample("\n\n  Quelm is it.\nMore text\n") == "Quelm is it."
    assert clean_sample(" \n ") == ""
    assert clean_sample("one line ") == "one line"


@pytest.mark.slow
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


@pytest.mark.slow
def test_batching_does_not_change_scores(llm) -> None:
    """Rows of different lengths in one left-padded pass score as each row alone (padding and the other rows
    are masked out), and a budget smaller than any row runs them one by one."""
    items = [(PROMPT, CONTINUATIONS), (PROMPT + " One word.", CONTINUATIONS[:4]), ("Say a city.", CONTINUATIONS[2:])]
    lengths = [len(_Packed(llm.prompts.encode(m), llm.prompts.continuations(c)).ids) for m, c in items]
    assert len(set(lengths)) == 3
    assert length_batches(lengths, 10_000) == [[0, 1], [2]], "the first two rows must share a padded pass"
    together = llm.score_many(items, reduce="sum", batch_tokens=10_000)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scorer_module, "HEAD_POSITIONS", 5)  # the vocabulary head a row at a time
        one_row_at_a_time = llm.score_many(items, reduce="sum", batch_tokens=10_000)
    for row_a, row_b in zip(together, one_row_at_a_time):
        for (a, na), (b, nb) in zip(row_a, row_b):
            assert (na, a) == (nb, pytest.approx(b, abs=1e-5))
    alone = llm.score_many(items, reduce="sum", batch_tokens=1)
    assert [len(x) for x in together] == [6, 4, 4]
    for row_a, row_b in zip(together, alone):
        for (a, na), (b, nb) in zip(row_a, row_b):
            assert na == nb
            assert a == pytest.approx(b, abs=1e-4)
    naive = llm.score_naive("Say a city.", CONTINUATIONS[2:], reduce="sum")
    for (a, _), (b, _) in zip(together[2], naive):
        assert a == pytest.approx(b, abs=1e-4)


def test_scoring_without_a_common_prefix(llm, monkeypatch) -> None:
    """Bare prompts (no chat template) that differ from their first token: nothing is cached, rows run whole."""
    monkeypatch.setattr(llm, "has_chat_template", False)
    items = [(PROMPT, CONTINUATIONS[:3]), ("Name a city.", CONTINUATIONS[2:])]
    prompts = [llm.prompts.encode(m) for m, _ in items]
    assert _common_prefix(prompts, limit=10) == 0
    scored = llm.score_many(items, reduce="sum")
    for (message, continuations), got in zip(items, scored):
        for (a, na), (b, nb) in zip(got, llm.score_naive(message, continuations, reduce="sum")):
            assert na == nb
            assert a == pytest.approx(b, abs=1e-4)


def test_common_prefix() -> None:
    assert _common_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]], limit=9) == 2
    assert _common_prefix([[1, 2, 3], [1, 2, 3]], limit=2) == 2  # each row keeps its last prompt token
    assert _common_prefix([[7, 1], [1, 7]], limit=1) == 0


def test_length_batches_respect_budget_and_padding() -> None:
    assert length_batches([100, 40, 90, 80, 30], budget=300) == [[0, 2, 3], [1, 4]]
    assert length_batches([100, 90, 80], budget=250) == [[0, 1], [2]]  # a third row would pad to 300
    assert length_batches([500, 10], budget=100) == [[0], [1]]  # a row over the budget runs alone
    # sampling: item i is weights[i] rows of its length + `extra` new tokens
    assert length_batches([100, 90, 80], budget=700, weights=[2, 1, 1], extra=100) == [[0, 1], [2]]
    assert length_batches([100, 90, 80], budget=600, weights=[1, 1, 1], extra=100) == [[0, 1, 2]]
    assert length_batches([100, 90], budget=100, weights=[4, 4], extra=10) == [[0], [1]]


def test_the_answer_in_context_outscores_a_wrong_one(shared_scores) -> None:
    mean = dict(zip(CONTINUATIONS, (s for s, _ in shared_scores["mean"])))
    assert mean["Quelm"] > mean["Paris"]


def test_empty_continuation_is_refused(llm) -> None:
    with pytest.raises(ValueError, match="continuation 1"):
        llm.score(PROMPT, ["Quelm", "", "Paris"])


@pytest.mark.slow
def test_sample_is_reproducible_per_seed(llm) -> None:
    first = sample_one(llm, PROMPT, n=4, max_new_tokens=12, temperature=1.0, seed=7)
    torch.rand(5)  # unrelated use of the global RNG must not matter
    again = sample_one(llm, PROMPT, n=4, max_new_tokens=12, temperature=1.0, seed=7)
    other = sample_one(llm, PROMPT, n=4, max_new_tokens=12, temperature=1.0, seed=8)
    assert len(first) == 4
    assert first == again
    assert first != other
    assert len(set(first)) > 1, "n samples of one prompt are not copies"
    for text in first + other:
        assert "\n" not in text and text == text.strip()


SHORT, MEDIUM = "Name a colour.", "Background: Quelm is the capital of Zorbia.\n\nWhat is the capital of Zorbia?"


@pytest.mark.slow
def test_a_prompts_samples_do_not_depend_on_the_rest_of_the_call(llm, monkeypatch) -> None:
    """The label stage samples a block of queries in one call: each prompt must get what it gets alone, wherever
    it sits in the call, next to prompts of other lengths (left padding) and however the call is split into
    generate batches."""
    longer = "Answer briefly. " + PROMPT
    messages = [PROMPT, SHORT, longer, MEDIUM]
    seeds = dict(zip(messages, [5, 6, 7, 8]))
    lengths = dict(zip(messages, llm.prompt_lengths(messages)))
    assert len(set(lengths.values())) == 4 and lengths[longer] > 3 * lengths[SHORT]
    kw = {"max_new_tokens": 8, "temperature": 1.0}
    alone = {m: sample_one(llm, m, n=2, seed=seeds[m], **kw) for m in messages}
    generate_rows = []
    original = llm.sampler._generate
    monkeypatch.setattr(
        llm.sampler, "_generate", lambda ids, *a, **k: generate_rows.append(len(ids)) or original(ids, *a, **k)
    )
    calls = {
        "one call": (messages, None, [2, 2, 4]),  # the two long prompts share a left-padded batch
        "reversed": (messages[::-1], None, [2, 2, 4]),
        # too small for both long prompts' rows (2 x (108 + 8) tokens each): four generate calls
        "split by the budget": ([MEDIUM, longer, SHORT, PROMPT], 2 * (lengths[longer] + 8), [2, 2, 2, 2]),
    }
    for name, (order, budget, batches) in calls.items():
        generate_rows.clear()
        got = llm.sample_many(order, [2] * 4, seeds=[seeds[m] for m in order], batch_tokens=budget, **kw)
        assert sorted(generate_rows) == batches, name
        assert got == [alone[m] for m in order], name
    # a prompt asked for no samples gets none and changes nothing for the others
    assert llm.sample_many([PROMPT, SHORT], [0, 2], seeds=[5, 6], **kw) == [[], alone[SHORT]]
    assert llm.sample_many([PROMPT, SHORT], [0, 0], seeds=[5, 6], **kw) == [[], []]
    # the first samples of a larger n are the samples of a smaller one
    assert sample_one(llm, SHORT, n=4, seed=6, **kw)[:2] == alone[SHORT]
    assert sample_one(llm, SHORT, n=2, seed=9, **kw) != alone[SHORT]
    with pytest.raises(ValueError, match="one n and one seed per prompt"):
        llm.sample_many([PROMPT, SHORT], [2, 2], seeds=[5], **kw)


def test_prompt_lengths_are_the_encoded_prompts(llm) -> None:
    messages = [PROMPT, SHORT, MEDIUM]
    assert llm.prompt_lengths(messages) == [len(llm.prompts.encode(m)) for m in messages]
    assert llm.prompt_lengths([]) == []


def test_sampling_at_a_low_temperature_is_greedy(llm) -> None:
    """Near-zero temperature puts all the mass on the top token: the prefilled, left-padded, repeated cache and the
    Gumbel-max draw must give the tokens of plain greedy decoding of each prompt."""
    prompts = [SHORT, MEDIUM]
    pools = llm.sample_many(prompts, [2, 1], max_new_tokens=8, temperature=1e-5, seeds=[3, 4])
    greedy = llm.greedy(prompts, max_new_tokens=8)
    assert [len(p) for p in pools] == [2, 1]
    assert pools[0] == [greedy[0], greedy[0]] and pools[1] == [greedy[1]]
    with pytest.raises(ValueError, match="temperature must be positive"):
        sample_one(llm, SHORT, 1, 8, 0.0, seed=3)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_first_tokens_follow_the_tempered_softmax(llm, temperature: float) -> None:
    """The empirical frequency of the top first token over 200 samples is its probability under
    softmax(logits / temperature), within 4 standard errors (about 0.12 at p = 0.27, 0.12 at p = 0.78): a sampler
    that ignored the temperature, took the argmax, or drew tokens at random would be off by far more."""
    message, n = "Name an animal.", 200
    with torch.inference_mode():
        logits = llm.model(torch.tensor([llm.prompts.encode(message)])).logits[0, -1].double()
    probs = torch.softmax(logits / temperature, dim=-1)
    texts = [clean_sample(llm.tokenizer.decode([t], skip_special_tokens=True)) for t in range(len(probs))]
    top = texts[int(probs.argmax())]
    p = float(sum(probs[t] for t, text in enumerate(texts) if text == top))  # every token that reads as `top`
    assert 0.2 < p < 0.85, "the check needs a top token that is neither rare nor certain"
    samples = sample_one(llm, message, n, max_new_tokens=1, temperature=temperature, seed=11)
    frequency = sum(s == top for s in samples) / n
    assert abs(frequency - p) < 4 * (p * (1 - p) / n) ** 0.5, (frequency, p)


@pytest.mark.slow
def test_sampling_prints_no_warnings_and_ignores_the_models_generation_config(llm, tmp_path, capfd) -> None:
    """A generation_config.json's penalties, top_k or temperature must not change what the samplers read (vLLM
    ignores that file too), and greedy decoding must not warn about sampling settings it does not use."""
    import json
    import warnings

    source = resolve_model_path(DEFAULT_LLM, "LLM")
    for name in os.listdir(source):
        if name != "generation_config.json":
            os.symlink(os.path.join(source, name), tmp_path / name)
    with open(os.path.join(source, "generation_config.json")) as f:
        config = json.load(f)
    config.update(do_sample=True, temperature=0.3, top_k=2, top_p=0.5, repetition_penalty=3.0, no_repeat_ngram_size=2)
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    tuned = TransformersBackend(str(tmp_path))
    capfd.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tuned_out, plain_out = (
            (
                backend.sample_many([SHORT, MEDIUM], [3, 1], max_new_tokens=8, temperature=1.0, seeds=[1, 2]),
                backend.greedy([SHORT, MEDIUM], max_new_tokens=8),
            )
            for backend in (tuned, llm)
        )
    assert tuned_out == plain_out
    captured = capfd.readouterr()
    assert (captured.out, captured.err) == ("", "")


@pytest.mark.slow
def test_scores_of_several_prompts_in_one_call_are_the_per_prompt_scores(llm) -> None:
    """The label stage scores many queries' prompts in one call: each item must score as it does alone, with the
    default budget and with one that splits the call. The float32 passes differ in shape (one call caches only the
    chat header, score() the whole prompt), which moves a token's log-probability by up to about 1e-5."""
    items = [(PROMPT, CONTINUATIONS), (SHORT, CONTINUATIONS[2:]), (MEDIUM, CONTINUATIONS[:3]), (PROMPT, ["Quelm"])]
    alone = [llm.score(m, c, reduce="sum") for m, c in items]
    for budget in (None, 200):
        together = llm.score_many(items, reduce="sum", batch_tokens=budget)
        for row_a, row_b in zip(together, alone):
            assert [n for _, n in row_a] == [n for _, n in row_b]
            for (a, n), (b, _) in zip(row_a, row_b):
                assert a == pytest.approx(b, abs=2e-5 * n), budget


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


def test_prompts_tokenize_the_rendered_prompt_and_each_continuation_on_its_own(llm) -> None:
    """The one prompt component of every backend: a chat-templated prompt is its rendered text's ids with no special
    tokens added (the template writes them); a bare prompt is the message and a newline with the tokenizer's own."""
    tokenizer = llm.tokenizer
    prompts = Prompts(tokenizer, llm.eos_ids)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": SHORT}], tokenize=False, add_generation_prompt=True
    )
    assert prompts.render(SHORT) == chat == llm.render(SHORT)
    assert prompts.encode(SHORT) == tokenizer(chat, add_special_tokens=False)["input_ids"] == llm.prompts.encode(SHORT)
    prompts.encode(SHORT).append(0)  # a caller's copy: the cached ids stay as they were
    assert prompts.encode(SHORT) == llm.prompts.encode(SHORT)
    assert prompts.continuations(["Quelm", " Quelm"]) == [
        tokenizer("Quelm", add_special_tokens=False)["input_ids"],
        tokenizer(" Quelm", add_special_tokens=False)["input_ids"],
    ]
    with pytest.raises(ValueError, match="continuation 1"):
        prompts.continuations(["Quelm", ""])
    bare = Prompts(tokenizer, llm.eos_ids)
    bare.has_chat_template = False
    assert bare.render(SHORT) == SHORT + "\n"
    assert bare.encode(SHORT) == tokenizer(SHORT + "\n")["input_ids"]
    word = tokenizer("Quelm", add_special_tokens=False)["input_ids"]
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert prompts.decode([word + [llm.eos_ids[0]] + word, newline + word + newline + word]) == ["Quelm", "Quelm"]


def test_a_backend_composes_its_sampler_and_scorer_on_the_prompts_ids(llm) -> None:
    """sample_many and score_many hand the components token ids, skip prompts asked for no samples, name a refused
    request by the call's own prompt, and reduce the scorer's sums once for every engine."""
    word = llm.prompts.continuations(["Quelm"])[0]
    asked = []

    class Sampler:
        def sample(self, prompts, ns, max_new_tokens, temperature, seeds, batch_tokens, progress):
            asked.append(prompts)
            if 0 in seeds:
                raise RequestRefused(seeds.index(0), "refused")
            return [[word] * n for n in ns]

    class Scorer:
        def score(self, prompts, continuations, batch_tokens, progress):
            return [[float(len(p) + len(c)) for c in cs] for p, cs in zip(prompts, continuations)]

    backend = LLMBackend.codec(llm.tokenizer)
    backend.sampler, backend.scorer = Sampler(), Scorer()
    assert backend.sample_many([SHORT, MEDIUM], [0, 2], 4, 1.0, [3, 4]) == [[], ["Quelm", "Quelm"]]
    assert asked == [[llm.prompts.encode(MEDIUM)]] and backend.generated_tokens == 2 * len(word)
    with pytest.raises(RequestRefused) as refused:
        backend.sample_many([SHORT, MEDIUM, PROMPT], [0, 1, 1], 4, 1.0, [3, 4, 0])
    assert refused.value.index == 2
    total = float(len(llm.prompts.encode(SHORT)) + len(word))
    assert backend.score_many([(SHORT, ["Quelm"])], reduce="sum") == [[(total, len(word))]]
    assert backend.score(SHORT, ["Quelm"]) == [(total / len(word), len(word))]


def test_resolve_llm_path(tmp_path) -> None:
    missing = os.path.join(str(tmp_path), "no-such-model")
    with pytest.raises(FileNotFoundError, match="no-such-model") as info:
        resolve_model_path(missing, "LLM")
    assert missing in str(info.value)
    with pytest.raises(FileNotFoundError):
        resolve_model_path("./also-missing", "LLM")
    assert resolve_model_path(str(tmp_path), "LLM") == str(tmp_path)
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct", "LLM") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert os.path.isfile(os.path.join(resolve_model_path(DEFAULT_LLM, "LLM"), "config.json"))


@pytest.mark.slow
def test_model_logits_path_and_attention_window_fallback(llm, monkeypatch) -> None:
    """The fast head (decoder + 2-D matmul) is taken for this model; the model's own logits (for heads that scale
    or cap after the matmul) and the per-sequence path (prompts longer than an attention window) score the same."""
    scorer = llm.scorer
    assert scorer.own_head and scorer.sliding_window is None
    items = [(PROMPT, CONTINUATIONS), ("Say a city.", CONTINUATIONS[2:])]
    fast = llm.score_many(items, reduce="sum")
    monkeypatch.setattr(scorer, "own_head", False)
    own_logits = llm.score_many(items, reduce="sum")
    monkeypatch.setattr(scorer, "own_head", True)
    monkeypatch.setattr(scorer, "sliding_window", 40)  # the first prompt alone is longer
    calls = []
    naive = scorer.naive
    monkeypatch.setattr(scorer, "naive", lambda *a, **k: calls.append(a) or naive(*a, **k))
    windowed = llm.score_many(items, reduce="sum")
    assert len(calls) == 2, "a window shorter than an item sends every item down the per-sequence path"
    for other in (own_logits, windowed):
        for row_a, row_b in zip(fast, other):
            assert [n for _, n in row_a] == [n for _, n in row_b]
            for (a, _), (b, _) in zip(row_a, row_b):
                assert a == pytest.approx(b, abs=1e-4)


def test_a_model_without_sdpa_loads_with_eager_attention_and_scores_the_same(llm, monkeypatch) -> None:
    """The packed mask needs an attention that takes a 4-D mask: sdpa, or eager where sdpa is not supported."""
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained.__func__

    def no_sdpa(cls, *args, **kwargs):
        if kwargs.get("attn_implementation") == "sdpa":
            raise ValueError("this architecture does not support sdpa")
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(no_sdpa))
    eager = TransformersBackend(DEFAULT_LLM)
    assert eager.model.config._attn_implementation == "eager"
    items = [(PROMPT, CONTINUATIONS), ("Say a city.", CONTINUATIONS[2:])]
    for row_a, row_b in zip(eager.score_many(items, reduce="sum"), llm.score_many(items, reduce="sum")):
        for (a, na), (b, nb) in zip(row_a, row_b):
            assert (na, a) == (nb, pytest.approx(b, abs=1e-4))


def test_progress_reports_each_batch_and_ends_at_one(llm) -> None:
    """The label stage's bar moves through a block as the backend's batches finish."""
    messages = [PROMPT, SHORT, MEDIUM]
    lengths = llm.prompt_lengths(messages)
    seen: list[float] = []
    budget = max(lengths) + 4  # one sample of one prompt per generate call
    llm.sample_many(messages, [1, 1, 1], 4, 1.0, [1, 2, 3], batch_tokens=budget, progress=seen.append)
    assert len(seen) == 3 and seen == sorted(seen) and seen[-1] == pytest.approx(1.0) and seen[0] < 1.0
    # the fraction is by KV tokens: the longest prompt (batched first) is the largest part
    assert seen[0] == pytest.approx((lengths[0] + 4) / sum(n + 4 for n in lengths))
    seen.clear()
    llm.score_many([(m, ["Quelm", "Paris"]) for m in messages], batch_tokens=max(lengths) + 2, progress=seen.append)
    assert len(seen) == 3 and seen == sorted(seen) and seen[-1] == pytest.approx(1.0)


def test_generated_tokens_count_each_row_up_to_its_end(llm) -> None:
    eos, pad = llm.eos_ids[0], llm.pad_id
    word = llm.tokenizer("Quelm", add_special_tokens=False)["input_ids"]
    before = llm.generated_tokens
    texts = llm._texts([word + [eos, eos], word + word, word + [pad, pad, pad]])
    assert texts == ["Quelm", "QuelmQuelm", "Quelm"]
    assert llm.generated_tokens - before == 4 * len(word)
    before = llm.generated_tokens
    samples = llm.sample_many([PROMPT, SHORT], [2, 3], 6, 1.0, [1, 2])
    counted = llm.generated_tokens - before
    # each sample's tokens, newline included when one ended it, at most the budget
    words = sum(len(llm.tokenizer(s, add_special_tokens=False)["input_ids"]) for row in samples for s in row)
    assert words <= counted <= 5 * 6
