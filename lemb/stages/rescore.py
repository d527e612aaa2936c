"""`lemb rescore`: another reward from the log-probabilities a label run kept, without calling the LLM.

Each label shard is read on its own and written again to `<run>/rescore/<kind>/` with the `reward` column recomputed
by `reward_from_logprobs` (the function training uses); every other column is copied. Rows without signal
(`skip_reason` set) keep a null reward, as in the label stage.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lemb.data import schemas
from lemb.errors import LembError
from lemb.pipeline.shards import shard_path, stage_files, write_shard
from lemb.stages.reward import row_reward
from lemb.vocabulary import REWARDS


def rescore(run: str | Path, kind: str, tie_tolerance: float = 1e-6) -> dict[str, Any]:
    """Write `<run>/rescore/<kind>/` and return its summary: rows, rows with a reward, mean reward per task."""
    if kind not in REWARDS:
        raise LembError(f"--reward {kind!r}: known rewards are {', '.join(REWARDS)}")
    label_dir = Path(run) / "label"
    stage_files(label_dir)  # refuses a missing, unfinished or damaged label stage
    n_shards = len(json.loads((label_dir / "_manifest.json").read_text())["plan"])
    out_dir = label_dir.parent / "rescore" / kind
    out_dir.mkdir(parents=True, exist_ok=True)
    per_task: dict[str, list[float]] = defaultdict(list)
    rows = 0
    for index in range(n_shards):
        source = shard_path(label_dir, index)
        shard = pq.read_table(source)
        records = shard.to_pylist()
        rewards = [row_reward(kind, r, tie_tolerance, source) for r in records]
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
