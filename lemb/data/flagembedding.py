"""Reader and writer of the FlagEmbedding llm_embedder training format.

One JSON object a line: `query`, `pos`, `neg`, `teacher_scores` (aligned with pos + neg),
`answers`, `task`, plus per-task extras seen in the official toy files: `query_id` (int) or `qid`
(str), `history` with teacher_scores aligned to it (chat), `pos_index` / `neg_index` (corpus
positions; qa, convsearch), `pos_scores` / `neg_score` (icl; the same numbers as teacher_scores),
`context` (lrlm, always empty).

Mapping to lemb records:
- Keys are deduplicated by text with stable ids "fe-" + blake2b(text)[:12], so the same passage
  listed under many queries is one key, and a file read twice gives the same ids.
- `pos` become `positive_ids`; `answers[0]` the target (the schema holds one desired output).
- chat and lrlm candidates are the query's own history, addressed by `schemas.history_key_id`.
  chat lists them in `history`; lrlm lists them in `pos` + `neg` (empty pos in the toy file), and
  they become its history in that order. Where a line has both, pos / neg are candidates taken
  from the history (`pos_index` / `neg_index` then index the history).
- `scores` maps (query_id, key_id) to the teacher score, or None where the file lists the
  candidate without one (tool and convsearch have no teacher_scores): the pairs are the query's
  candidate set, which the writer needs back. Duplicate candidates of one query keep the first.
- Lost on reading: corpus indices, icl's pos_scores / neg_score (duplicates), answers after the first.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa

from lemb.data import schemas
from lemb.errors import InputError
from lemb.files import write_text
from lemb.vocabulary import PER_QUERY_TASKS, TASKS

log = logging.getLogger(__name__)

Scores = dict[tuple[str, str], float | None]


def fe_key_id(text: str) -> str:
    return "fe-" + hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()[:12]


def _query_id(item: dict[str, Any], task: str, index: int) -> str:
    """String `query_id`s (what this writer writes) are kept; FlagEmbedding's own ids get the task as prefix.

    The toy files number queries from 0 in every task (int `query_id`, or tool's string `qid`); the
    prefix keeps files of several tasks apart. Lines without an id are numbered by position.
    """
    raw = item.get("query_id")
    if isinstance(raw, str):
        return raw
    raw = item.get("qid") if raw is None else raw
    return f"{task}-{index if raw is None else raw}"


def _strings(path: Path, where: str, item: dict[str, Any], field: str) -> list[str]:
    value = item.get(field)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(path, where, field, "expected a list of strings")
    return value


def _history_slots(path: Path, where: str, item: dict[str, Any], history: list[str], texts: list[str]) -> list[int]:
    """Positions in `history` of the pos + neg texts.

    lemb writes them as `pos_index` + `neg_index` (for chat and lrlm the history is the corpus these
    indices point into); without them, repeated texts take successive equal items.
    """
    index = list(item.get("pos_index") or []) + list(item.get("neg_index") or [])
    if index:
        if len(index) != len(texts) or not all(
            isinstance(i, int) and 0 <= i < len(history) and history[i] == t for i, t in zip(index, texts)
        ):
            raise InputError(path, where, "pos_index/neg_index", "do not point at the pos/neg texts in the history")
        return index
    slots, taken = [], set()
    for text in texts:
        i = next((i for i, h in enumerate(history) if h == text and i not in taken), None)
        if i is None:
            raise InputError(path, where, "pos/neg", "a candidate is not an item of the query's history")
        taken.add(i)
        slots.append(i)
    return slots


def read_flagembedding(path: str | Path, task: str | None = None) -> tuple[list[dict], list[dict], Scores]:
    """(queries, keys, scores) from a FlagEmbedding llm_embedder JSONL file.

    `task` names the task of lines that carry none; a line naming another task is an error.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file", None, "not found")
    queries: list[dict] = []
    keys: dict[str, dict] = {}
    scores: Scores = {}
    seen: set[str] = set()
    with open(path, encoding="utf-8") as fh:
        lines = [(n, line) for n, line in enumerate(fh, start=1) if line.strip()]
    for index, (n, line) in enumerate(lines):
        where = f"line {n}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(path, where, None, f"not valid JSON ({exc.msg})") from None
        qtask = item.get("task") or task
        if qtask is None:
            raise InputError(path, where, "task", "missing; pass task=")
        if task is not None and qtask != task:
            raise InputError(path, where, "task", f"{qtask!r} in a file read as {task!r}")
        if qtask not in TASKS:
            raise InputError(path, where, "task", f"unknown task {qtask!r}; known: {', '.join(TASKS)}")
        qid = _query_id(item, qtask, index)
        if qid in seen:
            raise InputError(path, where, "query_id", f"duplicate id {qid!r}")
        seen.add(qid)
        text = item.get("query")
        if not isinstance(text, str) or not text.strip():
            raise InputError(path, where, "query", "missing or empty")
        answers = _strings(path, where, item, "answers")
        pos, neg = _strings(path, where, item, "pos"), _strings(path, where, item, "neg")
        history = _strings(path, where, item, "history") if "history" in item else None
        if qtask in PER_QUERY_TASKS:
            if history is None:  # lrlm: pos + neg are the earlier chunks
                history, slots = pos + neg, list(range(len(pos) + len(neg)))
            elif pos or neg:  # lemb's form for a candidate subset of the history
                slots = _history_slots(path, where, item, history, pos + neg)
            else:  # chat: the whole history is the candidate set
                slots = list(range(len(history)))
            cand_ids = [schemas.history_key_id(qid, i) for i in slots]
        else:
            if any(not t.strip() for t in pos + neg):
                raise InputError(path, where, "pos/neg", "empty candidate text")
            cand_ids = []
            for t in pos + neg:
                kid = fe_key_id(t)
                keys.setdefault(kid, {"key_id": kid, "task": qtask, "text": t, "title": None})
                cand_ids.append(kid)
        teacher = item.get("teacher_scores")
        if teacher is not None and len(teacher) != len(cand_ids):
            raise InputError(path, where, "teacher_scores", f"{len(teacher)} scores for {len(cand_ids)} candidates")
        for i, kid in enumerate(cand_ids):
            scores.setdefault((qid, kid), None if teacher is None else float(teacher[i]))
        queries.append(
            {
                "query_id": qid,
                "task": qtask,
                "text": text,
                "target": answers[0] if answers else None,
                "positive_ids": list(dict.fromkeys(cand_ids[: len(pos)])),
                "history": list(history or []),
                "relevance": None,
            }
        )
    return queries, list(keys.values()), scores


def _rows(records: Iterable[dict] | pa.Table) -> list[dict]:
    return records.to_pylist() if isinstance(records, pa.Table) else list(records)


def _reward_map(rewards: Mapping[tuple[str, str], float | None] | Iterable[dict] | pa.Table) -> Scores:
    """(query_id, key_id) -> reward from a scores mapping or reward rows (`schemas.REWARD`), order kept."""
    if isinstance(rewards, Mapping):
        return {k: (None if v is None else float(v)) for k, v in rewards.items()}
    out: Scores = {}
    for r in _rows(rewards):
        reward = r.get("reward")
        out.setdefault((r["query_id"], r["key_id"]), None if reward is None else float(reward))
    return out


def write_flagembedding(
    queries: Iterable[dict] | pa.Table,
    keys: Iterable[dict] | pa.Table,
    rewards: Mapping[tuple[str, str], float | None] | Iterable[dict] | pa.Table,
    path: str | Path,
) -> Path:
    """Write queries with their rewarded candidates in the FlagEmbedding llm_embedder format.

    A query's candidates are its (query_id, key_id) pairs in `rewards` (a mapping as returned by
    `read_flagembedding`, or reward rows), in their order. `pos` is the query's known positives
    among them; a query without any gets the candidates with the highest reward (ties kept), as
    rewards are all there is to go by. Known positives win because FlagEmbedding reads `pos` as the
    gold set: the toy qa file keeps its gold passage in pos although the LLM scores a negative higher.
    `neg` is the other candidates; `teacher_scores` the rewards aligned with pos + neg, written when
    every candidate has one (a query with some but not all rewarded is an error).
    chat and lrlm follow the toy files: no pos from rewards; chat writes `history` with scores aligned
    to it, lrlm `pos: []`, `neg` = its history. When their candidates are only part of the history,
    the full `history` is written beside pos / neg, with pos_index / neg_index pointing into it
    (lemb's extension, read back by `read_flagembedding`).
    """
    path = Path(path)
    texts = {k["key_id"]: k["text"] for k in _rows(keys)}
    by_query: dict[str, dict[str, float | None]] = {}
    for (qid, kid), r in _reward_map(rewards).items():
        by_query.setdefault(qid, {})[kid] = r
    lines = []
    for q in _rows(queries):
        qid, task, history = q["query_id"], q["task"], list(q.get("history") or [])
        cands = by_query.pop(qid, {})
        known = [k for k in q.get("positive_ids") or [] if k in cands] if cands else list(q.get("positive_ids") or [])
        values = [v for v in cands.values() if v is not None]
        if values and len(values) != len(cands):
            raise ValueError(f"query {qid!r}: {len(cands) - len(values)} of {len(cands)} candidates have no reward")
        out: dict[str, Any] = {"query_id": qid, "task": task, "query": q["text"]}
        if q.get("target") is not None:
            out["answers"] = [q["target"]]
        if task in PER_QUERY_TASKS:
            slot = {schemas.history_key_id(qid, i): i for i in range(len(history))}
            unknown = [k for k in list(cands) + known if k not in slot]
            if unknown:
                raise ValueError(f"query {qid!r}: candidate {unknown[0]!r} is not an item of its history")
            cand_list = list(cands) or list(slot)  # without rewards the whole history is the candidate set
            whole = cand_list == list(slot)
            if whole and not known and task == "chat":
                out["history"] = history
                order = cand_list
            else:
                pos = known
                order = pos + [k for k in cand_list if k not in pos]
                out["pos"], out["neg"] = [history[slot[k]] for k in pos], [history[slot[k]] for k in order[len(pos) :]]
                if not (whole and not known and task == "lrlm"):
                    out["history"] = history
                    out["pos_index"], out["neg_index"] = [slot[k] for k in pos], [slot[k] for k in order[len(pos) :]]
        else:
            if known:
                pos = known
            elif values:
                best = max(values)
                pos = [k for k, v in cands.items() if v == best]
            else:
                pos = []
            order = pos + [k for k in cands if k not in pos]
            missing = [k for k in order if k not in texts]
            if missing:
                raise ValueError(f"query {qid!r}: key {missing[0]!r} is not among the keys")
            out["pos"], out["neg"] = [texts[k] for k in pos], [texts[k] for k in order[len(pos) :]]
            if history:
                out["history"] = history
        if values:
            out["teacher_scores"] = [cands[k] for k in order]
        lines.append(json.dumps(out, ensure_ascii=False))
    if by_query:
        log.warning("rewards of %d queries not among the queries were not written", len(by_query))
    return write_text(path, "".join(line + "\n" for line in lines))
