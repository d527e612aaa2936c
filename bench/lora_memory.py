"""Full fine-tuning vs LoRA adapters (`lemb train --lora`): examples/s and memory, same model, data and batch.

    python bench/lora_memory.py [--steps 8] [--batch 8] [--group 8] [--lora r=16,alpha=32] [--json OUT]
    python bench/lora_memory.py --device cuda --precision bf16 --batch 64 --model DIR --random-init   # one GPU

Data, warm-up and timing are bench/train_throughput.py's (NQ questions with their gold passage and other passages,
synthetic rewards; lemb's training recipe, one thread on a CPU). Each variant runs in its own process, so that its
memory is its own. Memory on a CPU: the process's peak resident set size (`ru_maxrss`, the kernel's high-water mark,
the model's load included) and its RSS once the recipe is set up (psutil); on a GPU, torch's allocator peak
(`torch.cuda.max_memory_allocated`). Both variants also report the bytes that differ between them by construction:
the gradients after the last step and AdamW's state (two float32 tensors per trained weight).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import DATA, WARMUP, make_data, make_groups, model_path, settings, timed_steps  # noqa: E402

VARIANTS = ("full", "lora")


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def run(variant: str, args: argparse.Namespace) -> dict:
    import psutil
    import torch

    from lemb.pipeline.config import TrainConfig, load_config
    from lemb.trainer.recipe import TrainRecipe

    torch.set_num_threads(1)
    groups = make_groups(make_data(args.data, args.batch * (args.steps + WARMUP), args.group))
    with tempfile.TemporaryDirectory(prefix="lemb-bench-lora-") as folder:
        cfg = load_config(
            TrainConfig, run=folder, embedder=model_path(args), steps=args.steps + WARMUP, batch_size=args.batch,
            group_size=args.group, lr=1e-5, save_every=0, max_length=args.max_length, device=args.device,
            precision=args.precision, lora=args.lora if variant == "lora" else None,
        )  # fmt: skip
        recipe = TrainRecipe(cfg)
        recipe.setup(groups)
        rss_setup = psutil.Process().memory_info().rss
        times = timed_steps(recipe, args.device)
        params = list(recipe.model.parameters())
        state = [t for s in recipe.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()]
        out = {
            "examples_per_s": args.batch * args.steps / sum(times[WARMUP:]),
            "trainable_weights": sum(p.numel() for p in params if p.requires_grad),
            "weights": sum(p.numel() for p in params),
            "grad_mb": _bytes(p.grad for p in params if p.grad is not None) / 2**20,
            "optimizer_state_mb": _bytes(state) / 2**20,
            "rss_after_setup_mb": rss_setup / 2**20,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        recipe.cleanup()
    if args.device.startswith("cuda"):
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="Timed steps (after the warm-up steps).")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lora", default="r=16,alpha=32", help="The LoRA variant's --lora setting.")
    parser.add_argument("--model", default="all-minilm-l6-v2")
    parser.add_argument("--random-init", action="store_true", help="The model's architecture with fresh weights.")
    parser.add_argument("--data", type=Path, default=DATA, help="A folder with corpus.jsonl and queries.jsonl.")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run(args.child, args)))
        return
    passed = list(sys.argv[1:])
    if "--json" in passed:
        i = passed.index("--json")
        del passed[i : i + 2]
    report: dict = {}
    for variant in VARIANTS:
        done = subprocess.run([sys.executable, __file__, "--child", variant, *passed], capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
        report[variant] = json.loads(next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))[7:])
    memory = ["peak_rss_mb", "rss_after_setup_mb"] + (["peak_gpu_mb"] if args.device.startswith("cuda") else [])
    report["ratio_lora_over_full"] = {
        key: report["lora"][key] / report["full"][key] for key in ("examples_per_s", *memory)
    }
    report["settings"] = {**settings(args), "lora": args.lora}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
