"""`lemb convert`: public data of the six task kinds, FlagEmbedding llm_embedder files or BEIR folders, as lemb
records.

`SOURCES` is the table of what can be converted: where each source sits under a data root laid
out like ../shared/data, and which splits it has (the first is the default). `convert` reads
one or more sources, optionally cuts each to its first `limit` queries and `max_keys` keys (the
kept queries' positives always stay), and writes `queries.jsonl` + `corpus.jsonl` (the files the
stages read) or one FlagEmbedding file per task.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lemb.data import sources
from lemb.data.flagembedding import read_flagembedding, write_flagembedding
from lemb.data.readers import read_keys, read_queries, write_jsonl
from lemb.data.split import split_by_hash
from lemb.errors import LembError

Records = tuple[list[dict[str, Any]], list[dict[str, Any]]]


@dataclass(frozen=True)
class Source:
    folder: str  # relative to a data root; `--data` may also point at the folder (or file) itself
    read: Callable[[Path, str | None], Records]  # (located path, split) -> (queries, keys)
    splits: tuple[str, ...] = ()  # accepted splits, the default first; empty: the source has none
    about: str = ""
    any_split: bool = False  # the split names a file the reader looks for (its first `splits` is the default)


def _icl(dataset: str) -> Callable[[Path, str | None], Records]:
    return lambda path, split: sources.icl(path, dataset, query_split=split)


def _flagembedding(path: Path, split: str | None) -> Records:
    """One llm_embedder file, or every `*.json` of a folder (`split` picks `<task>.json`); teacher scores dropped."""
    files = [path] if path.is_file() else [path / f"{split}.json"] if split else sorted(path.glob("*.json"))
    queries, keys = [], {}
    for file in files:
        q, k, _ = read_flagembedding(file)
        queries += q
        keys.update((key["key_id"], key) for key in k)
    return queries, list(keys.values())


SOURCES: dict[str, Source] = {
    "nq_oracle": Source(
        "knowledge_qa/nq_oracle", lambda p, s: sources.knowledge_qa_nq_oracle(p), about="qa: NQ with gold passages"
    ),
    "sst2": Source("icl", _icl("sst2"), ("dev", "test"), "icl: SST-2 (train is the demonstration pool)"),
    "trec": Source("icl", _icl("trec"), ("test",), "icl: TREC question types"),
    "cb": Source("icl", _icl("cb"), ("val",), "icl: CommitmentBank"),
    "rte": Source("icl", _icl("rte"), ("val",), "icl: RTE"),
    "msc": Source(
        "conv_memory/msc",
        lambda p, s: sources.msc(p if p.is_file() else p / f"{s}.jsonl"),
        ("session_3_test", "session_2_test"),
        "chat: Multi-Session Chat, one query per episode",
    ),
    "gutenberg": Source("long_context_lm/gutenberg", lambda p, s: sources.gutenberg(p), about="lrlm: next chunk"),
    "gorilla": Source(
        "tool_retrieval/gorilla_apibench",
        sources.gorilla_apibench,
        ("torchhub", "tensorflowhub", "huggingface"),
        "tool: Gorilla APIBench, one hub",
    ),
    "toolalpaca": Source("tool_retrieval/toolalpaca", lambda p, s: sources.toolalpaca(p), about="tool: ToolAlpaca"),
    "trec_cast": Source(
        "conv_search/trec_cast/2021",
        lambda p, s: sources.trec_cast(p if p.is_file() else p / f"2021_{s}_evaluation_topics_v1.0.json"),
        ("manual", "automatic"),
        "convsearch: TREC CAsT 2021 topics",
    ),
    "flagembedding": Source(
        "llm_embedder_toy",
        _flagembedding,
        about="any task: FlagEmbedding llm_embedder JSONL (file or folder)",
        any_split=True,
    ),
    "beir": Source(
        "",
        lambda p, s: sources.beir(p, s or "test"),
        ("test",),
        any_split=True,
        about="qa: a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv), graded judgments kept",
    ),
}
FORMATS = ("lemb", "flagembedding")


def parse_source(spec: str, default_split: str | None = None) -> tuple[str, str | None]:
    """'name' or 'name:split' -> (name, split), checked against `SOURCES`."""
    name, _, split = spec.partition(":")
    source = SOURCES.get(name)
    if source is None:
        raise LembError(f"unknown source {name!r}; known: {', '.join(SOURCES)}")
    split = split or default_split
    if source.any_split:
        return name, split or (source.splits[0] if source.splits else None)  # checked by the reader
    if split and split not in source.splits:
        known = ", ".join(source.splits) if source.splits else "none"
        raise LembError(f"source {name}: unknown split {split!r}; its splits: {known}")
    return name, split or (source.splits[0] if source.splits else None)


def read_source(name: str, data: Path, split: str | None) -> Records:
    """Records of one source; a layout the converter does not expect is one LembError naming the path."""
    source = SOURCES[name]
    path = data / source.folder if source.folder and (data / source.folder).exists() else data
    if not path.exists():
        raise LembError(f"{path}: not found (--data is a data root like ../shared/data, or the source's folder)")
    try:
        return source.read(path, split)
    except LembError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, json.JSONDecodeError) as exc:
        raise LembError(f"{path}: not in the layout of source {name} ({type(exc).__name__}: {exc})") from None


def cut(queries: list[dict], keys: list[dict], limit: int | None, max_keys: int | None) -> Records:
    """The first `limit` queries; keys cut to `max_keys`, the kept queries' positives and graded ids first (never
    dropped)."""
    queries = queries[:limit]
    if max_keys is None or len(keys) <= max_keys:
        return queries, keys
    needed = {p for q in queries for p in [*q["positive_ids"], *(q.get("relevance") or {})]}
    room = max(0, max_keys - len(needed & {k["key_id"] for k in keys}))
    others = [k["key_id"] for k in keys if k["key_id"] not in needed][:room]
    keep = needed | set(others)
    return queries, [k for k in keys if k["key_id"] in keep]


def _merge(parts: list[tuple[str, Records]]) -> Records:
    queries, keys, origin = [], {}, {}
    for name, (q, k) in parts:
        for record in q:
            if record["query_id"] in origin:
                raise LembError(
                    f"query_id {record['query_id']!r} comes from both {origin[record['query_id']]} and {name}"
                )
            origin[record["query_id"]] = name
        queries += q
        for key in k:
            if key["key_id"] in keys and keys[key["key_id"]]["text"] != key["text"]:
                raise LembError(f"key_id {key['key_id']!r} has two texts (source {name})")
            keys[key["key_id"]] = key
    return queries, list(keys.values())


def convert(
    specs: list[str],
    data: str | Path,
    out: str | Path,
    limit: int | None = None,
    max_keys: int | None = None,
    split: str | None = None,
    fmt: str = "lemb",
    dev_fraction: float | None = None,
) -> dict[str, Any]:
    """Convert `specs` ('name' or 'name:split') and write them into `out`; returns counts and paths. With
    `dev_fraction`, the queries whose id hashes below it (lemb/data/split.py) go to `dev.jsonl` instead of
    `queries.jsonl`, both over the one corpus."""
    if fmt not in FORMATS:
        raise LembError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if dev_fraction is not None and not 0 < dev_fraction < 1:
        raise LembError(f"--dev-fraction must be a fraction in (0, 1), got {dev_fraction}")
    if dev_fraction is not None and fmt != "lemb":
        raise LembError("--dev-fraction writes queries.jsonl and dev.jsonl: use it with --format lemb")
    if not specs:
        raise LembError(f"name at least one source; known: {', '.join(SOURCES)}")
    for name, value in (("--limit", limit), ("--max-keys", max_keys)):
        if value is not None and value < 1:
            raise LembError(f"{name} must be >= 1, got {value}")
    parts = []
    for spec in specs:
        name, chosen = parse_source(spec, split)
        queries, keys = cut(*read_source(name, Path(data), chosen), limit, max_keys)
        if not queries:
            raise LembError(f"source {spec}: no queries in {data}")
        parts.append((spec, (queries, keys)))
    queries, keys = _merge(parts)
    out = Path(out)
    dev: list[dict[str, Any]] = []
    if dev_fraction is not None:
        queries, dev = _split(queries, dev_fraction)
    paths = _write(queries, keys, out, fmt)
    if not dev:
        (out / "dev.jsonl").unlink(missing_ok=True)  # an earlier split's held-out queries are in queries.jsonl now
    if dev:
        paths["dev_path"] = write_jsonl(dev, out / "dev.jsonl")
        read_queries(paths["dev_path"])
    return {
        "queries": len(queries),
        "keys": len(keys),
        "per_task": dict(Counter(q["task"] for q in queries)),
        "dev": len(dev),
        "dev_per_task": dict(Counter(q["task"] for q in dev)),
        **paths,
    }


def _split(queries: list[dict], dev_fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, dev) queries, each in the sources' order; a side left empty is an error, not a silent empty file."""
    dev_ids = set(split_by_hash([q["query_id"] for q in queries], dev_fraction)[1])
    train = [q for q in queries if q["query_id"] not in dev_ids]
    dev = [q for q in queries if q["query_id"] in dev_ids]
    if not train or not dev:
        side = "dev.jsonl" if not dev else "queries.jsonl"
        raise LembError(f"--dev-fraction {dev_fraction} leaves {side} empty ({len(queries)} queries in all)")
    return train, dev


def sources_help() -> str:
    """The sources `lemb convert` reads, a line each (name, splits, task kind and what it is), for --help."""
    lines = []
    for name, source in SOURCES.items():
        splits = f" (splits: {', '.join(source.splits)})" if source.splits and not source.any_split else ""
        where = f"DATA/{source.folder}" if source.folder else "DATA is the folder"
        lines.append(f"{name}{splits}: {source.about} ({where})")
    return "\n\n".join(["Sources (NAME or NAME:SPLIT; DATA is --data, a root laid out like ../shared/data):", *lines])


def _write(queries: list[dict], keys: list[dict], out: Path, fmt: str) -> dict[str, Path]:
    if fmt == "flagembedding":
        # no candidates yet: pos = the known positives (chat and lrlm list their whole history); `lemb export`
        # writes the retrieved candidates with their rewards once a run is labelled
        tasks = sorted({q["task"] for q in queries})
        return {
            t: write_flagembedding([q for q in queries if q["task"] == t], keys, {}, out / f"{t}.json") for t in tasks
        }
    paths = {"queries_path": write_jsonl(queries, out / "queries.jsonl")}
    if keys:
        paths["corpus_path"] = write_jsonl(keys, out / "corpus.jsonl")
    # the stages' own readers check what was written, so a converter slip never reaches `lemb retrieve`
    read_queries(paths["queries_path"])
    if keys:
        read_keys(paths["corpus_path"])
    return paths
