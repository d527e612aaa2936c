"""One vLLM engine per process: a second backend reuses it or shuts it down, never leaves it to the collector."""

from __future__ import annotations

import gc

import pytest

from lemb.pipeline.executor import set_threads
from lemb.stages.llm.vllm_engine import VLLMBackend
from lemb.vocabulary import DEFAULT_LLM
from tests.stages.test_llm import CONTINUATIONS, PROMPT

pytest.importorskip("vllm")


@pytest.mark.slow
def test_a_backend_after_another_in_the_same_process_keeps_working() -> None:
    set_threads(1)
    first = VLLMBackend(DEFAULT_LLM, max_model_len=1024)
    expected = first.score(PROMPT, CONTINUATIONS, reduce="sum")
    again = VLLMBackend(DEFAULT_LLM, max_model_len=1024)  # same settings: the same engine, its cache emptied
    assert again.engine is first.engine
    assert again.score(PROMPT, CONTINUATIONS, reduce="sum") == expected
    other = VLLMBackend(DEFAULT_LLM, max_model_len=768)  # other settings: the first engine is shut down first
    assert other.engine is not first.engine
    del first, again
    gc.collect()  # a left-over engine torn down here would clear the live engine's distributed state
    scored = other.score(PROMPT, CONTINUATIONS, reduce="sum")
    assert [n for _, n in scored] == [n for _, n in expected]
    assert [lp for lp, _ in scored] == pytest.approx([lp for lp, _ in expected], abs=1e-4)
    assert other.sample_many([PROMPT], [2], 8, 1.0, [0])[0]
