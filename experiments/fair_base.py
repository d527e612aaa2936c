"""The honest baseline (issue 26): each embedder scored with the instructions it is meant to be used with.

On one finished label run and one task kind, four arms, each ranked on the dev queries of that kind that have a
positive, over the corpus keys of that kind (lemb eval's ranking and metrics, no LLM):

- `base`: the base embedder with no instructions, as all-MiniLM-L6-v2 was trained and is used by its authors;
- `base_llm_embedder`: the same base with the LLM-Embedder instructions (the row every earlier "vs base" figure
  compared against);
- `trained_none` / `trained_llm_embedder`: rank reward + graded loss trained with no instructions / with the
  LLM-Embedder preset, each scored with the instructions it was trained with.

`--llm` adds the LLM's own metric with the top retrieved candidates in its prompt (the default LLM, greedy): for qa the
answer accuracy against every NQ answer alias with the top 1 and top 3 passages on the first 300 dev questions (as in
RESULTS.md section 1), for icl the label accuracy and for chat and lrlm the mean token log-probability of the target
with the top-1 item (section 2). Kinds without positives (icl, chat, lrlm) are scored on all their dev queries, by the
LLM only. Every arm is compared with `base` (and the two trained arms with each other) by a paired bootstrap over dev
queries. Each finished arm keeps its per-query metrics in `<out>/<arm>/dev-metrics.json`, so a rerun redoes only what
is missing. `--prepare qa|feedback` writes the dev and corpus files of RESULTS.md's sections 1 and 2 (replicate.py's
hash splits) into `<out>/data` instead of taking `--dev` / `--corpus`.

    python experiments/fair_base.py --run runs/nq-pool32 --prepare qa --task qa --key-template '{text}' \\
        --out runs/fair-qa --steps 100
    python experiments/fair_base.py --run runs/fb --prepare feedback --task tool --group-size 5 --out runs/fair-tool
    python experiments/fair_base.py --prepare feedback --task chat --llm --arms base base_llm_embedder \\
        --out runs/fair-chat
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from lemb.files import write_json
from lemb.trainer.bootstrap import paired_bootstrap

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss_settings import task_files, task_rows  # noqa: E402
from pool_size import label_setup, train_on  # noqa: E402
from replicate import (  # noqa: E402
    FB_METRIC,
    Clock,
    alias_answer_scores,
    answers_in_chunks,
    bootstrap_table,
    machine,
    md_table,
    per_query_feedback,
    per_query_retrieval,
)

log = logging.getLogger("fair_base")
METRICS = ("ndcg@10", "ndcg@5", "ndcg@3", "recall@1", "recall@5")
DEV_METRICS = "dev-metrics.json"
# arm -> (trained with these instructions, or None for the base; scored with these instructions)
ARMS = {
    "base": (None, "none"),
    "base_llm_embedder": (None, "llm-embedder"),
    "trained_none": ("none", "none"),
    "trained_llm_embedder": ("llm-embedder", "llm-embedder"),
}
COMPARISONS = [
    ("trained_none", "base"),
    ("trained_llm_embedder", "base"),
    ("base_llm_embedder", "base"),
    ("trained_none", "trained_llm_embedder"),
]


def prepare(kind: str, folder: Path, data: Path, fb_train: int = 100, fb_dev: int = 150) -> dict[str, Any]:
    """RESULTS.md's dev and corpus files: section 1 (`qa`: 320 dev questions, all 2,600 passages; the first 300 also
    answered by the LLM, with their NQ answer aliases) or section 2 (`feedback`: the first `fb_train` training and
    `fb_dev` dev queries per kind of its hash split, 100 and 150 there, and the four kinds' key pools)."""
    from replicate import FB_KINDS, parse_args, prepare_multitask, prepare_qa

    if kind == "qa":
        args = parse_args(["--queries", "300", "--dev", "320", "--data", str(data)])
        prepared = prepare_qa(args, folder)
        return prepared["paths"] | {"llm_dev": prepared["dev"][:300], "aliases": prepared["aliases"]}
    args = parse_args(["--data", str(data)])
    return prepare_multitask(args, folder, FB_KINDS, fb_train, fb_dev, 0.4)["paths"]


def write_unlabelled(train: Path, run: Path, task: str, out: Path) -> Path:
    """The training queries of `task` that the label run `run` has not labelled: the input of a second label run."""
    from lemb.data.readers import read_queries, write_jsonl
    from lemb.pipeline.shards import stage_files

    done = {
        q for f in stage_files(run / "label") for q in pq.read_table(f, columns=["query_id"])["query_id"].to_pylist()
    }
    todo = [q for q in read_queries(train).to_pylist() if q["task"] == task and q["query_id"] not in done]
    return write_jsonl(todo, out)


def kind_files(dev: Path, corpus: Path, task: str, folder: Path) -> tuple[Path, Path | None]:
    """The dev queries and corpus keys of `task`: those with a positive where the kind has positives (retrieval
    metrics), all of them where it has none (the LLM's metric only)."""
    from lemb.data.readers import read_keys, read_queries, write_jsonl

    queries = [q for q in read_queries(dev).to_pylist() if q["task"] == task]
    if any(q["positive_ids"] for q in queries):
        return task_files(dev, corpus, task, folder)
    if not queries:
        raise SystemExit(f"{dev}: no query of task {task!r}")
    folder.mkdir(parents=True, exist_ok=True)
    keys = [k for k in read_keys(corpus).to_pylist() if k["task"] == task]  # none for chat, lrlm: their history
    return write_jsonl(queries, folder / "dev.jsonl"), write_jsonl(keys, folder / "corpus.jsonl") if keys else None


class LLMMetric:
    """The task's LLM metric per dev query, the LLM's outputs cached across arms (the default LLM, greedy)."""

    def __init__(self, task: str, data: dict[str, Any]) -> None:
        from lemb.stages.llm.hf import TransformersBackend
        from lemb.trainer.evaluate import LLMJudge, TaskEvaluator
        from lemb.vocabulary import DEFAULT_LLM

        self.task, self.data = task, data
        llm = TransformersBackend(DEFAULT_LLM)
        self.judge = LLMJudge(llm, 24)  # qa: section 1's answers with the top 1 and top 3 passages
        self.evaluator = TaskEvaluator(llm, k=1)  # icl, chat, lrlm: section 2's top-1 metric

    def __call__(self, ranked: Any) -> dict[str, dict[str, float]]:
        if self.task != "qa":
            _, details = self.evaluator.run(ranked)
            return {FB_METRIC[self.task]: per_query_feedback(self.task, ranked.queries, ranked.ranking, details)}
        self.judge.key_text.update(ranked.key_text)
        out = {}
        llm_dev = self.data["llm_dev"]
        for k in (1, 3):
            answers = answers_in_chunks(self.judge, llm_dev, ranked.ranking, k)
            out[f"accuracy_any_answer_top{k}"] = {
                q["query_id"]: alias_answer_scores(answers[q["query_id"]], self.data["aliases"][q["query_id"]])[1]
                for q in llm_dev
            }
        return out


def rank_arm(model: str, folder: Path, args, instructions: str) -> Any:
    """The dev queries ranked by `model` embedded with `instructions` (lemb eval's ranking)."""
    from lemb.pipeline.config import EvalConfig, load_config
    from lemb.stages.key_reuse import run_key_template
    from lemb.trainer.evaluate import rank

    template = args.key_template
    if template is None:
        template = run_key_template(args.run[0]) if args.run else None
    corpus = str(args.corpus) if args.corpus else None
    config = load_config(EvalConfig, run=str(folder), queries=str(args.dev), corpus=corpus,
                         executor="local", threads=args.threads, key_template=template)  # fmt: skip
    return rank(config, model, folder / "rank", progress=False, instructions=instructions)


def dev_retrieval(ranking: dict, args) -> dict[str, dict[str, float]]:
    """{metric: {query: value}}: lemb eval's "all" row and the task's own retrieval metrics (`TaskSpec.metrics`,
    e.g. tool's nDCG@5) of the dev queries with a positive."""
    from lemb.data.readers import read_queries
    from lemb.data.tasks import task_spec
    from lemb.trainer.evaluate import IR_NAMES, RETRIEVAL_METRICS

    own = tuple(m for m in task_spec(args.task).metrics if m.partition("@")[0] in IR_NAMES)
    names = RETRIEVAL_METRICS + tuple(m for m in own if m not in RETRIEVAL_METRICS)
    return dict(per_query_retrieval(ranking, read_queries(args.dev).to_pylist(), names))


def saved_ranking(rank_dir: Path) -> dict[str, list[tuple[str, float]]]:
    """The ranking an arm's retrieve run wrote (for arms scored before their task's own metrics were)."""
    from lemb.data.schemas import by_query
    from lemb.pipeline.shards import stage_files

    ranking = {}
    for f in stage_files(rank_dir / "candidates"):
        for rows in by_query(pq.read_table(f).to_pylist()):
            ranking[rows[0]["query_id"]] = [(r["key_id"], r["retrieval_score"]) for r in rows]
    return ranking


def scored_arm(
    name: str, spec: tuple, folder: Path, tables: list, tie_tolerance: float, clock: Clock, args
) -> dict[str, Any]:
    """{"per_query": {metric: {query: value}}, "seconds": {...}} of one arm, trained and ranked once. `spec`:
    (instructions trained with or None, instructions scored with, model or None for the base)."""
    from lemb.vocabulary import DEFAULT_EMBEDDER

    cached = folder / DEV_METRICS
    trained_with, scored_with, given = spec
    made = {"task": args.task, "steps": args.steps, "trained_with": trained_with, "scored_with": scored_with}
    made |= {"llm": args.llm is not None} | ({"model": given} if given else {})
    if cached.exists():
        saved = json.loads(cached.read_text())
        saved["made"].setdefault("llm", False)
        if saved["made"] != made:
            raise SystemExit(f"{cached}: made with {saved['made']}, not {made}; use another --out")
        saved["per_query"] |= dev_retrieval(saved_ranking(folder / "rank"), args)  # the task's own depths too
        return saved
    seconds = {}
    model = given or DEFAULT_EMBEDDER
    if trained_with is not None:
        overrides = {"loss": {args.task: "graded"}, "instructions": trained_with}
        model = clock(f"{name}/train", lambda: train_on(tables, folder, args, tie_tolerance, **overrides))
        seconds["train_s"] = json.loads((folder / "train" / "log.jsonl").read_text().splitlines()[-1])["elapsed_s"]
    ranked = clock(f"{name}/dev", lambda: rank_arm(model, folder, args, scored_with))
    seconds["dev_s"] = clock.seconds[f"{name}/dev"]
    per_query = dev_retrieval(ranked.ranking, args)
    if args.llm is not None:
        per_query |= clock(f"{name}/llm", lambda: args.llm(ranked))
        seconds["llm_s"] = clock.seconds[f"{name}/llm"]
    out = {"made": made, "model": model, "seconds": seconds, "per_query": per_query}
    write_json(cached, out)
    return out


def main(argv: list[str] | None = None) -> int:
    from lemb.pipeline.config import TrainConfig

    defaults = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--run",
        type=Path,
        nargs="*",
        default=[],
        help="run folders with a finished label stage (the trained arms train on all their rows)",
    )
    p.add_argument(
        "--extra",
        nargs="*",
        default=[],
        help="NAME=MODEL: more arms, models trained elsewhere, scored with their own instructions",
    )
    p.add_argument("--prepare", choices=("qa", "feedback"), help="write RESULTS.md's dev and corpus files")
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    p.add_argument("--fb-train", type=int, default=100, help="--prepare feedback: training queries per kind")
    p.add_argument("--fb-dev", type=int, default=150, help="--prepare feedback: dev queries per kind")
    p.add_argument("--unlabelled-from", type=Path,
                   help="write <out>/data/unlabelled.jsonl, the prepared training queries of --task that this label"
                   " run has not labelled, and stop")  # fmt: skip
    p.add_argument("--dev", type=Path)
    p.add_argument("--corpus", type=Path)
    p.add_argument("--out", type=Path, default=Path("runs/fair_base"))
    p.add_argument("--task", default="qa", help="the task kind trained and scored")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--group-size", type=int, default=defaults.group_size)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--key-template", default=None, help="dev ranking's key template (default: the label run's)")
    p.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--llm", action="store_true", help="also the task's LLM metric (qa, icl, chat, lrlm)")
    p.add_argument("--reuse", nargs="*", default=[],
                   help="ARM=RESULTS.json:VARIANT: an arm's per-query metrics from a loss_settings.py run that trained"
                   " it with the same settings, instead of training it again")  # fmt: skip
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    from lemb.pipeline.executor import quiet_libraries, set_threads

    quiet_libraries()
    set_threads(args.threads)
    clock = Clock()
    data: dict[str, Any] = {}
    if args.prepare:
        data = prepare(args.prepare, args.out / "data", args.data, args.fb_train, args.fb_dev)
        args.dev, args.corpus = data["dev"], data["corpus"]
        if args.unlabelled_from:
            path = write_unlabelled(
                data["train"], args.unlabelled_from, args.task, args.out / "data" / "unlabelled.jsonl"
            )
            print(f"{path}: the {args.task} training queries that {args.unlabelled_from} has not labelled")
            return 0
    if args.dev is None or args.corpus is None:
        raise SystemExit("--dev and --corpus (or --prepare) are required")
    tables, setup = [], {"tie_tolerance": None}
    if any(ARMS[a][0] for a in args.arms):
        if not args.run:
            raise SystemExit("--run (a finished label stage) is required for the trained arms")
        for run in args.run:
            setup = label_setup(run / "label", subpools=False)
            found = [task_rows(pq.read_table(f), args.task) for f in setup["files"]]
            if not any(t.num_rows for t in found):
                raise SystemExit(f"{run / 'label'}: no reward rows of task {args.task!r}")
            tables += found
    arms = {name: (*ARMS[name], None) for name in args.arms}
    arms |= {name: (None, "auto", model) for name, model in (e.split("=", 1) for e in args.extra)}
    if args.llm and args.task == "qa" and "aliases" not in data:
        raise SystemExit("--llm on qa needs --prepare qa (the NQ answer aliases)")
    args.dev, args.corpus = kind_files(args.dev, args.corpus, args.task, args.out / f"data-{args.task}")
    args.llm = LLMMetric(args.task, data) if args.llm else None
    results: dict[str, Any] = {"command": " ".join(["python", *sys.argv]), "machine": machine(), "task": args.task,
                               "steps": args.steps, "batch_size": args.batch_size, "group_size": args.group_size,
                               "tau": defaults.tau, "alpha": defaults.alpha, "arms": {}}  # fmt: skip
    per_query = {}
    for name, spec in arms.items():
        arm = scored_arm(name, spec, args.out / name, tables, setup["tie_tolerance"], clock, args)
        per_query[name] = arm["per_query"]
        means = {m: float(np.mean(list(v.values()))) for m, v in arm["per_query"].items()}
        results["arms"][name] = {"trained_with": spec[0], "scored_with": spec[1], "model": arm["model"], **means,
                                 **arm["seconds"]}  # fmt: skip
    for item in args.reuse:  # an arm measured before, with the same settings, by loss_settings.py
        name, _, where = item.partition("=")
        path, _, variant = where.rpartition(":")
        saved = json.loads(Path(path).read_text())
        per_query[name] = saved["per_query"][variant]
        if set(per_query[name]["ndcg@10"]) != set(next(iter(per_query.values()))["ndcg@10"]):
            raise SystemExit(f"{path}: variant {variant!r} was scored on other dev queries")
        means = {m: float(np.mean(list(v.values()))) for m, v in per_query[name].items()}
        results["arms"][name] = {"trained_with": ARMS[name][0], "scored_with": ARMS[name][1], "from": where, **means}
    intervals = {}
    metrics = [
        m for m in next(iter(per_query.values())) if m in METRICS or not m.startswith(("recall", "ndcg", "mrr"))
    ]
    extras = [name for name in arms if arms[name][2]]
    for a, b in COMPARISONS + [(n, "base") for n in extras] + [("trained_none", n) for n in extras]:
        if a in per_query and b in per_query:
            for m in metrics:
                ids = sorted(per_query[b][m])
                intervals[f"{m}: {a} - {b}"] = paired_bootstrap(
                    [per_query[a][m][i] for i in ids], [per_query[b][m][i] for i in ids], seed=args.seed
                )
    results["paired_bootstrap_95"] = intervals
    results["per_query"] = per_query
    results["seconds"] = clock.seconds
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results-fair-base.json", results)
    rows = [
        [n, a["trained_with"] or "-", a["scored_with"], *[a[m] for m in metrics]] for n, a in results["arms"].items()
    ]
    table = md_table(["arm", "trained with", "scored with", *metrics], rows) + "\n\n" + bootstrap_table(intervals)
    (args.out / "results-fair-base.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
