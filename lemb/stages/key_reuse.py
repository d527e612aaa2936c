"""Key embeddings that one ranking can take from another: `lemb eval` ranks the held-out queries over the corpus
that `lemb retrieve` embedded, usually with the same base model, template and instructions.

Each key shard records in its Parquet metadata what its rows are a function of (`key_identity`): the model's files,
every task's key template and key instruction, `max_length`, and a digest of the corpus records. Another run takes a
finished keys folder only when every shard is intact (its recorded SHA-256) and records the identity that the run
would write itself: checked, never assumed from names or settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lemb.data.tasks import DEFAULT_KEY_TEMPLATE, key_template
from lemb.errors import LembError
from lemb.pipeline.layout import RunLayout
from lemb.pipeline.shards import shard_path, stage_files
from lemb.stages.instructions import Instructions
from lemb.stages.models import resolve_model_path
from lemb.vocabulary import TASKS

log = logging.getLogger(__name__)
IDENTITY = "lemb.keys_identity"  # the Parquet metadata key of a key shard's identity
# what each part of the identity is called in messages
PARTS = {"model": "model", "key_template": "template", "key_instructions": "instructions",
         "max_length": "max_length", "corpus": "corpus"}  # fmt: skip


class CorpusDigest:
    """A digest of the corpus records in the order they are read (key id, task, text, title of each)."""

    def __init__(self) -> None:
        self._digest = hashlib.blake2b(digest_size=16)

    def update(self, key_ids: list, tasks: list, texts: list, titles: list) -> None:
        for row in zip(key_ids, tasks, texts, titles):
            self._digest.update(json.dumps(row).encode() + b"\n")

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def model_content(name: str) -> str:
    """A local model folder's SHA-256 over every file's path and bytes (weights retrained in place differ, sizes
    alike), its model card and other Markdown left out (eval and push rewrite the card); a hub id as it is named."""
    path = resolve_model_path(name, "embedder")
    if not os.path.isdir(path):
        return name
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for file in sorted(f for f in files if not f.endswith(".md")):
            full = os.path.join(root, file)
            digest.update(os.path.relpath(full, path).encode() + b"\0")
            with open(full, "rb") as fh:
                digest.update(hashlib.file_digest(fh, "sha256").digest())
    return digest.hexdigest()[:32]


def key_identity(
    embedder: str, template: Any, instructions: Instructions, max_length: int, corpus: str
) -> dict[str, Any]:
    """What key embeddings and key texts are a function of; `template` is the key_template setting."""
    return {
        "model": model_content(embedder),
        "key_template": {task: key_template(template, task) for task in TASKS},
        "key_instructions": {task: instructions.key(task) for task in TASKS},
        "max_length": max_length,
        "corpus": corpus,
    }


def recorded_identity(keys_dir: Path) -> dict[str, Any] | None:
    """The identity that the first key shard in `keys_dir` records (its footer only: the shards are not checked
    here, `reuse_problem` checks them before any reuse), or None."""
    try:
        return _identity(shard_path(keys_dir, 0))
    except (OSError, pa.ArrowException):
        return None


def _identity(shard: Path) -> dict[str, Any] | None:
    """The identity one key shard's Parquet metadata records, or None (a shard of an earlier lemb)."""
    found = (pq.read_schema(shard).metadata or {}).get(IDENTITY.encode())
    return json.loads(found) if found is not None else None


def reuse_problem(keys_dir: Path, identity: dict[str, Any]) -> str | None:
    """Why the key shards in `keys_dir` cannot stand for those of `identity`, or None when every shard is intact and
    records that identity."""
    try:
        files = stage_files(keys_dir)
    except (LembError, OSError) as exc:
        return f"no finished key embeddings there ({str(exc).splitlines()[0]})"
    for path in files:
        recorded = _identity(path)
        if recorded is None:
            return "their shards record no identity (written by an earlier lemb)"
        differs = [PARTS[part] for part in PARTS if recorded.get(part) != identity[part]]
        if differs:
            return f"{', '.join(differs)} differ{'s' if len(differs) == 1 else ''}"
    return None


def run_key_template(run: str | Path, setting: Any = None) -> Any:
    """The key template of held-out keys (eval's, train's dev set): `setting` when given, else the one the run's
    retrieve stage embedded its keys with (what its key shards record), else the default: held-out keys read as the
    training candidates did."""
    if setting is not None:
        return setting
    keys = RunLayout(run).keys
    recorded = recorded_identity(keys)
    if recorded is None or "key_template" not in recorded:
        if keys.exists():
            log.warning("%s records no key template (written by an earlier lemb): held-out keys are embedded with "
                        "%r; pass --key-template to match retrieve's", keys, DEFAULT_KEY_TEMPLATE)  # fmt: skip
        return DEFAULT_KEY_TEMPLATE
    templates = recorded["key_template"]  # {task: template}: one template when every task has the same
    return next(iter(templates.values())) if len(set(templates.values())) == 1 else templates
