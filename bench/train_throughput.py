"""lemb's trainer vs sentence-transformers' trainer (DistillKLDivLoss): same model, data, batch, steps.

Each variant runs in its own process (so peak RSS is its own). Data: NQ questions with their gold
passage and 7 other passages from ../shared/data/knowledge_qa/nq_oracle, with synthetic teacher
scores (throughput does not depend on their values). Needs the `bench` extra (datasets, accelerate).

    python bench/train_throughput.py [--steps 12] [--batch 8] [--group 8] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "knowledge_qa" / "nq_oracle"
WARMUP = 2  # steps left out of the timing (allocator warm-up, first-call overheads)


def make_data(n_queries: int, group: int, seed: int = 0) -> list[dict]:
    corpus = {r["id"]: r["text"] for r in map(json.loads, (DATA / "corpus.jsonl").read_text().splitlines())}
    ids = sorted(corpus)
    rng = random.Random(seed)
    rows = []
    for q in map(json.loads, (DATA / "queries.jsonl").read_text().splitlines()[:n_queries]):
        negatives = rng.sample([i for i in ids if i not in q["positive_ids"]], group - 1)
        keys = [corpus[q["positive_ids"][0]]] + [corpus[i] for i in negatives]
        rows.append(
            {
                "query": q["question"],
                "keys": keys,
                "rewards": [1.0] + sorted((rng.random() for _ in negatives), reverse=True),
            }
        )
    return rows


def run_lemb(args: argparse.Namespace) -> dict:
    import torch

    from lemb.pipeline.config import TrainConfig, load_config
    from lemb.trainer.batches import Group
    from lemb.trainer.losses import graded_loss
    from lemb.trainer.recipe import TrainRecipe

    rows = make_data(args.batch * (args.steps + WARMUP), args.group)
    groups = [
        Group(
            f"q{i}",
            "qa",
            r["query"],
            r["keys"],
            [f"k{i}_{j}" for j in range(len(r["keys"]))],
            r["rewards"],
            [j == 0 for j in range(len(r["keys"]))],
        )
        for i, r in enumerate(rows)
    ]
    cfg = load_config(
        TrainConfig,
        run="/tmp/lemb-bench",
        steps=args.steps + WARMUP,
        batch_size=args.batch,
        group_size=args.group,
        lr=1e-5,
        save_every=0,
        max_length=args.max_length,
    )
    recipe = TrainRecipe(cfg)
    recipe.setup(groups)
    times = []
    for step in range(cfg.steps):
        start = time.perf_counter()
        batch = [recipe.groups[i] for i in recipe.sampler.batch(step)]
        recipe.optimizer.zero_grad(set_to_none=True)
        recipe._step(batch)
        recipe.optimizer.step()
        recipe.scheduler.step()
        times.append(time.perf_counter() - start)
    step_s = sum(times[WARMUP:]) / args.steps
    # the loss alone (forward + backward on embeddings of the step's shape), as a fraction of a step
    q = torch.randn(args.batch, 384, requires_grad=True)
    k = torch.randn(args.batch, args.group, 384, requires_grad=True)
    rewards, valid = torch.rand(args.batch, args.group), torch.ones(args.batch, args.group, dtype=torch.bool)
    start = time.perf_counter()
    for _ in range(20):
        graded_loss(q, k, rewards, valid).backward()
    loss_s = (time.perf_counter() - start) / 20
    return {
        "examples_per_s": args.batch / step_s,
        "step_s": step_s,
        "loss_s": loss_s,
        "loss_fraction_of_step": loss_s / step_s,
    }


def run_st(args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.losses import DistillKLDivLoss
    from transformers import TrainerCallback

    from lemb.stages.encoder import load_embedder

    torch.set_num_threads(1)
    rows = make_data(args.batch * (args.steps + WARMUP), args.group)
    columns = {"query": [r["query"] for r in rows]}
    for j in range(args.group):
        columns[f"doc{j}"] = [r["keys"][j] for r in rows]
    columns["label"] = [r["rewards"] for r in rows]
    model = load_embedder("all-minilm-l6-v2", args.max_length)

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], 0.0

        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.start)

    timer = Timer()
    training_args = SentenceTransformerTrainingArguments(
        output_dir="/tmp/st-bench",
        per_device_train_batch_size=args.batch,
        max_steps=args.steps + WARMUP,
        learning_rate=1e-5,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=training_args,
        train_dataset=Dataset.from_dict(columns),
        loss=DistillKLDivLoss(model),
        callbacks=[timer],
    )
    trainer.train()
    step_s = sum(timer.times[WARMUP:]) / args.steps
    return {"examples_per_s": args.batch / step_s, "step_s": step_s}


def child(variant: str, args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    out = run_lemb(args) if variant == "lemb" else run_st(args)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=["lemb", "sentence_transformers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args)
    results = {}
    for variant in ("lemb", "sentence_transformers"):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            variant,
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--group",
            str(args.group),
            "--max-length",
            str(args.max_length),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[variant] = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    report = {
        "lemb": {k: results["lemb"][k] for k in ("examples_per_s", "peak_rss_mb")},
        "sentence_transformers": {k: results["sentence_transformers"][k] for k in ("examples_per_s", "peak_rss_mb")},
        "ratio": results["lemb"]["examples_per_s"] / results["sentence_transformers"]["examples_per_s"],
        "loss_fraction_of_step": results["lemb"]["loss_fraction_of_step"],
        "settings": {
            "steps": args.steps,
            "warmup_steps": WARMUP,
            "batch": args.batch,
            "group": args.group,
            "max_length": args.max_length,
            "threads": 1,
            "machine": platform.processor() or platform.machine(),
        },
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
