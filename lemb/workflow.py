"""The built-in demo: the whole pipeline on a generated world."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lemb.pipeline.config import EvalConfig, LabelConfig, RetrieveConfig, TrainConfig, load_config
from lemb.trainer.evaluate import evaluate_run

log = logging.getLogger(__name__)

# Demo sizes: steps and samples chosen so `tiny` runs in about 3 minutes and `small` in under 15 here.
DEMO_SETTINGS = {
    "tiny": {"top_k": 3, "n_samples": 4, "per_candidate_samples": 1, "steps": 20, "batch_size": 4},
    "small": {"top_k": 4, "n_samples": 6, "per_candidate_samples": 1, "steps": 60, "batch_size": 8},
}


def run_demo(size: str, out: Path, executor: str = "ray", threads: int = 1, progress: bool = True) -> dict[str, Any]:
    """Generate the demo world, then retrieve -> label -> train -> eval; returns the metrics."""
    from lemb.data.demo import write_demo
    from lemb.stages.label import label
    from lemb.stages.models import require_packaged
    from lemb.stages.retrieve import retrieve
    from lemb.trainer.recipe import train
    from lemb.vocabulary import DEFAULT_EMBEDDER, DEFAULT_LLM

    # a default model without its package: one line naming the install, before any file is written or Ray starts
    require_packaged([DEFAULT_EMBEDDER, DEFAULT_LLM])
    s = DEMO_SETTINGS[size]
    files = write_demo(out / "data", size=size)
    run = out / "run"
    common = {"run": str(run), "threads": threads}
    sharded = {**common, "executor": executor}
    data = {"corpus": str(files["corpus"]), "shards": 4}
    retrieve(
        load_config(RetrieveConfig, queries=str(files["train"]), top_k=s["top_k"], restart=True, **data, **sharded),
        progress,
    )
    label(
        load_config(
            LabelConfig,
            n_samples=s["n_samples"],
            per_candidate_samples=s["per_candidate_samples"],
            restart=True,
            **sharded,
        ),  # fmt: skip
        progress,
    )
    train(
        load_config(
            TrainConfig, steps=s["steps"], batch_size=s["batch_size"], group_size=s["top_k"], restart=True, **common
        ),  # fmt: skip
        progress,
    )
    eval_config = load_config(EvalConfig, queries=str(files["heldout"]), **data, **sharded)
    metrics = evaluate_run(eval_config, progress=progress, report_to=out)
    log.info("demo report: %s", out / "report.md")
    return metrics
