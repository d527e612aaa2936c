"""LLM backends of the label stage and of eval's downstream metrics: transformers (`hf`), vLLM in process
(`vllm_engine`) and OpenAI-compatible servers (`server`), one interface (`base.LLMBackend`). Each backend composes the
shared prompt rendering and tokenization (`prompts`) with its engine's sampler and scorer (`hf_sampler`, `hf_scorer`;
`vllm_sampler`, `vllm_scorer`; `server_sampler`, `server_scorer`)."""

from __future__ import annotations

from typing import Any

from lemb.stages.llm.base import LLMBackend
from lemb.vocabulary import BACKENDS, DEFAULT_LLM

__all__ = ["LLMBackend", "load_llm"]


def load_llm(
    backend: str,
    model: str = DEFAULT_LLM,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    server: Any = None,
    served: Any = None,
) -> LLMBackend:
    """The backend named (`LabelConfig.backend`), loading `model`; for `server`, the model as `server`
    (an LLMServer section) serves it: `served` where the driver already connected (server.connect), else connected
    here."""
    if backend == "vllm":
        from lemb.stages.llm.vllm_engine import VLLMBackend

        return VLLMBackend(model, dtype=dtype, trust_remote_code=trust_remote_code)
    if backend == "transformers":
        from lemb.stages.llm.hf import TransformersBackend

        return TransformersBackend(model, dtype=dtype, trust_remote_code=trust_remote_code)
    if backend == "server":
        from lemb.stages.llm.server import ServerBackend, connect

        served = served or connect(server, model, trust_remote_code)
        return ServerBackend(served, server, trust_remote_code=trust_remote_code)
    raise ValueError(f"unknown LLM backend {backend!r}; known: {', '.join(BACKENDS)}")
