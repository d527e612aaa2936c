"""The honest baseline (issue 26): each embedder scored with the instructions it is meant to be used with.

On one finished label run and one task kind, four arms, each ranked on the dev queries of that kind that have a
positive, over the corpus keys of that kind (lemb eval's ranking and metrics, no LLM):

- `base`: the base embedder with no instructions, as all-MiniLM-L6-v2 was trained and is used by its authors;
- `base_llm_embedder`: the same base with the LLM-Embedder instructions (the row every earlier "vs base" figure
  compared against);
- `trained_none` / `trained_llm_embedder`: rank reward + graded loss trained with no instructions / with the
  LLM-Embedder preset, each scored with the instructions it was trained with.

Every arm is compared with `base` (and the two trained arms with each other) by a paired bootstrap over dev queries.
Each finished arm keeps its per-query metrics in `<out>/<arm>/dev-metrics.json`, so a rerun redoes only what is
missing. `--prepare qa|feedback` writes the dev and corpus files of RESULTS.md's sections 1 and 2 (replicate.py's
hash splits) into `<out>/data` instead of taking `--dev` / `--corpus`.

    python experiments/fair_base.py --run runs/nq-pool32 --prepare qa --task qa --key-template '{text}' \\
        --out runs/fair-qa --steps 100
    python experiments/fair_base.py --run runs/fb --prepare feedback --task tool --group-size 5 --out runs/fair-tool
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loss_settings import task_files, task_rows  # noqa: E402
from pool_size import dev_metrics, label_setup, train_on  # noqa: E402
from replicate import Clock, bootstrap_table, machine, md_table, paired_bootstrap  # noqa: E402

log = logging.getLogger("fair_base")
METRICS = ("ndcg@10", "recall@1", "recall@5")
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


def prepare(kind: str, folder: Path, data: Path) -> tuple[Path, Path]:
    """RESULTS.md's dev and corpus files: section 1 (`qa`: 320 dev questions, all 2,600 passages) or section 2
    (`feedback`: 150 dev queries per kind, the four kinds' key pools)."""
    from replicate import FB_KINDS, parse_args, prepare_multitask, prepare_qa

    if kind == "qa":
        args = parse_args(["--queries", "300", "--dev", "320", "--data", str(data)])
        paths = prepare_qa(args, folder)["paths"]
    else:
        args = parse_args(["--data", str(data)])
        paths = prepare_multitask(args, folder, FB_KINDS, 100, 150, 0.4)["paths"]
    return paths["dev"], paths["corpus"]


def scored_arm(name: str, folder: Path, tables: list, tie_tolerance: float, clock: Clock, args) -> dict[str, Any]:
    """{"per_query": {metric: {query: value}}, "seconds": {...}} of one arm, trained and ranked once."""
    from lemb.vocabulary import DEFAULT_EMBEDDER

    cached = folder / DEV_METRICS
    trained_with, scored_with = ARMS[name]
    made = {"task": args.task, "steps": args.steps, "trained_with": trained_with, "scored_with": scored_with}
    if cached.exists():
        saved = json.loads(cached.read_text())
        if saved["made"] != made:
            raise SystemExit(f"{cached}: made with {saved['made']}, not {made}; use another --out")
        return saved
    seconds = {}
    model = DEFAULT_EMBEDDER
    if trained_with is not None:
        overrides = {"loss": {args.task: "graded"}, "instructions": trained_with}
        model = clock(f"{name}/train", lambda: train_on(tables, folder, args, tie_tolerance, **overrides))
        seconds["train_s"] = json.loads((folder / "train" / "log.jsonl").read_text().splitlines()[-1])["elapsed_s"]
    per_query = clock(f"{name}/dev", lambda: dev_metrics(model, folder, args, instructions=scored_with))
    seconds["dev_s"] = clock.seconds[f"{name}/dev"]
    out = {"made": made, "model": model, "seconds": seconds, "per_query": per_query}
    write_json(cached, out)
    return out


def main(argv: list[str] | None = None) -> int:
    from lemb.pipeline.config import TrainConfig

    defaults = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="run folder with a finished label stage")
    p.add_argument("--prepare", choices=("qa", "feedback"), help="write RESULTS.md's dev and corpus files")
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
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
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    from lemb.pipeline.executor import quiet_libraries, set_threads

    quiet_libraries()
    set_threads(args.threads)
    clock = Clock()
    if args.prepare:
        args.dev, args.corpus = prepare(args.prepare, args.out / "data", args.data)
    if args.dev is None or args.corpus is None:
        raise SystemExit("--dev and --corpus (or --prepare) are required")
    setup = label_setup(args.run / "label", subpools=False)
    tables = [task_rows(pq.read_table(f), args.task) for f in setup["files"]]
    if not any(t.num_rows for t in tables):
        raise SystemExit(f"{args.run / 'label'}: no reward rows of task {args.task!r}")
    args.dev, args.corpus = task_files(args.dev, args.corpus, args.task, args.out / f"data-{args.task}")
    results: dict[str, Any] = {"command": " ".join(["python", *sys.argv]), "machine": machine(), "task": args.task,
                               "steps": args.steps, "batch_size": args.batch_size, "group_size": args.group_size,
                               "tau": defaults.tau, "alpha": defaults.alpha, "arms": {}}  # fmt: skip
    per_query = {}
    for name in args.arms:
        arm = scored_arm(name, args.out / name, tables, setup["tie_tolerance"], clock, args)
        per_query[name] = arm["per_query"]
        means = {m: float(np.mean(list(arm["per_query"][m].values()))) for m in METRICS}
        results["arms"][name] = {"trained_with": ARMS[name][0], "scored_with": ARMS[name][1], **means,
                                 **arm["seconds"], "queries": len(arm["per_query"]["ndcg@10"])}  # fmt: skip
    intervals = {}
    for a, b in COMPARISONS:
        if a in per_query and b in per_query:
            for m in METRICS:
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
        [n, a["trained_with"] or "-", a["scored_with"], *[a[m] for m in METRICS]] for n, a in results["arms"].items()
    ]
    table = md_table(["arm", "trained with", "scored with", *METRICS], rows) + "\n\n" + bootstrap_table(intervals)
    (args.out / "results-fair-base.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
