"""Calls of an in-process vLLM engine on token ids, shared by the vLLM sampler and scorer: each call counts the
prompt tokens the engine computed (cache hits excluded) and reports its progress as requests finish."""

from __future__ import annotations

import io
from typing import Any

from lemb.stages.llm.base import Progress


class EngineCalls:
    """`run` on one engine (`vllm.LLM`), with the tokens its calls prefilled."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.prefilled_tokens = 0

    def run(self, prompts: list[list[int]], params: Any | list[Any], progress: Progress | None = None) -> list[Any]:
        """One engine call; `progress` is told the fraction of its requests finished as they finish."""
        bar = _reporting_bar(progress) if progress else False
        outs = self.engine.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=bar)
        # prompt tokens the engine computed (cache hits excluded), for benchmarks and cost reports
        self.prefilled_tokens += sum(len(p) - (o.num_cached_tokens or 0) for p, o in zip(prompts, outs))
        return outs


def _reporting_bar(progress: Progress) -> Any:
    """A tqdm class for `LLM.generate(use_tqdm=...)` that draws nothing and tells `progress` the fraction of the
    call's sequences finished (the engine counts a request of n samples as n, and updates by n when it finishes)."""
    from tqdm import tqdm

    class Reporting(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, "file": io.StringIO(), "mininterval": 1e9, "dynamic_ncols": False})

        def update(self, n: float | None = 1) -> bool | None:
            shown = super().update(n)
            progress(min(1.0, self.n / max(1, self.total or 1)))
            return shown

    return Reporting
