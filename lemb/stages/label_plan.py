"""`lemb label --dry-run`: the label stage's plan and cost before a long job.

Counted exactly from the run's candidates: queries, (query, candidate) pairs, prompts and their tokens, LLM requests
(sampling: one per prompt; scoring: one per prompt and continuation, with the pool size taken from calibration).
Measured by calibration: the real stage, with the configured backend, on a few queries on this machine; the first
query is a warm-up and is not timed. FLOPs follow the usual 2 x parameters per processed token (forward only), over
the tokens the LLM must process at least: each distinct prompt once, every sampled token, every scored continuation
token under each prompt.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lemb.data.schemas import by_query
from lemb.data.tasks import task_spec
from lemb.pipeline.config import LabelConfig
from lemb.pipeline.executor import set_threads
from lemb.stages.label import LabelStage, candidates_plan, query_prompts


def param_count(path: str) -> int | None:
    """Parameters of a local model folder, read from its safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors")) if os.path.isdir(path) else []
    total = 0
    for file in files:
        with safe_open(file, "pt") as f:
            for key in f.keys():
                n = 1
                for dim in f.get_slice(key).get_shape():
                    n *= dim
                total += n
    return total or None


def _calibrate(config: LabelConfig, queries: list[list[dict[str, Any]]], n: int) -> dict[str, float]:
    """Seconds and counters per query from the real stage on the first n + 1 queries that carry a target, each
    labelled on its own (a block of one query: the slowest case, so the estimate is an upper bound)."""
    chosen = [rows for rows in queries if (rows[0]["target"] or "").strip()][: n + 1]
    set_threads(config.cluster.threads)
    stage = LabelStage(config)
    start = time.perf_counter()
    stage.setup()
    timing = {"setup_seconds": time.perf_counter() - start}
    seconds = []
    for i, rows in enumerate(chosen):
        if i == 1:
            stage.counters.clear()  # counters of the timed queries only
        start = time.perf_counter()
        stage.process(pa.Table.from_pylist(rows))
        seconds.append(time.perf_counter() - start)
    timed = seconds[1:] or seconds
    c, queries = stage.counters, max(1, len(chosen) - 1)
    pool = c["scored_continuations"] / max(1, sum(len(rows) + 1 for rows in chosen[1:] or chosen)) - 1
    return {
        **timing,
        "queries_timed": len(timed),
        "seconds_per_query": sum(timed) / len(timed),
        "warmup_seconds": seconds[0] if len(seconds) > 1 else 0.0,
        "pool_per_query": pool,
        "tokens_per_continuation": c["continuation_tokens"] / max(1, c["scored_continuations"]),
        "samples_per_query": c["samples_drawn"] / queries,
    }


def plan_label(config: LabelConfig, calibrate: int = 2) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from lemb.stages.llm import LLMBackend
    from lemb.stages.models import resolve_model_path

    path = resolve_model_path(config.llm, "LLM")
    codec = LLMBackend()
    codec._init_codec(AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code), None)
    c, m = config.n_samples, config.per_candidate_samples
    queries = labelled = pairs = prompts = prompt_tokens = samples = sample_budget = 0
    first_shard: list[list[dict[str, Any]]] = []
    for shard in candidates_plan(Path(config.run)).inputs:  # one shard in memory at a time
        groups = by_query(pq.read_table(shard).to_pylist())
        first_shard = first_shard or groups
        queries += len(groups)
        pairs += sum(map(len, groups))
        for rows in groups:
            if not (rows[0]["target"] or "").strip():
                continue
            labelled += 1
            messages = query_prompts(rows)
            prompts += len(messages)
            prompt_tokens += sum(codec.prompt_lengths(messages))
            samples += c + m * len(rows)
            sample_budget += (c + m * len(rows)) * task_spec(rows[0]["task"]).max_new_tokens
    plan: dict[str, Any] = {
        "llm": config.llm,
        "backend": config.backend,
        "queries": queries,
        "queries_with_target": labelled,
        "pairs": pairs,
        "prompts": prompts,
        "prompt_tokens": prompt_tokens,
        "sampling_requests": prompts,
        "samples": samples,
        "sampled_tokens_max": sample_budget,
        "parameters": param_count(path),
    }
    if calibrate > 0 and labelled:
        cal = _calibrate(config, first_shard, calibrate)
        plan["calibration"] = cal
        pool = cal["pool_per_query"]
        continuation_tokens = cal["tokens_per_continuation"] * (pool + 1) * prompts
        sampled_tokens = cal["tokens_per_continuation"] * samples
        plan["scoring_requests"] = round((pool + 1) * prompts)
        plan["continuation_tokens"] = round(continuation_tokens + sampled_tokens)
        tokens = prompt_tokens + continuation_tokens + sampled_tokens
        plan["llm_tokens"] = round(tokens)
        if plan["parameters"]:
            plan["flops"] = 2.0 * plan["parameters"] * tokens
        c = config.cluster
        cluster = (os.cpu_count() or 1) // c.threads
        workers = max(1, c.workers or (1 if c.executor == "local" else cluster))
        plan["workers"] = workers
        per_worker = cal["seconds_per_query"] * labelled / workers
        plan["wall_seconds"] = cal["setup_seconds"] + cal["warmup_seconds"] + per_worker
    return plan


def format_plan(plan: dict[str, Any]) -> str:
    lines = [f"label plan for {plan['llm']} ({plan['backend']} backend)"]
    rows = [
        ("queries", f"{plan['queries']} ({plan['queries_with_target']} with a desired output)"),
        ("(query, candidate) pairs", plan["pairs"]),
        ("prompts (bare + one per candidate)", plan["prompts"]),
        ("prompt tokens", plan["prompt_tokens"]),
        ("LLM requests: sampling", f"{plan['sampling_requests']} ({plan['samples']} samples)"),
    ]
    if "calibration" in plan:
        cal = plan["calibration"]
        rows += [
            ("LLM requests: scoring", f"{plan['scoring_requests']} (pool of {cal['pool_per_query']:.1f} per query)"),
            ("continuation tokens (sampled + scored)", plan["continuation_tokens"]),
            ("LLM tokens in all", plan["llm_tokens"]),
        ]
        if "flops" in plan:
            flops = f"{plan['flops']:.3g} ({plan['parameters']:,} parameters)"
            rows.append(("FLOPs (2 x parameters x tokens)", flops))
        rows += [
            ("calibration", f"{cal['queries_timed']} queries, {cal['seconds_per_query']:.2f} s each after a "
             f"{cal['warmup_seconds']:.1f} s warm-up query; model start {cal['setup_seconds']:.1f} s"),
            ("estimated wall time", f"{plan['wall_seconds'] / 60:.1f} min on {plan['workers']} worker(s)"),
        ]  # fmt: skip
    else:
        rows.append(("sampled tokens (at most)", plan["sampled_tokens_max"]))
    width = max(len(name) for name, _ in rows)
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)
