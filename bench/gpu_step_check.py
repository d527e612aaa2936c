"""On a GPU: the trainer's step paths agree there too (the CPU tests cannot reach CUDA code paths).

Checks, on one batch of the benchmark data: gradient cache vs plain backward (fp32), gradient checkpointing vs
plain (fp32), and bf16 autocast vs fp32 (cosine of the gradients). Prints one JSON line; exits 1 on a mismatch.

    python bench/gpu_step_check.py --model DIR [--random-init] --data DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import DATA, make_data, make_groups, model_path  # noqa: E402

from lemb.pipeline.config import TrainConfig  # noqa: E402
from lemb.stages.encoder import load_embedder  # noqa: E402
from lemb.trainer.batches import collate  # noqa: E402
from lemb.trainer.losses import graded_loss  # noqa: E402
from lemb.trainer.step import MixedPrecision, backward_step  # noqa: E402

DEFAULTS = TrainConfig()  # the loss's settings as `lemb train` uses them


def grads(path: str, data: dict, device: torch.device, chunk=0, precision="fp32", checkpointing=False):
    torch.manual_seed(0)
    model = load_embedder(path, 128, device=str(device))
    model.train()
    for module in model.modules():  # no dropout: every path computes the same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if checkpointing:
        model[0].auto_model.gradient_checkpointing_enable({"use_reentrant": False})
    on = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in data.items()}

    def loss_fn(q, k):
        return graded_loss(q, k, on["rewards"], on["valid"], in_batch_mask=on["in_batch_mask"], tau=DEFAULTS.tau,
                           alpha=DEFAULTS.alpha)  # fmt: skip

    amp = MixedPrecision.make(precision, device)
    loss = backward_step(model, on["queries"], on["keys"], on["valid"], loss_fn, chunk_size=chunk, precision=amp)
    scale = amp.scaler.get_scale() if amp.scaler else 1.0
    flat = torch.cat([p.grad.flatten() / scale for p in model.parameters() if p.grad is not None])
    return loss, flat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="all-minilm-l6-v2")
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--device", default="cuda", help="cuda; cpu checks the fp32 paths only (a smoke run)")
    parser.add_argument("--queries", type=int, default=8, help="Queries in the batch (4 keys each).")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = make_data(args.data, args.queries, 4)
    groups = make_groups(rows)
    data = collate(groups, 4)
    path = model_path(args)
    ref_loss, ref = grads(path, data, device)
    out = {"loss_fp32": ref_loss}
    for name, kwargs in {"chunk2": {"chunk": 2}, "checkpointing": {"checkpointing": True}}.items():
        loss, g = grads(path, data, device, **kwargs)
        out[f"{name}_loss_diff"] = abs(loss - ref_loss)
        out[f"{name}_max_grad_diff"] = float((g - ref).abs().max())
    ok = out["chunk2_max_grad_diff"] < 1e-4 and out["checkpointing_max_grad_diff"] < 1e-4
    for name in ("bf16", "fp16") if device.type == "cuda" else ():
        loss, g = grads(path, data, device, precision=name)
        out[f"{name}_loss_rel_diff"] = abs(loss - ref_loss) / abs(ref_loss)
        out[f"{name}_grad_cosine"] = float(torch.nn.functional.cosine_similarity(g, ref, dim=0))
        ok = ok and out[f"{name}_grad_cosine"] > 0.98
    out["ok"] = ok
    print(json.dumps(out))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
