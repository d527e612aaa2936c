"""`lemb rescore`: another reward from the log-probabilities a label run kept, without calling the LLM.

A stage like the others (manifest, resume, per-shard stats, a lock on its folder): each label shard is read on its
own and written again to `<run>/rescore/<reward>/` with the `reward` column recomputed by `row_reward` (the function
training uses); every other column is copied. Rows without signal (`skip_reason` set) keep a null reward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lemb.data import schemas
from lemb.errors import LembError
from lemb.files import write_json
from lemb.pipeline.config import Cluster, RescoreConfig, load_config
from lemb.pipeline.executor import Stage, executor_for
from lemb.pipeline.layout import RunLayout
from lemb.pipeline.shards import MANIFEST, ShardPlan, stage_files
from lemb.stages.reward import row_reward
from lemb.vocabulary import REWARDS


class RescoreStage(Stage):
    name = "rescore"
    unit = "queries"
    required_columns = tuple(n for n in schemas.REWARD.names if n not in schemas.LATER_COLUMNS)
    output_schema = schemas.REWARD

    def __init__(self, config: RescoreConfig, label_metadata: dict[str, str]) -> None:
        super().__init__()
        self.config, self.label_metadata = config, label_metadata
        self.name = f"rescore/{config.reward}"  # one stage folder per reward kind

    def process(self, table: pa.Table) -> pa.Table:
        c = self.config
        rewards = [row_reward(c.reward, r, c.tie_tolerance, self.source) for r in table.to_pylist()]
        self.advance(len(set(table.column("query_id").to_pylist())))
        table = schemas.with_later_columns(table)
        table = table.set_column(table.schema.get_field_index("reward"), "reward", pa.array(rewards, pa.float64()))
        return table.select(list(schemas.REWARD.names))

    def metadata(self) -> dict[str, str]:
        c = self.config
        return {**self.label_metadata, "lemb.reward": c.reward, "lemb.tie_tolerance": repr(c.tie_tolerance)}


def rescore(run: str | Path, kind: str, tie_tolerance: float = 1e-6, progress: bool = False) -> dict[str, Any]:
    """Write `<run>/rescore/<kind>/` and return its summary: rows, rows with a reward, mean reward per task."""
    if kind not in REWARDS:
        raise LembError(f"--reward {kind!r}: known rewards are {', '.join(REWARDS)}")
    config = load_config(RescoreConfig, run=str(run), reward=kind, tie_tolerance=tie_tolerance)
    layout = RunLayout(config.run)
    label_dir = layout.label
    plan = ShardPlan.of_stage(label_dir, "query_id")  # refuses a missing, unfinished or damaged label stage
    meta = pq.read_schema(plan.inputs[0]).metadata or {}
    label_metadata = {k.decode(): v.decode() for k, v in meta.items() if k.decode().startswith("lemb.")}
    out = layout.rescore(config.reward)
    stage = RescoreStage(config, label_metadata)
    # a derived output, cheap to remake: other settings (or relabelled shards) simply redo it
    stats = executor_for(Cluster(executor="local"), restart=True, progress=progress).run(
        stage, plan, out, config, [label_dir / MANIFEST], "query_id"
    )
    per_task: dict[str, list[float]] = {}
    for path in stage_files(out):
        part = pq.read_table(path, columns=["task", "reward"]).filter(pc.is_valid(pc.field("reward")))
        for task, value in zip(part.column("task").to_pylist(), part.column("reward").to_pylist()):
            per_task.setdefault(task, []).append(value)
    summary = {
        "reward": config.reward,
        "rows": int(stats.get("rows_out", 0)),
        "rows_with_reward": sum(map(len, per_task.values())),
        "mean_reward": {task: sum(v) / len(v) for task, v in sorted(per_task.items())},
        "out": str(out),
    }
    write_json(out / "_summary.json", summary)
    return summary
