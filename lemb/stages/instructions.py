"""Which task instructions an embedder is used with: the `instructions` setting of retrieve, train and eval.

A model is embedded the way its authors use it. all-MiniLM-L6-v2, the default base, was trained without
instructions: given the LLM-Embedder's it loses 0.046 nDCG@10 on BEIR SciFact and 0.113 on NQ (RESULTS.md,
section 6), so a comparison against it so handicapped measures the handicap. The default, `auto`, follows the model:

1. a model trained by lemb: the table it saved as its sentence-transformers prompts (`<task>_query`, `<task>_key`);
2. a model with sentence-transformers prompts of its own: its query prompt for every task's queries, its document
   prompt (`document`, `passage` or `corpus`) for keys;
3. a model whose authors publish instructions that its folder does not carry (`KNOWN_MODELS`): theirs;
4. any other model: none.

A preset name (`none`, `llm-embedder`, `bge`) sets the instructions of every embedder; a table
`{task: [query_instruction, key_instruction]}` sets the tasks it names, and the others follow `auto`.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import logging
import os
import socket
import urllib.parse
from dataclasses import dataclass
from typing import Any

from lemb.data.tasks import INSTRUCTION_PRESETS
from lemb.stages.models import resolve_model_path
from lemb.vocabulary import TASKS

log = logging.getLogger(__name__)
AUTO = "auto"
ST_CONFIG = "config_sentence_transformers.json"  # where sentence-transformers keeps a model's prompts
KEY_PROMPT_NAMES = ("document", "passage", "corpus")  # the names models give their key prompt
# Models whose authors use instructions that their published folders do not carry as prompts, by the last part of
# the hub id or folder name: the published LLM-Embedder (Zhang et al., 2024) and the English BGE models (Xiao et
# al., 2023; query instruction for retrieval, none for passages).
KNOWN_MODELS = {"llm-embedder*": "llm-embedder", "bge-*-en": "bge", "bge-*-en-v1.5": "bge"}


@dataclass(frozen=True)
class Instructions:
    """A (query instruction, key instruction) pair for every task, and where it came from (for reports)."""

    table: dict[str, tuple[str, str]]
    source: str

    def query(self, task: str) -> str:
        return self.table[task][0]

    def key(self, task: str) -> str:
        return self.table[task][1]

    @property
    def name(self) -> str:
        """The preset this table equals (`none`, `llm-embedder`, `bge`), else `custom`."""
        for preset, table in INSTRUCTION_PRESETS.items():
            if all(tuple(table[t]) == tuple(self.table[t]) for t in TASKS):
                return preset
        return "custom"

    def prompts(self) -> dict[str, str]:
        """The table as sentence-transformers prompts: `model.encode(q, prompt_name="qa_query")`."""
        return {f"{t}_{side}": pair[i] for t, pair in self.table.items() for i, side in enumerate(("query", "key"))}

    def describe(self) -> dict[str, Any]:
        """What reports and metrics.json record: the preset name, the source and the whole table."""
        return {"name": self.name, "source": self.source, "table": {t: list(p) for t, p in self.table.items()}}


def resolve_instructions(setting: str | dict[str, Any], model: str) -> Instructions:
    """The instructions `model` is embedded with under `setting` (`auto`, a preset name or a table)."""
    if isinstance(setting, str) and setting != AUTO:
        if setting not in INSTRUCTION_PRESETS:
            raise ValueError(f"unknown instruction preset {setting!r}; known: auto, {', '.join(INSTRUCTION_PRESETS)}")
        return Instructions(_preset(setting), f"preset {setting!r} (setting)")
    if isinstance(setting, dict) and set(setting) - set(TASKS):
        raise ValueError(
            f"instructions: unknown task {sorted(set(setting) - set(TASKS))[0]!r}; known: {', '.join(TASKS)}"
        )
    own = model_instructions(model)
    if isinstance(setting, dict):
        table = own.table | {t: (str(q), str(k)) for t, (q, k) in setting.items()}
        return Instructions(table, f"table for {', '.join(sorted(setting))} (setting); others: {own.source}")
    return own


def model_instructions(model: str) -> Instructions:
    """The instructions `model` is meant to be used with (steps 1-4 of the module docstring)."""
    prompts = model_prompts(model)
    lemb_tasks = [t for t in TASKS if f"{t}_query" in prompts or f"{t}_key" in prompts]
    if lemb_tasks:
        table = {t: (prompts.get(f"{t}_query", ""), prompts.get(f"{t}_key", "")) for t in TASKS}
        return Instructions(table, "saved with the model by lemb train")
    if "query" in prompts:
        key = next((prompts[n] for n in KEY_PROMPT_NAMES if n in prompts), "")
        return Instructions(dict.fromkeys(TASKS, (prompts["query"], key)), "the model's own prompts")
    if prompts:  # prompts under names lemb does not know how to map: say so rather than drop them unseen
        log.warning("%s has sentence-transformers prompts %s but none named query; embedding it without instructions"
                    " (set `instructions` to use them)", model, sorted(prompts))  # fmt: skip
    base = os.path.basename(os.path.normpath(model)).lower()
    for pattern, preset in KNOWN_MODELS.items():
        if fnmatch.fnmatch(base, pattern):
            return Instructions(_preset(preset), f"preset {preset!r} (its authors' instructions)")
    return Instructions(_preset("none"), "none (the model has no instructions)")


def model_prompts(model: str) -> dict[str, str]:
    """The sentence-transformers prompts of `model` ({} when it has none or its folder cannot be read)."""
    path = resolve_model_path(model, "embedder")
    config = os.path.join(path, ST_CONFIG) if os.path.isdir(path) else _hub_file(path, ST_CONFIG)
    if config is None or not os.path.isfile(config):
        return {}
    with open(config, encoding="utf-8") as fh:
        prompts = json.load(fh).get("prompts") or {}
    return {str(k): str(v) for k, v in prompts.items()}


def _hub_file(repo: str, filename: str) -> str | None:
    """A file of a hub model from the local cache, else downloaded (None where neither works: the model's own load
    then reports why)."""
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
    except ImportError:
        return None
    cached = try_to_load_from_cache(repo, filename)
    if isinstance(cached, str):
        return cached
    if cached is not None or not _hub_reachable():  # the cache knows the file does not exist; or no network
        return None
    try:
        return hf_hub_download(repo, filename)
    except Exception as exc:  # no network, no such file, a gated repo: the model has no prompts we can read
        log.info("%s: no %s read (%s); its instructions follow its name", repo, filename, type(exc).__name__)
        return None


@functools.cache
def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers at all: without a network, huggingface_hub retries each request for half a minute."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # only the proxy knows: let huggingface_hub ask through it
    host = urllib.parse.urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        log.info("%s cannot be reached: a hub model's instructions follow its name", host)
        return False
    return True


def _preset(name: str) -> dict[str, tuple[str, str]]:
    return {t: tuple(INSTRUCTION_PRESETS[name][t]) for t in TASKS}
