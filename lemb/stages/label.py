"""`lemb label`: the LLM's rank-aware reward for every (query, candidate) pair (DESIGN.md).

Per query: a pool of the LLM's own samples (N from the bare prompt, m from each candidate's
prompt), the desired output and each distinct sample scored under every candidate's prompt and
under the bare prompt, the rank of the desired output, and the reward. Raw log-probabilities are
kept so other rewards can be recomputed without the LLM (`lemb rescore`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import yaml

import lemb
from lemb.data import schemas
from lemb.data.readers import key_texts, read_keys, read_queries
from lemb.data.tasks import build_prompt, task_spec, templates_fingerprint
from lemb.errors import InputError, LembError
from lemb.pipeline.config import LabelConfig, config_hash, save_config, to_dict
from lemb.pipeline.executor import Stage, run_stage
from lemb.pipeline.shards import read_stage
from lemb.stages.reward import build_pool, rank_of_target, reward_from_logprobs

log = logging.getLogger(__name__)
TARGET_REQUIRED = frozenset({"qa", "icl", "chat", "lrlm"})  # tool / convsearch may train on positives alone


def derive_seed(seed: int, *parts: str) -> int:
    """A per-query (and per-candidate) seed, so a shard's samples do not depend on what ran before it."""
    digest = hashlib.blake2b("\x1f".join([str(seed), *parts]).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big")


class LabelStage(Stage):
    name = "label"
    required_columns = ("query_id", "task", "key_id", "retrieval_rank", "query_text", "target", "key_text")
    output_schema = schemas.REWARD

    def __init__(self, config: LabelConfig) -> None:
        super().__init__()
        self.config = config

    def setup(self) -> None:
        from lemb.stages.llm import load_llm

        c = self.config
        self.llm = load_llm(c.backend, c.llm, dtype=c.dtype, trust_remote_code=c.trust_remote_code)

    def metadata(self) -> dict[str, str]:
        c = self.config
        sampling = {"n": c.n_samples, "m": c.per_candidate_samples, "temperature": c.temperature, "reduce": c.reduce}
        return {
            "lemb.llm": c.llm,
            "lemb.backend": c.backend,
            "lemb.llm_revision": self.llm.revision if hasattr(self, "llm") else "",
            "lemb.prompt_templates": json.dumps(templates_fingerprint()),
            "lemb.sampling": json.dumps(sampling),
            "lemb.seed": str(c.seed),
            "lemb.tie_tolerance": repr(c.tie_tolerance),
            "lemb.version": lemb.__version__,
        }

    def _sample(self, qid: str, task: str, bare: str, prompts: list[str]) -> list[str]:
        """The query's pool before dropping: N samples of the bare prompt and m of each candidate's prompt."""
        c = self.config
        ns = [c.n_samples] + [c.per_candidate_samples] * len(prompts)
        per_prompt = self.llm.sample_many(
            [bare, *prompts], ns, task_spec(task).max_new_tokens, c.temperature, derive_seed(c.seed, qid)
        )
        samples = [text for texts in per_prompt for text in texts]
        self.counters["samples_drawn"] += len(samples)
        return samples

    def _score(self, messages: list[str], continuations: list[str]) -> list[list[tuple[float, int]]]:
        """The continuations under each message, in one backend call (vLLM batches across the messages)."""
        c = self.config
        scored = self.llm.score_many(
            [(m, continuations) for m in messages], reduce=c.reduce, batch_tokens=c.score_batch_tokens or None
        )
        self.counters["scored_continuations"] += len(continuations) * len(messages)
        self.counters["continuation_tokens"] += sum(n for per_message in scored for _, n in per_message)
        return scored

    def _label_query(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        first = rows[0]
        qid, task, target = first["query_id"], first["task"], first["target"]
        prompts = {r["key_id"]: build_prompt(task, r["query_text"], r["key_text"]) for r in rows}
        bare = build_prompt(task, first["query_text"], None)
        base = {name: None for name in self.output_schema.names}
        if not target or not target.strip():
            self.counters["queries_skipped_no_target"] += 1
            return [{**base, **_ids(r), "n_samples": 0, "skip_reason": "no_target"} for r in rows]
        samples = self._sample(qid, task, bare, [prompts[r["key_id"]] for r in rows])
        pool, counts, dropped = build_pool(samples, target)
        self.counters["samples_empty"] += dropped["empty"]
        self.counters["samples_equal_to_target"] += dropped["equal_to_target"]
        n = sum(counts)
        continuations = [target, *pool]
        base_scores, *per_candidate = self._score([bare, *(prompts[r["key_id"]] for r in rows)], continuations)
        baseline = [s for s, _ in base_scores]
        out = []
        for r, scores in zip(rows, per_candidate):
            values = [s for s, _ in scores]
            row = {
                **base,
                **_ids(r),
                "target_logprob": values[0],
                "target_tokens": scores[0][1],
                "samples": pool,
                "sample_counts": counts,
                "sample_logprobs": values[1:],
                "baseline_target_logprob": baseline[0],
                "baseline_sample_logprobs": baseline[1:],
                "n_samples": n,
            }
            if n == 0:  # every sample was empty or equal to the target: the LLM needs no help
                row["skip_reason"] = "no_competing_samples"
            else:
                tol = self.config.tie_tolerance
                row["rank"] = rank_of_target(values[0], values[1:], counts, tol)
                # the same function training uses when it re-reads the shard
                row["reward"] = reward_from_logprobs(
                    "rank", values[0], values[1:], counts, baseline[0], baseline[1:], tol
                )
                row["baseline_rank"] = rank_of_target(baseline[0], baseline[1:], counts, tol)
            out.append(row)
        self.counters["queries_labelled" if n else "queries_skipped_no_competing_samples"] += 1
        return out

    def process(self, table: pa.Table) -> pa.Table:
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in table.to_pylist():
            groups[r["query_id"]].append(r)
        out = []
        for qid in sorted(groups):
            out += self._label_query(sorted(groups[qid], key=lambda r: r["retrieval_rank"]))
        return pa.Table.from_pylist(out, schema=self.output_schema)


def _ids(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("query_id", "task", "key_id", "retrieval_rank")}


def retrieve_inputs(run: Path) -> tuple[str, str | None]:
    """The query and corpus files the run's retrieve stage read."""
    path = run / "retrieve" / "config.yaml"
    if not path.exists():
        raise LembError(f"{path}: not found; run `lemb retrieve --run {run}` first")
    settings = yaml.safe_load(path.read_text())
    return settings["queries"], settings.get("corpus")


def build_work(run: Path) -> tuple[pa.Table, list[str | Path | None]]:
    """Candidates joined with the texts they need; every id checked against the queries and the corpus."""
    queries_path, corpus_path = retrieve_inputs(run)
    queries = {q["query_id"]: q for q in read_queries(queries_path).to_pylist()}
    texts = key_texts(list(queries.values()), read_keys(corpus_path) if corpus_path else None)
    cand_dir = run / "retrieve" / "candidates"
    rows = []
    for c in read_stage(cand_dir).to_pylist():
        q = queries.get(c["query_id"])
        if q is None:
            raise InputError(cand_dir, f"query_id {c['query_id']!r}", "query_id", "not in the query file")
        if c["key_id"] not in texts:
            raise InputError(
                cand_dir, f"query_id {c['query_id']!r}", "key_id", f"{c['key_id']!r} is not in the corpus"
            )
        if q["task"] in TARGET_REQUIRED and not (q["target"] or "").strip():
            raise InputError(
                queries_path, f"query_id {q['query_id']!r}", "target", f"task {q['task']} needs a desired output"
            )
        rows.append({**c, "query_text": q["text"], "target": q["target"], "key_text": texts[c["key_id"]]})
    return pa.Table.from_pylist(rows), [queries_path, corpus_path, cand_dir / "_manifest.json"]


def label(config: LabelConfig, progress: bool = True) -> dict[str, Any]:
    from lemb.stages.llm import resolve_llm_path

    resolve_llm_path(config.llm)  # a missing model fails here, not in every worker
    run = Path(config.run)
    work, inputs = build_work(run)
    factory = functools.partial(LabelStage, config)
    settings = to_dict(config)
    stats = run_stage(
        factory, work, "query_id", run / "label", config, settings, config_hash(config), inputs, progress
    )
    save_config(config, run / "label")
    return stats
