"""What `lemb eval` saves by ranking over retrieve's key embeddings instead of embedding the corpus again.

    python bench/eval_reuse.py [--queries 200] [--keys 600] [--repeats 3] [--executor local] [--json OUT]

NQ questions and passages from ../shared/data (what `lemb convert nq_oracle --limit Q --max-keys K` writes): the
first half of the questions to retrieve, the second half held out. One `retrieve` with the defaults, then `lemb eval`
of the base alone (no LLM), alternately in that run (retrieve's keys reused) and in a run without a retrieve stage
(the corpus embedded again), `--repeats` times each; prints each eval's seconds, their medians and the metrics of both,
which must be equal.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def held_out_split(folder: Path) -> tuple[str, str]:
    """The converted questions, first half to retrieve and second half held out."""
    lines = (folder / "queries.jsonl").read_text().splitlines(keepends=True)
    half = len(lines) // 2
    (folder / "train.jsonl").write_text("".join(lines[:half]))
    (folder / "heldout.jsonl").write_text("".join(lines[half:]))
    return str(folder / "train.jsonl"), str(folder / "heldout.jsonl")


def timed_eval(run: Path, heldout: str, corpus: str, executor: str) -> tuple[float, dict]:
    from lemb.pipeline.config import EvalConfig, load_config
    from lemb.trainer.evaluate import evaluate_run

    shutil.rmtree(run / "eval", ignore_errors=True)  # else its finished shards are skipped
    config = load_config(EvalConfig, run=str(run), queries=heldout, corpus=corpus, executor=executor, answer_k=0,
                         embedders={"base": "all-minilm-l6-v2"})  # fmt: skip
    start = time.perf_counter()
    metrics = evaluate_run(config, progress=False)["base"]["all"]
    return time.perf_counter() - start, {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--keys", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--executor", default="local")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("lemb").setLevel(logging.INFO)  # the reuse decision, each time

    from lemb.data.convert import convert
    from lemb.pipeline.config import RetrieveConfig, load_config
    from lemb.stages.retrieve import retrieve

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        convert(["nq_oracle"], DATA, root / "data", limit=args.queries, max_keys=args.keys)
        train, heldout = held_out_split(root / "data")
        corpus = str(root / "data" / "corpus.jsonl")
        start = time.perf_counter()
        retrieve(load_config(RetrieveConfig, run=str(root / "run"), queries=train, corpus=corpus,
                             executor=args.executor), progress=False)  # fmt: skip
        retrieve_s = time.perf_counter() - start
        seconds: dict[str, list[float]] = {"embedded": [], "reused": []}
        metrics = {}
        for _ in range(args.repeats):
            for mode, run in (("embedded", root / "fresh"), ("reused", root / "run")):
                took, metrics[mode] = timed_eval(run, heldout, corpus, args.executor)
                seconds[mode].append(round(took, 2))
    result = {
        "keys": args.keys,
        "heldout_queries": args.queries - args.queries // 2,
        "executor": args.executor,
        "retrieve_s": round(retrieve_s, 1),
        "eval_s": seconds,
        "median_s": {mode: statistics.median(s) for mode, s in seconds.items()},
        "metrics": metrics,
        "same_metrics": metrics["embedded"] == metrics["reused"],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
