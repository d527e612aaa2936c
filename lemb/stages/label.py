"""`lemb label`: the LLM's rank-aware reward for every (query, candidate) pair (DESIGN.md).

Per query: a pool of the LLM's own samples (N from the bare prompt, m from each candidate's prompt), the desired
output and each distinct sample scored under every candidate's prompt and under the bare prompt, the rank of the
desired output, and the reward. Raw log-probabilities are kept so other rewards can be recomputed without the LLM
(`lemb rescore`).

A worker reads its own candidate shard (retrieve wrote the texts into it) and labels it in blocks of queries: one
sampling call for every prompt of the block, then one scoring call for every (prompt, continuations) pair, so a GPU
or a vLLM engine sees hundreds of sequences at once. A block is sized by its prompt tokens (`block_tokens`). Every
prompt has its own seed, a function of (seed, query id, key id), so a query's samples, and therefore its rewards, do
not depend on the block it was labelled in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

import lemb
from lemb.data import schemas
from lemb.data.tasks import build_prompt, task_spec, templates_fingerprint
from lemb.errors import InputError, LembError
from lemb.pipeline.config import LabelConfig
from lemb.pipeline.executor import Stage, executor_for
from lemb.pipeline.layout import RunLayout
from lemb.pipeline.shards import MANIFEST, ShardPlan
from lemb.stages.llm.base import RequestRefused
from lemb.stages.plots import REWARDS_PLOT, plot_rewards
from lemb.stages.reward import build_pool, rank_of_target, reward_from_logprobs

log = logging.getLogger(__name__)
TIE_TOLERANCE = "lemb.tie_tolerance"  # the label shards' metadata key of the tolerance their rewards used
TARGET_REQUIRED = frozenset({"qa", "icl", "chat", "lrlm"})  # tool / convsearch may train on positives alone
# Prompt tokens per block of queries (LabelConfig.block_tokens = 0 takes these). A block only has to give the
# backend enough rows to fill its own batches (transformers: 16k KV tokens of sampling rows, 4k tokens a scoring
# pass on CPU): 8192 prompt tokens are about 40 prompts of NQ's size. On a GPU a vLLM engine or the packed scorer
# wants hundreds of sequences at once; 131072 tokens (about 600 prompts) has not yet been measured on one.
# A server backend keeps `max_concurrency` requests in flight and waits for a block's sampling before its scoring:
# a large block keeps the servers full through that turn.
BLOCK_TOKENS = {"cpu": 8192, "cuda": 131072, "server": 131072}


def derive_seed(seed: int, *parts: str) -> int:
    """A per-prompt seed, so a prompt's samples do not depend on what ran before it or beside it."""
    digest = hashlib.blake2b("\x1f".join([str(seed), *parts]).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big")


class LabelStage(Stage):
    name = "label"
    unit = "queries"
    required_columns = (
        "query_id",
        "task",
        "key_id",
        "retrieval_rank",
        *(c for c in schemas.CARRIED if c not in schemas.LATER_COLUMNS),
    )
    output_schema = schemas.REWARD

    def __init__(self, config: LabelConfig, served: Any = None) -> None:
        super().__init__()
        self.config = config
        self.served = served  # server backend: the model the servers serve (server.connect, in the driver)
        self.holds_model = config.backend != "server"  # a server backend's workers are HTTP clients

    def setup(self) -> None:
        from lemb.stages.llm import load_llm

        c = self.config
        self.llm = load_llm(c.backend, c.llm, c.dtype, c.trust_remote_code, server=c.server, served=self.served)
        if c.backend == "server":
            self.block_tokens = c.block_tokens or BLOCK_TOKENS["server"]
        else:
            import torch

            self.block_tokens = c.block_tokens or BLOCK_TOKENS["cuda" if torch.cuda.is_available() else "cpu"]

    def fingerprint(self) -> dict[str, Any]:
        out = {"templates": templates_fingerprint(), "sampler": "per-prompt seeds"}
        if self.served is not None:
            out["served"] = self.served.identity()
        return out

    def metadata(self) -> dict[str, str]:
        c = self.config
        sampling = {"n": c.n_samples, "m": c.per_candidate_samples, "temperature": c.temperature, "reduce": c.reduce}
        served = {}
        if self.served is not None:
            from lemb.stages.llm.server import public_url

            urls = [public_url(u) for u in c.server.urls]
            served = {"lemb.llm_server": json.dumps({**self.served.identity(), "urls": urls})}
        return {
            "lemb.llm": c.llm,
            "lemb.backend": c.backend,
            "lemb.llm_revision": self.llm.revision,
            **served,
            "lemb.prompt_templates": json.dumps(templates_fingerprint()),
            "lemb.sampling": json.dumps(sampling),
            "lemb.seed": str(c.seed),
            TIE_TOLERANCE: repr(c.tie_tolerance),
            "lemb.version": lemb.__version__,
        }

    def process(self, table: pa.Table) -> pa.Table:
        out: list[dict[str, Any]] = []
        for block in self._blocks(schemas.by_query(schemas.with_later_columns(table).to_pylist())):
            out += self._label_block(block)
        return pa.Table.from_pylist(out, schema=self.output_schema)

    def _blocks(self, queries: list[list[dict[str, Any]]]) -> list[list[list[dict[str, Any]]]]:
        """Consecutive queries of one task whose prompts hold about `block_tokens` tokens at most (at least one
        query). A query's tokens are estimated from its prompts' characters at the characters per token of the
        shard's first query: the backend tokenizes the prompts inside its own calls, once."""
        blocks: list[list[list[dict[str, Any]]]] = []
        if not queries:
            return blocks
        first = query_prompts(queries[0])
        chars_per_token = sum(map(len, first)) / max(1, sum(self.llm.prompt_lengths(first)))
        held = 0.0
        for rows in queries:
            tokens = sum(map(len, query_prompts(rows))) / chars_per_token
            if blocks and blocks[-1][0][0]["task"] == rows[0]["task"] and held + tokens <= self.block_tokens:
                blocks[-1].append(rows)
                held += tokens
            else:
                blocks.append([rows])
                held = tokens
        return blocks

    def _label_block(self, block: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
        c = self.config
        out: list[dict[str, Any]] = []
        todo = []
        for rows in block:
            target = rows[0]["target"]
            if target and target.strip():
                todo.append(rows)
            else:
                self.counters["queries_skipped_no_target"] += 1
                out += [self._row(r, pool_size=0, skip_reason="no_target") for r in rows]
        report = _BlockProgress(self, len(block))
        if not todo:
            report.finish()
            return out
        queries = [self._query(rows) for rows in todo]
        start, generated = time.perf_counter(), self.llm.generated_tokens
        owners = [q.id for q in queries for _ in q.prompts]  # the query of each prompt, for a refused request
        with _naming_queries(owners):
            samples = self.llm.sample_many(
                [p for q in queries for p in q.prompts], [n for q in queries for n in q.samples_per_prompt],
                task_spec(todo[0][0]["task"]).max_new_tokens, c.temperature, [s for q in queries for s in q.seeds],
                progress=report.sampling,
            )  # fmt: skip
        self.counters["sample_seconds"] += time.perf_counter() - start
        self.counters["samples_drawn"] += sum(map(len, samples))
        self.counters["sampled_tokens"] += self.llm.generated_tokens - generated
        for q, drawn in zip(queries, _per_query(samples, queries)):
            q.pool, q.counts, dropped = build_pool([s for texts in drawn for s in texts], q.target)
            self.counters["samples_empty"] += dropped["empty"]
            self.counters["samples_equal_to_target"] += dropped["equal_to_target"]
        items = [(p, [q.target, *q.pool]) for q in queries for p in q.prompts]  # one item per prompt, as sampled
        start = time.perf_counter()
        with _naming_queries(owners):
            scored = self.llm.score_many(
                items, reduce=c.reduce, batch_tokens=c.score_batch_tokens or None, progress=report.scoring
            )
        self.counters["score_seconds"] += time.perf_counter() - start
        self.counters["scored_continuations"] += sum(len(conts) for _, conts in items)
        self.counters["continuation_tokens"] += sum(n for per_item in scored for _, n in per_item)
        for q, scores in zip(queries, _per_query(scored, queries)):
            q.bare_scores, q.candidate_scores = scores[0], scores[1:]  # query_prompts: the bare prompt first
            out += self._rows(q)
        report.finish()
        return out

    def _query(self, rows: list[dict[str, Any]]) -> _Query:
        c = self.config
        keys = _prompt_keys(rows)
        return _Query(
            rows=rows,
            prompts=query_prompts(rows),
            samples_per_prompt=[c.n_samples] + [c.per_candidate_samples] * len(rows),
            seeds=[derive_seed(c.seed, rows[0]["query_id"], *k) for k in keys],
        )

    def _rows(self, q: _Query) -> list[dict[str, Any]]:
        """Reward rows of one query from its pool and its scores (the bare prompt's, then each candidate's)."""
        rows, pool, counts = q.rows, q.pool, q.counts
        n, tol = sum(counts), self.config.tie_tolerance
        baseline = [s for s, _ in q.bare_scores]
        self._check_finite(rows[0], None, baseline)
        out = []
        for r, scores in zip(rows, q.candidate_scores, strict=True):
            values = [s for s, _ in scores]
            self._check_finite(r, r["key_id"], values)
            row = self._row(
                r,
                target_logprob=values[0],
                target_tokens=scores[0][1],
                samples=pool,
                sample_counts=counts,
                sample_logprobs=values[1:],
                baseline_target_logprob=baseline[0],
                baseline_sample_logprobs=baseline[1:],
                pool_size=n,
            )
            if n == 0:  # every sample was empty or equal to the target: the LLM needs no help
                row["skip_reason"] = "no_competing_samples"
            else:
                row["rank"] = rank_of_target(values[0], values[1:], counts, tol)
                # the same function training uses when it re-reads the shard
                row["reward"] = reward_from_logprobs("rank", values[0], values[1:], counts, baseline[0], baseline[1:],
                                                     tol)  # fmt: skip
                row["baseline_rank"] = rank_of_target(baseline[0], baseline[1:], counts, tol)
            out.append(row)
        self.counters["queries_labelled" if n else "queries_skipped_no_competing_samples"] += 1
        return out

    def _row(self, candidate: dict[str, Any], **fields: Any) -> dict[str, Any]:
        """A reward row of `candidate`: what it carries from retrieve, `fields`, and null in every other column."""
        return {**dict.fromkeys(self.output_schema.names), **_carried(candidate), **fields}

    def _check_finite(self, row: dict[str, Any], key_id: str | None, values: list[float]) -> None:
        """A NaN or infinite log-probability is the LLM's fault (broken weights, an overflowing dtype), not a
        reward: the stage stops in one line rather than write it."""
        bad = next((v for v in values if not math.isfinite(v)), None)
        if bad is not None:
            prompt = f"key_id {key_id!r}" if key_id is not None else "the bare prompt"
            raise LembError(f"LLM {self.config.llm} gave a non-finite log-probability ({bad}) for query_id "
                            f"{row['query_id']!r} under {prompt}: its weights or dtype ({self.config.dtype}) may "
                            "be broken")  # fmt: skip


class _BlockProgress:
    """Moves the shard's progress through a block as the backend reports its calls' fractions done: sampling and
    scoring each count for their share of the stage's time so far (half each before any is measured), so the bar
    moves query by query through a block of many."""

    def __init__(self, stage: LabelStage, queries: int) -> None:
        self.stage, self.queries, self.reported = stage, queries, 0.0
        sampled, scored = stage.counters["sample_seconds"], stage.counters["score_seconds"]
        self.share = sampled / (sampled + scored) if sampled + scored > 0 else 0.5

    def _to(self, fraction: float) -> None:
        done = self.queries * min(1.0, fraction)
        if done > self.reported:
            self.stage.advance(done - self.reported)
            self.reported = done

    def sampling(self, fraction: float) -> None:
        self._to(self.share * fraction)

    def scoring(self, fraction: float) -> None:
        self._to(self.share + (1 - self.share) * fraction)

    def finish(self) -> None:
        self._to(1.0)


class LLMRequestFailed(RuntimeError):
    """A request of a query that the LLM refused: fails the shard, naming the query."""


@contextlib.contextmanager
def _naming_queries(owners: list[str]) -> Iterator[None]:
    """A backend's RequestRefused (about its i-th prompt) as one line naming the query of that prompt."""
    try:
        yield
    except RequestRefused as exc:
        raise LLMRequestFailed(f"query_id {owners[exc.index]!r}: {exc}") from None


def query_prompts(rows: list[dict[str, Any]]) -> list[str]:
    """The query's bare prompt, then one prompt per candidate."""
    first = rows[0]
    return [build_prompt(first["task"], first["query_text"], None)] + [
        build_prompt(r["task"], r["query_text"], r["key_text"]) for r in rows
    ]


def _prompt_keys(rows: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    """What each prompt's seed derives from besides the query id: nothing (bare prompt) or the candidate's key id."""
    return [()] + [(r["key_id"],) for r in rows]


@dataclass
class _Query:
    """One query of a block on its way through label: its candidate rows; its prompts (`query_prompts`: the bare
    prompt, then one per candidate) with what each samples and its seed; then its pool of samples, and the scores of
    the target and the pool under the bare prompt and under each candidate's."""

    rows: list[dict[str, Any]]
    prompts: list[str]
    samples_per_prompt: list[int]
    seeds: list[int]
    pool: list[str] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    bare_scores: list[tuple[float, int]] = field(default_factory=list)
    candidate_scores: list[list[tuple[float, int]]] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.rows[0]["query_id"]

    @property
    def target(self) -> str:
        return self.rows[0]["target"]


def _per_query(flat: list, queries: list[_Query]) -> Iterator[list]:
    """A block call's results (one per prompt, in the queries' order) cut back into each query's."""
    at = 0
    for q in queries:
        yield flat[at : at + len(q.prompts)]
        at += len(q.prompts)


def labelled_tie_tolerance(metadata: dict[bytes, bytes] | None, source: object) -> float:
    """The tie tolerance a label shard's rewards were computed with, from its Parquet metadata: train, rescore's
    agreement report and the model card score ties as label did, and a shard that does not say is one line, never a
    silent default."""
    value = (metadata or {}).get(TIE_TOLERANCE.encode())
    if value is None:
        raise InputError(
            source, "file", TIE_TOLERANCE, "missing from the shard's metadata; rerun `lemb label --restart`"
        )
    return float(value)


def _carried(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("query_id", "task", "key_id", "retrieval_rank", *schemas.CARRIED)}


def candidates_plan(run: Path) -> ShardPlan:
    """Label's work: the run's candidate shards as they are, each checked for the desired outputs label needs."""
    cand_dir = RunLayout(run).candidates
    if not (cand_dir / MANIFEST).exists():
        raise LembError(f"{cand_dir}: no candidates; run `lemb retrieve --run {run}` first")
    plan = ShardPlan.of_stage(cand_dir, "query_id")
    for path in plan.inputs:
        table = pq.read_table(path, columns=["query_id", "task", "target"])
        for q in table.to_pylist():
            if q["task"] in TARGET_REQUIRED and not (q["target"] or "").strip():
                problem = f"task {q['task']} needs a desired output (fix the query file and rerun retrieve)"
                raise InputError(path, f"query_id {q['query_id']!r}", "target", problem)
    return plan


def served_model(config: LabelConfig) -> Any:
    """The server backend's model, connected and checked once in the driver (None for the in-process backends,
    whose model path is checked here instead): a missing model or a wrong URL fails here, not in every worker."""
    if config.backend == "server":
        from lemb.stages.llm.server import connect, public_url

        served = connect(config.server, config.llm, config.trust_remote_code)
        log.info("labelling with %s as served at %s (tokenizer %s)", served.id,
                 ", ".join(map(public_url, config.server.urls)), served.tokenizer)  # fmt: skip
        return served
    from lemb.stages.models import check_model

    check_model(config.llm, "LLM", trust_remote_code=config.trust_remote_code)
    return None


def label(config: LabelConfig, progress: bool = True) -> dict[str, Any]:
    run = Path(config.run)
    plan = candidates_plan(run)
    stage = LabelStage(config, served_model(config))
    layout = RunLayout(run)
    inputs = [layout.manifest(layout.candidates)]
    stats = executor_for(config.cluster, config.restart, progress).run(
        stage, plan, layout.label, config, inputs, "query_id"
    )
    plot_rewards(layout.label, layout.label / REWARDS_PLOT)  # the histogram, each task's, as soon as it exists
    return stats
