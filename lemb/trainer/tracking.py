"""The training log, and the experiment trackers of `--report-to` that receive each of its rows.

Every tracker gets exactly the rows of log.jsonl, each at its step: every number of the row under its own name,
but the loss, which goes to `loss/all` and to `loss/<task>` (the task, a string, is no chart of its own); and the
run's resolved config as it starts. A resumed run continues the tracker runs of the run it resumes (their ids are
in <run>/train/trackers.json); a fresh run starts new ones. Each tracker is an optional package imported when the
log is built, so a missing one stops `lemb train` before its first step.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import re
import time
from pathlib import Path
from typing import Any

from lemb.errors import LembError, MissingDependency
from lemb.files import write_json, write_text

log = logging.getLogger(__name__)
TENSORBOARD = "tensorboard"  # <run>/train/tensorboard: TensorBoard's event files
TRACKER_IDS = "trackers.json"  # the tracker runs this training run logs to, by tracker, for --resume
MLRUNS = "mlruns"  # <run>/train/mlruns: MLflow's store when MLFLOW_TRACKING_URI names none
RUNNING_LOSS_STEPS = 20


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a log row by chart name: `loss` as `loss/all` and `loss/<task>`, the others (but `step`,
    the x axis) under their own keys. Strings and booleans are left out: no tracker charts them."""
    out = {}
    for key, value in row.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, numbers.Real):
            continue
        if key == "loss":
            out["loss/all"] = float(value)
            if "task" in row:
                out[f"loss/{row['task']}"] = float(value)
        else:
            out[key] = float(value)
    return out


class Tracker:
    """One tracker: `start` opens (or, given `run_id`, continues) its run and returns the run's id; `log` charts
    one row's numbers at its step; `close` ends the run, as failed when training stopped on an error or an interrupt.
    The constructor imports the package, and only that."""

    name = ""

    def start(self, config: dict[str, Any], start_step: int, run_id: str | None) -> str | None:
        raise NotImplementedError

    def log(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self, failed: bool = False) -> None:
        raise NotImplementedError

    def where(self) -> str:
        """Where the user finds the charts."""
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    """Events in <run>/train/tensorboard; a resumed run purges the events past its checkpoint, so the charts show
    each step once. The config is a text summary at step 0."""

    name = "tensorboard"

    def __init__(self, out: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise MissingDependency("tensorboard", "pip install 'lemb[tensorboard]'") from None
        self.writer, self.folder, self.events = SummaryWriter, out / TENSORBOARD, None

    def start(self, config: dict[str, Any], start_step: int, run_id: str | None) -> None:
        self.events = self.writer(str(self.folder), purge_step=start_step)
        if not start_step:  # markdown: indented lines show as code
            text = json.dumps(config, indent=2, sort_keys=True, default=str)
            self.events.add_text("config", "\n".join("    " + line for line in text.splitlines()), 0)
        return None

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.events.add_scalar(key, value, step)
        self.events.flush()

    def close(self, failed: bool = False) -> None:
        if self.events is not None:
            self.events.close()
            self.events = None

    def where(self) -> str:
        return f"tensorboard --logdir {self.folder}"


class WandbTracker(Tracker):
    """A Weights & Biases run with the config, in <run>/train/wandb. wandb's own variables (WANDB_MODE=offline,
    WANDB_PROJECT, WANDB_NAME, WANDB_DIR, ...) take precedence over lemb's defaults: project lemb, the run folder's
    name. wandb refuses a step below the last one its run holds: rows a resumed run's tracker run already has (the
    interrupted run logged them) are not sent again."""

    name = "wandb"

    def __init__(self, out: Path) -> None:
        try:
            import wandb
        except ImportError:
            raise MissingDependency("wandb", "pip install 'lemb[wandb]'") from None
        self.wandb, self.out, self.run, self.first = wandb, out, None, 0

    def start(self, config: dict[str, Any], start_step: int, run_id: str | None) -> str:
        env = os.environ.get
        self.out.mkdir(parents=True, exist_ok=True)
        self.run = self.wandb.init(
            project=env("WANDB_PROJECT") or "lemb", name=env("WANDB_NAME") or _run_name(config),
            dir=env("WANDB_DIR") or str(self.out), config=config, id=run_id, resume="allow" if run_id else None,
        )  # fmt: skip
        self.first = self.run.step
        return self.run.id

    def log(self, step: int, values: dict[str, float]) -> None:
        if step >= self.first:
            self.run.log(values, step=step)

    def close(self, failed: bool = False) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None

    def where(self) -> str:
        return f"wandb run {self.run.id} of project {self.run.project}"


class MlflowTracker(Tracker):
    """An MLflow run with the config as params, in the store of MLFLOW_TRACKING_URI or else in a file store in
    <run>/train/mlruns; the experiment is MLFLOW_EXPERIMENT_NAME or lemb. Metric names go through `mlflow_name`.
    A resumed run's tracker run keeps the rows it already has (MLflow would chart a step twice)."""

    name = "mlflow"

    def __init__(self, out: Path) -> None:
        try:
            from mlflow import MlflowClient
            from mlflow.entities import Metric, Param
        except ImportError:
            raise MissingDependency("mlflow", "pip install 'lemb[mlflow]'") from None
        self.client_class, self.metric, self.param = MlflowClient, Metric, Param
        self.out, self.run_id, self.first = out, None, 0

    def start(self, config: dict[str, Any], start_step: int, run_id: str | None) -> str:
        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or (self.out / MLRUNS).resolve().as_uri()
        if self.uri.startswith("file:"):  # MLflow 3 opens a file store only when asked to (an explicit false wins)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = self.client_class(self.uri)
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            done = self.client.get_metric_history(run_id, "loss/all")
            self.first = max((m.step for m in done), default=-1) + 1
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "lemb"
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            run_id = self.client.create_run(experiment_id, run_name=_run_name(config)).info.run_id
            params = [self.param(k, v if isinstance(v, str) else json.dumps(v)) for k, v in sorted(config.items())]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params in a batch
                self.client.log_batch(run_id, params=params[i : i + 100])
        self.run_id = run_id
        return run_id

    def log(self, step: int, values: dict[str, float]) -> None:
        if step < self.first:
            return
        now = int(time.time() * 1000)
        metrics = [self.metric(mlflow_name(k), v, now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, failed: bool = False) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
            self.run_id = None

    def where(self) -> str:
        allow = "MLFLOW_ALLOW_FILE_STORE=true " if self.uri.startswith("file:") else ""
        return f"mlflow run {self.run_id} ({allow}mlflow ui --backend-store-uri {self.uri})"


def _run_name(config: dict[str, Any]) -> str:
    """The tracker run's name: the run folder's."""
    return Path(config.get("run") or ".").resolve().name


def mlflow_name(key: str) -> str:
    """The MLflow name of a chart: MLflow refuses '@' (dev/all/ndcg@10 -> dev/all/ndcg_at_10); any other character
    it refuses on some system (it takes letters, digits, _ - . / and spaces) becomes '_'."""
    return re.sub(r"[^\w\-./ ]", "_", key.replace("@", "_at_"))


TRACKER_CLASSES: dict[str, type[Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
    "mlflow": MlflowTracker,
}


class TrainLog:
    """The training log, a row per step written and flushed as the step ends (`tail -f` follows it; a killed run
    keeps it): step, task, loss, lr, queries, examples_per_s (queries per second of the step), elapsed_s, and on
    some steps more numbers (the dev scores). Each of `trackers` (names in TRACKER_CLASSES) gets the same rows. A
    resumed run first drops the rows past its checkpoint, so its log equals an uninterrupted run's but for the
    timings."""

    def __init__(self, path: Path, start_step: int, enabled: bool = True, trackers: list[str] | tuple[str, ...] = (),
                 config: dict[str, Any] | None = None) -> None:  # fmt: skip
        self.last: dict[str, Any] | None = None
        self.fh = None
        self.trackers: list[Tracker] = []
        self.recent: list[float] = []  # the last RUNNING_LOSS_STEPS losses, for the progress bar
        if not enabled:
            return
        self.trackers = [TRACKER_CLASSES[name](path.parent) for name in trackers]  # a missing package stops here
        kept = []
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] < start_step]
        write_text(path, "".join(line + "\n" for line in kept))  # in one rename: a kill here loses no row
        self.fh = open(path, "a")
        try:
            self._start_trackers(path.parent / TRACKER_IDS, start_step, config or {})
        except BaseException:
            self.close()
            raise
        where = "; ".join(t.where() for t in self.trackers) or "trackers: --report-to tensorboard,wandb,mlflow"
        log.info("training log: %s (one row per step; tail -f follows it); %s", path, where)

    def _start_trackers(self, ids_file: Path, start_step: int, config: dict[str, Any]) -> None:
        """Start each tracker; a resumed run (`start_step` > 0) continues the tracker runs whose ids it saved."""
        ids = json.loads(ids_file.read_text()) if start_step and ids_file.exists() else {}
        for tracker in self.trackers:
            try:
                run_id = tracker.start(config, start_step, ids.get(tracker.name))
            except Exception as exc:  # a login, a server or a store the tracker cannot reach: one line
                problem = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise LembError(f"--report-to {tracker.name}: cannot start its run ({problem})") from exc
            if run_id is not None:
                ids[tracker.name] = run_id
                write_json(ids_file, ids)

    def write(self, row: dict[str, Any]) -> None:
        self.last = row
        if "loss" in row:
            self.recent = [*self.recent[-(RUNNING_LOSS_STEPS - 1) :], row["loss"]]
        if self.fh is not None:
            self.fh.write(json.dumps(row) + "\n")
            self.fh.flush()
        if self.trackers:
            values = scalars(row)
            for tracker in self.trackers:
                tracker.log(row["step"], values)

    @property
    def running_loss(self) -> float:
        """Mean loss of the last RUNNING_LOSS_STEPS steps (any task)."""
        return sum(self.recent) / len(self.recent) if self.recent else float("nan")

    def close(self, failed: bool = False) -> None:
        """Close the log and end every tracker's run (`failed`: training stopped before its last step)."""
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        for tracker in self.trackers:
            tracker.close(failed)
