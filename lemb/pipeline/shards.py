"""The shard protocol: deterministic plans, the stage manifest, atomic shard files, resume.

A stage folder holds `_manifest.json` (written before any work), `part-NNNNN.parquet` (one per
shard, renamed into place only when complete), `part-NNNNN.stats.json` (its counters, and the shard's row
count, size in bytes, schema fingerprint and SHA-256, written before the rename), and at the end `_stats.json` and
`_failures.jsonl` (shards that failed on their data).

A shard counts as done only while it matches what was recorded when it was written: `verify_shard` checks its
size, footer and content hash, so a truncated, replaced, schema-changed or bit-flipped file is found; the stage's
rerun redoes such shards, the next stage refuses them naming the file and the problem, `lemb status` shows them
DAMAGED and `lemb inspect` refuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import lemb
from lemb.data.schemas import WHERE
from lemb.errors import InputError, LembError, StageConflict
from lemb.files import atomic, move_aside, remove, write_json
from lemb.pipeline.config import config_changes

log = logging.getLogger(__name__)
MANIFEST = "_manifest.json"
STATS = "_stats.json"
FAILURES = "_failures.jsonl"


def shard_of(item_id: str, n_shards: int) -> int:
    """Stable across processes and Python versions (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(item_id.encode(), digest_size=8).digest(), "big") % n_shards


@dataclass
class ShardPlan:
    """Every shard's input file and what it holds: `shards[i]` = {"rows", "items", "ids_digest"} (items are the
    distinct ids, e.g. the queries of a candidate shard). The driver keeps this, never the rows, so its memory does
    not grow with the input; a worker reads its own shard's file."""

    inputs: list[Path]
    shards: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.shards)

    def rows(self, index: int) -> int:
        return self.shards[index]["rows"]

    def items(self, index: int) -> int:
        return self.shards[index]["items"]

    def shard_ids(self, index: int, id_column: str) -> list[str]:
        return sorted(set(pq.read_table(self.inputs[index], columns=[id_column]).column(id_column).to_pylist()))

    def describe(self) -> list[dict[str, Any]]:
        """What the manifest records (and a rerun must match)."""
        return self.shards

    @classmethod
    def of_stage(cls, stage_dir: Path, id_column: str) -> ShardPlan:
        """A plan over the shards of a finished stage (label works on retrieve's candidate shards as they are)."""
        inputs = stage_files(stage_dir)
        shards = []
        for path in inputs:
            ids = pq.read_table(path, columns=[id_column]).column(id_column).to_pylist()
            shards.append({"rows": len(ids), "items": len(set(ids)), "ids_digest": _ids_digest(set(ids))})
        return cls(inputs, shards)


def _ids_digest(ids: Iterable[str]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for item in sorted(ids):
        digest.update(item.encode() + b"\0")
    return digest.hexdigest()


def partition(
    batches: Iterable[pa.Table], id_column: str, n_shards: int, folder: Path, source: str | Path, schema: pa.Schema
) -> ShardPlan:
    """Stream validated record batches (of `schema`, with a `_where` column) into one Parquet input file per shard,
    then check each shard for duplicate ids (a repeated id always lands in the same shard). Every shard gets a file,
    empty or not, so that every shard takes the same worker path. Memory: one batch, then one shard's ids."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    paths = [folder / f"input-{i:05d}.parquet" for i in range(n_shards)]
    writers = [pq.ParquetWriter(p, schema) for p in paths]
    try:
        for batch in batches:
            shards = pa.array([shard_of(item, n_shards) for item in batch.column(id_column).to_pylist()])
            for i in set(shards.to_pylist()):
                writers[i].write_table(batch.filter(pc.equal(shards, i)))
    finally:
        for w in writers:
            w.close()
    plan = []
    for path in paths:
        table = pq.read_table(path, columns=[id_column, WHERE])
        ids, where = table.column(id_column).to_pylist(), table.column(WHERE).to_pylist()
        seen: dict[str, str] = {}
        for item, place in zip(ids, where):
            if item in seen:
                raise InputError(source, place, id_column, f"duplicate id {item!r} (first at {seen[item]})")
            seen[item] = place
        plan.append({"rows": len(ids), "items": len(ids), "ids_digest": _ids_digest(ids)})
    return ShardPlan(paths, plan)


def partition_table(table: pa.Table, id_column: str, n_shards: int, folder: Path, source: str = "input") -> ShardPlan:
    """`partition` of a table already in memory (tests, small inputs)."""
    where = pa.array([f"row {i + 1}" for i in range(table.num_rows)], pa.string())
    table = table.append_column(WHERE, where)
    return partition([table], id_column, n_shards, folder, source, table.schema)


def shard_path(stage_dir: Path, index: int) -> Path:
    return stage_dir / f"part-{index:05d}.parquet"


def _stats_path(stage_dir: Path, index: int) -> Path:
    return stage_dir / f"part-{index:05d}.stats.json"


def progress_path(stage_dir: Path, index: int) -> Path:
    """Written by the worker while a shard runs (items done, rate); removed once the shard is final."""
    return stage_dir / f"part-{index:05d}.progress.json"


def read_manifest(stage_dir: Path) -> dict[str, Any]:
    path = stage_dir / MANIFEST
    if not path.exists():
        raise LembError(f"{stage_dir}: no stage output here; run that stage first")
    return json.loads(path.read_text())


def write_shard(
    stage_dir: Path, index: int, table: pa.Table, schema: pa.Schema, metadata: dict[str, str], stats: dict[str, Any]
) -> Path:
    """Write to a temporary name, check the footer and row count, then rename into place."""
    table = table.cast(schema).replace_schema_metadata({**(schema.metadata or {}), **metadata})
    with atomic(shard_path(stage_dir, index)) as tmp:
        pq.write_table(table, tmp)
        footer = pq.ParquetFile(tmp).metadata  # read back
        if footer.num_rows != table.num_rows:
            raise OSError(f"{tmp}: wrote {footer.num_rows} rows, expected {table.num_rows}")
        schema_print = schema_fingerprint(footer.schema.to_arrow_schema())
        record = {"rows": footer.num_rows, "bytes": tmp.stat().st_size, "schema": schema_print,
                  "sha256": content_hash(tmp)}  # fmt: skip
        write_json(_stats_path(stage_dir, index), {**stats, "shard": record})
    return shard_path(stage_dir, index)


def schema_fingerprint(schema: pa.Schema) -> str:
    """Column names and types (not the metadata)."""
    text = ";".join(f"{f.name}:{f.type}" for f in schema)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def content_hash(path: Path) -> str:
    """SHA-256 of a file's bytes (about a fifth of the time a read of the shard takes: BENCHMARKS.md)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def verify_shard(stage_dir: Path, index: int) -> str | None:
    """What is wrong with a finished shard, or None: its file against the row count, size, schema and content hash
    recorded when it was written. Size and footer find a truncated or replaced file; the hash finds a changed byte
    anywhere (a bad disk, a bad copy, an edit)."""
    path = shard_path(stage_dir, index)
    try:
        record = json.loads(_stats_path(stage_dir, index).read_text()).get("shard")
    except (OSError, ValueError):
        return "its stats file is missing or unreadable"
    if record is None:
        return None  # written before shards recorded their size and schema
    size = path.stat().st_size
    if size != record["bytes"]:
        return f"{size} bytes where {record['bytes']} were written (truncated or replaced)"
    try:
        meta = pq.ParquetFile(path).metadata
    except (OSError, pa.ArrowException) as exc:
        return f"not a readable Parquet file ({exc})"
    if meta.num_rows != record["rows"]:
        return f"{meta.num_rows} rows where {record['rows']} were written"
    if schema_fingerprint(meta.schema.to_arrow_schema()) != record["schema"]:
        return "its columns or types differ from those it was written with"
    if "sha256" in record and content_hash(path) != record["sha256"]:  # shards of earlier versions have no hash
        return "its content differs from what was written (a changed byte: a bad disk, a bad copy or an edit)"
    return None


FINGERPRINT_BLOCK = 1 << 16


def input_fingerprint(paths: list[str | Path | None]) -> list[dict[str, Any]]:
    """Each input's absolute path (for messages) and what identifies its content wherever it lies: its size and
    a hash of its first and last 64 KiB. A run folder copied or moved with its inputs matches; an edited file
    does not (an edit that keeps the size and both ends is not seen: the price of not reading whole corpora)."""
    out = []
    for p in paths:
        if p is None:
            continue
        path = Path(p)
        size = path.stat().st_size
        digest = hashlib.sha256(str(size).encode())
        with open(path, "rb") as fh:
            digest.update(fh.read(FINGERPRINT_BLOCK))
            if size > FINGERPRINT_BLOCK:
                fh.seek(max(FINGERPRINT_BLOCK, size - FINGERPRINT_BLOCK))
                digest.update(fh.read())
        out.append({"path": str(path.resolve()), "size": size, "content": digest.hexdigest()[:16]})
    return out


def _same_content(old: dict[str, Any], new: dict[str, Any]) -> bool:
    if "content" not in old:  # a manifest of an earlier version: path, size and mtime
        return old["path"] == new["path"] and old["size"] == new["size"]
    return (old["size"], old["content"]) == (new["size"], new["content"])


def _describe_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    parts = config_changes(old["config"], new["config"])
    if len(old["inputs"]) != len(new["inputs"]):
        parts.append(f"inputs: {len(old['inputs'])} -> {len(new['inputs'])} files")
    for before, item in zip(old["inputs"], new["inputs"]):
        if not _same_content(before, item):
            parts.append(f"input changed since the first run: {item['path']}")
    return "; ".join(parts) or "shard plan differs"


def _discard(stage_dir: Path) -> None:
    """Move the folder aside in one rename, then delete it: a kill midway never leaves a half-deleted stage."""
    remove(move_aside(stage_dir, "discarded"))


def open_stage(
    stage_dir: Path,
    stage: str,
    config: dict[str, Any],
    config_hash: str,
    inputs: list[str | Path | None],
    plan: ShardPlan,
    restart: bool = False,
) -> set[int]:
    """Write (or check) the manifest and return the indices of shards already done."""
    manifest = {
        "stage": stage,
        "config": config,
        "config_hash": config_hash,
        "inputs": input_fingerprint(inputs),
        "plan": plan.describe(),
        "lemb_version": lemb.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = stage_dir / MANIFEST
    if path.exists():
        old = json.loads(path.read_text())
        same = old["config_hash"] == config_hash and old["plan"] == plan.describe()
        same = same and len(old["inputs"]) == len(manifest["inputs"])
        same = same and all(_same_content(a, b) for a, b in zip(old["inputs"], manifest["inputs"]))
        if not same and not restart and has_output(stage_dir):
            raise StageConflict(
                f"{stage_dir}: earlier output was made with other settings or inputs"
                f" ({_describe_change(old, manifest)}); pass --restart to discard it"
            )
        if not same:  # --restart, or an earlier try that finished no shard: nothing of value is lost
            log.info("%s: discarding earlier output (%s)", stage_dir, _describe_change(old, manifest))
            _discard(stage_dir)
    elif stage_dir.exists():
        # output without a manifest cannot be trusted (a killed --restart, or files from elsewhere)
        _discard(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    remove_leftovers(stage_dir)  # left by a killed or interrupted process
    (stage_dir / FAILURES).unlink(missing_ok=True)
    if not path.exists():
        write_json(path, manifest)
    done = set()
    for i in range(len(plan)):
        if not shard_path(stage_dir, i).exists():
            continue
        problem = verify_shard(stage_dir, i)
        if problem:  # damaged since it was written: redone
            log.warning("%s: %s; redoing it", shard_path(stage_dir, i), problem)
            shard_path(stage_dir, i).unlink()
            continue
        done.add(i)
    return done


def has_output(stage_dir: Path) -> bool:
    """Whether a stage folder holds anything a rerun must not lose: a finished shard or a record of failed ones."""
    return (stage_dir / FAILURES).exists() or any(stage_dir.glob("part-*.parquet"))


def remove_leftovers(stage_dir: Path) -> None:
    """Temporary files and progress files of shards that did not finish."""
    for leftover in [*stage_dir.glob(".*.tmp-*"), *stage_dir.glob("part-*.progress.json")]:
        remove(leftover)


def finish_stage(stage_dir: Path, n_shards: int, failures: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate per-shard counters into `_stats.json`; record failed shards in `_failures.jsonl`."""
    totals: dict[str, float] = {}
    done = 0
    for i in range(n_shards):
        p = _stats_path(stage_dir, i)
        if shard_path(stage_dir, i).exists() and p.exists():
            done += 1
            for k, v in json.loads(p.read_text()).items():
                if isinstance(v, (int, float)):
                    totals[k] = totals.get(k, 0) + v
    stats = {
        "shards": n_shards,
        "shards_done": done,
        "shards_failed": len(failures),
        "ids_in_failed_shards": sum(len(f["ids"]) for f in failures),  # reported, never silently dropped
        **totals,
    }
    write_json(stage_dir / STATS, stats)
    if failures:
        with open(stage_dir / FAILURES, "w") as fh:
            for f in failures:
                fh.write(json.dumps(f) + "\n")
    return stats


def _require_done(stage_dir: Path, files: list[Path]) -> None:
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise LembError(
            f"{stage_dir}: stage incomplete ({len(files) - len(missing)} of {len(files)} shards done,"
            f" missing {missing[0]}); rerun that stage to finish it"
        )


def stage_files(stage_dir: Path) -> list[Path]:
    """The shard files of a finished stage, in shard order; refuses a stage that is missing or incomplete, or a
    shard damaged since it was written (naming the file, the problem and the command that redoes it)."""
    files = [shard_path(stage_dir, i) for i in range(len(read_manifest(stage_dir)["plan"]))]
    _require_done(stage_dir, files)
    for i in range(len(files)):
        refuse_damaged(stage_dir, i)
    return files


def refuse_damaged(stage_dir: Path, index: int) -> None:
    """One line naming a shard damaged since it was written, its problem and the command that redoes it."""
    problem = verify_shard(stage_dir, index)
    if problem:
        stage = read_manifest(stage_dir)["stage"]
        raise LembError(f"{shard_path(stage_dir, index)}: damaged: {problem}; rerun `lemb {stage}` on this run to "
                        "redo it")  # fmt: skip


def read_stage(stage_dir: Path, columns: list[str] | None = None) -> pa.Table:
    """All shards of a finished stage as one table (small stages, tests; workers read their own shard)."""
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in stage_files(stage_dir)])
