"""The shard protocol: deterministic plans, the stage manifest, atomic shard files, resume.

A stage folder holds `_manifest.json` (written before any work), `part-NNNNN.parquet` (one per
shard, renamed into place only when complete), `part-NNNNN.stats.json` (its counters), and at the
end `_stats.json` and `_failures.jsonl` (shards that failed on their data).
"""

from __future__ import annotations

import hashlib
import json
import os
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

MANIFEST = "_manifest.json"
STATS = "_stats.json"
FAILURES = "_failures.jsonl"


def shard_of(item_id: str, n_shards: int) -> int:
    """Stable across processes and Python versions (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(item_id.encode(), digest_size=8).digest(), "big") % n_shards


@dataclass
class ShardPlan:
    """Which ids each shard holds. In-memory work lists the ids (`ids[s]`, sorted); work streamed from a file
    into per-shard input files (`partition`) keeps only each shard's row count and a digest of its ids, so
    the driver's memory does not grow with the input."""

    ids: list[list[str]] | None = None
    digests: list[dict[str, Any]] | None = None  # [{"rows": n, "ids_digest": hex}] per shard
    inputs: list[Path] | None = None  # per-shard input files of a partitioned plan

    @classmethod
    def from_ids(cls, ids: list[str], n_shards: int) -> ShardPlan:
        buckets: list[list[str]] = [[] for _ in range(n_shards)]
        for item in sorted(set(ids)):
            buckets[shard_of(item, n_shards)].append(item)
        return cls(ids=buckets)

    def __len__(self) -> int:
        return len(self.ids if self.ids is not None else self.digests)

    def rows(self, index: int) -> int:
        return len(self.ids[index]) if self.ids is not None else self.digests[index]["rows"]

    def shard_ids(self, index: int, id_column: str) -> list[str]:
        if self.ids is not None:
            return self.ids[index]
        return sorted(pq.read_table(self.inputs[index], columns=[id_column]).column(id_column).to_pylist())

    def describe(self) -> list:
        """What the manifest records (and a rerun must match)."""
        return self.ids if self.ids is not None else self.digests


def _ids_digest(ids: list[str]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for item in sorted(ids):
        digest.update(item.encode() + b"\0")
    return digest.hexdigest()


def partition(
    batches: Iterable[pa.Table], id_column: str, n_shards: int, folder: Path, source: str | Path
) -> ShardPlan:
    """Stream validated record batches into one Parquet input file per shard, then check each shard for
    duplicate ids (a repeated id always lands in the same shard). Memory: one batch, then one shard."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    paths = [folder / f"input-{i:05d}.parquet" for i in range(n_shards)]
    writers: dict[int, pq.ParquetWriter] = {}
    try:
        for batch in batches:
            shards = [shard_of(item, n_shards) for item in batch.column(id_column).to_pylist()]
            column = pa.array(shards)
            for i in set(shards):
                part = batch.filter(pc.equal(column, i))
                if i not in writers:
                    writers[i] = pq.ParquetWriter(paths[i], batch.schema)
                writers[i].write_table(part)
    finally:
        for w in writers.values():
            w.close()
    digests = []
    for i, path in enumerate(paths):
        if i not in writers:
            digests.append({"rows": 0, "ids_digest": _ids_digest([])})
            continue
        table = pq.read_table(path, columns=[id_column, WHERE])
        ids, where = table.column(id_column).to_pylist(), table.column(WHERE).to_pylist()
        seen: dict[str, str] = {}
        for item, place in zip(ids, where):
            if item in seen:
                raise InputError(source, place, id_column, f"duplicate id {item!r} (first at {seen[item]})")
            seen[item] = place
        digests.append({"rows": len(ids), "ids_digest": _ids_digest(ids)})
    return ShardPlan(digests=digests, inputs=paths)


def shard_path(stage_dir: Path, index: int) -> Path:
    return stage_dir / f"part-{index:05d}.parquet"


def _stats_path(stage_dir: Path, index: int) -> Path:
    return stage_dir / f"part-{index:05d}.stats.json"


def write_json_atomic(path: Path, content: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(content, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def write_shard(
    stage_dir: Path, index: int, table: pa.Table, schema: pa.Schema, metadata: dict[str, str], stats: dict[str, Any]
) -> Path:
    """Write to a temporary name, check the footer and row count, then rename into place."""
    final = shard_path(stage_dir, index)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    table = table.cast(schema).replace_schema_metadata({**(schema.metadata or {}), **metadata})
    try:
        pq.write_table(table, tmp)
        written = pq.ParquetFile(tmp).metadata.num_rows  # reads the footer back
        if written != table.num_rows:
            raise OSError(f"{tmp}: wrote {written} rows, expected {table.num_rows}")
        write_json_atomic(_stats_path(stage_dir, index), stats)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def input_fingerprint(paths: list[str | Path | None]) -> list[dict[str, Any]]:
    out = []
    for p in paths:
        if p is None:
            continue
        st = Path(p).stat()
        out.append({"path": str(Path(p).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _describe_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    changed = sorted(
        k for k in set(old["config"]) | set(new["config"]) if old["config"].get(k) != new["config"].get(k)
    )
    parts = [f"{k}: {old['config'].get(k)!r} -> {new['config'].get(k)!r}" for k in changed]
    old_in = {i["path"]: i for i in old["inputs"]}
    for item in new["inputs"]:
        before = old_in.get(item["path"])
        if before is None:
            parts.append(f"new input {item['path']}")
        elif (before["size"], before["mtime_ns"]) != (item["size"], item["mtime_ns"]):
            parts.append(f"input changed since the first run: {item['path']}")
    return "; ".join(parts) or "shard plan differs"


def _discard(stage_dir: Path) -> None:
    """Move the folder aside in one rename, then delete it: a kill midway never leaves a half-deleted stage."""
    trash = stage_dir.with_name(f".{stage_dir.name}.discarded-{os.getpid()}")
    os.replace(stage_dir, trash)
    shutil.rmtree(trash)


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
        same = same and [(i["path"], i["size"], i["mtime_ns"]) for i in old["inputs"]] == [
            (i["path"], i["size"], i["mtime_ns"]) for i in manifest["inputs"]
        ]
        if not same and not restart:
            raise StageConflict(
                f"{stage_dir}: earlier output was made with other settings or inputs"
                f" ({_describe_change(old, manifest)}); pass --restart to discard it"
            )
        if not same:
            _discard(stage_dir)
    elif stage_dir.exists():
        # output without a manifest cannot be trusted (a killed --restart, or files from elsewhere)
        _discard(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    for stale in stage_dir.glob(".*.tmp-*"):  # left by a killed process
        stale.unlink()
    (stage_dir / FAILURES).unlink(missing_ok=True)
    if not path.exists():
        write_json_atomic(path, manifest)
    return {i for i in range(len(plan)) if shard_path(stage_dir, i).exists()}


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
    write_json_atomic(stage_dir / STATS, stats)
    if failures:
        with open(stage_dir / FAILURES, "w") as fh:
            for f in failures:
                fh.write(json.dumps(f) + "\n")
    return stats


def read_stage(stage_dir: Path, columns: list[str] | None = None) -> pa.Table:
    """All shards of a finished stage as one table; refuses a stage that is missing or incomplete."""
    manifest = stage_dir / MANIFEST
    if not manifest.exists():
        raise LembError(f"{stage_dir}: no stage output here; run that stage first")
    n_shards = len(json.loads(manifest.read_text())["plan"])
    files = [shard_path(stage_dir, i) for i in range(n_shards)]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise LembError(
            f"{stage_dir}: stage incomplete ({n_shards - len(missing)} of {n_shards} shards done,"
            f" missing {missing[0]});"
            " rerun that stage to finish it"
        )
    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])
