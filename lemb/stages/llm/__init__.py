"""LLM backends of the label stage and of eval's downstream metrics: transformers (`hf`) and vLLM
(`vllm_engine`), one interface (`base.LLMBackend`)."""

from __future__ import annotations

from lemb.stages.llm.base import LLMBackend
from lemb.vocabulary import BACKENDS, DEFAULT_LLM

__all__ = ["LLMBackend", "load_llm"]


def load_llm(
    backend: str, model: str = DEFAULT_LLM, dtype: str = "float32", trust_remote_code: bool = False
) -> LLMBackend:
    """The backend named (`LabelConfig.backend`), loading `model`."""
    if backend == "vllm":
        from lemb.stages.llm.vllm_engine import VLLMBackend

        return VLLMBackend(model, dtype=dtype, trust_remote_code=trust_remote_code)
    if backend == "transformers":
        from lemb.stages.llm.hf import TransformersBackend

        return TransformersBackend(model, dtype=dtype, trust_remote_code=trust_remote_code)
    raise ValueError(f"unknown LLM backend {backend!r}; known: {', '.join(BACKENDS)}")
