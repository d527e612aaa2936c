"""The executor owns a stage run: hashing, manifest, saved config, skip-completed, progress, stats, retries and
failure records.

A stage is a small object with `setup()` (load models once per worker) and `process(table)`; it knows nothing of
Ray, files or retries. Its input is a plan of per-shard files (`shards.partition`, or the shards of the stage
before it); each pending shard runs on a worker that reads its own file and writes its own output atomically.

`Executor` holds what every run shares (the plan, the pending shards, the manifest, the bar, the stats); its two
kinds differ only in where the pending shards run: `LocalExecutor` in this process, `RayExecutor` on a pool of Ray
actors (`ray_pool.ActorPool`), retrying shards whose actor or node died. `executor_for` picks the kind that
`cluster.executor` names.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import traceback
import warnings
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.parquet as pq

from lemb.data.schemas import WHERE
from lemb.errors import LembError
from lemb.files import remove, write_json
from lemb.pipeline.config import Cluster, config_hash, save_config, to_dict
from lemb.pipeline.lock import StageLock
from lemb.pipeline.ray_pool import ActorPool, init_ray
from lemb.pipeline.shards import (
    ShardPlan,
    finish_stage,
    has_output,
    open_stage,
    progress_path,
    remove_leftovers,
    shard_path,
    write_shard,
)

log = logging.getLogger(__name__)


class Stage(ABC):
    """Declared inputs (`required_columns` of a shard's input), declared output (`output_schema`), one `process`.

    A stage reports its progress inside a shard with `self.advance(n)` (n `unit`s done); the executor turns that
    into the driver's bar and the shard's progress file. It knows nothing of Ray, files or retries."""

    name: ClassVar[str]
    unit: ClassVar[str] = "rows"  # what the plan's "items" count and the progress bar shows
    required_columns: ClassVar[tuple[str, ...]]
    output_schema: ClassVar[pa.Schema]
    holds_model: bool = True  # False: its workers are clients of a service (no CPU or GPU of their own in Ray)

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()  # per-shard counters (rows skipped, tokens, ...)
        self._advance: Callable[[float], None] | None = None  # set by the executor while a shard runs
        self.source: Path | None = None  # the input file of the shard being processed (for messages)

    def setup(self) -> None:
        """Load models; called once per worker, before the first shard."""

    @abstractmethod
    def process(self, table: pa.Table) -> pa.Table: ...

    def advance(self, n: float) -> None:
        """`n` more items of the current shard are done (a fraction of one while an item is under way)."""
        if self._advance is not None:
            self._advance(n)

    def metadata(self) -> dict[str, str]:
        """Provenance written into every output shard's Parquet metadata (called after setup)."""
        return {}

    def fingerprint(self) -> dict[str, Any]:
        """What beyond the config determines the output (prompt templates, instruction tables): part of the hash."""
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


class _ShardProgress:
    """A shard's progress file: items done, rate, who runs it; written at most once a second (the driver's bar and
    `lemb status` read it)."""

    def __init__(self, stage_dir: Path, index: int, total: int) -> None:
        self.path, self.total, self.done = progress_path(stage_dir, index), total, 0
        self.started = self.written = time.time()
        self.who = {"pid": os.getpid(), "host": socket.gethostname()}
        self._write()

    def advance(self, n: float) -> None:
        self.done += n
        if time.time() - self.written >= 1.0:
            self._write()

    def _write(self) -> None:
        self.written = time.time()
        elapsed = self.written - self.started
        state = {"done": round(self.done, 3), "total": self.total, "started": self.started, "updated": self.written}
        write_json(self.path, {**state, **self.who, "rate": self.done / elapsed if elapsed > 0 else 0.0})


def run_shard(stage: Stage, stage_dir: Path, index: int, source: Path, items: int) -> dict[str, Any]:
    """Process one shard's input file and write its output; the same path for every shard, empty or not."""
    table = pq.read_table(source)
    table = table.drop_columns([WHERE]) if WHERE in table.column_names else table
    start = time.perf_counter()
    stage.counters.clear()
    progress = _ShardProgress(stage_dir, index, items)
    stage._advance, stage.source = progress.advance, source
    try:
        out = stage.process(table) if table.num_rows else stage.output_schema.empty_table()
        stats = {"rows_in": table.num_rows, "rows_out": out.num_rows, "seconds": time.perf_counter() - start}
        stats.update(stage.counters)
        metadata = {"lemb.stage": stage.name, **stage.metadata()}
        write_shard(stage_dir, index, out, stage.output_schema, metadata, stats)
    finally:
        stage._advance, stage.source = None, None
        progress.path.unlink(missing_ok=True)
    return stats


class _Worker:
    """One stage instance (one model copy) per Ray actor."""

    def __init__(self, stage: Stage, threads: int) -> None:
        if stage.holds_model:
            set_threads(threads)
        quiet_libraries()
        self.stage = stage
        self.stage.setup()

    def run(self, stage_dir: str, index: int, source: str, items: int) -> dict[str, Any]:
        return run_shard(self.stage, Path(stage_dir), index, Path(source), items)


def check_columns(schema: pa.Schema, required: tuple[str, ...], what: str) -> None:
    missing = [c for c in required if c not in schema.names]
    if missing:
        raise LembError(f"{what}: missing column(s) {missing}; present: {schema.names}")


class Executor(ABC):
    """Owns a stage run: the config hash, the manifest with its plan, the saved config, every pending shard on a
    worker, the progress bar, per-shard stats, failure records and the stage's stats. A shard is done once its
    output file is in place, which happens only after its stats are written. Subclasses say where the pending
    shards run (`LocalExecutor`, `RayExecutor`); `executor_for(cluster, ...)` builds the one `cluster.executor` names.

    `inputs` are the files the stage's output depends on (fingerprinted in the manifest); `id_column` names the
    ids that failure records list."""

    def __init__(self, cluster: Cluster, restart: bool = False, progress: bool = True) -> None:
        self.settings, self.restart, self.progress = cluster, restart, progress

    def run(
        self, stage: Stage, plan: ShardPlan, out: Path, config: Any, inputs: list[Path], id_column: str
    ) -> dict[str, Any]:
        check_columns(pq.read_schema(plan.inputs[0]), stage.required_columns, f"{stage.name} input")
        with StageLock(out, stage.name):
            try:
                return self._run(stage, plan, out, config, inputs, id_column)
            except BaseException:
                if out.exists() and not has_output(out):  # nothing finished: leave no manifest to trip a rerun
                    remove(out)
                raise

    def _run(
        self, stage: Stage, plan: ShardPlan, out: Path, config: Any, inputs: list[Path], id_column: str
    ) -> dict[str, Any]:
        digest = config_hash(config, stage.fingerprint())
        done = open_stage(out, stage.name, to_dict(config), digest, inputs, plan, restart=self.restart)
        save_config(config, out)
        pending = [i for i in range(len(plan)) if i not in done]
        if done:
            log.info("%s: %d of %d shards already done, skipping them", stage.name, len(done), len(plan))
        failures: list[dict[str, Any]] = []
        if pending:
            with _Bar(stage, plan, out, pending, self.progress):
                try:
                    failures = self._run_shards(stage, plan, out, pending)
                except KeyboardInterrupt:  # Ctrl-C, or SIGTERM as Interrupted
                    remove_leftovers(out)  # what in-flight shards left
                    raise
        for f in failures:
            f["ids"] = plan.shard_ids(f["shard"], id_column)
        stats = finish_stage(out, len(plan), failures)
        if failures:
            first = failures[0]
            raise LembError(
                f"{stage.name}: {len(failures)} shard(s) failed (see {out / '_failures.jsonl'}); "
                f"first: shard {first['shard']}: {first['error']}"
            )
        return stats

    @abstractmethod
    def _run_shards(self, stage: Stage, plan: ShardPlan, out: Path, pending: list[int]) -> list[dict[str, Any]]:
        """Run every pending shard; return the failure records of those that failed on their data (a `LembError`
        stops the stage instead)."""


class LocalExecutor(Executor):
    """Every pending shard in this process, one after another, on one stage instance; no Ray."""

    def _run_shards(self, stage: Stage, plan: ShardPlan, out: Path, pending: list[int]) -> list[dict[str, Any]]:
        set_threads(self.settings.threads)
        stage.setup()
        failures = []
        for i in pending:
            try:
                run_shard(stage, out, i, plan.inputs[i], plan.items(i))
            except LembError:
                raise
            except Exception as exc:  # a shard that fails on its data is recorded, the others go on
                failures.append(_failure(i, exc))
        return failures


class RayExecutor(Executor):
    """The pending shards on a pool of Ray actors (`_Worker`s, one stage instance each), longest first; a shard
    whose actor or node died is retried on a fresh actor, at most `max_retries` times."""

    def _run_shards(self, stage: Stage, plan: ShardPlan, out: Path, pending: list[int]) -> list[dict[str, Any]]:
        s = self.settings
        ray = init_ray(s.address)
        resources = ray.cluster_resources()
        gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 0)
        if stage.holds_model and s.num_gpus > gpus:  # Ray would wait forever for an actor it can never place
            raise LembError(f"{stage.name}: num_gpus {s.num_gpus:g} per worker, but the Ray cluster has {gpus:g} "
                            f"GPUs")  # fmt: skip
        if stage.holds_model and s.threads > cpus:  # likewise: each worker asks for `threads` CPUs
            raise LembError(f"{stage.name}: threads {s.threads} per worker, but the Ray cluster has {cpus:g} CPUs "
                            f"(lower --threads)")  # fmt: skip
        queue = sorted(pending, key=plan.items, reverse=True)  # longest first: a shorter tail on the last workers
        cpus, gpus = (s.threads, s.num_gpus) if stage.holds_model else (0, 0)
        worker = ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=0)(_Worker)
        size = min(self._pool_size(ray, stage.holds_model), len(queue))
        pool = ActorPool(ray, lambda: worker.remote(stage, s.threads), size, stage.name, s.max_retries)
        try:
            with pool:  # leaving it stops every actor; in-flight shards are abandoned and the stage's rerun does them
                return self._drain(ray, plan, out, queue, pool)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM as Interrupted
            if s.address is None:
                ray.shutdown()  # the local cluster this process started goes with it
            raise

    def _pool_size(self, ray: Any, stage_holds_model: bool) -> int:
        """`workers`, or as many actors as the cluster's CPUs (or GPUs, for GPU actors) hold; clients of a service
        (`holds_model` False) take no resources, so any number of them run, by default one per CPU."""
        s = self.settings
        if s.workers:
            return s.workers
        resources = ray.cluster_resources()
        if s.num_gpus and stage_holds_model:
            return max(1, int(resources.get("GPU", 0) // s.num_gpus))
        return max(1, int(resources.get("CPU", 1) // s.threads))

    def _drain(self, ray: Any, plan: ShardPlan, out: Path, queue: list[int], pool: ActorPool) -> list[dict[str, Any]]:
        """Keep every started actor busy until the queue is empty; retry shards whose actor (or node) died."""
        s = self.settings
        attempts: Counter[int] = Counter()
        failures: list[dict[str, Any]] = []
        while queue or pool.running:
            while queue and pool.idle:
                index = queue.pop(0)
                pool.submit(index, str(out), str(plan.inputs[index]), plan.items(index))
            ref = pool.wait()
            if ref in pool.starting:
                pool.started(ref)
                continue
            index, actor = pool.running.pop(ref)
            try:
                ray.get(ref)
                pool.idle.append(actor)
            except pool.infrastructure as exc:
                attempts[index] += 1
                pool.replace(actor)
                if attempts[index] > s.max_retries:
                    failures.append(_failure(index, exc, attempts[index]))
                else:
                    log.warning("shard %d: %s; retry %d of %d", index, type(exc).__name__, attempts[index],
                                s.max_retries)  # fmt: skip
                    queue.append(index)
            except ray.exceptions.RayTaskError as exc:
                cause = exc.as_instanceof_cause()
                if isinstance(cause, LembError):
                    raise LembError(str(cause).splitlines()[-1]) from None
                failures.append(_failure(index, cause))
                pool.idle.append(actor)
        return failures


def executor_for(cluster: Cluster, restart: bool = False, progress: bool = True) -> Executor:
    """The executor that `cluster.executor` names: `LocalExecutor` for `local`, else `RayExecutor`."""
    kind = LocalExecutor if cluster.executor == "local" else RayExecutor
    return kind(cluster, restart, progress)


def _failure(index: int, error: BaseException, attempts: int = 1) -> dict[str, Any]:
    log.error("shard %d failed: %s", index, error)
    return {
        "shard": index,
        "error": f"{type(error).__name__}: {error}",
        "attempts": attempts,
        "traceback": "".join(traceback.format_exception(error))[-4000:],
    }


class _Bar:
    """The driver's progress bar in the stage's unit (queries, keys), with rate and ETA: a thread polls the running
    shards' progress files (written by the workers, wherever they run: the stage folder is shared) twice a second."""

    def __init__(self, stage: Stage, plan: ShardPlan, out: Path, pending: list[int], enabled: bool) -> None:
        self.plan, self.out, self.pending = plan, out, pending
        total = sum(plan.items(i) for i in range(len(plan)))
        self.initial = total - sum(plan.items(i) for i in pending)
        self.enabled = enabled and total > 0
        self.bar = None
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=self.initial, desc=stage.name, unit=f" {stage.unit}",
                            unit_scale=False, dynamic_ncols=True)  # fmt: skip
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def done(self) -> int:
        n: float = self.initial
        for i in self.pending:
            if shard_path(self.out, i).exists():
                n += self.plan.items(i)
                continue
            try:
                n += json.loads(progress_path(self.out, i).read_text())["done"]
            except (OSError, ValueError, KeyError):
                pass
        return int(n)

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            self._refresh()

    def _refresh(self) -> None:
        n = self.done()
        if n > self.bar.n:
            self.bar.update(n - self.bar.n)

    def __enter__(self) -> _Bar:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self._stop.set()
            self._thread.join()
            self._refresh()
            self.bar.close()
