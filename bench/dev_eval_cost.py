"""The cost of dev evaluation while training (`lemb train --dev --eval-every`): the same training with and without it.

Both runs train the same groups (NQ questions with their gold passage and 7 others from
../shared/data/knowledge_qa/nq_oracle, synthetic rewards, as bench/train_throughput.py builds them) for the same
steps; the second also scores `--dev-queries` held-out NQ questions over `--dev-keys` passages every `--every` steps.
The report gives each run's wall time, the evaluations' own time (the log rows' `dev_seconds`) and what is left:
the slow-down beyond the evaluations themselves, which should be about zero; and the training steps' own times (from
the log rows' `examples_per_s`), whose medians tell a slower step from a noisy machine.

    python bench/dev_eval_cost.py [--steps 40] [--every 10] [--dev-queries 200] [--dev-keys 2600] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import DATA, make_data, make_groups  # noqa: E402


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def write_dev(data: Path, out: Path, n_queries: int, n_keys: int) -> tuple[Path, Path]:
    """The last `n_queries` NQ questions as lemb query records, over their gold passages plus others up to `n_keys`."""
    queries = [json.loads(line) for line in (data / "queries.jsonl").read_text().splitlines()][-n_queries:]
    corpus = [json.loads(line) for line in (data / "corpus.jsonl").read_text().splitlines()]
    gold = {p for q in queries for p in q["positive_ids"]}
    keys = [k for k in corpus if k["id"] in gold] + [k for k in corpus if k["id"] not in gold]
    keys = keys[: max(n_keys, len(gold))]
    dev, keys_file = out / "dev.jsonl", out / "corpus.jsonl"
    dev.write_text("".join(json.dumps({"query_id": q["id"], "task": "qa", "text": q["question"],
                                       "target": q["answers"][0], "positive_ids": q["positive_ids"]}) + "\n"
                           for q in queries))  # fmt: skip
    keys_file.write_text("".join(json.dumps({"key_id": k["id"], "task": "qa", "text": k["text"],
                                             "title": k.get("title")}) + "\n" for k in keys))  # fmt: skip
    return dev, keys_file


def run(args: argparse.Namespace, dev: tuple[Path, Path] | None, folder: Path) -> dict:
    from lemb.pipeline.config import TrainConfig, load_config
    from lemb.trainer.recipe import TrainRecipe

    groups = make_groups(make_data(args.data, args.batch * args.steps, 8))
    settings = {"dev": str(dev[0]), "corpus": str(dev[1]), "eval_every": args.every} if dev else {}
    cfg = load_config(TrainConfig, run=str(folder), steps=args.steps, batch_size=args.batch, save_every=0,
                      lr=1e-5, max_length=args.max_length, **settings)  # fmt: skip
    recipe = TrainRecipe(cfg)
    recipe.setup(groups)
    start = time.perf_counter()
    recipe.train(progress=False)
    wall = time.perf_counter() - start
    recipe.cleanup()
    rows = [json.loads(line) for line in (folder / "train" / "log.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "dev_seconds" in r]
    steps = sorted(r["queries"] / r["examples_per_s"] for r in rows)  # each step's own time, evaluations excluded
    median = steps[len(steps) // 2]
    return {"wall_s": round(wall, 2), "steps_s": round(sum(steps), 2), "median_step_s": round(median, 3),
            "evaluations": len(evals),
            "dev_seconds": round(sum(r["dev_seconds"] for r in evals), 2),
            "dev_ndcg@10": [round(r["dev/qa/ndcg@10"], 4) for r in evals]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--dev-queries", type=int, default=200)
    parser.add_argument("--dev-keys", type=int, default=2600)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dev = write_dev(args.data, tmp, args.dev_queries, args.dev_keys)
        plain = run(args, None, tmp / "plain")
        with_dev = run(args, dev, tmp / "dev")
    extra = with_dev["wall_s"] - plain["wall_s"] - with_dev["dev_seconds"]
    report = {
        "machine": cpu_name(),
        "steps": args.steps, "every": args.every, "dev_queries": args.dev_queries, "dev_keys": args.dev_keys,
        "without_dev": plain, "with_dev": with_dev,
        "per_evaluation_s": round(with_dev["dev_seconds"] / max(with_dev["evaluations"], 1), 2),
        "slowdown_beyond_evaluations_s": round(extra, 2),
        "slowdown_beyond_evaluations_fraction": round(extra / plain["wall_s"], 4),
        "median_step_ratio": round(with_dev["median_step_s"] / plain["median_step_s"], 3),
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
