"""`lemb rescore`: another reward from the log-probabilities a label run kept, without calling the LLM.

Each label shard is read on its own and written again to `<run>/rescore/<kind>/` with the `reward` column recomputed
by `reward_from_logprobs` (the function training uses); every other column is copied. Rows without signal
(`skip_reason` set) keep a null reward, as in the label stage.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lemb.data import schemas
from lemb.errors import InputError, LembError
from lemb.pipeline.shards import read_stage, shard_path, write_shard
from lemb.stages.reward import REWARD_KINDS, reward_from_logprobs

LOGPROB_FIELDS = ("target_logprob", "sample_logprobs", "baseline_target_logprob", "baseline_sample_logprobs")


def _reward(kind: str, row: dict[str, Any], tie_tol: float, source: Path) -> float | None:
    if row["skip_reason"] is not None:
        return None
    for name in LOGPROB_FIELDS:
        values = row[name] if isinstance(row[name], list) else [row[name]]
        if any(v is None or not math.isfinite(v) for v in values):
            where = f"query_id {row['query_id']!r}, key_id {row['key_id']!r}"
            raise InputError(source, where, name, f"not a finite log-probability ({row[name]})")
    return reward_from_logprobs(
        kind, row["target_logprob"], row["sample_logprobs"], row["sample_counts"], row["baseline_target_logprob"],
        row["baseline_sample_logprobs"], tie_tol,
    )  # fmt: skip


def rescore(run: str | Path, kind: str, tie_tolerance: float = 1e-6) -> dict[str, Any]:
    """Write `<run>/rescore/<kind>/` and return its summary: rows, rows with a reward, mean reward per task."""
    if kind not in REWARD_KINDS:
        raise LembError(f"--reward {kind!r}: known rewards are {', '.join(REWARD_KINDS)}")
    label_dir = Path(run) / "label"
    read_stage(label_dir, columns=["query_id"])  # refuses a missing or unfinished label stage
    n_shards = len(json.loads((label_dir / "_manifest.json").read_text())["plan"])
    out_dir = label_dir.parent / "rescore" / kind
    out_dir.mkdir(parents=True, exist_ok=True)
    per_task: dict[str, list[float]] = defaultdict(list)
    rows = 0
    for index in range(n_shards):
        source = shard_path(label_dir, index)
        shard = pq.read_table(source)
        records = shard.to_pylist()
        rewards = [_reward(kind, r, tie_tolerance, source) for r in records]
        for r, value in zip(records, rewards):
            if value is not None:
                per_task[r["task"]].append(value)
        table = shard.set_column(shard.schema.get_field_index("reward"), "reward", pa.array(rewards, pa.float64()))
        metadata = {k.decode(): v.decode() for k, v in (shard.schema.metadata or {}).items()}
        metadata.update({"lemb.reward": kind, "lemb.tie_tolerance": repr(tie_tolerance)})
        write_shard(out_dir, index, table, schemas.REWARD, metadata, {"rows_out": len(records)})
        rows += len(records)
    summary = {
        "reward": kind,
        "rows": rows,
        "rows_with_reward": sum(map(len, per_task.values())),
        "mean_reward": {task: sum(v) / len(v) for task, v in sorted(per_task.items())},
        "out": str(out_dir),
    }
    (out_dir / "_summary.json").write_text(json.dumps(summary, indent=1))
    return summary
