"""Task kinds: embedder instructions, key templates, LLM prompt templates and per-task training defaults.

The `llm-embedder` instruction preset is the interface of the published LLM-Embedder model
(Zhang et al., ACL 2024; FlagEmbedding's llm_embedder), `bge` that of the English BGE models (Xiao et al., 2023: a
query instruction for retrieval, none for passages). Which one an embedder is used with follows the model unless a
setting says otherwise (lemb/stages/instructions.py). Prompt templates are lemb's own: each
task's desired output is scored as the assistant's reply to the user message built here.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from lemb.vocabulary import TASKS

# How a corpus key's text is built from its fields, as DPR, BEIR and BGE embed Wikipedia passages (title + text).
# The rendered text is what the embedder encodes and what the LLM's prompts hold, in every stage.
DEFAULT_KEY_TEMPLATE = "{title}: {text}"
KEY_FIELDS = ("title", "text")

INSTRUCTION_PRESETS: dict[str, dict[str, tuple[str, str]]] = {
    "llm-embedder": {
        "qa": ("Represent this query for retrieving relevant documents: ", "Represent this document for retrieval: "),
        "icl": (
            "Convert this example into vector to look for useful examples: ",
            "Convert this example into vector for retrieval: ",
        ),
        "chat": (
            "Embed this dialogue to find useful historical dialogues: ",
            "Embed this historical dialogue for retrieval: ",
        ),
        "lrlm": (
            "Embed this text chunk for finding useful historical chunks: ",
            "Embed this historical text chunk for retrieval: ",
        ),
        "tool": (
            "Transform this user request for fetching helpful tool descriptions: ",
            "Transform this tool description for retrieval: ",
        ),
        "convsearch": (
            "Encode this query and context for searching relevant passages: ",
            "Encode this passage for retrieval: ",
        ),
    },
    "bge": {task: ("Represent this sentence for searching relevant passages: ", "") for task in TASKS},
    "none": {task: ("", "") for task in TASKS},
}


@dataclass(frozen=True)
class TaskSpec:
    """How one task kind is prompted and trained.

    `prompt` holds `{candidate}` and `{query}` (and `{history}` where used); `bare_prompt` is the
    same request without any candidate, used for the no-candidate samples and the baseline rank.
    `metrics` names are those of METRICS; retrieval ones are reported only for queries with known positives.
    """

    name: str
    prompt: str
    bare_prompt: str
    max_new_tokens: int  # sampling budget for the LLM's own outputs (tokens)
    loss: str  # graded | kl | contrastive (reference defaults of DESIGN.md)
    in_batch_negatives: bool  # off where candidates belong to one query only
    metrics: tuple[str, ...]  # what `lemb eval` reports for the task, the paper's measure first (see METRICS)


# Evaluation measures by name, as the paper evaluates each task kind (LLM ones use the top-`answer_k` retrieved
# candidates in the task's prompt, the same prompt the rewards were labelled with).
METRICS = {
    "recall@k": "known positives among the top k (ir-measures R@k); recall@100 (qa, convsearch: what a reader or "
    "reranker after the retriever could still find) needs eval_depth >= 100",
    "mrr@k": "reciprocal rank of the first positive within the top k (RR@k)",
    "ndcg@k": "nDCG of the top k against the known positives (nDCG@k); the paper's tool and convsearch measure",
    "answer_accuracy": "the LLM's greedy answer holds the normalised target as a whole-word span (icl: label match)",
    "answer_em": "the LLM's greedy answer is the normalised target",
    "perplexity": "exp(- mean log-probability of the target's tokens), pooled over all target tokens; lower is better",
}

TASK_SPECS: dict[str, TaskSpec] = {
    "qa": TaskSpec(
        "qa",
        prompt="Background: {candidate}\n\nAnswer the question in a few words.\nQuestion: {query}",
        bare_prompt="Answer the question in a few words.\nQuestion: {query}",
        max_new_tokens=16,
        loss="graded",
        in_batch_negatives=True,
        metrics=("recall@1", "recall@5", "mrr@10", "ndcg@10", "recall@100", "answer_accuracy", "answer_em"),
    ),
    "icl": TaskSpec(
        "icl",
        prompt="Example:\n{candidate}\n\nAnswer in the same way.\n{query}",
        bare_prompt="Answer in one word.\n{query}",
        max_new_tokens=8,
        loss="graded",
        in_batch_negatives=True,
        metrics=("answer_accuracy", "answer_em"),
    ),
    "chat": TaskSpec(
        "chat",
        prompt="Earlier in our conversation: {candidate}\n\nReply briefly.\n{query}",
        bare_prompt="Reply briefly.\n{query}",
        max_new_tokens=24,
        loss="graded",
        in_batch_negatives=False,
        metrics=("perplexity", "recall@1", "ndcg@10"),
    ),
    "lrlm": TaskSpec(
        "lrlm",
        prompt="Earlier text: {candidate}\n\nContinue this text.\n{query}",
        bare_prompt="Continue this text.\n{query}",
        max_new_tokens=48,
        loss="graded",
        in_batch_negatives=False,
        metrics=("perplexity", "recall@1", "ndcg@10"),
    ),
    "tool": TaskSpec(
        "tool",
        prompt="Available tool: {candidate}\n\nWrite the tool call that fulfils this request.\nRequest: {query}",
        bare_prompt="Write the tool call that fulfils this request.\nRequest: {query}",
        max_new_tokens=16,
        loss="graded",
        in_batch_negatives=True,
        metrics=("ndcg@5", "recall@1", "recall@5"),
    ),
    "convsearch": TaskSpec(
        "convsearch",
        prompt="Background: {candidate}\n\n{query}",
        bare_prompt="{query}",
        max_new_tokens=32,
        loss="contrastive",
        in_batch_negatives=True,
        metrics=("ndcg@3", "recall@1", "recall@5", "recall@100"),
    ),
}


def task_spec(task: str) -> TaskSpec:
    try:
        return TASK_SPECS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}") from None


def key_template(setting: str | dict[str, str], task: str) -> str:
    """The key template of `task`: one template for every task, or a table {task: template} (others: default)."""
    return setting if isinstance(setting, str) else setting.get(task, DEFAULT_KEY_TEMPLATE)


def template_problems(setting: Any, name: str = "key_template") -> list[str]:
    """What is wrong with a key template setting (a template over {title} and {text}, or {task: template})."""
    if isinstance(setting, dict):
        out = [f"{name}: unknown task {t!r}" for t in setting if t not in TASKS]
        return out + [p for t, v in setting.items() if t in TASKS for p in template_problems(v, f"{name}[{t}]")]
    if not isinstance(setting, str):
        return [f"{name} must be a template such as {DEFAULT_KEY_TEMPLATE!r} or a table {{task: template}}"]
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(setting) if f is not None}
    except ValueError as exc:
        return [f"{name} {setting!r} is not a template ({exc})"]
    unknown = sorted(fields - set(KEY_FIELDS))
    if unknown:
        return [f"{name} {setting!r}: unknown field {{{unknown[0]}}}; a key has {{title}} and {{text}}"]
    if "text" not in fields:
        return [f"{name} {setting!r} must contain {{text}}"]
    try:  # a format spec or conversion that only fails on a real key ({text:d}, {title!x})
        setting.format(text="a key's text", title="a title")
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        return [f"{name} {setting!r} cannot render a key ({exc})"]
    return []


def render_key(template: str, text: str, title: str | None) -> str:
    """A key's text under `template`; a key without a title is its text alone whatever the template."""
    if not title and "{title}" in template:
        return text
    return template.format(text=text, title=title or "")


def build_prompt(task: str, query: str, candidate: str | None) -> str:
    """The user message for `query`, with `candidate` in context (or none: the bare prompt)."""
    spec = task_spec(task)
    if candidate is None:
        return spec.bare_prompt.format(query=query)
    return spec.prompt.format(query=query, candidate=candidate)


def templates_fingerprint() -> dict[str, list]:
    """The prompt templates and token budgets in force, for config hashes and shard provenance."""
    return {t: [s.prompt, s.bare_prompt, s.max_new_tokens] for t, s in TASK_SPECS.items()}
