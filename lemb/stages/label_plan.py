"""`lemb label --dry-run`: the label stage's plan and cost before a long job.

Counted exactly from the run's candidates: queries, (query, candidate) pairs, prompts and their tokens, LLM requests
(sampling: one per prompt; scoring: one per prompt and continuation, with the pool size taken from calibration).
Measured by calibration: the real stage, with the configured backend, on a few queries on this machine; the first
query is a warm-up and is not timed. With the server backend the queries are labelled together, as one block with
their requests in flight at once (the servers are already warm), and the estimate is one worker's. FLOPs follow the
usual 2 x parameters per processed token (forward only), over the tokens the LLM must process at least: each
distinct prompt once, every sampled token, every scored continuation token under each prompt.
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
from lemb.stages.llm.server import public_url


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


def _calibrate(
    config: LabelConfig, queries: list[list[dict[str, Any]]], n: int, served: Any = None
) -> dict[str, float]:
    """Seconds and counters per query from the real stage on the first n + 1 queries that carry a target, each
    labelled on its own (a block of one query: the slowest case, so the estimate is an upper bound); with the server
    backend, the first n together."""
    chosen = [rows for rows in queries if (rows[0]["target"] or "").strip()][: n + 1]
    set_threads(config.cluster.threads)
    stage = LabelStage(config, served)
    start = time.perf_counter()
    stage.setup()
    timing = {"setup_seconds": time.perf_counter() - start}
    if served is not None:
        chosen = chosen[:n]
        start = time.perf_counter()
        stage.process(pa.Table.from_pylist([row for rows in chosen for row in rows]))
        elapsed = time.perf_counter() - start
        stage.llm.close()
        return {**timing, **_per_query(stage, chosen, chosen), "queries_timed": len(chosen),
                "seconds_per_query": elapsed / len(chosen), "warmup_seconds": 0.0}  # fmt: skip
    seconds = []
    for i, rows in enumerate(chosen):
        if i == 1:
            stage.counters.clear()  # counters of the timed queries only
        start = time.perf_counter()
        stage.process(pa.Table.from_pylist(rows))
        seconds.append(time.perf_counter() - start)
    timed = seconds[1:] or seconds
    return {
        **timing,
        **_per_query(stage, chosen[1:] or chosen, chosen[1:]),
        "queries_timed": len(timed),
        "seconds_per_query": sum(timed) / len(timed),
        "warmup_seconds": seconds[0] if len(seconds) > 1 else 0.0,
    }


def _per_query(stage: LabelStage, counted: list[list[dict[str, Any]]], timed: list) -> dict[str, float]:
    """Pool, continuation length and samples per query from the stage's counters over the `counted` queries."""
    c = stage.counters
    return {
        "pool_per_query": c["scored_continuations"] / max(1, sum(len(rows) + 1 for rows in counted)) - 1,
        "tokens_per_continuation": c["continuation_tokens"] / max(1, c["scored_continuations"]),
        "samples_per_query": c["samples_drawn"] / max(1, len(timed)),
    }


def plan_label(config: LabelConfig, calibrate: int = 2) -> dict[str, Any]:
    from lemb.stages.label import served_model

    served = served_model(config)  # the model checked (the server backend: connected) before the heavy imports
    from transformers import AutoTokenizer

    from lemb.stages.llm import LLMBackend
    from lemb.stages.models import resolve_model_path

    path = served.tokenizer if served is not None else resolve_model_path(config.llm, "LLM")
    codec = LLMBackend.codec(AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code))
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
        "llm": served.id if served is not None else config.llm,
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
    if served is not None:
        plan["servers"] = [public_url(u) for u in config.server.urls]
        plan["max_concurrency"] = config.server.max_concurrency
    if calibrate > 0 and labelled:
        cal = _calibrate(config, first_shard, calibrate, served)
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
        # the servers' capacity, not the workers, bounds a server backend: the estimate is one worker's
        workers = 1 if served is not None else max(1, c.workers or (1 if c.executor == "local" else cluster))
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
        ]  # fmt: skip
        if "servers" in plan:
            rows += [
                ("servers", ", ".join(plan["servers"])),
                ("estimated wall time", f"{plan['wall_seconds'] / 60:.1f} min for one worker with "
                 f"{plan['max_concurrency']} requests in flight (more workers help while the servers have room)"),
            ]  # fmt: skip
        else:
            rows.append(("estimated wall time", f"{plan['wall_seconds'] / 60:.1f} min on {plan['workers']} worker(s)"))
    else:
        rows.append(("sampled tokens (at most)", plan["sampled_tokens_max"]))
    width = max(len(name) for name, _ in rows)
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)
