"""`lemb status` and `lemb inspect`: read-only views of a run and of any shard folder (polars)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from lemb.errors import LembError
from lemb.pipeline.layout import RunLayout
from lemb.pipeline.lock import holder_of, process_gone
from lemb.pipeline.shards import FAILURES, MANIFEST, progress_path, refuse_damaged, shard_path, verify_shard


def stage_status(stage_dir: Path) -> dict:
    manifest = json.loads((stage_dir / MANIFEST).read_text())
    n = len(manifest["plan"])
    written = [i for i in range(n) if shard_path(stage_dir, i).exists()]
    damaged = {i: problem for i in written if (problem := verify_shard(stage_dir, i))}
    done = [i for i in written if i not in damaged]
    failed = []
    if (stage_dir / FAILURES).exists():
        failed = [json.loads(line)["shard"] for line in (stage_dir / FAILURES).read_text().splitlines() if line]
    rows = seconds = tokens = 0.0
    for i in done:
        stats_file = stage_dir / f"part-{i:05d}.stats.json"
        if stats_file.exists():
            s = json.loads(stats_file.read_text())
            rows += s.get("rows_out", 0)
            seconds += s.get("seconds", 0.0)
            tokens += sum(v for k, v in s.items() if k.endswith("_tokens"))
    running = []
    for i in range(n):
        if i in written:
            continue
        try:
            p = json.loads(progress_path(stage_dir, i).read_text())
        except (OSError, ValueError):
            continue
        running.append({"shard": i, **p})
    return {
        "stage": manifest["stage"],
        "running": running,
        "shards": n,
        "done": len(done),
        "failed": len(failed),
        "damaged": [{"shard": i, "problem": p} for i, p in damaged.items()],
        "pending": n - len(done) - len(failed) - len(damaged),
        "rows": int(rows),
        "tokens": int(tokens),
        "seconds": round(seconds, 1),
        "config_hash": manifest["config_hash"],
    }


def _gone(progress: dict) -> bool:
    """Whether the process that wrote a shard's progress is known to be dead (only a process of this host can be)."""
    if progress.get("host") != socket.gethostname():
        return False
    try:
        pid = int(progress["pid"])
    except (ValueError, KeyError, TypeError):
        return False
    return process_gone(pid)


def run_status(run: Path) -> str:
    stages = sorted(p.parent for p in run.rglob(MANIFEST))
    train = RunLayout(run).train
    if not stages and not train.exists():
        raise LembError(f"{run}: no stage output here")
    lines = [f"{'stage':<22}{'done':>6}{'pending':>9}{'failed':>8}{'rows':>9}{'tokens':>10}{'seconds':>10}  config"]
    for d in stages:
        s = stage_status(d)
        lines.append(
            f"{s['stage']:<22}{s['done']:>4}/{s['shards']:<2}{s['pending']:>8}{s['failed']:>8}{s['rows']:>9}"
            f"{s['tokens']:>10}{s['seconds']:>10}  {s['config_hash']}"
        )
        for bad in s["damaged"]:
            lines.append(f"  shard {bad['shard']}: DAMAGED, {bad['problem']} (a rerun of the stage redoes it)")
        for r in s["running"]:
            ago = time.time() - r["updated"]
            where = f"pid {r['pid']} on {r['host']}"
            if _gone(r):
                where += ": that process is gone; the shard waits for a retry or a rerun of the stage"
            lines.append(
                f"  shard {r['shard']}: {int(r['done'])}/{r['total']} done, {r['rate']:.2f}/s, updated {ago:.0f} s ago"
                f" ({where})"
            )
    if train.exists():
        lines.append(f"{'train':<22}{train_status(train)}")
    return "\n".join(lines)


def train_status(train_dir: Path) -> str:
    """Whether a training run is under way (its lock held) and how far it is (its log's last row, its checkpoint)."""
    holder = holder_of(train_dir)
    log, checkpoint = train_dir / "log.jsonl", train_dir / "checkpoint.pt"
    last = None
    if log.exists():
        rows = [line for line in log.read_text().splitlines() if line.strip()]
        last = json.loads(rows[-1]) if rows else None
    where = f"{last['step'] + 1} steps done, loss {last['loss']:.4f}" if last else "no step done yet"
    saved = ""
    if checkpoint.exists():
        saved = f"; checkpoint of {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(checkpoint.stat().st_mtime))}"
    if holder is not None:
        return f"running ({holder}): {where}{saved}"
    if checkpoint.exists():
        return f"stopped: {where}{saved} (lemb train --resume continues it)"
    return "model saved" if RunLayout.model_in(train_dir).exists() else "no model yet"


def _checked_shards(path: Path) -> list[Path]:
    """The shards at `path` (a shard folder or one shard); a shard of a stage folder is refused if it is damaged
    since it was written (as the next stage would refuse it)."""
    files = sorted(path.glob("part-*.parquet")) if path.is_dir() else [path]
    if not files or not files[0].exists():
        raise LembError(f"{path}: no Parquet shards here")
    for f in files:
        index = f.name.removeprefix("part-").removesuffix(".parquet")
        if (f.parent / MANIFEST).exists() and index.isdigit():
            refuse_damaged(f.parent, int(index))
    return files


def inspect_shards(path: Path, top: int = 3) -> str:
    import polars as pl

    files = _checked_shards(path)
    try:
        df = pl.scan_parquet(files).collect()
    except (pl.exceptions.PolarsError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LembError(f"{path}: not a readable Parquet file or shard folder ({first})") from None
    out = [f"{path}: {df.height} rows in {len(files)} shard(s); columns: {', '.join(df.columns)}"]
    with pl.Config(tbl_rows=50, fmt_str_lengths=60, tbl_width_chars=140):
        if "task" in df.columns:
            out.append(str(df.group_by("task").len().sort("task")))
        value = next((c for c in ("reward", "retrieval_score") if c in df.columns), None)
        if value is None:
            return "\n".join(out)
        valid = df.filter(pl.col(value).is_not_null())
        out.append(f"{value} distribution ({df.height - valid.height} rows without a value):")
        out.append(
            str(
                valid.group_by("task")
                .agg(
                    pl.col(value).mean().alias("mean"),
                    pl.col(value).std().alias("std"),
                    pl.col(value).min().alias("min"),
                    pl.col(value).median().alias("median"),
                    pl.col(value).max().alias("max"),
                )
                .sort("task")
            )
        )
        if "skip_reason" in df.columns:
            skipped = df.filter(pl.col("skip_reason").is_not_null())
            if skipped.height:
                out.append("rows without signal by reason:")
                out.append(str(skipped.group_by("skip_reason").len()))
        out.append(f"top {top} by {value}:")
        out += _examples(valid.sort(value, descending=True).head(top).to_dicts(), value)
        out.append(f"bottom {top} by {value}:")
        out += _examples(valid.sort(value).head(top).to_dicts(), value)
    return "\n".join(out)


def _examples(rows: list[dict], value: str, width: int = 100) -> list[str]:
    """Rows as a person reads them: the numbers on one line, then the query, the key and the desired output, each
    shortened to `width` characters."""
    out = []
    for i, r in enumerate(rows, 1):
        numbers = [f"{value} {r[value]:.3f}"]
        if r.get("rank") is not None and r.get("pool_size") is not None:
            numbers.append(f"target rank {r['rank']:g} of {r['pool_size'] + 1}")
        if r.get("retrieval_rank") is not None:
            numbers.append(f"retrieval rank {r['retrieval_rank']}")
        names = " / ".join(str(r[c]) for c in ("query_id", "key_id") if r.get(c) is not None)
        out.append(f"{i:>3}. {' '.join(x for x in (r.get('task'), names) if x)}: {', '.join(numbers)}")
        for label, column in (("query", "query_text"), ("key", "key_text"), ("target", "target")):
            if r.get(column) is not None:
                out.append(f"       {label:<6} {_shorten(r[column], width)}")
    return out


def _shorten(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 3] + "..."
