"""`lemb train --lora`: LoRA adapters (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022)
on the embedder's transformers encoder, through peft.

Each adapted linear layer W gets a trainable update (alpha / r) * B A of rank r, B starting at zero, so training
starts from the base model exactly; every other weight is frozen and gets no gradient. The adapted layers are the
`targets` of the setting, by default peft's table for the model type
(`peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`): the attention's query and value
projections for BERT, RoBERTa and XLM-R encoders (all-MiniLM-L6-v2 among them), the W_q and W_v of the LoRA paper.

A model with adapters saves as an adapter folder (adapter_config.json, adapter_model.safetensors, beside
sentence-transformers' own files), which `SentenceTransformer(path)` loads with peft installed: the base model it
names, plus the adapters. `merge_adapters` folds B A into W and drops the adapters: a full model, loadable without
peft.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch

from lemb.errors import ConfigError, LembError, MissingDependency
from lemb.pipeline.config import LoraSpec

log = logging.getLogger(__name__)
ADAPTER_CONFIG = "adapter_config.json"  # what makes a model folder an adapter folder (peft's name)
INSTALL = "pip install 'lemb[lora]'"


def require_peft() -> None:
    """One line naming the extra where peft is not installed."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise MissingDependency("peft (for LoRA adapters)", INSTALL) from None


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _encoder(model: Any) -> Any:
    """The transformers model inside a SentenceTransformer, or one line where it has none peft can adapt."""
    from transformers import PreTrainedModel

    encoder = getattr(model[0], "auto_model", None)
    if not isinstance(encoder, PreTrainedModel):
        raise LembError(f"LoRA adapts a transformers encoder, and this model's first module is "
                        f"{type(model[0]).__name__}: train it without --lora")  # fmt: skip
    return encoder


def _targets(encoder: torch.nn.Module, spec: LoraSpec) -> list[str]:
    """The layer names of the setting, each checked to match a linear layer; or peft's defaults for the model type."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    linear = [name for name, m in encoder.named_modules() if isinstance(m, torch.nn.Linear)]
    names = sorted({name.rsplit(".", 1)[-1] for name in linear})
    model_type = getattr(encoder.config, "model_type", None)
    targets = list(spec.targets) or DEFAULTS.get(model_type, [])
    if not targets:
        raise ConfigError(f"lora: peft has no default layers to adapt for model type {model_type!r}; name them with "
                          f"targets=NAME+NAME (the model's linear layers: {', '.join(names)})")  # fmt: skip
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear)]
    if unmatched:
        raise ConfigError(f"lora: targets {'+'.join(unmatched)} match no linear layer of the model (its linear "
                          f"layers: {', '.join(names)})")  # fmt: skip
    return targets


def add_adapters(model: Any, spec: LoraSpec) -> None:
    """Add a LoRA adapter to `model` (a SentenceTransformer) and freeze every other weight."""
    require_peft()
    from peft import LoraConfig

    encoder = _encoder(model)
    targets = _targets(encoder, spec)
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets)
    encoder.add_adapter(config)  # transformers' peft integration: it saves the adapters alone, and loads them back
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("LoRA r=%d alpha=%d dropout=%g on %s: %d of %d weights trainable (%.2f%%)", spec.r, spec.alpha,
             spec.dropout, "+".join(targets), trainable, total, 100 * trainable / total)  # fmt: skip


def has_adapters(model: Any) -> bool:
    encoder = getattr(model[0], "auto_model", None)
    return bool(getattr(encoder, "_hf_peft_config_loaded", False))


@torch.no_grad()
def merge_adapters(model: Any) -> Any:
    """`model` with each adapter's update added to the weight it adapts and the adapters removed (in place)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    encoder = model[0].auto_model
    for name, module in list(encoder.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(encoder.get_submodule(parent), child, module.get_base_layer())
    encoder._hf_peft_config_loaded = False  # transformers then saves the whole model, not the adapters
    encoder.__dict__.pop("peft_config", None)
    # the key renamings transformers kept from reading an adapter folder (`base_model.model.` prefixes) would be
    # reverted on the whole model as it saves; without them it saves as a model of its class built afresh does
    encoder.__dict__.pop("_weight_conversions", None)
    return model


def merged_copy(model: Any) -> Any:
    """A copy of `model` with its adapters merged; `model` keeps them."""
    return merge_adapters(copy.deepcopy(model))
