"""lemb's trainer vs sentence-transformers' trainer (DistillKLDivLoss): same model, data, batch, steps.

Each variant runs in its own process (so peak memory is its own). Data: NQ questions with their gold
passage and 7 other passages from ../shared/data/knowledge_qa/nq_oracle (or --data), with synthetic teacher
scores (throughput does not depend on their values). Needs the `bench` extra (datasets, accelerate).

    python bench/train_throughput.py [--steps 12] [--batch 8] [--group 8] [--json OUT]
    python bench/train_throughput.py --device cuda --precision bf16 --model DIR --random-init   # one GPU

`--random-init` builds the model's architecture from its config.json with fresh weights: throughput does not
depend on the weights, so a folder with only config.json and the tokenizer files is enough.
`--lemb-only` adds lemb variants with gradient cache / gradient checkpointing and skips sentence-transformers.
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
VARIANTS = ("lemb", "sentence_transformers")
WARMUP = 2  # steps left out of the timing (allocator warm-up, first-call overheads)


def make_data(data: Path, n_queries: int, group: int, seed: int = 0) -> list[dict]:
    corpus = {r["id"]: r["text"] for r in map(json.loads, (data / "corpus.jsonl").read_text().splitlines())}
    ids = sorted(corpus)
    rng = random.Random(seed)
    rows = []
    lines = (data / "queries.jsonl").read_text().splitlines()
    for q in map(json.loads, (lines * (1 + n_queries // len(lines)))[:n_queries]):
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


def make_groups(rows: list[dict]) -> list:
    """Training groups of the rows: the gold passage first (the positive), then the other passages."""
    from lemb.trainer.batches import Group

    return [
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


def model_path(args: argparse.Namespace) -> str:
    """The model to train: as given, or (--random-init) its architecture with fresh weights, saved once."""
    from lemb.stages.models import resolve_model_path

    path = resolve_model_path(args.model, "embedder")
    if not args.random_init:
        return path
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    out = Path(f"/tmp/lemb-bench-model-{Path(path).name}")
    if not (out / "config.json").exists():
        import torch

        torch.manual_seed(0)
        AutoModel.from_config(AutoConfig.from_pretrained(path)).save_pretrained(out)
        AutoTokenizer.from_pretrained(path).save_pretrained(out)
    return str(out)


def settings(args: argparse.Namespace) -> dict:
    """The settings a report records: sizes, model, device, precision, machine."""
    out = {
        "steps": args.steps,
        "warmup_steps": WARMUP,
        "batch": args.batch,
        "group": args.group,
        "max_length": args.max_length,
        "model": args.model + (" (random init)" if args.random_init else ""),
        "device": args.device,
        "precision": args.precision,
        "threads": 1,
        "machine": platform.processor() or platform.machine(),
    }
    if args.device.startswith("cuda"):
        import torch

        out["gpu"] = torch.cuda.get_device_name()
    return out


def timed_steps(recipe, device: str) -> list[float]:
    """Seconds of each of the recipe's steps (batch, forward, backward, optimizer), the device synchronised."""
    times = []
    for step in range(recipe.config.steps):
        start = time.perf_counter()
        batch = [recipe.groups[i] for i in recipe.sampler.batch(step)]
        recipe.optimizer.zero_grad(set_to_none=True)
        recipe._step(batch)
        recipe.precision.step(recipe.optimizer)
        recipe.scheduler.step()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_lemb(args: argparse.Namespace, grad_chunk: int = 0, checkpointing: bool = False) -> dict:
    import torch

    from lemb.pipeline.config import TrainConfig, load_config
    from lemb.stages.encoder import embedding_dim
    from lemb.trainer.losses import graded_loss
    from lemb.trainer.recipe import TrainRecipe

    groups = make_groups(make_data(args.data, args.batch * (args.steps + WARMUP), args.group))
    cfg = load_config(
        TrainConfig,
        run="/tmp/lemb-bench",
        embedder=model_path(args),
        steps=args.steps + WARMUP,
        batch_size=args.batch,
        group_size=args.group,
        lr=1e-5,
        save_every=0,
        max_length=args.max_length,
        device=args.device,
        precision=args.precision,
        grad_chunk=grad_chunk,
        gradient_checkpointing=checkpointing,
    )
    recipe = TrainRecipe(cfg)
    recipe.setup(groups)
    times = timed_steps(recipe, args.device)
    step_s = sum(times[WARMUP:]) / args.steps
    # the loss alone (forward + backward on embeddings of the step's shape), as a fraction of a step
    dim, device = embedding_dim(recipe.model), recipe.device
    q = torch.randn(args.batch, dim, requires_grad=True, device=device)
    k = torch.randn(args.batch, args.group, dim, requires_grad=True, device=device)
    rewards = torch.rand(args.batch, args.group, device=device)
    valid = torch.ones(args.batch, args.group, dtype=torch.bool, device=device)
    sync(args.device)
    start = time.perf_counter()
    for _ in range(20):
        graded_loss(q, k, rewards, valid, tau=cfg.tau, alpha=cfg.alpha).backward()
    sync(args.device)
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
    rows = make_data(args.data, args.batch * (args.steps + WARMUP), args.group)
    columns = {"query": [r["query"] for r in rows]}
    for j in range(args.group):
        columns[f"doc{j}"] = [r["keys"][j] for r in rows]
    columns["label"] = [r["rewards"] for r in rows]
    model = load_embedder(model_path(args), args.max_length, device=args.device)

    class Timer(TrainerCallback):
        """Step i's time runs from its begin to step i+1's begin, so the batch's tokenization (done by the
        trainer's data collator between steps) is counted, as it is in lemb's step."""

        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, *a, **k):
            sync(args.device)
            now = time.perf_counter()
            if self.start is not None:
                self.times.append(now - self.start)
            self.start = now

        def on_train_end(self, *a, **k):
            sync(args.device)
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
        use_cpu=args.device == "cpu",
        bf16=args.precision == "bf16",
        fp16=args.precision == "fp16",
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
    if variant == "sentence_transformers":
        out = run_st(args)
    else:
        out = run_lemb(args, grad_chunk=args.chunk if "chunk" in variant else 0, checkpointing="ckpt" in variant)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.device.startswith("cuda"):
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--model", default="all-minilm-l6-v2")
    parser.add_argument("--random-init", action="store_true", help="The model's architecture with fresh weights.")
    parser.add_argument("--data", type=Path, default=DATA, help="A folder with corpus.jsonl and queries.jsonl.")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--chunk", type=int, default=8, help="Queries per gradient-cache chunk (lemb-only runs).")
    parser.add_argument("--lemb-only", action="store_true", help="lemb with gradient cache / checkpointing; no ST.")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args)
    variants = ("lemb", "lemb+chunk", "lemb+chunk+ckpt") if args.lemb_only else VARIANTS
    passed = [a for a in sys.argv[1:] if a not in ("--lemb-only",)]
    if "--json" in passed:
        i = passed.index("--json")
        del passed[i : i + 2]
    results = {}
    for variant in variants:
        cmd = [sys.executable, __file__, "--child", variant, *passed]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:  # e.g. out of GPU memory at a batch the other variants fit: report it, go on
            print(f"{variant} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
            results[variant] = {"error": (done.stderr.strip().splitlines() or ["exit %d" % done.returncode])[-1]}
            continue
        results[variant] = json.loads(next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))[7:])
    memory = ("peak_rss_mb", "peak_gpu_mb") if args.device.startswith("cuda") else ("peak_rss_mb",)
    keys = ("examples_per_s", *memory, "error")
    report = {v: {k: results[v][k] for k in keys if k in results[v]} for v in variants}
    failed = [v for v in variants if "error" in results[v]]
    if "lemb" in failed or (not args.lemb_only and failed):
        print(json.dumps(report, indent=2))
        sys.exit(f"variants failed: {', '.join(failed)}")
    if not args.lemb_only:
        report["ratio"] = results["lemb"]["examples_per_s"] / results["sentence_transformers"]["examples_per_s"]
    report["loss_fraction_of_step"] = results["lemb"]["loss_fraction_of_step"]
    report["settings"] = settings(args)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
