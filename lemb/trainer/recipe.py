"""`lemb train`: graded distillation of the embedder from cached rewards, a recipe in four steps.

setup() builds every component from the config and the reward shards; train() is the loop;
save() writes a model folder that loads with sentence-transformers and with transformers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from lemb.data.tasks import task_spec
from lemb.errors import ConfigError, InputError, LembError, MissingDependency, StageConflict
from lemb.files import atomic, move_aside, remove, write_json, write_text
from lemb.pipeline.config import TrainConfig, config_changes, config_hash, load_config, save_config, to_dict
from lemb.pipeline.executor import set_threads
from lemb.pipeline.layout import RunLayout
from lemb.pipeline.lock import StageLock, process_gone
from lemb.pipeline.shards import STATS, stage_files
from lemb.stages.encoder import load_embedder
from lemb.stages.instructions import resolve_instructions
from lemb.stages.label import labelled_tie_tolerance
from lemb.stages.models import check_model
from lemb.stages.plots import LOSS_PLOT, plot_loss
from lemb.trainer.batches import (
    SIGNAL_COLUMNS,
    TEXT_COLUMNS,
    Group,
    LabelledGroups,
    TaskBatchSampler,
    build_groups,
    collate,
)
from lemb.trainer.card import task_counts, training_facts, write_card
from lemb.trainer.losses import make_loss
from lemb.trainer.step import MixedPrecision, World, backward_step
from lemb.vocabulary import TASKS

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"  # one row per step (TrainLog)
TENSORBOARD = "tensorboard"
TIMING_FIELDS = ("examples_per_s", "elapsed_s")  # the log's fields that differ between two runs of one config
RUNNING_LOSS_STEPS = 20


class TrainLog:
    """The training log, a row per step written and flushed as the step ends (`tail -f` follows it; a killed run
    keeps it): step, task, loss, lr, queries, examples_per_s (queries per second of the step), elapsed_s. With
    `tensorboard`, the same scalars also go to TensorBoard events in `<run>/train/tensorboard/`. A resumed run first
    drops the rows (and events) past its checkpoint, so its log equals an uninterrupted run's but for the timings."""

    def __init__(self, path: Path, start_step: int, enabled: bool = True, tensorboard: bool = False) -> None:
        self.last: dict[str, Any] | None = None
        self.fh = None
        self.events = None
        self.recent: list[float] = []  # the last RUNNING_LOSS_STEPS losses, for the progress bar
        if not enabled:
            return
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MissingDependency("tensorboard", "pip install 'lemb[tensorboard]'") from None
            self.events = SummaryWriter(str(path.parent / TENSORBOARD), purge_step=start_step)
        kept = []
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] < start_step]
        write_text(path, "".join(line + "\n" for line in kept))  # in one rename: a kill here loses no row
        self.fh = open(path, "a")
        where = f"TensorBoard: tensorboard --logdir {path.parent / TENSORBOARD}" if tensorboard else (
            "TensorBoard: --tensorboard (pip install 'lemb[tensorboard]')")  # fmt: skip
        log.info("training log: %s (one row per step; tail -f follows it); %s", path, where)

    def write(self, row: dict[str, Any]) -> None:
        self.last = row
        self.recent = [*self.recent[-(RUNNING_LOSS_STEPS - 1) :], row["loss"]]
        if self.fh is not None:
            self.fh.write(json.dumps(row) + "\n")
            self.fh.flush()
        if self.events is not None:
            step = row["step"]
            self.events.add_scalar(f"loss/{row['task']}", row["loss"], step)
            self.events.add_scalar("loss/all", row["loss"], step)
            self.events.add_scalar("lr", row["lr"], step)
            self.events.add_scalar("examples_per_s", row["examples_per_s"], step)
            self.events.flush()

    @property
    def running_loss(self) -> float:
        """Mean loss of the last RUNNING_LOSS_STEPS steps (any task)."""
        return sum(self.recent) / len(self.recent) if self.recent else float("nan")

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        if self.events is not None:
            self.events.close()
            self.events = None


class TrainRecipe:
    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.run = Path(config.run)
        self.layout = RunLayout(config.run)
        self.out = self.layout.train

    def setup(self, groups: list[Group] | LabelledGroups | None = None) -> None:
        """Build every component; `groups` replaces the run's reward shards (benchmarks, experiments)."""
        c = self.config
        set_threads(c.threads)
        self.world = _init_distributed()
        torch.manual_seed(c.seed)
        self.groups, self.skipped = (groups, Counter()) if groups is not None else self._load_groups()
        self.tasks = list(self.groups.tasks) if isinstance(self.groups, LabelledGroups) else [g.task for g in groups]
        if not self.tasks:
            raise LembError(f"{self.run / 'label'}: no query carries a training signal ({dict(self.skipped)})")
        for reason, n in self.skipped.items():
            log.warning("%d queries left out of training: %s", n, reason)
        per_task = Counter(self.tasks)
        small = sorted(t for t, n in per_task.items() if n < self.world.size)
        if small:
            raise LembError(f"tasks {small} have fewer queries than the {self.world.size} training processes")
        self.device = _device(c.device)
        self.instructions = resolve_instructions(c.instructions, c.embedder)
        log.info("training with instructions %s: %s", self.instructions.name, self.instructions.source)
        self.model = load_embedder(c.embedder, c.max_length, device=str(self.device))
        if c.gradient_checkpointing:
            self.model[0].auto_model.gradient_checkpointing_enable({"use_reentrant": False})
        self.model.train()
        self.precision = MixedPrecision.make(c.precision, self.device)
        self.sampler = TaskBatchSampler(self.tasks, c.batch_size, c.task_weights or None, c.seed)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        warmup = int(c.warmup * c.steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min((s + 1) / max(warmup, 1), max(0.0, (c.steps - s) / max(c.steps - warmup, 1)))
        )
        self.losses = {t: make_loss(self._loss_name(t), c.tau, c.alpha, task_spec(t).in_batch_negatives)
                       for t in sorted(set(self.tasks))}  # fmt: skip
        self.initial_loss: dict[str, float] = {}  # for self-paced scheduling
        self.start_step = 0
        if c.resume and (self.out / CHECKPOINT).exists():
            self.load_checkpoint()
        elif self.world.rank == 0:  # a fresh run: nothing of an earlier run may be read as this run's
            for stale in (CHECKPOINT, "config.yaml", STATS, LOG):
                (self.out / stale).unlink(missing_ok=True)
            if (self.out / TENSORBOARD).exists():  # an earlier run's events are not this run's
                remove(self.out / TENSORBOARD)
        self.train_log = TrainLog(self.out / LOG, self.start_step, self.world.rank == 0, c.tensorboard)

    def save_checkpoint(self, step: int) -> None:
        """Everything a resumed run needs to continue bit for bit: weights, optimizer, schedule, step, RNG."""
        state = {
            "step": step,
            "config_hash": config_hash(self.config),
            "config": to_dict(self.config),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "grad_scaler": self.precision.scaler.state_dict() if self.precision.scaler else {},
            "rewards": self._rewards_fingerprint(),
            "initial_loss": self.initial_loss,
        }
        with atomic(self.out / CHECKPOINT) as tmp:
            torch.save(state, tmp)

    def _rewards_fingerprint(self) -> str:
        """The label stage's manifest (config hash, inputs, plan): relabelling changes it."""
        manifest = self.layout.manifest(self.layout.label)
        return hashlib.sha256(manifest.read_bytes()).hexdigest()[:16] if manifest.exists() else ""

    def load_checkpoint(self) -> None:
        state = torch.load(self.out / CHECKPOINT, weights_only=True, map_location="cpu")  # tensors, plain values
        if state["rewards"] != self._rewards_fingerprint():
            raise StageConflict(
                f"{self.out / CHECKPOINT}: the run's reward shards changed since this checkpoint;"
                " drop --resume to start over"
            )
        if state["config_hash"] != config_hash(self.config):
            changed = config_changes(state["config"], to_dict(self.config))
            raise StageConflict(
                f"{self.out / CHECKPOINT}: made with other settings ({'; '.join(changed)});"
                " drop --resume to start over"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.precision.scaler and state.get("grad_scaler"):
            self.precision.scaler.load_state_dict(state["grad_scaler"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.initial_loss, self.start_step = state["initial_loss"], state["step"]
        log.info("resuming from step %d of %d", self.start_step, self.config.steps)

    def _load_groups(self) -> tuple[LabelledGroups, Any]:
        """Groups from the label shards, one shard at a time; their texts go to a memory-mapped file."""
        label_dir = self.layout.label
        files = stage_files(label_dir)
        for f in files:  # a shard written by another version, or by hand: one line, before any work
            missing = [c for c in (*SIGNAL_COLUMNS, *TEXT_COLUMNS) if c not in pq.read_schema(f).names]
            if missing:
                raise InputError(f, "file", missing[0], f"missing column (of {missing}); rerun `lemb label --restart`")
        meta = pq.read_schema(files[0]).metadata or {}
        tie_tolerance = labelled_tie_tolerance(meta, files[0])  # the tolerance the rewards were labelled with
        contrastive = frozenset(t for t in TASKS if self._loss_name(t) == "contrastive")
        self.out.mkdir(parents=True, exist_ok=True)
        self.texts_file = self.out / f".texts-{os.getpid()}.arrow"
        shards = (pq.read_table(f) for f in files)
        return build_groups(
            shards, self.config.reward, self.config.group_size, str(label_dir), tie_tolerance=tie_tolerance,
            positives_only=contrastive, texts_file=self.texts_file,
        )  # fmt: skip

    def _loss_name(self, task: str) -> str:
        return self.config.loss.get(task, task_spec(task).loss)

    def _step(self, batch: list[Group]) -> tuple[str, float]:
        """Forward and backward of one one-task batch; gradients accumulate in the model."""
        c = self.config
        task = batch[0].task
        q_instr, k_instr = self.instructions.table[task]
        data = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in collate(batch, c.group_size).items()}

        def loss_fn(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            return self.losses[task](q, k, data)

        def scale(loss: float) -> float:
            if not c.self_paced:
                return 1.0
            self.initial_loss.setdefault(task, loss)  # tasks already learnt slow down: L_task(0) / L_task(now)
            return self.initial_loss[task] / max(loss, 1e-8)

        loss = backward_step(
            self.model, [q_instr + t for t in data["queries"]], [k_instr + t for t in data["keys"]], data["valid"],
            loss_fn, chunk_size=c.grad_chunk, world=self.world, scale=scale, precision=self.precision,
        )  # fmt: skip
        return task, loss

    def train(self, progress: bool = True) -> None:
        from tqdm.auto import tqdm

        c = self.config
        start = time.perf_counter()
        bar = tqdm(total=c.steps, initial=self.start_step, desc="train", disable=not progress or self.world.rank)
        for step in range(self.start_step, c.steps):
            step_start = time.perf_counter()
            batch = [self.groups[i] for i in self.sampler.batch(step)]
            batch = batch[: len(batch) - len(batch) % self.world.size]  # every rank embeds an equal slice
            self.optimizer.zero_grad(set_to_none=True)
            task, loss = self._step(batch)
            if not math.isfinite(loss):
                raise LembError(f"train: the loss of step {step} (task {task}) is {loss}: training diverged (a "
                                f"learning rate of {c.lr:g} too high?); no model saved")  # fmt: skip
            self.precision.step(self.optimizer, c.max_grad_norm)
            lr = self.scheduler.get_last_lr()[0]  # the rate this step used
            self.scheduler.step()
            now = time.perf_counter()
            self.train_log.write({"step": step, "task": task, "loss": loss, "lr": lr, "queries": len(batch),
                                  "examples_per_s": round(len(batch) / max(now - step_start, 1e-9), 3),
                                  "elapsed_s": round(now - start, 3)})  # fmt: skip
            bar.set_postfix({"task": task, "loss": f"{loss:.4f}", f"loss@{RUNNING_LOSS_STEPS}":
                             f"{self.train_log.running_loss:.4f}"}, refresh=False)  # fmt: skip
            bar.update(1)
            every = c.checkpoint_every
            if every and (step + 1) % every == 0 and step + 1 < c.steps and self.world.rank == 0:
                self.save_checkpoint(step + 1)
        bar.close()
        self.seconds = time.perf_counter() - start

    def save(self) -> Path:
        c = self.config
        path = self.layout.model
        tasks = sorted(set(self.tasks))
        self.model.prompts = self.instructions.prompts()  # every task's: `auto` finds them again in eval
        self.model.default_prompt_name = None  # the base's default prompt is not among them
        self.model.eval()
        broken = [name for name, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if broken:
            raise LembError(f"train: {len(broken)} weight tensors are not finite after the last step (first: "
                            f"{broken[0]}): training diverged; no model saved")  # fmt: skip
        final_loss = self.train_log.last["loss"] if self.train_log.last else None
        facts = training_facts(c, task_counts(self.groups), {t: self._loss_name(t) for t in tasks}, self.skipped,
                               self.instructions.describe(), self.seconds, final_loss)  # fmt: skip
        old = None
        with atomic(path) as tmp:
            self.model.save(str(tmp), create_model_card=False)  # its card would be the base model's, word for word
            write_card(tmp, facts, model=self.model)
            if path.exists():  # replace the previous model in two renames, never leaving a half-written folder
                old = move_aside(path, "old")
        if old is not None:
            remove(old)
        stats = {
            "embedder": c.embedder,  # the base it started from: eval's default base
            "steps": c.steps,
            "groups": len(self.groups),
            "groups_per_task": {t: self.tasks.count(t) for t in tasks},
            "queries_left_out": dict(self.skipped),
            "seconds": self.seconds,
            "final_loss": final_loss,
            "instructions": self.instructions.describe(),
        }
        write_json(self.layout.train_stats, stats)
        plot_loss(self.layout.train_log, self.out / LOSS_PLOT)
        save_config(c, self.out)
        (self.out / CHECKPOINT).unlink(missing_ok=True)  # the run is complete: the model folder supersedes it
        return path

    def should_run(self) -> bool:
        """Whether to train, from what the run folder holds: an unfinished run's checkpoint is resumed (--resume)
        or discarded (--restart), never silently; a finished run with the same settings is left as it is."""
        c = self.config
        checkpoint, model, saved = self.out / CHECKPOINT, self.layout.model, self.out / "config.yaml"
        if c.restart:
            return True  # setup clears the earlier run's checkpoint, stats and log; save replaces its model
        if checkpoint.exists():
            if not c.resume:
                raise StageConflict(
                    f"{checkpoint}: an unfinished training run is here; pass --resume to continue it or --restart"
                    " to start over"
                )
            return True
        if not model.exists():
            return True
        try:
            old = load_config(TrainConfig, saved) if saved.exists() else None
        except ConfigError:  # saved by a version with other settings: its settings cannot be compared
            old = None
        if old is not None and config_hash(old) == config_hash(c):
            log.info("%s: already trained with these settings; --restart trains again", model)
            return False
        changed = "its settings are unknown" if old is None else "it was trained with other settings ("
        if old is not None:
            changed += "; ".join(config_changes(to_dict(old), to_dict(c))) + ")"
        raise StageConflict(f"{model}: {changed}; pass --restart to train again")

    def remove_leftovers(self) -> None:
        """What a killed run left (its text file, a half-written model or checkpoint, a model folder moved aside):
        removed by the next run, whatever that run then does."""
        for pattern in (".texts-*.arrow", ".*.tmp-*", ".model.old-*"):
            for stale in self.out.glob(pattern):
                if not _alive(stale.name):  # another rank of this job may be writing its own
                    remove(stale)

    def cleanup(self) -> None:
        """Close the training log; drop the memory-mapped text file of the run's groups."""
        if getattr(self, "train_log", None) is not None:
            self.train_log.close()
        texts_file = getattr(self, "texts_file", None)
        if texts_file is not None:
            self.groups = None
            texts_file.unlink(missing_ok=True)


def _alive(name: str) -> bool:
    """Whether the process whose pid ends a leftover's name (`.texts-PID.arrow`, `.model.tmp-PID`) still runs."""
    digits = "".join(c for c in name.removesuffix(".arrow").rsplit("-", 1)[-1] if c.isdigit())
    if not digits or int(digits) == os.getpid():
        return False
    return not process_gone(int(digits))


def _device(setting: str) -> torch.device:
    """`auto`: this process's GPU when there is one (torchrun's LOCAL_RANK picks it), else the CPU."""
    if setting == "auto":
        setting = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise LembError(f"device {setting!r} asked for, but torch sees no GPU (torch {torch.__version__})")
    return torch.device(setting)


def _init_distributed() -> World:
    """Join the process group that torchrun (or Ray Train) describes in the environment, if any."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return World.current()


def train(config: TrainConfig, progress: bool = True) -> Path:
    check_model(config.embedder, "embedder", config.max_length)  # a bad model fails here, before any file
    recipe = TrainRecipe(config)
    # one training job per run folder: the first process of a job holds the lock (the others are its ranks)
    lock = StageLock(recipe.out, "train") if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext()
    with lock:
        recipe.remove_leftovers()
        if not recipe.should_run():
            return recipe.layout.model
        try:
            recipe.setup()
            recipe.train(progress)
            if recipe.world.rank:
                return recipe.layout.model  # rank 0 writes the model
            return recipe.save()
        finally:
            recipe.cleanup()
