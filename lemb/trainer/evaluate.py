"""`lemb eval`: each task's metrics, as the paper evaluates it, for each embedder on held-out queries.

Which metrics a task reports is its `TaskSpec.metrics` (lemb/data/tasks.py; the names are
explained in `tasks.METRICS`): qa Recall@k / nDCG@10 / Recall@100 and the LLM's answer accuracy; icl the
LLM's accuracy with the retrieved demonstrations (label match); chat and lrlm the LLM's
perplexity of the next response / next chunk with the retrieved history in its prompt; tool
nDCG@5; convsearch nDCG@3 and Recall@100. The "all" row holds R@1, R@5, MRR@10 and nDCG@10 over every query
with known positives, and the answer metrics over every query of a task that reports them.

Each embedder ranks the queries to `eval_depth` keys through the retrieve stage itself (`rank`), into
`<run>/eval/<name>/`: the candidate shards it writes carry the query records and key texts that the metrics and the
LLM's prompts need. Where the run's `retrieve/keys` shards record the key embeddings this embedder would compute (the
same model files, key template, key instructions, max_length and corpus records), it ranks over those instead of
embedding the corpus again. Retrieval metrics (ir-measures over pytrec_eval) use the queries' known positives; a
metric deeper than `eval_depth` is left out. The LLM sees the top-`answer_k` retrieved candidates in the task's
prompt (the one the rewards were labelled with): it answers greedily, or scores the target, under a progress bar.
Answers and targets are normalised SQuAD-style; `answer_em` is strict exact match; `answer_accuracy` counts an answer
correct when the normalised target is the answer or a whole-word span of it, the accuracy of Lost in the Middle (Liu
et al., TACL 2024) and PopQA (Mallen et al., ACL 2023): small chat models answer in sentences ("The capital of Zorbia
is Quelm."), which strict exact match scores as wrong.

Every metric is kept per query (`details.json`), and each embedder is compared with the base (or the first embedder)
by a paired bootstrap over the queries (lemb/trainer/bootstrap.py): the report gives each difference's 95% interval
and the number of queries it pairs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import string
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from lemb.data.schemas import by_query, grades
from lemb.data.tasks import build_prompt, task_spec
from lemb.errors import ConfigError, LembError
from lemb.files import write_json, write_text
from lemb.pipeline.config import EvalConfig, RetrieveConfig, load_config
from lemb.pipeline.executor import set_threads
from lemb.pipeline.layout import RunLayout
from lemb.pipeline.lock import StageLock
from lemb.pipeline.shards import stage_files
from lemb.stages.key_reuse import run_key_template
from lemb.stages.models import check_model
from lemb.stages.retrieve import retrieve, truncation_counts, truncation_line
from lemb.trainer.bootstrap import compare
from lemb.trainer.card import read_facts, write_card
from lemb.trainer.lora import is_adapter_folder, require_peft
from lemb.trainer.report import write_report

log = logging.getLogger(__name__)
RETRIEVAL_METRICS = ("recall@1", "recall@5", "mrr@10", "ndcg@10")  # the "all" row, over every task's queries
ANSWER_METRICS = ("answer_accuracy", "answer_em")
IR_NAMES = {"recall": "R", "ndcg": "nDCG", "mrr": "RR"}
# prompts per greedy call: the transformers backend pads a call into one batch (memory), vLLM and servers batch by
# themselves and want many at once; between two calls the progress bar moves
ANSWER_CHUNK = {"transformers": 16, "vllm": 256, "server": 256}


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, collapse whitespace (SQuAD / NQ convention)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


@dataclass
class Ranked:
    """One embedder's ranking of a query set, as retrieve wrote it: top-`depth` (key_id, score) per query in rank
    order, the query records and the retrieved keys' texts (what the LLM's prompts need). `depth` None: unknown
    (every metric is computed); `truncation`: {step: (texts cut at max_length, texts encoded)}."""

    ranking: dict[str, list[tuple[str, float]]]
    queries: list[dict[str, Any]]
    key_text: dict[str, str]
    embedded_with: dict[str, Any] = field(default_factory=dict)  # model, instructions, key_template
    depth: int | None = None
    truncation: dict[str, tuple[int, int]] = field(default_factory=dict)


def rank(
    config: EvalConfig,
    model: str,
    out: str | Path,
    progress: bool = True,
    depth: int | None = None,
    instructions: Any = None,
) -> Ranked:
    """Rank `config.queries` over `config.corpus` with `model` to `depth` keys (default `config.eval_depth`) by
    running the retrieve stage into `out` (the same encode -> index -> top-K as training's candidates; no positives
    added), then read its candidate shards. The corpus is embedded again unless the run's `retrieve/keys` shards
    record the same key embeddings. `instructions`: this embedder's setting (default: the config's, `auto` unless
    set: the model's own)."""
    out = Path(out)
    depth = config.eval_depth if depth is None else depth
    if depth < 1:
        raise ConfigError(f"EvalConfig: eval_depth must be >= 1, got {depth}")
    template = run_key_template(config.run, config.key_template)
    retrieve_config = load_config(
        RetrieveConfig, run=config.run, cluster=dataclasses.asdict(config.cluster), shards=config.shards, restart=True,
        queries=config.queries, corpus=config.corpus,
        embedder=model, instructions=config.instructions if instructions is None else instructions,
        key_template=template, top_k=depth, add_positives=False,
        batch_size=config.batch_size, max_length=config.max_length,
    )  # fmt: skip
    keys = RunLayout(config.run).keys
    stats = retrieve(retrieve_config, progress, out=out, summary=False, reuse_keys=keys if keys.exists() else None,
                     name=out.name)  # fmt: skip
    embedded_with = {"model": model, "instructions": stats["instructions"], "key_template": template}
    ranking: dict[str, list[tuple[str, float]]] = {}
    queries, key_text = [], {}
    for path in stage_files(RunLayout.candidates_in(out)):
        for rows in by_query(pq.read_table(path).to_pylist()):
            first = rows[0]
            ranking[first["query_id"]] = [(r["key_id"], r["retrieval_score"]) for r in rows]
            queries.append({"query_id": first["query_id"], "task": first["task"], "text": first["query_text"],
                            "target": first["target"], "positive_ids": first["positive_ids"] or [],
                            "relevance": grades(first["relevance"])})  # fmt: skip
            key_text.update((r["key_id"], r["key_text"]) for r in rows)
    queries.sort(key=lambda q: q["query_id"])
    return Ranked(ranking, queries, key_text, embedded_with, depth, truncation_counts(stats))


def _ir_measure(name: str) -> str:
    """ "recall@5" -> "R@5", "ndcg@3" -> "nDCG@3", "mrr@10" -> "RR@10" (ir-measures names)."""
    kind, _, depth = name.partition("@")
    return f"{IR_NAMES[kind]}@{depth}"


def within(names: tuple[str, ...], depth: int | None) -> tuple[str, ...]:
    """The metrics of `names` that a ranking `depth` keys deep can score (a cut-off at most `depth`)."""
    return tuple(n for n in names if depth is None or "@" not in n or int(n.partition("@")[2]) <= depth)


def per_query_retrieval(
    ranking: dict[str, list[tuple[str, float]]], queries: list[dict], names: tuple[str, ...] = RETRIEVAL_METRICS
) -> dict[str, dict[str, float]]:
    """{metric: {query_id: value}} of each retrieval metric in `names` (others are ignored), for every query with
    known positives; one that retrieved none of them scores 0 (pytrec_eval would leave it out).

    nDCG's gains are the queries' grades where they have them (`relevance`), else 1 per positive; recall and
    MRR count the ids graded > 0."""
    import ir_measures

    names = tuple(n for n in names if n.partition("@")[0] in IR_NAMES)
    qrels = [ir_measures.Qrel(q["query_id"], k, g) for q in queries for k, g in judgments(q).items()]
    if not qrels or not names:
        return {}
    judged = sorted({q["query_id"] for q in queries if q["positive_ids"]})
    # Every metric scores the list in the order the LLM sees it (the retrieve stage's rank order, ties among equal
    # scores already broken there): each key's score is its position from the end, so no evaluation backend
    # breaks a tie its own way (ir-measures sends RR to one that breaks ties by doc id ascending, trec_eval's
    # R and nDCG descending).
    wanted = set(judged)
    run = [
        ir_measures.ScoredDoc(qid, kid, float(len(found) - i))
        for qid, found in ranking.items()
        if qid in wanted
        for i, (kid, _) in enumerate(found)
    ]
    measures = {name: ir_measures.parse_measure(_ir_measure(name)) for name in names}
    found: dict[str, dict[str, float]] = defaultdict(dict)
    for m in ir_measures.iter_calc(list(measures.values()), qrels, run):
        found[str(m.measure)][m.query_id] = m.value
    return {name: {q: found[str(m)].get(q, 0.0) for q in judged} for name, m in measures.items()}


def retrieval_metrics(
    ranking: dict[str, list[tuple[str, float]]], queries: list[dict], names: tuple[str, ...] = RETRIEVAL_METRICS
) -> dict[str, float]:
    """Mean of each retrieval metric in `names` (others are ignored) over the queries with known positives
    (`per_query_retrieval`)."""
    return {name: _mean(values.values()) for name, values in per_query_retrieval(ranking, queries, names).items()}


def judgments(query: dict) -> dict[str, int]:
    """{key_id: grade} of a query: its graded `relevance` where given, else grade 1 for each positive."""
    return grades(query.get("relevance")) or dict.fromkeys(query["positive_ids"], 1)


class LLMJudge:
    """The LLM's greedy answers and target log-probabilities, cached by (query, candidates in the prompt).

    Embedders that put the same candidates in a query's prompt share one LLM call. `advance(n)`, if given, is
    called as each n prompts are done (the progress bar); `chunk` prompts go into one greedy call.
    """

    def __init__(self, llm: Any, max_new_tokens: int = 24, chunk: int = 16) -> None:
        self.llm, self.max_new_tokens, self.chunk = llm, max_new_tokens, chunk
        self.key_text: dict[str, str] = {}
        self.answer_cache: dict[tuple[str, tuple[str, ...]], str] = {}
        self.score_cache: dict[tuple[str, tuple[str, ...]], tuple[float, int]] = {}

    def _prompt(self, q: dict, chosen: tuple[str, ...]) -> str:
        context = "\n".join(self.key_text[kid] for kid in chosen) if chosen else None
        return build_prompt(q["task"], q["text"], context)

    def answer_todo(self, queries: list[dict], ranking: dict[str, list[tuple[str, float]]], k: int) -> list[dict]:
        """The queries whose answer with their top-k candidates is not cached yet."""
        return [q for q in queries if (q["query_id"], _top(ranking, q, k)) not in self.answer_cache]

    def score_todo(self, queries: list[dict], ranking: dict[str, list[tuple[str, float]]], k: int) -> list[dict]:
        """The queries with a target whose log-probability with their top-k candidates is not cached yet."""
        return [q for q in queries if (q["target"] or "").strip()
                and (q["query_id"], _top(ranking, q, k)) not in self.score_cache]  # fmt: skip

    def answers(
        self, queries: list[dict], ranking: dict[str, list[tuple[str, float]]], k: int, advance: Any = None
    ) -> dict[str, str]:
        """Greedy answer of each query with its top-k candidates in the prompt."""
        chosen = {q["query_id"]: _top(ranking, q, k) for q in queries}
        todo = self.answer_todo(queries, ranking, k)
        for task in sorted({q["task"] for q in todo}):  # each task answers within its own token budget
            part = [q for q in todo if q["task"] == task]
            budget = min(task_spec(task).max_new_tokens, self.max_new_tokens)
            for start in range(0, len(part), self.chunk):
                block = part[start : start + self.chunk]
                prompts = [self._prompt(q, chosen[q["query_id"]]) for q in block]
                texts = self.llm.greedy(prompts, max_new_tokens=budget)
                self.answer_cache.update(((q["query_id"], chosen[q["query_id"]]), t) for q, t in zip(block, texts))
                if advance:
                    advance(len(block))
        return {qid: self.answer_cache[(qid, c)] for qid, c in chosen.items()}

    def target_logprobs(
        self, queries: list[dict], ranking: dict[str, list[tuple[str, float]]], k: int, advance: Any = None
    ) -> dict[str, tuple[float, int]]:
        """(summed log-probability, token count) of each query's target with its top-k candidates in the prompt."""
        out = {}
        for q in queries:
            if not (q["target"] or "").strip():
                continue
            key = (q["query_id"], _top(ranking, q, k))
            if key not in self.score_cache:
                self.score_cache[key] = self.llm.score(self._prompt(q, key[1]), [q["target"]], reduce="sum")[0]
                if advance:
                    advance(1)
            out[q["query_id"]] = self.score_cache[key]
        return out


def _top(ranking: dict[str, list[tuple[str, float]]], q: dict, k: int) -> tuple[str, ...]:
    return tuple(kid for kid, _ in ranking[q["query_id"]][:k])


def _mean(values: Any) -> float:
    values = list(values)
    return sum(values) / len(values)


def answer_scores(queries: list[dict], answers: dict[str, str]) -> dict[str, dict[str, float]]:
    """{"answer_accuracy": {query_id: 0 or 1}, "answer_em": {...}} of the queries with a target and an answer."""
    out: dict[str, dict[str, float]] = {}
    for q in queries:
        if q["target"] and q["query_id"] in answers:
            answer, target = normalize_answer(answers[q["query_id"]]), normalize_answer(q["target"])
            out.setdefault("answer_accuracy", {})[q["query_id"]] = float(f" {target} " in f" {answer} ")
            out.setdefault("answer_em", {})[q["query_id"]] = float(answer == target)
    return out


def answer_metrics(queries: list[dict], answers: dict[str, str]) -> dict[str, float]:
    """Mean answer accuracy and exact match (`answer_scores`)."""
    return {name: _mean(values.values()) for name, values in answer_scores(queries, answers).items()}


def pooled_perplexity(scored: np.ndarray) -> np.ndarray:
    """exp(- summed log-probability / summed tokens) over the queries of `scored` (..., queries, 2), each query's
    (summed log-probability of its target, its target's tokens): one number per leading index."""
    return np.exp(-scored[..., 0].sum(axis=-1) / scored[..., 1].sum(axis=-1))


def perplexity(scored: dict[str, tuple[float, int]]) -> dict[str, float]:
    """Perplexity pooled over every target token: exp(- sum of log-probabilities / number of tokens)."""
    if not sum(n for _, n in scored.values()):
        return {}
    return {"perplexity": float(pooled_perplexity(np.asarray(list(scored.values()), dtype=float)))}


STATISTICS = {"perplexity": pooled_perplexity}  # metrics that are not a mean of per-query values


def row_metrics(per_query: dict[str, dict[str, Any]], queries: list[dict], names: tuple[str, ...]) -> dict[str, Any]:
    """Each metric of `names` over `queries` from its per-query values (those it has), then the query count."""
    out: dict[str, Any] = {}
    ids = [q["query_id"] for q in queries]
    for name in names:
        values = per_query.get(name, {})
        mine = {i: values[i] for i in ids if i in values}
        if name == "perplexity":
            out.update(perplexity(mine))
        elif mine:
            out[name] = _mean(mine.values())
    return out | {"queries": len(queries)}


def _needs(task: str, kind: str) -> bool:
    names = task_spec(task).metrics
    return {"answer": "answer_accuracy" in names or "answer_em" in names, "perplexity": "perplexity" in names}[kind]


class TaskEvaluator:
    """Each task's metrics (its `TaskSpec.metrics`) for any number of rankings of one query set.

    `llm` a backend with `greedy` and `score` (None: retrieval metrics only), `k` the retrieved candidates in the
    LLM's prompt, `chunk` the prompts of one greedy call. LLM outputs are cached across embedders; `progress` shows
    the LLM's part as a bar with its rate and ETA.
    """

    def __init__(
        self, llm: Any = None, k: int = 1, max_new_tokens: int = 24, progress: bool = False, chunk: int = 16
    ) -> None:
        self.k, self.progress = k, progress
        self.judge = LLMJudge(llm, max_new_tokens, chunk) if llm is not None else None

    def _llm_outputs(self, ranked: Ranked, name: str) -> tuple[dict[str, str], dict[str, tuple[float, int]]]:
        if self.judge is None or self.k < 1:
            return {}, {}
        from tqdm.auto import tqdm

        judge, ranking = self.judge, ranked.ranking
        judge.key_text.update(ranked.key_text)
        asked = [q for q in ranked.queries if _needs(q["task"], "answer")]
        scored = [q for q in ranked.queries if _needs(q["task"], "perplexity")]
        todo = len(judge.answer_todo(asked, ranking, self.k)) + len(judge.score_todo(scored, ranking, self.k))
        with tqdm(total=todo, desc=f"eval/llm {name}".strip(), unit=" prompts", disable=not self.progress or not todo,
                  dynamic_ncols=True) as bar:  # fmt: skip
            answers = judge.answers(asked, ranking, self.k, bar.update)
            return answers, judge.target_logprobs(scored, ranking, self.k, bar.update)

    def run(self, ranked: Ranked, name: str = "") -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
        """({"all": metrics, "<task>": metrics}, per-query details: ranking, answers, target log-probs and every
        metric's per-query values)."""
        queries, ranking = ranked.queries, ranked.ranking
        answers, scored = self._llm_outputs(ranked, name)
        tasks = sorted({q["task"] for q in queries})
        rows = {"all": within(RETRIEVAL_METRICS, ranked.depth) + ANSWER_METRICS}
        rows.update((task, within(task_spec(task).metrics, ranked.depth)) for task in tasks)
        per_query = per_query_retrieval(ranking, queries, tuple(dict.fromkeys(n for r in rows.values() for n in r)))
        per_query.update(answer_scores(queries, answers))
        if scored:
            per_query["perplexity"] = scored
        by_task = {"all": row_metrics(per_query, queries, rows["all"])}
        for task in tasks:
            by_task[task] = row_metrics(per_query, [q for q in queries if q["task"] == task], rows[task])
        return by_task, {"ranking": ranking, "answers": answers, "target_logprobs": scored, "per_query": per_query}


def evaluate_run(
    config: EvalConfig, embedders: dict[str, Any] | None = None, progress: bool = True, report_to: Path | None = None
) -> dict[str, Any]:
    """`lemb eval`: {embedder name: {"all": metrics, "<task>": metrics}} for the given embedders (default: the
    run's base and trained ones; a model, or a table {model, instructions}). Each embedder is embedded with its own
    instructions (`auto`: the model's) and ranks through a retrieve run under `<run>/eval/<name>/`; the metrics
    (with what each embedder was embedded with, and every other embedder's paired bootstrap intervals against the
    base, else the first) and the report go to `report_to` (default `<run>/eval/`), the per-query details to
    `<run>/eval/`."""
    run = Path(config.run)
    embedders = embedders or config.embedders or _default_embedders(run)
    for name, spec in embedders.items():  # every model fails now, before the first ranking, not after it
        check_model(embedder_spec(spec)[0], "embedder", config.max_length, setting=f"--embedder {name}=MODEL")
    if config.answer_k > 0 and config.backend != "server":
        check_model(config.llm, "LLM")
    with StageLock(RunLayout(run).eval, "eval"):  # one eval per run at a time: its reports and rankings are shared
        return _evaluate(config, run, embedders, progress, report_to)


def _evaluate(
    config: EvalConfig, run: Path, embedders: dict[str, Any], progress: bool, report_to: Path | None
) -> dict[str, Any]:
    set_threads(config.cluster.threads)
    layout = RunLayout(run)
    llm = None
    evaluator = TaskEvaluator(None, config.answer_k, config.max_new_tokens)
    results: dict[str, Any] = {}
    details: dict[str, Any] = {}
    embedded_with: dict[str, Any] = {}
    truncation: dict[str, tuple[int, int]] = {}
    for name, spec in embedders.items():
        model, instructions = embedder_spec(spec)
        ranked = rank(config, model, layout.ranking(name), progress, instructions=instructions)
        embedded_with[name] = ranked.embedded_with
        truncation[name] = tuple(sum(c[i] for c in ranked.truncation.values()) for i in (0, 1))
        needs_llm = any(_needs(q["task"], "answer") or _needs(q["task"], "perplexity") for q in ranked.queries)
        if llm is None and config.answer_k > 0 and needs_llm:
            from lemb.stages.llm import load_llm

            llm = load_llm(config.backend, config.llm, server=config.server)
            evaluator = TaskEvaluator(llm, config.answer_k, config.max_new_tokens, progress,
                                      ANSWER_CHUNK[config.backend])  # fmt: skip
        log.info("evaluating %s (%s, instructions %s) on %d queries", name, model,
                 ranked.embedded_with["instructions"]["name"], len(ranked.queries))  # fmt: skip
        results[name], details[name] = evaluator.run(ranked, name)
        write_trec(ranked, layout.ranking(name), trec_tag(name, ranked.embedded_with))
    line = truncation_line(truncation, config.max_length)
    if line:
        log.warning("eval: %s", line)
    _log_left_out(ranked.queries, config.eval_depth)
    reference = "base" if "base" in results else next(iter(results))
    compare(results, {n: d["per_query"] for n, d in details.items()}, ranked.queries, reference, STATISTICS)
    write_report(run, report_to or layout.eval, results, embedded_with)
    write_json(layout.eval / "details.json", details)
    _card_metrics(layout.model, embedders, results)
    return results


def _card_metrics(model_dir: Path, embedders: dict[str, Any], results: dict[str, Any]) -> None:
    """When this eval scored the run's trained model, its model card gains these metrics (README.md, rewritten)."""
    scored = any(Path(embedder_spec(spec)[0]).resolve() == model_dir.resolve() for spec in embedders.values())
    if scored and read_facts(model_dir) is not None:
        write_card(model_dir, metrics=results)
        log.info("%s: model card updated with these metrics", model_dir / "README.md")


def _log_left_out(queries: list[dict], depth: int) -> None:
    names = dict.fromkeys(n for q in queries for n in (*RETRIEVAL_METRICS, *task_spec(q["task"]).metrics))
    deep = [n for n in names if n not in within(tuple(names), depth)]
    if deep:
        log.info("eval_depth %d: %s left out (their cut-off is deeper than the ranking)", depth, ", ".join(deep))


def write_trec(ranked: Ranked, folder: Path, tag: str) -> None:
    """`run.trec` (`qid Q0 docid rank score tag`, in the order the metrics and the LLM's prompts use; score is the
    embedder's similarity) and `qrels.trec` (`qid 0 docid grade`, 1 for a positive without grades), for trec_eval."""
    run_lines = [f"{qid} Q0 {key} {i} {score:.6f} {tag}\n"
                 for qid, hits in ranked.ranking.items() for i, (key, score) in enumerate(hits, 1)]  # fmt: skip
    qrels = [f"{q['query_id']} 0 {key} {grade}\n" for q in ranked.queries for key, grade in judgments(q).items()]
    write_text(folder / "run.trec", "".join(run_lines))
    write_text(folder / "qrels.trec", "".join(qrels))


def embedder_spec(spec: Any) -> tuple[str, Any]:
    """(model, instructions setting or None) of an `embedders` entry: a model, or a table {model, instructions}."""
    if isinstance(spec, dict):
        return spec["model"], spec.get("instructions")
    return spec, None


def trec_tag(name: str, embedded_with: dict[str, Any]) -> str:
    """A TREC run tag that says what the ranking was embedded with: `base|instructions=none|keys={title}:_{text}`."""
    template = embedded_with["key_template"]
    keys = template if isinstance(template, str) else json.dumps(template, sort_keys=True, separators=(",", ":"))
    return "_".join(f"{name}|instructions={embedded_with['instructions']['name']}|keys={keys}".split())


def _default_embedders(run: Path) -> dict[str, str]:
    """The base the run's training started from (train's stats say which) and the model it trained."""
    layout = RunLayout(run)
    if not layout.model.exists():
        raise LembError(f"{layout.model}: not found; run `lemb train --run {run}` first or pass --embedder")
    if is_adapter_folder(layout.model):  # trained with --lora: the adapters load through peft
        require_peft()
    try:
        base = json.loads(layout.train_stats.read_text())["embedder"]
    except (OSError, ValueError, KeyError):
        raise LembError(f"{layout.train_stats} does not name the base embedder (a training run of an earlier lemb): "
                        f"pass --embedder base=MODEL --embedder trained={layout.model}") from None  # fmt: skip
    return {"base": base, "trained": str(layout.model)}
