"""The executor owns sharding, skip-completed, per-shard stats, retries and failure records.

A stage is a small object with `setup()` (load models once per worker) and `process(table)`;
it knows nothing of Ray, files or retries. Work rows are split by a deterministic plan over
`id_column`; each pending shard runs on a worker that writes its own output file atomically.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
import warnings
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lemb.data.schemas import WHERE
from lemb.errors import LembError, MissingDependency
from lemb.pipeline.config import RunSettings
from lemb.pipeline.shards import ShardPlan, finish_stage, open_stage, write_shard

log = logging.getLogger(__name__)


class Stage(ABC):
    """Declared inputs (`required_columns` of the work table), declared output (`output_schema`)."""

    name: ClassVar[str]
    required_columns: ClassVar[tuple[str, ...]]
    output_schema: ClassVar[pa.Schema]

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()  # per-shard counters (rows skipped, tokens, ...)

    def setup(self) -> None:
        """Load models; called once per worker, before the first shard."""

    @abstractmethod
    def process(self, table: pa.Table) -> pa.Table: ...

    def metadata(self) -> dict[str, str]:
        """Provenance written into every output shard's Parquet metadata."""
        return {}


def quiet_libraries() -> None:
    """lemb logs at INFO; third-party libraries only warn (no per-model loading bars in worker logs)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lemb").setLevel(logging.INFO)
    for noisy in ("faiss", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("torch._library").setLevel(logging.ERROR)  # "Triton not available" on every CPU start
    # libraries' notices about their own dependencies (torch deprecations seen from vLLM, say): not for the user
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(?!lemb)")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def run_shard(stage: Stage, stage_dir: Path, index: int, table: pa.Table | str) -> dict[str, Any]:
    """Process one shard's rows (a table, or the path of a partitioned input file) and write its output."""
    if isinstance(table, str):
        table = pq.read_table(table)
        table = table.drop_columns([WHERE]) if WHERE in table.column_names else table
    start = time.perf_counter()
    stage.counters.clear()
    out = stage.process(table) if table.num_rows else stage.output_schema.empty_table()
    stats = {"rows_in": table.num_rows, "rows_out": out.num_rows, "seconds": time.perf_counter() - start}
    stats.update(stage.counters)
    write_shard(stage_dir, index, out, stage.output_schema, {"lemb.stage": stage.name, **stage.metadata()}, stats)
    return stats


class _Worker:
    """One stage instance (one model copy) per Ray actor."""

    def __init__(self, factory: Callable[[], Stage], threads: int) -> None:
        set_threads(threads)
        quiet_libraries()
        self.stage = factory()
        self.stage.setup()

    def run(self, stage_dir: str, index: int, table: pa.Table | str) -> dict[str, Any]:
        return run_shard(self.stage, Path(stage_dir), index, table)


def init_ray(address: str | None) -> Any:
    try:
        import ray
    except ImportError:
        raise MissingDependency("ray", "pip install 'ray[default]'") from None
    if not ray.is_initialized():
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
        if address is None:
            kwargs["object_store_memory"] = 256 * 1024**2  # shards are small; keep /dev/shm free
        ray.init(address=address, **kwargs)
    return ray


def check_columns(table: pa.Table, required: tuple[str, ...], what: str) -> None:
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise LembError(f"{what}: missing column(s) {missing}; present: {table.column_names}")


def run_stage(
    factory: Callable[[], Stage],
    work: pa.Table | ShardPlan,
    id_column: str,
    stage_dir: Path,
    settings: RunSettings,
    config: dict[str, Any],
    config_hash: str,
    inputs: list[str | Path | None],
    progress: bool = True,
) -> dict[str, Any]:
    """Run every pending shard of a stage; return the stage's aggregated stats.

    `work` is the whole work table, or a partitioned plan (`shards.partition`) whose per-shard input files
    the workers read themselves, so that no process holds more than a shard."""
    stage_cls = factory.func if hasattr(factory, "func") else factory  # functools.partial or class
    if isinstance(work, ShardPlan):
        plan = work
        first = next((p for i, p in enumerate(plan.inputs) if plan.rows(i)), None)
        if first is not None:
            check_columns(pq.read_schema(first).empty_table(), stage_cls.required_columns, f"{stage_cls.name} input")
    else:
        check_columns(work, stage_cls.required_columns, f"{stage_cls.name} input")
        plan = ShardPlan.from_ids(work.column(id_column).to_pylist(), settings.shards)
    done = open_stage(stage_dir, stage_cls.name, config, config_hash, inputs, plan, restart=settings.restart)
    pending = [i for i in range(len(plan)) if i not in done and plan.rows(i)]
    empty = [i for i in range(len(plan)) if i not in done and not plan.rows(i)]
    if done:
        log.info("%s: %d of %d shards already done, skipping them", stage_cls.name, len(done), len(plan))
    if isinstance(work, ShardPlan):
        empty_table = stage_cls.output_schema.empty_table()
        tables = {i: str(plan.inputs[i]) if plan.rows(i) else empty_table for i in pending + empty}
    else:
        id_type = work.column(id_column).type
        tables = {
            i: work.filter(pc.is_in(work.column(id_column), pa.array(plan.ids[i], id_type))) for i in pending + empty
        }
    failures: list[dict[str, Any]] = []
    if pending or empty:
        runner = _run_local if settings.executor == "local" else _run_ray
        failures = runner(factory, stage_dir, pending, empty, tables, settings, progress, stage_cls.name)
        for f in failures:
            f["ids"] = plan.shard_ids(f["shard"], id_column)  # a partitioned plan reads them from the input file
    stats = finish_stage(stage_dir, len(plan), failures)
    if failures:
        first = failures[0]
        raise LembError(
            f"{stage_cls.name}: {len(failures)} shard(s) failed (see {stage_dir / '_failures.jsonl'}); "
            f"first: shard {first['shard']}: {first['error']}"
        )
    return stats


def _failure(index: int, error: BaseException, attempts: int = 1) -> dict[str, Any]:
    log.error("shard %d failed: %s", index, error)
    return {
        "shard": index,
        "error": f"{type(error).__name__}: {error}",
        "attempts": attempts,
        "traceback": "".join(traceback.format_exception(error))[-4000:],
    }


def _progress(total: int, name: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"{name} shards", disable=not enabled, unit="shard")


def _run_local(factory, stage_dir, pending, empty, tables, settings, progress, name) -> list[dict[str, Any]]:
    set_threads(settings.threads)
    stage = factory()
    for i in empty:  # empty shards need no model
        run_shard(stage, stage_dir, i, tables[i])
    if not pending:
        return []
    stage.setup()
    failures = []
    with _progress(len(pending), name, progress) as bar:
        for i in pending:
            try:
                run_shard(stage, stage_dir, i, tables[i])
            except LembError:
                raise
            except Exception as exc:  # a shard that fails on its data is recorded, the others go on
                failures.append(_failure(i, exc))
            bar.update(1)
    return failures


def _pool_size(ray: Any, settings: RunSettings) -> int:
    """`workers`, or as many actors as the cluster's CPUs (or GPUs, for GPU actors) hold."""
    if settings.workers:
        return settings.workers
    resources = ray.cluster_resources()
    if settings.num_gpus:
        return max(1, int(resources.get("GPU", 0) // settings.num_gpus))
    return max(1, int(resources.get("CPU", 1) // settings.threads))


def _run_ray(factory, stage_dir, pending, empty, tables, settings, progress, name) -> list[dict[str, Any]]:
    ray = init_ray(settings.address)
    from ray.exceptions import ActorDiedError, NodeDiedError, OutOfMemoryError, RayActorError, WorkerCrashedError

    infrastructure = (ActorDiedError, RayActorError, NodeDiedError, OutOfMemoryError, WorkerCrashedError)
    actor_cls = ray.remote(num_cpus=settings.threads, num_gpus=settings.num_gpus, max_restarts=0)(_Worker)
    local_stage = factory()
    for i in empty:
        run_shard(local_stage, stage_dir, i, tables[i])
    queue = list(pending)
    attempts: Counter[int] = Counter()
    failures: list[dict[str, Any]] = []
    idle = [actor_cls.remote(factory, settings.threads) for _ in range(min(_pool_size(ray, settings), len(queue)))]
    running: dict[Any, tuple[int, Any]] = {}
    with _progress(len(pending), name, progress) as bar:
        while queue or running:
            while queue and idle:
                actor, index = idle.pop(), queue.pop(0)
                running[actor.run.remote(str(stage_dir), index, tables[index])] = (index, actor)
            ready, _ = ray.wait(list(running), num_returns=1)
            index, actor = running.pop(ready[0])
            try:
                ray.get(ready[0])
                idle.append(actor)
                bar.update(1)
            except infrastructure as exc:
                attempts[index] += 1
                ray.kill(actor)
                idle.append(actor_cls.remote(factory, settings.threads))
                if attempts[index] > settings.max_retries:
                    failures.append(_failure(index, exc, attempts[index]))
                    bar.update(1)
                else:
                    log.warning(
                        "shard %d: %s; retry %d of %d",
                        index,
                        type(exc).__name__,
                        attempts[index],
                        settings.max_retries,
                    )
                    queue.append(index)
            except ray.exceptions.RayTaskError as exc:
                cause = exc.as_instanceof_cause()
                if isinstance(cause, LembError):
                    raise LembError(str(cause).splitlines()[-1]) from None
                failures.append(_failure(index, cause))
                idle.append(actor)
                bar.update(1)
    for actor in idle:
        ray.kill(actor)
    return failures
