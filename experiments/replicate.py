"""The LLM-Embedder comparison at small scale (issue 3), built from lemb's stages.

Part 1 (`--part qa`), NQ oracle (2,600 passages, 1,615 questions):
  one `retrieve` + one `label` run on the training questions, shared by every trained variant
  (each variant's run folder links to the shared `retrieve/` and `label/`), then
    base          the embedder as shipped
    contrastive   InfoNCE on the gold passages
    likelihood_kl likelihood reward (mean token log-prob of the answer) + KL distillation (arXiv / REPLUG)
    rank_graded   rank-aware reward + graded distillation (ACL 2024)
  with the same candidates, steps, batch and seed. Dev: Recall@1/5, nDCG@10, the LLM's answers
  with the top-1 and top-3 passages, and from the label shards, how often each reward puts the
  gold passage first.

Part 2 (`--part multitask`): all six task kinds; one model trained on the mixture vs one model per
  kind (the same run's labels, `task_weights` restricted to that kind), per-task dev metrics.

Train/dev split: a question is dev when the first 8 hex digits of sha256("<salt>:<query_id>"),
read as a fraction of 2**32, fall below `--dev-fraction`; each side is ordered by that hash, so
`--queries N` takes the first N training questions of a fixed pseudo-random order and a larger N
only adds questions (lemb/data/split.py, the split of `lemb convert --dev-fraction`). The split does not
depend on `--seed` (which seeds sampling and training).

    python experiments/replicate.py --part all --out runs/replicate --queries 160
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from lemb.data.split import hash_fraction, split_by_hash
from lemb.trainer.bootstrap import paired_bootstrap

log = logging.getLogger("replicate")
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # replaced by --data
QA_VARIANTS = {  # name -> (reward, loss): the paper's 2 x 2 ablation, and contrastive on the gold passages
    "contrastive": ("rank", "contrastive"),
    "likelihood_kl": ("likelihood", "kl"),
    "likelihood_graded": ("likelihood", "graded"),
    "rank_kl": ("rank", "kl"),
    "rank_graded": ("rank", "graded"),
}


# ---------------------------------------------------------------- pure helpers (tested)


def alias_answer_scores(answer: str, aliases: list[str]) -> tuple[float, float]:
    """(exact match, accuracy) of one answer against every acceptable answer (NQ-open convention).

    Exact match: the normalised answer equals a normalised alias; accuracy: a normalised alias is
    the answer or a whole-word span of it (lemb eval's answer_accuracy).
    """
    from lemb.trainer.evaluate import normalize_answer

    got = normalize_answer(answer)
    wanted = [normalize_answer(a) for a in aliases if normalize_answer(a)]
    return float(any(got == a for a in wanted)), float(any(f" {a} " in f" {got} " for a in wanted))


# ---------------------------------------------------------------- running lemb's stages


class Clock:
    """Wall seconds of each named step, written into the results."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        log.info("start %s", name)
        out = fn()
        self.seconds[name] = round(time.perf_counter() - start, 1)
        log.info("done %s in %.1f s", name, self.seconds[name])
        return out


def run_settings(args: argparse.Namespace, run: Path) -> dict[str, Any]:
    return {"run": str(run), "executor": args.executor, "threads": args.threads}


def retrieve_and_label(args: argparse.Namespace, run: Path, queries: Path, corpus: Path, clock: Clock, tag: str):
    """The expensive part, once per part: lemb retrieve + lemb label (resumes if already done)."""
    from lemb.pipeline.config import LabelConfig, RetrieveConfig, load_config
    from lemb.stages.label import label
    from lemb.stages.retrieve import retrieve

    common = run_settings(args, run)
    clock(
        f"{tag}/retrieve",
        lambda: retrieve(
            load_config(
                RetrieveConfig,
                queries=str(queries),
                corpus=str(corpus),
                top_k=args.top_k,
                shards=args.shards,
                instructions=args.instructions,
                **common,
            ),  # fmt: skip
            progress=False,
        ),
    )
    label_cfg = load_config(
        LabelConfig,
        n_samples=args.n_samples,
        per_candidate_samples=args.per_candidate_samples,
        seed=args.seed,
        workers=args.workers,
        **common,
    )
    return clock(f"{tag}/label", lambda: label(label_cfg, progress=False))


def train_variant(args: argparse.Namespace, shared: Path, run: Path, clock: Clock, tag: str, **settings: Any) -> str:
    """lemb train in `run`, whose retrieve/ and label/ are links to the shared run's."""
    from lemb.pipeline.config import TrainConfig, load_config
    from lemb.trainer.recipe import train

    run.mkdir(parents=True, exist_ok=True)
    for stage in ("retrieve", "label"):
        link = run / stage
        if not link.is_symlink() and (shared / stage).exists():
            link.symlink_to(Path(os.path.relpath(shared / stage, run)), target_is_directory=True)
    defaults = {"steps": args.steps, "batch_size": args.batch_size, "group_size": args.top_k, "seed": args.seed,
                "instructions": args.instructions}  # fmt: skip
    config = load_config(TrainConfig, save_every=0, run=str(run), threads=args.threads, **(defaults | settings))
    return str(clock(tag, lambda: train(config, progress=False)))


def loss_curve(run: Path, windows: int = 10) -> list[dict[str, float]]:
    """The training loss of `run` as the mean over `windows` equal spans of steps (all tasks' rows pooled).

    log.jsonl counts steps from 0; the spans name them from 1 (`first_step` 1 is the log's step 0)."""
    rows = [json.loads(line) for line in (run / "train" / "log.jsonl").read_text().splitlines()]
    steps = max(r["step"] for r in rows) + 1
    width = max(1, -(-steps // windows))
    spans: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        spans[r["step"] // width].append(r["loss"])
    return [
        {"first_step": i * width + 1, "last_step": min(steps, (i + 1) * width), "loss": float(np.mean(v))}
        for i, v in sorted(spans.items())
    ]


def rank_dev(model: str, queries: Path, corpus: Path, out: Path, args: argparse.Namespace) -> Any:
    """The dev queries ranked by `model` through lemb's retrieve stage (what `lemb eval` does), into `out`."""
    from lemb.pipeline.config import EvalConfig, load_config
    from lemb.trainer.evaluate import rank

    config = load_config(
        EvalConfig, run=str(out), queries=str(queries), corpus=str(corpus), executor=args.executor,
        threads=args.threads, shards=args.shards, batch_size=args.eval_batch_size, key_template=args.key_template,
        instructions=args.instructions,
    )  # fmt: skip
    return rank(config, model, out, progress=False)


def per_query_retrieval(
    ranking: dict, records: list[dict], names: tuple[str, ...] | None = None
) -> dict[str, dict[str, float]]:
    """{metric: {query_id: value}} with lemb eval's measures (`names`, default its "all" row), one query at a time."""
    from lemb.trainer.evaluate import RETRIEVAL_METRICS, retrieval_metrics

    out: dict[str, dict[str, float]] = defaultdict(dict)
    for q in records:
        if q["positive_ids"]:
            for name, value in retrieval_metrics({q["query_id"]: ranking[q["query_id"]]}, [q],
                                                 names or RETRIEVAL_METRICS).items():  # fmt: skip
                out[name][q["query_id"]] = value
    return out


def answers_in_chunks(judge: Any, records: list[dict], ranking: dict, k: int, chunk: int = 16) -> dict[str, str]:
    out: dict[str, str] = {}
    for start in range(0, len(records), chunk):
        out.update(judge.answers(records[start : start + chunk], ranking, k))
    return out


def machine() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_start": os.getloadavg(),
    }


# ---------------------------------------------------------------- part 1: knowledge QA


def prepare_qa(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    from lemb.data.convert import cut
    from lemb.data.readers import write_jsonl
    from lemb.data.sources import knowledge_qa_nq_oracle

    queries, keys = knowledge_qa_nq_oracle(args.data / "knowledge_qa" / "nq_oracle")
    by_id = {q["query_id"]: q for q in queries}
    train_ids, dev_ids = split_by_hash(by_id, args.dev_fraction)
    train = [by_id[i] for i in train_ids[: args.queries]]
    dev = [by_id[i] for i in dev_ids[: args.dev]]
    if args.qa_corpus:  # the gold passages of the kept questions, then others in hash order, up to the cap
        keys = cut(train + dev, sorted(keys, key=lambda k: hash_fraction(k["key_id"])), None, args.qa_corpus)[1]
    aliases = {
        f"nq-{row['id']}": row["answers"]
        for row in map(
            json.loads, (args.data / "knowledge_qa" / "nq_oracle" / "queries.jsonl").read_text().splitlines()
        )
    }
    paths = {
        "train": write_jsonl(train, folder / "train.jsonl"),
        "dev": write_jsonl(dev, folder / "dev.jsonl"),
        "corpus": write_jsonl(keys, folder / "corpus.jsonl"),
    }
    split = {
        "train_available": len(train_ids),
        "dev_available": len(dev_ids),
        "train": len(train),
        "dev": len(dev),
        "corpus": len(keys),
    }
    return {"paths": paths, "dev": dev, "aliases": aliases, "split": split}


def part_qa(args: argparse.Namespace, out: Path, clock: Clock) -> dict[str, Any]:
    from lemb.stages.agreement import agreement as label_agreement
    from lemb.stages.llm.hf import TransformersBackend
    from lemb.trainer.evaluate import LLMJudge, answer_metrics
    from lemb.vocabulary import DEFAULT_EMBEDDER, DEFAULT_LLM

    data = prepare_qa(args, out / "qa" / "data")
    if args.label_from:  # a finished label stage of an earlier run (its run folder): no retrieve, no LLM calls
        shared = args.label_from
        label_stats = json.loads((shared / "label" / "_stats.json").read_text())
    else:
        shared = out / "qa" / "shared"
        label_stats = retrieve_and_label(args, shared, data["paths"]["train"], data["paths"]["corpus"], clock, "qa")
    agreement = label_agreement(shared / "label")["tasks"]["qa"]  # what `lemb inspect --agreement` prints

    models = {"base": DEFAULT_EMBEDDER}
    curves = {}
    for name, (reward, loss) in QA_VARIANTS.items():
        models[name] = train_variant(
            args, shared, out / "qa" / name, clock, f"qa/train/{name}", reward=reward, loss={"qa": loss}
        )
        curves[name] = loss_curve(out / "qa" / name)

    dev = data["dev"]
    llm_dev = dev[: args.dev_llm]
    judge = LLMJudge(TransformersBackend(DEFAULT_LLM), 24)
    metrics: dict[str, dict[str, float]] = {}
    per_query: dict[str, dict[str, dict[str, float]]] = {}
    for name, model in models.items():

        def evaluate_one(model: str = model, name: str = name) -> tuple[dict, dict]:
            ranked = rank_dev(model, data["paths"]["dev"], data["paths"]["corpus"], out / "qa" / "rank" / name, args)
            ranking = ranked.ranking
            judge.key_text.update(ranked.key_text)
            scores = per_query_retrieval(ranking, dev)
            result = {m: float(np.mean(list(v.values()))) for m, v in scores.items()}
            for k in (1, 3):
                answers = answers_in_chunks(judge, llm_dev, ranking, k)
                result.update({f"{m}_top{k}": v for m, v in answer_metrics(llm_dev, answers).items()})
                pairs = [alias_answer_scores(answers[q["query_id"]], data["aliases"][q["query_id"]]) for q in llm_dev]
                scores[f"em_any_answer_top{k}"] = {q["query_id"]: p[0] for q, p in zip(llm_dev, pairs)}
                scores[f"accuracy_any_answer_top{k}"] = {q["query_id"]: p[1] for q, p in zip(llm_dev, pairs)}
                result[f"em_any_answer_top{k}"] = float(np.mean([p[0] for p in pairs]))
                result[f"accuracy_any_answer_top{k}"] = float(np.mean([p[1] for p in pairs]))
            return result, scores

        metrics[name], per_query[name] = clock(f"qa/eval/{name}", evaluate_one)

    intervals = {}
    for metric in ("ndcg@10", "recall@1", "accuracy_any_answer_top1", "accuracy_any_answer_top3"):
        ref = per_query["rank_graded"][metric]
        for other in models:
            if other != "rank_graded":
                ids = sorted(ref)
                intervals[f"{metric}: rank_graded - {other}"] = paired_bootstrap(
                    [ref[i] for i in ids], [per_query[other][metric][i] for i in ids], seed=args.seed
                )
    return {
        "split": data["split"],
        "dev_llm_queries": len(llm_dev),
        "label_stats": {k: v for k, v in label_stats.items() if not isinstance(v, (list, dict))},
        "reward_gold_agreement": agreement,
        "metrics": metrics,
        "paired_bootstrap_95": intervals,
        "loss_curves": curves,
        "models": models,
    }


# ---------------------------------------------------------------- part 2: six task kinds

# (lemb convert source, split) per task kind; several sources of one kind share its key pool
MT_SOURCES = {
    "qa": [("nq_oracle", None)],
    "icl": [("sst2", "dev"), ("trec", "test"), ("cb", "val"), ("rte", "val")],
    "chat": [("msc", "session_3_test")],
    "lrlm": [("gutenberg", None)],
    "tool": [("gorilla", "torchhub"), ("toolalpaca", None)],
    "convsearch": [("trec_cast", "manual")],
}
MT_KINDS = tuple(MT_SOURCES)


def prepare_multitask(
    args: argparse.Namespace,
    folder: Path,
    kinds: Iterable[str] = MT_KINDS,
    n_train: int | None = None,
    n_dev: int | None = None,
    dev_fraction: float | None = None,
) -> dict[str, Any]:
    """Train and dev queries per kind (split by id hash, first N of each side), and the union of key pools."""
    from lemb.data.convert import cut, read_source
    from lemb.data.readers import write_jsonl

    n_train = args.mt_queries if n_train is None else n_train
    n_dev = args.mt_dev if n_dev is None else n_dev
    dev_fraction = args.dev_fraction if dev_fraction is None else dev_fraction
    train, dev, keys, counts = [], [], [], {}
    for kind in kinds:
        specs = MT_SOURCES[kind]
        queries, pool = [], []
        for name, split in specs:
            q, k = read_source(name, args.data, split)
            if kind == "icl":  # a fixed hash-ordered sample of each dataset's demonstration pool
                k = sorted(k, key=lambda key: hash_fraction(key["key_id"]))[: args.mt_pool]
            queries += q
            pool += k
        by_id = {q["query_id"]: q for q in queries}
        train_ids, dev_ids = split_by_hash(by_id, dev_fraction)
        kind_train = [by_id[i] for i in train_ids[:n_train]]
        kind_dev = [by_id[i] for i in dev_ids[:n_dev]]
        if kind == "qa":  # the gold passages of the kept questions, then others, up to the cap
            pool = cut(kind_train + kind_dev, sorted(pool, key=lambda key: hash_fraction(key["key_id"])), None,
                       args.mt_qa_corpus)[1]  # fmt: skip
        train += kind_train
        dev += kind_dev
        keys += pool
        counts[kind] = {
            "train": len(kind_train), "dev": len(kind_dev), "keys": len(pool),
            "train_available": len(train_ids), "dev_available": len(dev_ids),
        }  # fmt: skip
    paths = {
        "train": write_jsonl(train, folder / "train.jsonl"),
        "dev": write_jsonl(dev, folder / "dev.jsonl"),
        "corpus": write_jsonl(keys, folder / "corpus.jsonl"),
    }
    return {"paths": paths, "dev": dev, "counts": counts}


MT_MAIN_METRIC = {
    "qa": "ndcg@10",
    "icl": "answer_accuracy",
    "chat": "perplexity",
    "lrlm": "perplexity",
    "tool": "ndcg@5",
    "convsearch": "ndcg@3",
}


def part_multitask(args: argparse.Namespace, out: Path, clock: Clock) -> dict[str, Any]:
    from lemb.stages.llm.hf import TransformersBackend
    from lemb.trainer.evaluate import TaskEvaluator
    from lemb.vocabulary import DEFAULT_EMBEDDER, DEFAULT_LLM

    data = prepare_multitask(args, out / "multitask" / "data")
    shared = out / "multitask" / "shared"
    label_stats = retrieve_and_label(args, shared, data["paths"]["train"], data["paths"]["corpus"], clock, "multitask")
    models = {"base": DEFAULT_EMBEDDER}
    models["multitask"] = train_variant(args, shared, out / "multitask" / "all", clock, "multitask/train/all")
    for kind in MT_KINDS:
        models[f"only_{kind}"] = train_variant(
            args, shared, out / "multitask" / f"only_{kind}", clock, f"multitask/train/{kind}",
            task_weights={kind: 1.0},
        )  # fmt: skip

    from lemb.trainer.evaluate import Ranked

    evaluator = TaskEvaluator(TransformersBackend(DEFAULT_LLM), k=1)  # LLM outputs are cached across models
    metrics: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for name, model in models.items():
        kinds = [name.removeprefix("only_")] if name.startswith("only_") else list(MT_KINDS)

        def run_eval(model: str = model, name: str = name, kinds: list[str] = kinds) -> Any:
            ranked = rank_dev(model, data["paths"]["dev"], data["paths"]["corpus"], out / "multitask" / "rank" / name,
                              args)  # fmt: skip
            queries = [q for q in ranked.queries if q["task"] in kinds]
            ranking = {q["query_id"]: ranked.ranking[q["query_id"]] for q in queries}
            return evaluator.run(Ranked(ranking, queries, ranked.key_text))

        by_task, _ = clock(f"multitask/eval/{name}", run_eval)
        for kind in kinds:
            metrics[kind][name] = by_task.get(kind, {})
    label_by_task = label_summary(shared / "label")
    return {
        "counts": data["counts"],
        "label_by_task": label_by_task,
        "label_stats": {k: v for k, v in label_stats.items() if not isinstance(v, (list, dict))},
        "metrics": dict(metrics),
        "models": models,
    }


# ---------------------------------------------------------------- part 3: kinds whose only label is the LLM's feedback

FB_KINDS = ("icl", "chat", "lrlm", "tool")
FB_VARIANTS = {"rank_graded": ("rank", "graded"), "likelihood_kl": ("likelihood", "kl")}  # name -> (reward, loss)
FB_METRIC = {  # the per-query value each kind's comparison is bootstrapped on (higher is better)
    "icl": "answer_accuracy",  # the LLM's label with the top-1 demonstration contains the gold label
    "chat": "target_logprob_per_token",  # mean token log-probability of the target with the top-1 item
    "lrlm": "target_logprob_per_token",
    "tool": "ndcg@5",  # no LLM metric: the gold tool's rank
}


def per_query_feedback(kind: str, queries: list[dict], ranking: dict, details: dict) -> dict[str, float]:
    """{query_id: value of FB_METRIC[kind]} for the dev queries of `kind` that have one."""
    from lemb.trainer.evaluate import answer_metrics, retrieval_metrics

    part = [q for q in queries if q["task"] == kind]
    metric = FB_METRIC[kind]
    if metric == "answer_accuracy":
        answers = details["answers"]
        return {
            q["query_id"]: answer_metrics([q], {q["query_id"]: answers[q["query_id"]]})["answer_accuracy"]
            for q in part
            if q["query_id"] in answers and q["target"]
        }
    if metric == "target_logprob_per_token":
        scored = details["target_logprobs"]
        return {
            q["query_id"]: scored[q["query_id"]][0] / scored[q["query_id"]][1] for q in part if q["query_id"] in scored
        }
    return {
        q["query_id"]: retrieval_metrics({q["query_id"]: ranking[q["query_id"]]}, [q], (metric,))[metric]
        for q in part
        if q["positive_ids"]
    }


def part_feedback(args: argparse.Namespace, out: Path, clock: Clock) -> dict[str, Any]:
    """icl, chat, lrlm and tool: base vs rank + graded vs likelihood + KL (one model per kind) vs one model trained
    on all four with rank + graded, on the LLM's own metric of each kind, with paired intervals."""
    from lemb.stages.agreement import agreement as label_agreement
    from lemb.stages.llm.hf import TransformersBackend
    from lemb.trainer.evaluate import Ranked, TaskEvaluator
    from lemb.vocabulary import DEFAULT_EMBEDDER, DEFAULT_LLM

    data = prepare_multitask(args, out / "feedback" / "data", FB_KINDS, args.fb_queries, args.fb_dev,
                             args.fb_dev_fraction)  # fmt: skip
    if args.label_from:
        shared = args.label_from
        label_stats = json.loads((shared / "label" / "_stats.json").read_text())
    else:
        shared = out / "feedback" / "shared"
        label_stats = retrieve_and_label(args, shared, data["paths"]["train"], data["paths"]["corpus"], clock,
                                         "feedback")  # fmt: skip
    result: dict[str, Any] = {
        "counts": data["counts"],
        "label_stats": {k: v for k, v in label_stats.items() if not isinstance(v, (list, dict))},
        "label_by_task": label_summary(shared / "label"),
        "reward_gold_agreement": label_agreement(shared / "label")["tasks"],
    }
    if args.label_only:
        return result

    models = {"base": DEFAULT_EMBEDDER}
    curves = {}
    tag = "feedback/train/multitask"
    models["multitask"] = train_variant(args, shared, out / "feedback" / "multitask", clock, tag, reward="rank",
                                        loss=dict.fromkeys(FB_KINDS, "graded"), steps=args.fb_steps)  # fmt: skip
    curves["multitask"] = loss_curve(out / "feedback" / "multitask")
    for kind in FB_KINDS:
        for name, (reward, loss) in FB_VARIANTS.items():
            run = out / "feedback" / f"{name}_{kind}"
            models[f"{name}_{kind}"] = train_variant(
                args, shared, run, clock, f"feedback/train/{name}_{kind}", reward=reward, loss={kind: loss},
                task_weights={kind: 1.0}, steps=args.fb_steps,
            )  # fmt: skip
            curves[f"{name}_{kind}"] = loss_curve(run)

    evaluator = TaskEvaluator(TransformersBackend(DEFAULT_LLM), k=1)  # LLM outputs are cached across models
    metrics: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    per_query: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)  # kind -> model -> query -> value
    for name, model in models.items():
        kinds = [k for k in FB_KINDS if name.endswith(f"_{k}")] or list(FB_KINDS)

        def run_eval(model: str = model, name: str = name, kinds: list[str] = kinds) -> Any:
            ranked = rank_dev(model, data["paths"]["dev"], data["paths"]["corpus"], out / "feedback" / "rank" / name,
                              args)  # fmt: skip
            queries = [q for q in ranked.queries if q["task"] in kinds]
            ranking = {q["query_id"]: ranked.ranking[q["query_id"]] for q in queries}
            by_task, details = evaluator.run(Ranked(ranking, queries, ranked.key_text))
            return by_task, details, queries, ranking

        by_task, details, queries, ranking = clock(f"feedback/eval/{name}", run_eval)
        for kind in kinds:
            metrics[kind][name] = by_task.get(kind, {})
            per_query[kind][name] = per_query_feedback(kind, queries, ranking, details)

    intervals = {}
    for kind in FB_KINDS:
        values = per_query[kind]
        rank, likelihood = f"rank_graded_{kind}", f"likelihood_kl_{kind}"
        pairs = [(rank, "base"), (rank, likelihood), (likelihood, "base"), ("multitask", "base"), ("multitask", rank)]
        for a, b in pairs:
            ids = sorted(set(values[a]) & set(values[b]))
            intervals[f"{kind} {FB_METRIC[kind]}: {a} - {b}"] = paired_bootstrap(
                [values[a][i] for i in ids], [values[b][i] for i in ids], seed=args.seed
            )
    return result | {
        "metrics": dict(metrics),
        "per_query_means": {
            k: {m: float(np.mean(list(v.values()))) for m, v in d.items()} for k, d in per_query.items()
        },
        "paired_bootstrap_95": intervals,
        "loss_curves": curves,
        "models": models,
    }


def feedback_markdown(fb: dict[str, Any]) -> str:
    rows = []
    for kind in FB_KINDS:
        m, c = fb.get("metrics", {}).get(kind, {}), fb["counts"][kind]
        main = MT_MAIN_METRIC[kind]
        names = ("base", f"rank_graded_{kind}", f"likelihood_kl_{kind}", "multitask")
        rows.append([kind, main, c["train"], c["dev"], *[m.get(n, {}).get(main) for n in names]])
    lines = [
        "Main metric per kind (perplexity: lower is better; the rest: higher is better).",
        "",
        md_table(
            ["kind", "metric", "train q", "dev q", "base", "rank + graded", "likelihood + KL", "multi-task"], rows
        ),
        "",
        "Label signal per kind (training queries):",
        "",
        md_table(
            ["kind", "queries", "with signal", "mean rank reward"],
            [[k, v["queries"], v["with_signal"], v["mean_reward"]] for k, v in fb["label_by_task"].items()],
        ),
    ]
    if fb.get("paired_bootstrap_95"):
        lines += [
            "",
            "Paired bootstrap (2,000 resamples of dev queries), 95% interval of the difference of per-query values:",
            "",
            bootstrap_table(fb["paired_bootstrap_95"]),
        ]
    return "\n".join(lines)


def label_summary(label_dir: Path) -> dict[str, dict[str, float]]:
    """Per task: labelled queries, queries without a signal, mean rank-aware reward."""
    from lemb.pipeline.shards import read_stage

    rows = read_stage(label_dir, ["query_id", "task", "pool_size", "reward"]).to_pylist()
    out: dict[str, dict[str, float]] = {}
    for task in sorted({r["task"] for r in rows}):
        part = [r for r in rows if r["task"] == task]
        signal = {r["query_id"] for r in part if r["pool_size"]}
        rewards = [r["reward"] for r in part if r["reward"] is not None]
        out[task] = {
            "queries": len({r["query_id"] for r in part}),
            "with_signal": len(signal),
            "mean_reward": float(np.mean(rewards)) if rewards else float("nan"),
        }
    return out


def multitask_markdown(mt: dict[str, Any]) -> str:
    rows = []
    for kind in MT_KINDS:
        m = mt["metrics"].get(kind, {})
        metric = MT_MAIN_METRIC[kind]
        counts = mt["counts"][kind]
        rows.append(
            [kind, metric, counts["train"], counts["dev"]]
            + [m.get(name, {}).get(metric) for name in ("base", "multitask", f"only_{kind}")]
        )
    lines = [
        "Main metric per task (perplexity: lower is better; the rest: higher is better).",
        "",
        md_table(["task", "metric", "train q", "dev q", "base", "one multi-task model", "one model per task"], rows),
        "",
        "All metrics:",
        "",
    ]
    for kind in MT_KINDS:
        m = mt["metrics"].get(kind, {})
        names = [n for n in ("base", "multitask", f"only_{kind}") if n in m]
        cols = sorted({c for n in names for c in m[n]})
        lines += [
            f"**{kind}**",
            "",
            md_table(["model", *cols], [[n, *[m[n].get(c) for c in cols]] for n in names]),
            "",
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------- markdown


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def qa_markdown(qa: dict[str, Any]) -> str:
    cols = [
        "recall@1", "recall@5", "ndcg@10",
        "em_any_answer_top1", "accuracy_any_answer_top1", "em_any_answer_top3", "accuracy_any_answer_top3",
    ]  # fmt: skip
    rows = [[name, *[m.get(c, float("nan")) for c in cols]] for name, m in qa["metrics"].items()]
    out = [
        f"Dev: {qa['split']['dev']} questions for retrieval, the first {qa['dev_llm_queries']} of them for the"
        f" LLM's answers; trained on {qa['split']['train']} labelled questions.",
        "",
        md_table(["variant", *cols], rows),
        "",
        "Reward vs gold passage on the labelled training questions (candidates of the base retrieval):",
        "",
        md_table(
            ["ordering", "gold first", "MRR of gold", "tied pairs", "no signal", "queries with gold"],
            [
                [k, v["gold_first"], v["mrr"], v["tied_pair_share"], v["no_signal"], v["with_positive"]]
                for k, v in qa["reward_gold_agreement"].items()
            ],
        ),  # fmt: skip
        "",
        "Paired bootstrap (2,000 resamples of dev questions), 95% interval of the difference:",
        "",
        bootstrap_table(qa["paired_bootstrap_95"]),
    ]
    return "\n".join(out)


def bootstrap_table(intervals: dict[str, dict[str, float]]) -> str:
    """paired_bootstrap results, one comparison per row."""
    return md_table(["comparison", "diff", "lo", "hi", "n"], [[k, v["diff"], v["lo"], v["hi"], v["n"]]
                                                                for k, v in intervals.items()])  # fmt: skip


def timings_markdown(seconds: dict[str, float]) -> str:
    return md_table(["step", "seconds"], [[k, v] for k, v in seconds.items()])


# ---------------------------------------------------------------- entry point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--part", choices=("qa", "multitask", "feedback", "all"), default="all")
    p.add_argument("--out", type=Path, default=Path("runs/replicate"))
    p.add_argument("--data", type=Path, default=DATA, help="the shared data folder")
    p.add_argument("--queries", type=int, default=160, help="labelled training questions (qa)")
    p.add_argument("--dev", type=int, default=320, help="dev questions for retrieval metrics (qa)")
    p.add_argument("--dev-llm", type=int, default=100, help="first dev questions also answered by the LLM")
    p.add_argument("--dev-fraction", type=float, default=0.2, help="share of questions in the dev split")
    p.add_argument("--mt-queries", type=int, default=24, help="training queries per task kind (multitask)")
    p.add_argument("--mt-dev", type=int, default=40, help="dev queries per task kind (multitask)")
    p.add_argument("--mt-pool", type=int, default=250, help="demonstrations kept per ICL dataset (multitask)")
    p.add_argument("--mt-qa-corpus", type=int, default=600, help="NQ passages kept in part 2 (golds first)")
    p.add_argument("--fb-queries", type=int, default=100, help="training queries per kind (feedback)")
    p.add_argument("--fb-dev", type=int, default=150, help="dev queries per kind (feedback)")
    p.add_argument("--fb-dev-fraction", type=float, default=0.4, help="share of each kind in its dev split (feedback)")
    p.add_argument("--fb-steps", type=int, default=100, help="training steps of each model (feedback)")
    p.add_argument("--label-only", action="store_true", help="stop after retrieve and label (feedback)")
    p.add_argument("--qa-corpus", type=int, default=0, help="NQ passages kept in part 1, golds first (0: all)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--top-k", type=int, default=5, help="candidates per query (also the training group size)")
    p.add_argument("--n-samples", type=int, default=6)
    p.add_argument("--per-candidate-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--instructions", default="auto",
                   help="instructions of retrieve, train and eval (auto: each model's own; the runs of RESULTS.md's "
                   "sections 1-3 used llm-embedder)")  # fmt: skip
    p.add_argument("--executor", choices=("ray", "local"), default="ray")
    p.add_argument("--workers", type=int, default=0, help="label actors (0: fill the cluster)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--key-template", default="{title}: {text}", help="eval's key template (as the labels embedded)")
    p.add_argument(
        "--label-from",
        type=Path,
        default=None,
        help="run folder of a finished label stage to train on (parts qa and feedback; skips retrieve and label)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    from lemb.pipeline.executor import quiet_libraries, set_threads

    quiet_libraries()
    set_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    clock = Clock()
    command = " ".join(["python", *sys.argv]) if argv is None else " ".join(argv)
    results: dict[str, Any] = {"command": command, "args": vars(args) | {"out": str(args.out), "data": str(args.data)}}
    results["machine"] = machine()
    start = time.perf_counter()
    sections: list[str] = []

    def write() -> None:  # after each part, so a failure later keeps what is done
        results["seconds"] = clock.seconds
        results["total_seconds"] = round(time.perf_counter() - start, 1)
        text = "\n".join([*sections, "## Wall time of each step", "", timings_markdown(clock.seconds), ""])
        (args.out / f"results-{args.part}.json").write_text(json.dumps(results, indent=2, default=str))
        (args.out / f"results-{args.part}.md").write_text(text)

    if args.part in ("qa", "all"):
        results["qa"] = part_qa(args, args.out, clock)
        sections += ["## Part 1: knowledge QA (NQ oracle)", "", qa_markdown(results["qa"]), ""]
        write()
    if args.part in ("multitask", "all"):
        results["multitask"] = part_multitask(args, args.out, clock)
        sections += ["## Part 2: one multi-task model vs one model per task", ""]
        sections += [multitask_markdown(results["multitask"]), ""]
        write()
    if args.part in ("feedback", "all"):
        results["feedback"] = part_feedback(args, args.out, clock)
        sections += ["## Part 3: the kinds whose only label is the LLM's feedback", ""]
        sections += [feedback_markdown(results["feedback"]), ""]
        write()
    print((args.out / f"results-{args.part}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
