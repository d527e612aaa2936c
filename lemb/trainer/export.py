"""`lemb export`: a trained model folder in the layout of FlagEmbedding's llm_embedder research code.

That code loads the encoder with `AutoModel` / `AutoTokenizer`, pools by `--pooling_method` (cls, mean,
plus `dense`: a bias-free linear layer read from `dense_pooler.bin`) and compares by `--dense_metric cos`.
Its task instructions are a table {task: {"query": ..., "key": ...}}. The export writes:

    OUT/config.json, model.safetensors, tokenizer files   the encoder (AutoModel)
    OUT/dense_pooler.bin                                   only when the model has a Dense layer
    OUT/instructions.json                                  the task instructions the model was trained with
    OUT/export.json                                        pooling, metric, lengths and the matching flags
    OUT/README.md                                          the model card, with the trained model's training facts
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lemb.errors import LembError
from lemb.files import atomic
from lemb.pipeline.layout import RunLayout
from lemb.stages.encoder import load_embedder
from lemb.trainer.card import read_facts, write_card
from lemb.trainer.lora import has_adapters, is_adapter_folder, merge_adapters, require_peft

FORMATS = ("flagembedding",)


def model_folder(path: Path) -> Path:
    """A model folder, or a run folder whose trained model is taken."""
    for candidate in (path, RunLayout(path).model):
        if (candidate / "modules.json").exists() or (candidate / "config.json").exists():
            return candidate
    raise LembError(f"{path}: neither a model folder nor a run folder with train/model in it")


def st_modules() -> Any:
    """sentence-transformers' module classes (moved to `sentence_transformer.modules` in release 6)."""
    try:
        from sentence_transformers.sentence_transformer import modules
    except ImportError:
        from sentence_transformers import models as modules
    return modules


def _pooling(model: Any) -> tuple[list[str], torch.Tensor | None]:
    """FlagEmbedding's pooling_method list for the sentence-transformers modules after the encoder."""
    models = st_modules()
    method: list[str] = []
    dense = None
    for module in list(model)[1:]:
        if isinstance(module, models.Pooling):
            config = module.get_config_dict()
            mode = config.get("pooling_mode") or module.get_pooling_mode_str()
            if mode not in ("cls", "mean"):
                raise LembError(f"pooling {mode!r} has no FlagEmbedding equivalent (it pools by cls or mean)")
            if not config.get("include_prompt", True):
                raise LembError("pooling leaves the instruction's tokens out; FlagEmbedding pools over them")
            method.append(mode)
        elif isinstance(module, models.Dense):
            linear = module.linear
            square = linear.in_features == linear.out_features
            if linear.bias is not None or not square or not isinstance(module.activation_function, torch.nn.Identity):
                raise LembError("only a square, bias-free, linear Dense layer maps to FlagEmbedding's dense pooler")
            method.append("dense")
            dense = linear.weight.detach().cpu().clone()
        elif not isinstance(module, models.Normalize):
            raise LembError(f"module {type(module).__name__} has no FlagEmbedding equivalent")
    if not method or method[0] not in ("cls", "mean"):
        raise LembError("the model has no cls or mean pooling layer")
    return method, dense


def export_flagembedding(model_path: Path, out: Path) -> Path:
    """Write the FlagEmbedding layout of `model_path` to `out` (which must not exist yet); return `out`."""
    if out.exists():
        raise LembError(f"{out}: already exists; choose a new folder")
    source = model_folder(model_path)
    if is_adapter_folder(source):  # LoRA adapters (lemb train --lora): the base's weights with them merged in
        require_peft()
    model = load_embedder(str(source), max_length=None)
    if has_adapters(model):
        merge_adapters(model)
    method, dense = _pooling(model)
    prompts = dict(getattr(model, "prompts", None) or {})
    tasks = sorted({name.rsplit("_", 1)[0] for name in prompts if name.endswith(("_query", "_key"))})
    instructions = {t: {"query": prompts.get(f"{t}_query", ""), "key": prompts.get(f"{t}_key", "")} for t in tasks}
    max_length = int(model.max_seq_length)
    flags = (
        f"--query_encoder {out} --pooling_method {' '.join(method)} --dense_metric cos"
        f" --query_max_length {max_length} --key_max_length {max_length}"
    )
    with atomic(out) as tmp:
        tmp.mkdir()
        model[0].auto_model.save_pretrained(tmp)
        model.tokenizer.save_pretrained(tmp)
        if dense is not None:
            torch.save({"weight": dense}, tmp / "dense_pooler.bin")
        (tmp / "instructions.json").write_text(json.dumps(instructions, indent=2) + "\n")
        info = {
            "format": "flagembedding",
            "pooling_method": method,
            "dense_metric": "cos",
            "max_length": max_length,
            "tasks": tasks,
            "flags": flags,
        }
        (tmp / "export.json").write_text(json.dumps(info, indent=2) + "\n")
        write_card(tmp, read_facts(source) or {}, model=model)
    return out


def export(model_path: Path, out: Path, fmt: str) -> tuple[Path, str]:
    """`lemb export`: the model in the layout `fmt` names; returns the folder and the flags its users pass."""
    if fmt not in FORMATS:
        raise LembError(f"--format {fmt!r}: known formats are {', '.join(FORMATS)}")
    path = export_flagembedding(model_path, out)
    return path, json.loads((path / "export.json").read_text())["flags"]
