"""Training settings from evidence (issue 14, part 5): the graded loss's alpha and tau and the group size, varied one
at a time around lemb's defaults on one finished label run (no LLM call), each scored by dev nDCG@10 and R@1 with
paired bootstrap intervals against the defaults.

Every variant trains with the rank reward and the graded loss on the same reward rows, steps, batches and seed; only
the varied setting differs. The group size can be at most the label run's candidates per query. Each finished
variant keeps its per-query dev metrics in `<out>/<variant>/dev-metrics.json`: a rerun into the same `--out` with
more values trains and ranks only the new ones, so a sweep can be split across processes and joined afterwards.

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
import pyarrow.parquet as pq

from lemb.files import write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pool_size import dev_metrics, label_setup, train_on  # noqa: E402
from replicate import Clock, bootstrap_table, machine, md_table, paired_bootstrap  # noqa: E402

log = logging.getLogger("loss_settings")
METRICS = ("ndcg@10", "recall@1")
DEV_METRICS = "dev-metrics.json"  # a variant's per-query dev metrics and wall seconds, once it is done


def variants(defaults: dict[str, Any], grid: dict[str, list[Any]]) -> dict[str, dict[str, Any]]:
    """{name: overrides}: the defaults ("default": {}), then each setting's other values, one at a time."""
    out: dict[str, dict[str, Any]] = {"default": {}}
    for setting, values in grid.items():
        for value in values:
            if value != defaults[setting]:
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
        return saved["per_query"], saved["seconds"]
    model = clock(f"{name}/train", lambda: train_on(tables, folder, args, tie_tolerance, **settings))
    per_query = clock(f"{name}/dev", lambda: dev_metrics(model, folder, args))
    log_rows = (folder / "train" / "log.jsonl").read_text().splitlines()
    seconds = {"train_s": json.loads(log_rows[-1])["elapsed_s"], "dev_s": clock.seconds[f"{name}/dev"]}
    write_json(cached, {"settings": settings, "seconds": seconds, "per_query": per_query})
    return per_query, seconds


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
    p.add_argument("--group-size", type=int, default=defaults.group_size, help="the default point's group size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--key-template", default=None, help="dev ranking's key template (default: the label run's)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    from lemb.pipeline.executor import quiet_libraries, set_threads

    quiet_libraries()
    set_threads(args.threads)
    clock = Clock()
    setup = label_setup(args.run / "label", subpools=False)
    tables = [pq.read_table(f) for f in setup["files"]]
    point = {"alpha": defaults.alpha, "tau": defaults.tau, "group_size": args.group_size}
    grid = {"alpha": args.alphas, "tau": args.taus, "group_size": args.group_sizes}
    results: dict[str, Any] = {"command": " ".join(["python", *sys.argv]), "machine": machine(), "default": point,
                               "steps": args.steps, "batch_size": args.batch_size, "variants": {}}  # fmt: skip
    per_query: dict[str, dict[str, dict[str, float]]] = {}
    for name, overrides in variants(point, grid).items():
        settings = point | overrides
        folder = args.out / name.replace("=", "_")
        per_query[name], seconds = scored_variant(folder, name, settings, clock, tables, setup["tie_tolerance"], args)
        results["variants"][name] = settings | {m: float(np.mean(list(per_query[name][m].values()))) for m in METRICS}
        results["variants"][name] |= seconds
    intervals = {}
    for name in per_query:
        if name != "default":
            for m in METRICS:
                ids = sorted(per_query["default"][m])
                intervals[f"{m}: {name} - default"] = paired_bootstrap(
                    [per_query[name][m][i] for i in ids], [per_query["default"][m][i] for i in ids], seed=args.seed
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
