"""Training settings from evidence (issue 14, part 5): the graded loss's alpha and tau and the group size, varied one
at a time around a reference point (lemb's defaults unless `--alpha` / `--tau` / `--group-size` say otherwise) on
one finished label run (no LLM call), each scored by dev nDCG@10 and R@1 with paired bootstrap intervals against the
reference.

Every variant trains with the rank reward and the graded loss on the same reward rows, steps, batches and seed; only
the varied setting differs. `--task` picks the task kind trained and scored (default qa): only its label rows are
trained on, and only its dev queries with a positive are ranked, over its own keys of the corpus. The group size can
be at most the label run's candidates per query. `--pool N` trains on the rank reward of a sub-pool of N of the
label run's samples, cut as experiments/pool_size.py cuts it (the run must hold no per-candidate samples).

Each finished variant keeps its per-query dev metrics in `<out>/<variant>/dev-metrics.json`: a rerun into the same
`--out` with more values trains and ranks only the new ones. So a sweep can be split across processes (all but one
with `--no-reference`, which trains only the listed values) and joined by one run over all values into one `--out`.
The results JSON keeps every variant's per-query metrics, so a later sweep joins it with `--join` without training
the reference again.

    python experiments/loss_settings.py --run runs/nq-pool32 --dev runs/ablation/qa/data/dev.jsonl \\
        --corpus runs/ablation/qa/data/corpus.jsonl --out runs/loss_settings --key-template '{text}'
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lemb.files import write_json
from lemb.trainer.bootstrap import paired_bootstrap

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pool_size import dev_metrics, label_setup, subpool_table, train_on  # noqa: E402
from replicate import Clock, bootstrap_table, machine, md_table  # noqa: E402

log = logging.getLogger("loss_settings")
METRICS = ("ndcg@10", "recall@1")
DEV_METRICS = "dev-metrics.json"  # a variant's per-query dev metrics and wall seconds, once it is done


def variants(reference: dict[str, Any], grid: dict[str, list[Any]]) -> dict[str, dict[str, Any]]:
    """{name: overrides}: the reference point ("reference": {}), then each setting's other values, one at a time."""
    out: dict[str, dict[str, Any]] = {"reference": {}}
    for setting, values in grid.items():
        for value in values:
            if value != reference[setting]:
                out[f"{setting}={value:g}"] = {setting: value}
    return out


def scored_variant(
    folder: Path, name: str, settings: dict[str, Any], clock: Clock, tables: list, tie_tolerance: float, args
) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """({metric: {dev query: value}}, {"train_s", "dev_s"}) of one variant: trained and ranked once, then read back
    from `<folder>/dev-metrics.json`, so a rerun with more variants redoes none of the finished ones. A model trained
    by an earlier run without that file is reused and only ranked again."""
    cached = folder / DEV_METRICS
    if cached.exists():
        saved = json.loads(cached.read_text())
        made = (saved.get("task", "qa"), saved.get("pool"), saved["settings"])
        if made != (args.task, args.pool, settings):
            raise SystemExit(f"{cached}: made for (task, pool, settings) {made}, not "
                             f"{(args.task, args.pool, settings)}; use another --out")  # fmt: skip
        return saved["per_query"], saved["seconds"]
    trained = settings | {"loss": {args.task: "graded"}, "instructions": args.instructions}
    model = clock(f"{name}/train", lambda: train_on(tables, folder, args, tie_tolerance, **trained))
    per_query = clock(f"{name}/dev", lambda: dev_metrics(model, folder, args, args.instructions))
    log_rows = (folder / "train" / "log.jsonl").read_text().splitlines()
    seconds = {"train_s": json.loads(log_rows[-1])["elapsed_s"], "dev_s": clock.seconds[f"{name}/dev"]}
    write_json(cached, {"task": args.task, "pool": args.pool, "settings": settings, "seconds": seconds,
                        "per_query": per_query})  # fmt: skip
    return per_query, seconds


def task_rows(table: pa.Table, task: str) -> pa.Table:
    """The reward rows of one task kind."""
    return table.filter(pc.equal(table["task"], task))


def task_files(dev: Path, corpus: Path, task: str, folder: Path) -> tuple[Path, Path]:
    """The dev queries of `task` that have a positive and the corpus keys of `task`, as files in `folder` (the inputs
    themselves where nothing is left out)."""
    from lemb.data.readers import read_keys, read_queries, write_jsonl

    queries, keys = read_queries(dev).to_pylist(), read_keys(corpus).to_pylist()
    kept_queries = [q for q in queries if q["task"] == task and q["positive_ids"]]
    kept_keys = [k for k in keys if k["task"] == task]
    if not kept_queries:
        raise SystemExit(f"{dev}: no query of task {task!r} with a positive")
    if len(kept_queries) == len(queries) and len(kept_keys) == len(keys):
        return dev, corpus
    folder.mkdir(parents=True, exist_ok=True)
    return write_jsonl(kept_queries, folder / "dev.jsonl"), write_jsonl(kept_keys, folder / "corpus.jsonl")


def main(argv: list[str] | None = None) -> int:
    from lemb.pipeline.config import TrainConfig

    defaults = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="run folder with a finished label stage")
    p.add_argument("--dev", type=Path, required=True)
    p.add_argument("--corpus", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("runs/loss_settings"))
    p.add_argument("--alphas", type=float, nargs="*", default=[0.03, 0.3, 1.0])
    p.add_argument("--taus", type=float, nargs="*", default=[0.02, 0.05])
    p.add_argument("--group-sizes", type=int, nargs="*", default=[4])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--alpha", type=float, default=defaults.alpha, help="the reference point's alpha")
    p.add_argument("--tau", type=float, default=defaults.tau, help="the reference point's tau")
    p.add_argument("--group-size", type=int, default=defaults.group_size, help="the reference point's group size")
    p.add_argument("--task", default="qa", help="the task kind trained and scored")
    p.add_argument("--pool", type=int, default=None, help="train on a sub-pool of this many samples (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--instructions",
        default="auto",
        help="instructions trained and ranked with (auto: the model's own; section 5 used llm-embedder)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--key-template", default=None, help="dev ranking's key template (default: the label run's)")
    p.add_argument("--no-reference", action="store_true", help="train and rank only the listed values, compare none")
    p.add_argument("--join", type=Path, nargs="*", default=[],
                   help="earlier results JSON with per-query metrics: its variants join this one's table")  # fmt: skip
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    from lemb.pipeline.executor import quiet_libraries, set_threads

    quiet_libraries()
    set_threads(args.threads)
    clock = Clock()
    setup = label_setup(args.run / "label", subpools=args.pool is not None)
    tables = [task_rows(pq.read_table(f), args.task) for f in setup["files"]]
    if not any(t.num_rows for t in tables):
        raise SystemExit(f"{args.run / 'label'}: no reward rows of task {args.task!r}")
    if args.pool is not None:
        tables = [subpool_table(t, setup["drawn"], args.pool, str(args.seed), setup["tie_tolerance"]) for t in tables]
    args.dev, args.corpus = task_files(args.dev, args.corpus, args.task, args.out / f"data-{args.task}")
    point = {"alpha": args.alpha, "tau": args.tau, "group_size": args.group_size}
    grid = {"alpha": args.alphas, "tau": args.taus, "group_size": args.group_sizes}
    results: dict[str, Any] = {"command": " ".join(["python", *sys.argv]), "machine": machine(), "task": args.task,
                               "pool": args.pool, "reference": point, "steps": args.steps,
                               "batch_size": args.batch_size, "variants": {}}  # fmt: skip
    per_query: dict[str, dict[str, dict[str, float]]] = {}
    for name, overrides in variants(point, grid).items():
        if name == "reference" and args.no_reference:
            continue
        settings = point | overrides
        folder = args.out / name.replace("=", "_")
        per_query[name], seconds = scored_variant(folder, name, settings, clock, tables, setup["tie_tolerance"], args)
        results["variants"][name] = settings | {m: float(np.mean(list(per_query[name][m].values()))) for m in METRICS}
        results["variants"][name] |= seconds
    if args.no_reference:
        return 0
    for path in args.join:
        earlier = json.loads(path.read_text())
        same = {k: earlier.get(k) for k in ("task", "pool", "reference", "steps", "batch_size")}
        if same != {"task": args.task, "pool": args.pool, "reference": point, "steps": args.steps,
                    "batch_size": args.batch_size}:  # fmt: skip
            raise SystemExit(f"{path}: task, pool, reference, steps or batch_size differ from this run's: {same}")
        for name, saved in earlier["per_query"].items():
            if name not in per_query:
                per_query[name] = saved
                results["variants"][name] = earlier["variants"][name] | {"from": str(path)}
    results["per_query"] = per_query
    intervals = {}
    for name in per_query:
        if name != "reference":
            for m in METRICS:
                ids = sorted(per_query["reference"][m])
                intervals[f"{m}: {name} - reference"] = paired_bootstrap(
                    [per_query[name][m][i] for i in ids], [per_query["reference"][m][i] for i in ids], seed=args.seed
                )
    results["paired_bootstrap_95"] = intervals
    results["seconds"] = clock.seconds
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results-loss-settings.json").write_text(json.dumps(results, indent=2, default=str))
    rows = [
        [n, v["alpha"], v["tau"], v["group_size"], *[v[m] for m in METRICS]] for n, v in results["variants"].items()
    ]
    table = md_table(["variant", "alpha", "tau", "group size", *METRICS], rows)
    table += "\n\n" + bootstrap_table(intervals)
    (args.out / "results-loss-settings.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
