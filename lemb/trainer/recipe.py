"""`lemb train`: graded distillation of the embedder from cached rewards, a recipe in four steps.

setup() builds every component from the config and the reward shards; train() is the loop;
save() writes a model folder that loads with sentence-transformers and with transformers.
"""

from __future__ import annotations

import contextlib
import hashlib
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
from lemb.errors import ConfigError, InputError, LembError, StageConflict
from lemb.files import atomic, move_aside, remove, write_json
from lemb.pipeline.config import (
    TrainConfig,
    config_changes,
    config_hash,
    load_config,
    parse_lora,
    save_config,
    to_dict,
)
from lemb.pipeline.executor import set_threads
from lemb.pipeline.layout import RunLayout
from lemb.pipeline.lock import StageLock, process_gone
from lemb.pipeline.shards import STATS, stage_files
from lemb.stages.encoder import load_embedder
from lemb.stages.instructions import resolve_instructions
from lemb.stages.key_reuse import run_key_template
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
from lemb.trainer.dev_eval import DevEvaluator, load_dev
from lemb.trainer.lora import add_adapters, merged_copy
from lemb.trainer.losses import make_loss
from lemb.trainer.step import MixedPrecision, World, backward_step
from lemb.trainer.tracking import RUNNING_LOSS_STEPS, TENSORBOARD, TRACKER_IDS, TrainLog
from lemb.vocabulary import TASKS

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"  # the weights of the best dev score so far (--keep best), with its step and value
LOG = "log.jsonl"  # one row per step (TrainLog)
TIMING_FIELDS = ("examples_per_s", "elapsed_s")  # the log's fields that differ between two runs of one config


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
        if c.lora:  # adapters, every other weight frozen (lemb/trainer/lora.py)
            add_adapters(self.model, parse_lora(c.lora))
        if c.gradient_checkpointing:  # transformers also makes the input embeddings require grads, as frozen ones must
            self.model[0].auto_model.gradient_checkpointing_enable({"use_reentrant": False})
        self.model.train()
        self.precision = MixedPrecision.make(c.precision, self.device)
        self.sampler = TaskBatchSampler(self.tasks, c.batch_size, c.task_weights or None, c.seed)
        trainable = [p for p in self.model.parameters() if p.requires_grad]  # with --lora, the adapters only
        self.optimizer = torch.optim.AdamW(trainable, lr=c.lr, weight_decay=c.weight_decay)
        warmup = int(c.warmup * c.steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min((s + 1) / max(warmup, 1), max(0.0, (c.steps - s) / max(c.steps - warmup, 1)))
        )
        self.losses = {t: make_loss(self._loss_name(t), c.tau, c.alpha, task_spec(t).in_batch_negatives)
                       for t in sorted(set(self.tasks))}  # fmt: skip
        self.dev_eval = self._dev_evaluator()
        self.last_dev: dict[str, Any] | None = None  # {"step": steps done, "value": the keep metric, "scores": all}
        self.best: dict[str, Any] | None = None  # the last_dev of the best dev score so far
        self.initial_loss: dict[str, float] = {}  # for self-paced scheduling
        self.start_step = 0
        if c.resume and (self.out / CHECKPOINT).exists():
            self.load_checkpoint()
        elif self.world.rank == 0:  # a fresh run: nothing of an earlier run may be read as this run's
            for stale in (CHECKPOINT, BEST, "config.yaml", STATS, LOG, TRACKER_IDS):
                (self.out / stale).unlink(missing_ok=True)
            if (self.out / TENSORBOARD).exists():  # an earlier run's events are not this run's
                remove(self.out / TENSORBOARD)
            # the wandb and mlruns stores stay: there an earlier run is a tracker run apart from this one's
        self.train_log = TrainLog(self.out / LOG, self.start_step, self.world.rank == 0, c.trackers, to_dict(c))

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
            "best": self.best,
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
        self.best = state.get("best")
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

    def _dev_evaluator(self) -> DevEvaluator | None:
        """The dev evaluation of `--dev` (rank 0 runs it), checked before the first step: a dev set that cannot be
        scored, or a kept metric it has no queries for, is one line."""
        c = self.config
        if not c.dev or self.world.rank:
            return None
        dev = load_dev(c.dev, c.corpus, run_key_template(c.run))
        where = c.keep_metric.partition("/")[0]
        if where != "all" and where not in dev.tasks:
            raise ConfigError(f"TrainConfig: keep_metric {c.keep_metric!r} names task {where}, which has no judged "
                              f"query in {c.dev} (its tasks: {', '.join(dev.tasks)})")  # fmt: skip
        log.info("dev evaluation: %d queries of %s, every %s", len(dev.queries), ", ".join(dev.tasks),
                 f"{c.dev_every} steps and after the last" if c.dev_every else "run, after the last step")  # fmt: skip
        return DevEvaluator(dev, self.instructions, keep_metric=c.keep_metric)

    def _evaluate_dev(self, done: int) -> dict[str, float]:
        """Score the model after `done` steps; with --keep best, keep its weights when it beats the best so far."""
        c = self.config
        scores = self.dev_eval(self.model)
        value = scores[f"dev/{c.keep_metric}"]
        better = self.best is None or value > self.best["value"]
        if c.keep == "best" and better:
            with atomic(self.out / BEST) as tmp:
                torch.save({"step": done, "value": value, "model": self.model.state_dict()}, tmp)
        self.last_dev = {"step": done, "value": value, "scores": scores}
        if better:
            self.best = self.last_dev
        log.info("dev after step %d: %s %.4f (best %.4f after step %d; %.1f s)", done, c.keep_metric, value,
                 self.best["value"], self.best["step"], scores["dev_seconds"])  # fmt: skip
        return scores

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
            row = {"step": step, "task": task, "loss": loss, "lr": lr, "queries": len(batch),
                   "examples_per_s": round(len(batch) / max(now - step_start, 1e-9), 3),
                   "elapsed_s": round(now - start, 3)}  # fmt: skip
            every = c.dev_every
            if self.dev_eval is not None and ((every and (step + 1) % every == 0) or step + 1 == c.steps):
                row |= self._evaluate_dev(step + 1)  # after the step's timing: examples_per_s is training's alone
            self.train_log.write(row)
            running = f"{self.train_log.running_loss:.4f}"
            shown = {"task": task, "loss": f"{loss:.4f}", f"loss@{RUNNING_LOSS_STEPS}": running}
            if self.best is not None:
                shown[f"best {c.keep_metric}"] = f"{self.best['value']:.4f}"
            bar.set_postfix(shown, refresh=False)
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
        if c.keep == "best" and self.best is not None:  # the weights of the best dev score, not the last step's
            self.model.load_state_dict(torch.load(self.out / BEST, weights_only=True, map_location="cpu")["model"])
            log.info("saving the model of step %d, the best by %s (%.4f)", self.best["step"], c.keep_metric,
                     self.best["value"])  # fmt: skip
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
        if self.dev_eval is not None:
            facts["dev"] = self._dev_facts()
        folders = [(path, self.model, facts)]  # with --lora, the adapters and the base they name
        if c.lora and c.merge:  # the adapters folded into the base's weights: a full model, loadable without peft
            merged = {**facts, "lora": {**facts["lora"], "merged": True}}
            folders.append((self.layout.merged_model, merged_copy(self.model), merged))
        elif self.layout.merged_model.exists():  # an earlier run's merged model is not this run's
            remove(self.layout.merged_model)
        for folder, model, card_facts in folders:
            old = None
            with atomic(folder) as tmp:
                model.save(str(tmp), create_model_card=False)  # its card would be the base model's, word for word
                write_card(tmp, card_facts, model=model)
                if folder.exists():  # replace the previous model in two renames, never leaving a half-written folder
                    old = move_aside(folder, "old")
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
        if self.dev_eval is not None:
            stats["dev"] = self._dev_facts()
        write_json(self.layout.train_stats, stats)
        plot_loss(self.layout.train_log, self.out / LOSS_PLOT)
        save_config(c, self.out)
        for done in (CHECKPOINT, BEST):  # the run is complete: the model folder supersedes them
            (self.out / done).unlink(missing_ok=True)
        return path

    def _dev_facts(self) -> dict[str, Any]:
        """What the card and the stats say of the dev evaluation: the queries, the kept model's step and scores."""
        c, dev = self.config, self.dev_eval.dev
        kept = self.best if c.keep == "best" else self.last_dev
        return {"queries": len(dev.queries), "tasks": dev.tasks, "every": c.dev_every, "keep": c.keep,
                "metric": c.keep_metric, "step": kept["step"], "scores": kept["scores"]}  # fmt: skip

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
        for pattern in (".texts-*.arrow", ".*.tmp-*", ".model*.old-*"):
            for stale in self.out.glob(pattern):
                if not _alive(stale.name):  # another rank of this job may be writing its own
                    remove(stale)

    def cleanup(self, failed: bool = False) -> None:
        """Close the training log (and the trackers' runs, as failed when training stopped on an error or an
        interrupt); drop the memory-mapped text file of the run's groups."""
        if getattr(self, "train_log", None) is not None:
            self.train_log.close(failed)
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
        failed = True
        try:
            recipe.setup()
            recipe.train(progress)
            path = recipe.save() if recipe.world.rank == 0 else recipe.layout.model  # rank 0 writes the model
            failed = False
            return path
        finally:
            recipe.cleanup(failed)
