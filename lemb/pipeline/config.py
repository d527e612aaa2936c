"""Typed, self-validating settings of every stage.

Settings come from a YAML file (`--config`) and/or flags (flags win). Every problem is gathered
into one ConfigError; the resolved config is saved beside the stage's output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lemb.data.tasks import DEFAULT_KEY_TEMPLATE, INSTRUCTION_PRESETS, template_problems
from lemb.errors import ConfigError
from lemb.files import write_text
from lemb.vocabulary import (
    DEFAULT_EMBEDDER,
    DEFAULT_LLM,
    TASKS,
    TRACKERS,
    VLLM_INSTALL,
    Backend,
    DType,
    ExecutorKind,
    IndexKind,
    Keep,
    Loss,
    Precision,
    Reduce,
    Reward,
    Task,
    default_backend,
    one_of,
    vllm_installed,
)

# the panels of a stage's --help, in the order they are shown
IO, METHOD, PERF, SERVER = "Inputs and outputs", "Method", "Cluster and performance", "LLM server (--backend server)"
GROUPS = (IO, METHOD, SERVER, PERF)


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Any = dataclasses.MISSING,
    group: str = METHOD,
    required: bool = False,
    hashed: bool = True,
) -> Any:
    """A setting: its default (or `factory` for a mutable one), the one line of help that the CLI shows, the panel
    of --help it is listed in, whether a stage cannot run without it (given as a flag or in --config), and whether
    it determines the stage's output (`hashed`: in the config hash that a rerun is compared by). Not hashed: where
    or how fast a stage runs (the run folder, the cluster, threads, devices, batch sizes in tokens), and the paths
    of input files, whose content is fingerprinted with the stage's inputs instead (a run folder moved or copied
    with its data is the same run)."""
    meta = {"help": help, "group": group, "required": required, "hashed": hashed}
    return field(default=default, default_factory=factory, metadata=meta)


@dataclass
class Cluster:
    """Where a sharded stage's shards run (retrieve, label, eval's ranking): none of it changes the output."""

    executor: ExecutorKind = setting("ray", "ray (Ray actors) or local (in this process, no Ray).", group=PERF)
    address: str | None = setting(
        None, "Ray cluster address; none: RAY_ADDRESS, else a new local cluster.", group=PERF
    )
    workers: int = setting(
        0, "Actors in the pool, one model copy each (0: as many as the CPUs or GPUs hold).", group=PERF
    )
    num_gpus: float = setting(0.0, "GPUs per actor.", group=PERF)
    threads: int = setting(1, "Torch threads per worker (1 is fastest on 2 vCPUs).", group=PERF)
    max_retries: int = setting(3, "Resubmissions of a shard whose actor or node died.", group=PERF)

    def problems(self) -> list[str]:
        out = _at_least_one(self, "threads")
        if self.workers < 0:
            out.append(f"workers must be >= 0 (0: fill the cluster), got {self.workers}")
        if self.max_retries < 0:
            out.append(f"max_retries must be >= 0, got {self.max_retries}")
        if self.num_gpus < 0:
            out.append(f"num_gpus must be >= 0, got {self.num_gpus}")
        return out


@dataclass
class LLMServer:
    """OpenAI-compatible LLM servers for `backend: server` (vLLM's `vllm serve`). None of it is hashed: the served
    model's identity is, as the stage's fingerprint, so a job can move to other servers of the same model."""

    llm_url: str | list[str] = setting(
        "",
        "Base URL(s) of OpenAI-compatible servers of the LLM (backend server), "
        "e.g. http://gpu1:8000/v1; several comma-separated or a list.",
        group=SERVER,
    )
    api_key_env: str = setting(
        "VLLM_API_KEY", "Environment variable holding the servers' API key (never saved).", group=SERVER
    )
    max_concurrency: int = setting(64, "Requests a label worker keeps in flight (over all its servers).", group=SERVER)
    request_timeout: float = setting(600.0, "Seconds before a request is abandoned (and retried).", group=SERVER)
    request_retries: int = setting(
        10,
        "Retries of a request after a connection error, timeout, 429 or 5xx "
        "(backoff 0.5 s doubling to 30 s: about 2.5 min in all).",
        group=SERVER,
    )
    tokenizer: str | None = setting(
        None,
        "Tokenizer of the served LLM for lemb's client-side rendering (none: --llm, else the served model's path).",
        group=SERVER,
    )

    @property
    def urls(self) -> list[str]:
        """The base URLs, without trailing slashes."""
        items = self.llm_url.split(",") if isinstance(self.llm_url, str) else self.llm_url
        return [u.strip().rstrip("/") for u in items if u.strip()]

    def problems(self) -> list[str]:
        out = _at_least_one(self, "max_concurrency")
        for url in self.urls:
            if not url.startswith(("http://", "https://")):
                out.append(f"llm_url {url!r} must start with http:// or https://")
        if self.request_timeout <= 0:
            out.append(f"request_timeout must be > 0, got {self.request_timeout}")
        if self.request_retries < 0:
            out.append(f"request_retries must be >= 0, got {self.request_retries}")
        if not self.api_key_env.strip():
            out.append("api_key_env must name an environment variable")
        return out


def _backend_problems(backend: str, server: LLMServer) -> list[str]:
    if backend == "vllm" and not vllm_installed():
        return [f"backend 'vllm' needs vllm, which is not installed; install it with: {VLLM_INSTALL}"]
    if backend == "server" and not server.urls:
        return ["backend 'server' needs llm_url: the base URL of an OpenAI-compatible server (--llm-url)"]
    if backend != "server" and server.urls:
        return [f"llm_url is set but backend is {backend!r}: add --backend server to label with the server"]
    return []


def _at_least_one(config: Any, *names: str) -> list[str]:
    return [f"{n} must be >= 1, got {getattr(config, n)}" for n in names if getattr(config, n) < 1]


def _check_instructions(value: Any) -> list[str]:
    if isinstance(value, str):
        known = ("auto", *INSTRUCTION_PRESETS)
        return [] if value in known else [f"instructions: unknown preset {value!r}; known: {', '.join(known)}"]
    if isinstance(value, dict):
        out = []
        for task, pair in value.items():
            if task not in TASKS:
                out.append(f"instructions: unknown task {task!r}")
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
                out.append(f"instructions[{task}] must be [query_instruction, key_instruction], got {pair!r}")
        return out
    return ["instructions must be auto, a preset name or a table {task: [query_instruction, key_instruction]}"]


INSTRUCTIONS_HELP = (
    "Task instructions of the embedder: auto (the model's own: those a lemb-trained model saved, its"
    " sentence-transformers prompts, its authors' preset, else none), a preset (none, llm-embedder, bge) for every"
    " embedder, or {task: [query_instruction, key_instruction]} (other tasks: auto)."
)
KEY_TEMPLATE_HELP = (
    "A corpus key's text as the embedder and the LLM see it: a template over {title} and {text}, or {task: template};"
    " a key without a title is its text alone."
)


@dataclass
class StageSettings:
    """What every command that works on a run folder takes first."""

    run: str = setting("runs/default", "Run folder; each stage writes <run>/<stage>/.", group=IO, hashed=False)


@dataclass
class RestartableSettings(StageSettings):
    """A stage that keeps its output between runs (retrieve, label, train)."""

    restart: bool = setting(
        False, "Discard earlier or unfinished output of this stage and start over.", group=IO, hashed=False
    )


@dataclass
class ShardedSettings(RestartableSettings):
    """A stage whose shards run on a cluster (retrieve, label)."""

    cluster: Cluster = setting(factory=Cluster, help="Where the shards run.", hashed=False)


@dataclass
class RetrieveConfig(ShardedSettings):
    shards: int = setting(4, "Output files per step (the unit of work and of resume); label keeps them.", group=PERF)
    queries: str = setting("", "Query records (JSONL or Parquet).", group=IO, required=True, hashed=False)
    corpus: str | None = setting(
        None, "Key records (JSONL or Parquet); none: only per-query tasks (chat, lrlm).", group=IO, hashed=False
    )
    embedder: str = setting(DEFAULT_EMBEDDER, "Embedder: HF id, local path or a lemb default name.", group=IO)
    instructions: str | dict[Task, Any] = setting("auto", INSTRUCTIONS_HELP)
    key_template: str | dict[Task, str] = setting(DEFAULT_KEY_TEMPLATE, KEY_TEMPLATE_HELP)
    top_k: int = setting(8, "Candidates per query.")
    add_positives: bool = setting(True, "Put known positives among the candidates (replacing the lowest-ranked).")
    index: IndexKind = setting(
        "flat", "flat (exact inner product), ivf or hnsw, for corpora too large for exact.", group=PERF
    )
    nprobe: int = setting(16, "IVF lists searched per query.", group=PERF)
    hnsw_m: int = setting(32, "HNSW links per node.", group=PERF)
    ef_search: int = setting(128, "HNSW search breadth.", group=PERF)
    batch_size: int = setting(64, "Texts per encoder forward pass.", group=PERF)
    max_length: int = setting(256, "Tokens per query or key (LLM-Embedder's setting).")

    def problems(self) -> list[str]:
        out = _check_instructions(self.instructions) + template_problems(self.key_template)
        if not self.queries:
            out.append("queries: a query file is required")
        return out + _at_least_one(
            self, "shards", "top_k", "batch_size", "max_length", "nprobe", "hnsw_m", "ef_search"
        )


@dataclass
class LabelConfig(ShardedSettings):
    llm: str = setting(DEFAULT_LLM, "LLM: HF id, local path or a lemb default name.", group=IO)
    backend: Backend = setting(factory=default_backend, help="vllm (the default where installed), transformers, or "
                               "server (an OpenAI-compatible server at llm_url).")  # fmt: skip
    server: LLMServer = setting(factory=LLMServer, help="The LLM's servers (backend server).", hashed=False)
    dtype: DType = setting(
        "float32", "LLM weights' dtype (CPU: float32; bf16 is slower on AVX2 and less exact).", group=PERF
    )
    n_samples: int = setting(8, "Samples from the prompt without a candidate (pooled with the per-candidate ones).")
    per_candidate_samples: int = setting(2, "m: samples from each candidate's prompt, pooled with the N.")
    temperature: float = setting(1.0, "Sampling temperature.")
    seed: int = setting(0, "Per-query seeds derive from it: a rerun of a shard draws the same samples.")
    reduce: Reduce = setting("mean", "A continuation's score: mean (or sum) of its token log-probabilities.")
    tie_tolerance: float = setting(1e-6, "Scores this close to the target's count as ties (nats).")
    score_batch_tokens: int = setting(
        0, "Tokens per scoring pass (transformers; 0: 4096 CPU, 32768 GPU).", group=PERF, hashed=False
    )
    block_tokens: int = setting(
        0,
        "Prompt tokens of the queries labelled in one sampling + one scoring call "
        "(0: the measured default); samples and rewards do not depend on it.",
        group=PERF,
        hashed=False,
    )
    trust_remote_code: bool = setting(False, "Allow the model's own code (off unless asked).", group=IO)

    def problems(self) -> list[str]:
        out = _backend_problems(self.backend, self.server)
        if self.n_samples < 0 or self.per_candidate_samples < 0 or self.n_samples + self.per_candidate_samples == 0:
            out.append("n_samples and per_candidate_samples must be >= 0 and not both 0")
        if self.temperature <= 0:
            out.append(f"temperature must be > 0, got {self.temperature}")
        if self.tie_tolerance < 0:
            out.append(f"tie_tolerance must be >= 0, got {self.tie_tolerance}")
        for name in ("score_batch_tokens", "block_tokens"):
            if getattr(self, name) < 0:
                out.append(f"{name} must be >= 0 (0: the measured default), got {getattr(self, name)}")
        return out


@dataclass
class TrainConfig(RestartableSettings):
    resume: bool = setting(False, "Continue from the last checkpoint.", group=IO, hashed=False)
    threads: int = setting(1, "Torch threads.", group=PERF, hashed=False)
    embedder: str = setting(DEFAULT_EMBEDDER, "Embedder to start from.", group=IO)
    instructions: str | dict[Task, Any] = setting("auto", INSTRUCTIONS_HELP)
    reward: Reward = setting("rank", "Reward recomputed from the label shards' log-probabilities.")
    loss: dict[Task, Loss] = setting(factory=dict, help="Per-task loss override, {task: graded | kl | contrastive}.")
    group_size: int = setting(8, "Candidates per query in a batch (LLM-Embedder: 1 positive + 7).")
    batch_size: int = setting(8, "Queries per one-task batch.")
    steps: int = setting(100, "Optimizer steps.")
    lr: float = setting(2e-5, "Peak learning rate.")
    warmup: float = setting(0.1, "Linear warm-up, as a fraction of the steps.")
    weight_decay: float = setting(0.01, "AdamW weight decay.")
    max_grad_norm: float = setting(0.0, "Clip the gradients to this total norm before each step (0: no clipping).")
    tau: float = setting(0.05, "Temperature of the cosine similarity (RESULTS.md, section 5).")
    alpha: float = setting(0.1, "Temperature of the reward weights softmax(r / alpha).")
    task_weights: dict[Task, float] = setting(factory=dict, help="{task: weight}; empty: mix tasks by their size.")
    self_paced: bool = setting(False, "Scale each task's loss by L_task(step 0) / L_task(now).")
    max_length: int = setting(256, "Tokens per query or key.")
    grad_chunk: int = setting(0, "Queries per gradient-cache chunk (0: off); memory bounded by the chunk.", group=PERF)
    precision: Precision = setting("fp32", "Autocast of the encoder's forward (fp16 adds loss scaling).", group=PERF)
    gradient_checkpointing: bool = setting(
        False, "Recompute activations in backward (less memory, ~30% slower).", group=PERF
    )
    device: str = setting("auto", "auto (cuda when available), cpu, cuda or cuda:N.", group=PERF, hashed=False)
    seed: int = setting(0, "Seed of the batch order and of the model's new parameters.")
    save_every: int | None = setting(
        None, "Checkpoint every N steps (0: never; default min(50, steps // 4)).", group=PERF, hashed=False
    )
    report_to: str = setting(
        "",
        "Also log each step's row to these trackers, comma-separated: tensorboard (events in <run>/train/tensorboard),"
        " wandb, mlflow (each: pip install 'lemb[NAME]').",
        group=IO,
        hashed=False,
    )
    dev: str | None = setting(
        None,
        "Held-out query records scored while training (retrieval metrics, no LLM), e.g. the dev.jsonl of"
        " `lemb convert --dev-fraction`.",
        group=IO,
        hashed=False,
    )
    corpus: str | None = setting(
        None, "Key records the --dev queries are ranked over (chat and lrlm rank their own history).", group=IO,
        hashed=False,
    )  # fmt: skip
    eval_every: int | None = setting(
        None, "Score --dev every N steps and after the last (0: after the last only; default: at each checkpoint)."
    )
    keep: Keep = setting("last", "The model saved: the last step's, or the best on --dev by --keep-metric.")
    keep_metric: str = setting("all/ndcg@10", "The dev metric --keep best maximises: TASK/METRIC or all/METRIC.")
    lora: str | None = setting(
        None,
        "Train LoRA adapters (peft) instead of every weight: r=16,alpha=32[,dropout=0.1][,targets=query+value]"
        " (pip install 'lemb[lora]').",
    )
    merge: bool = setting(False, "With --lora, also save the adapters merged into the base: <run>/train/model-merged.")

    def problems(self) -> list[str]:
        out = _check_instructions(self.instructions)
        if self.grad_chunk < 0:
            out.append(f"grad_chunk must be >= 0, got {self.grad_chunk}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            out.append(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        out += _at_least_one(self, "threads", "group_size", "batch_size", "steps", "max_length")
        for name in ("weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                out.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.warmup < 1:
            out.append(f"warmup must be a fraction of the steps in [0, 1), got {self.warmup}")
        if self.save_every is not None and self.save_every < 0:
            out.append(f"save_every must be >= 0 (0: never), got {self.save_every}")
        for name in ("lr", "tau", "alpha"):
            if getattr(self, name) <= 0:
                out.append(f"{name} must be > 0, got {getattr(self, name)}")
        if self.resume and self.restart:
            out.append("resume and restart exclude each other: --resume continues a run, --restart starts over")
        out += _tracker_problems(self.trackers)
        if self.eval_every is not None and self.eval_every < 0:
            out.append(f"eval_every must be >= 0 (0: after the last step only), got {self.eval_every}")
        if self.keep == "best" and not self.dev:
            out.append("keep best needs dev queries to choose by: pass --dev")
        out += _dev_metric_problems(self.keep_metric)
        out += _lora_problems(self.lora, self.merge)
        return out

    @property
    def dev_every(self) -> int:
        """Steps between two dev evaluations (0: after the last step only): `eval_every`, or at each checkpoint."""
        return self.eval_every if self.eval_every is not None else self.checkpoint_every

    @property
    def trackers(self) -> list[str]:
        """The trackers of `report_to`, in the order given."""
        return [t.strip() for t in self.report_to.split(",") if t.strip()]

    @property
    def checkpoint_every(self) -> int:
        """Steps between checkpoints: `save_every`, or by default a few per run whatever its length."""
        return self.save_every if self.save_every is not None else max(1, min(50, self.steps // 4))


@dataclass
class EvalConfig(StageSettings):
    cluster: Cluster = setting(factory=Cluster, help="Where the held-out queries are ranked.", hashed=False)
    shards: int = setting(4, "Shards of each embedder's ranking of the held-out queries.", group=PERF)
    queries: str = setting("", "Held-out query records.", group=IO, required=True, hashed=False)
    corpus: str | None = setting(None, "Key records.", group=IO, hashed=False)
    embedders: dict[str, Any] = setting(
        factory=dict,
        help="{name: model or {model: M, instructions: I}}; default: base and <run>/train/model, each with its own"
        " instructions.",
        group=IO,
    )
    instructions: str | dict[Task, Any] = setting("auto", INSTRUCTIONS_HELP)
    key_template: str | dict[Task, str] | None = setting(
        None, f"{KEY_TEMPLATE_HELP} Default: the run's retrieve setting, else {DEFAULT_KEY_TEMPLATE!r}."
    )
    llm: str = setting(DEFAULT_LLM, "LLM of the downstream metrics.", group=IO)
    backend: Backend = setting("transformers", "LLM backend of the downstream metrics: transformers, vllm or server.")
    server: LLMServer = setting(factory=LLMServer, help="The LLM's servers (backend server).", hashed=False)
    answer_k: int = setting(1, "Retrieved candidates in the LLM's prompt (0: no LLM).")
    eval_depth: int = setting(100, "Keys each held-out query is ranked to (run.trec, recall@100); deeper metrics "
                                   "are left out.")  # fmt: skip
    max_new_tokens: int = setting(24, "Tokens the LLM generates per answer.")
    batch_size: int = setting(64, "Texts per encoder forward pass.", group=PERF)
    max_length: int = setting(256, "Tokens per query or key.")

    def problems(self) -> list[str]:
        out = _check_instructions(self.instructions) + _backend_problems(self.backend, self.server)
        out += template_problems(self.key_template) if self.key_template is not None else []
        for name, spec in self.embedders.items():
            table = (
                isinstance(spec, dict)
                and set(spec) <= {"model", "instructions"}
                and isinstance(spec.get("model"), str)
            )
            if not (isinstance(spec, str) or table):
                out.append(f"embedders[{name}] must be a model or {{model: M, instructions: I}}, got {spec!r}")
            if isinstance(spec, dict):
                out += [f"embedders[{name}]: {p}" for p in _check_instructions(spec.get("instructions", "auto"))]
        if not self.queries:
            out.append("queries: a held-out query file is required")
        if self.answer_k < 0:
            out.append(f"answer_k must be >= 0, got {self.answer_k}")
        return out + _at_least_one(self, "shards", "max_new_tokens", "batch_size", "max_length", "eval_depth")


@dataclass
class RescoreConfig(StageSettings):
    reward: Reward = setting("rank", "The reward recomputed from the label shards' log-probabilities.")
    tie_tolerance: float = setting(1e-6, "Scores this close to the target's count as ties (nats).")

    def problems(self) -> list[str]:
        return [] if self.tie_tolerance >= 0 else [f"tie_tolerance must be >= 0, got {self.tie_tolerance}"]


def _tracker_problems(names: list[str]) -> list[str]:
    return [f"report_to: unknown tracker {t!r} (one of {', '.join(TRACKERS)})" for t in names if t not in TRACKERS]


DEV_METRIC_KINDS = ("recall", "ndcg", "mrr")  # the retrieval metrics a dev evaluation computes (no LLM)


def _dev_metric_problems(name: str) -> list[str]:
    """`TASK/METRIC` or `all/METRIC`, METRIC a retrieval metric at a depth: ndcg@10, recall@5, mrr@10."""
    where, _, metric = name.partition("/")
    kind, _, depth = metric.partition("@")
    if where in ("all", *TASKS) and kind in DEV_METRIC_KINDS and depth.isdigit() and int(depth) >= 1:
        return []
    kinds = ", ".join(k + "@N" for k in DEV_METRIC_KINDS)
    return [f"keep_metric must be TASK/METRIC or all/METRIC with METRIC one of {kinds} (e.g. all/ndcg@10,"
            f" qa/recall@5), got {name!r}"]  # fmt: skip


LORA_KEYS = ("r", "alpha", "dropout", "targets")


@dataclass(frozen=True)
class LoraSpec:
    """The `lora` setting, parsed: the adapters' rank `r`, their scale `alpha` (an update is scaled by alpha / r),
    the dropout on their input, and the names of the linear layers they adapt (empty: peft's defaults for the model
    type, lemb/trainer/lora.py)."""

    r: int
    alpha: int
    dropout: float = 0.0
    targets: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}


def parse_lora(spec: str) -> LoraSpec:
    """`r=16,alpha=32[,dropout=0.1][,targets=query+value]` as a LoraSpec; every problem in one ConfigError."""
    parsed, problems = _read_lora(spec)
    if parsed is None:
        raise ConfigError("; ".join(problems))
    return parsed


def _read_lora(spec: str) -> tuple[LoraSpec | None, list[str]]:
    values: dict[str, str] = {}
    out = []
    for item in spec.split(","):
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq:
            out.append(f"lora: {item.strip()!r} is not KEY=VALUE (e.g. r=16,alpha=32)")
        elif key not in LORA_KEYS:
            out.append(f"lora: unknown key {key!r} (keys: {', '.join(LORA_KEYS)})")
        elif key in values:
            out.append(f"lora: {key} is given twice")
        else:
            values[key] = value
    for key in ("r", "alpha"):
        if key not in values:
            out.append(f"lora: {key} is required (e.g. r=16,alpha=32)")
        elif not (values[key].isdigit() and int(values[key]) > 0):
            out.append(f"lora: {key} must be a positive integer, got {values[key]!r}")
    try:
        dropout = float(values.get("dropout", "0"))
    except ValueError:
        dropout = math.nan
    if not 0 <= dropout < 1:
        out.append(f"lora: dropout must be a number in [0, 1), got {values['dropout']!r}")
    targets = tuple(t.strip() for t in values.get("targets", "").split("+") if t.strip())
    if "targets" in values and not targets:
        out.append(f"lora: targets must name at least one layer, as NAME+NAME (e.g. query+value), got "
                   f"{values['targets']!r}")  # fmt: skip
    if out:
        return None, out
    return LoraSpec(int(values["r"]), int(values["alpha"]), dropout, targets), []


def _lora_problems(spec: str | None, merge: bool) -> list[str]:
    if spec is None:
        return ["merge needs --lora: only adapters are merged"] if merge else []
    return _read_lora(spec)[1]


def type_problems(name: str, value: Any, hint: Any) -> list[str]:
    """What is wrong with `value` as a `hint` (Literal choices, tables' keys and values included); [] if nothing."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return []
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        return [] if value in choices else [f"{name} must be {one_of(choices)}, got {value!r}"]
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if any(not type_problems(name, value, a) for a in options):
            return []
        return [f"{name} must be {type_name(hint)}, got {value!r}"]
    if hint is type(None):
        return [] if value is None else [f"{name} must be None, got {value!r}"]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{name} must be a table {type_name(hint)}, got {value!r}"]
        key_hint, value_hint = typing.get_args(hint)
        out = []
        for k, v in value.items():
            if typing.get_origin(key_hint) is typing.Literal and k not in typing.get_args(key_hint):
                out.append(f"{name}: unknown task {k!r}" if key_hint is Task else f"{name}: unknown key {k!r}")
            else:
                out += type_problems(f"{name}[{k}]", v, value_hint)
        return out
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            return [f"{name} must be a finite number, got {value!r}"]
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, hint)
    return [] if ok else [f"{name} must be {type_name(hint)}, got {value!r}"]


def type_name(hint: Any) -> str:
    """`int`, `str | None`, `dict[str, float]`: a type as a user would write it."""
    if typing.get_origin(hint) is typing.Literal:
        return one_of(typing.get_args(hint))
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


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
    errors, choices, values = _resolve(cls, data)
    if errors:
        raise ConfigError(f"{cls.__name__}: " + "; ".join(errors + choices))
    config = cls(**values)
    errors = choices + [p for part in (config, *_sections(config)) for p in part.problems()]
    if errors:
        raise ConfigError(f"{cls.__name__}: " + "; ".join(errors))
    return config


def _resolve(cls: type, data: dict[str, Any]) -> tuple[list[str], list[str], dict[str, Any]]:
    """Type-check `data` against `cls`'s fields: (type errors, values outside a Literal's choices, values). A value
    outside its choices is kept, to be reported with the range checks of `problems()`. A section (a dataclass
    field, e.g. `cluster`) takes its settings as a table under its name (as `config.yaml` is saved) or flat (as
    flags and hand-written YAML give them)."""
    hints = typing.get_type_hints(cls)
    sections = {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}
    owner = {f.name: name for name, sub in sections.items() for f in dataclasses.fields(sub)}
    nested: dict[str, dict[str, Any]] = {name: {} for name in sections}
    errors, choices, values = [], [], {}
    for key, value in data.items():
        if key in sections:
            if not isinstance(value, dict):
                errors.append(f"{key} must be a table of settings, got {value!r}")
            else:
                nested[key].update(value)
        elif key in owner:
            nested[owner[key]][key] = value
        elif key in RETIRED:
            errors.append(f"{key!r} {RETIRED[key]}")
        elif key not in hints:
            errors.append(f"unknown setting {key!r}" + (f" ({NOT_HERE[key]})" if key in NOT_HERE else ""))
        else:
            found = type_problems(key, value, hints[key])
            (choices if _has_choices(hints[key]) else errors).extend(found)
            values[key] = float(value) if hints[key] is float and isinstance(value, int) else value
    for name, sub in sections.items():
        sub_errors, sub_choices, sub_values = _resolve(sub, nested[name])
        errors += sub_errors
        choices += sub_choices
        values[name] = sub(**sub_values)
    return errors, choices, values


def _has_choices(hint: Any) -> bool:
    return typing.get_origin(hint) is typing.Literal or any(_has_choices(a) for a in typing.get_args(hint))


def _sections(config: Any) -> list[Any]:
    return [
        getattr(config, f.name)
        for f in dataclasses.fields(config)
        if dataclasses.is_dataclass(getattr(config, f.name))
    ]


# settings that earlier versions wrote into config.yaml, and what replaced them
RETIRED = {
    "tensorboard": "was replaced by report_to: pass --report-to tensorboard (or report_to: tensorboard)",
    "score_batch_size": "was replaced by score_batch_tokens (tokens per scoring forward pass; 0: the backend's "
    "default): remove it or rename it",
}

# the settings of any stage that do not determine its output (`setting(hashed=False)`), by name
UNHASHED = frozenset(
    f.name
    for cls in (RetrieveConfig, LabelConfig, TrainConfig, EvalConfig, RescoreConfig)
    for f in dataclasses.fields(cls)
    if not f.metadata["hashed"]
)
# why a setting of another stage is not one of this stage's
NOT_HERE = {f.name: "a setting of the sharded stages retrieve, label and eval" for f in dataclasses.fields(Cluster)}
NOT_HERE.update({f.name: "a setting of label and eval (backend server)" for f in dataclasses.fields(LLMServer)})
NOT_HERE["shards"] = "a setting of retrieve and eval; label's shards are retrieve's candidate shards"


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_hash(config: Any, extra: dict[str, Any] | None = None) -> str:
    """Hash of what determines a stage's output: its settings (execution settings excluded) and `extra`
    (the prompt templates or instruction tables in force, the model's fingerprint)."""
    content = {k: v for k, v in to_dict(config).items() if k not in UNHASHED}
    content["_extra"] = extra or {}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`name: old -> new` for each setting that determines the output (UNHASHED ones left out) and differs, by name:
    what every "made with other settings" message lists."""
    names = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in names if old.get(k) != new.get(k) and k not in UNHASHED]


def save_config(config: Any, folder: str | Path) -> Path:
    """The resolved config beside a stage's output, loadable again with `--config`."""
    return write_text(Path(folder) / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=True))
