"""Every record that crosses a stage boundary, with its pyarrow schema.

Parquet is always written with one of these schemas, never inferred from rows.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

GRADES = pa.map_(pa.string(), pa.int32())

QUERY = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("target", pa.string()),  # desired output O; null where the task has none
        pa.field("positive_ids", pa.list_(pa.string())),  # known relevant key ids; may be empty
        pa.field("history", pa.list_(pa.string())),  # earlier turns / chunks for chat, lrlm, convsearch
        pa.field("relevance", GRADES),  # graded judgments {key_id: grade >= 0}; positives are the ids graded > 0
    ]
)

KEY = pa.schema(
    [
        pa.field("key_id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("title", pa.string()),
    ]
)

# key shards keep the text (as the key template rendered it: what was embedded) and title beside the vector, so
# candidates take their texts from retrieve's own output
KEY_EMBEDDING = pa.schema(
    [
        pa.field("key_id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("embedding", pa.list_(pa.float32()), nullable=False),
    ]
)

# What every later stage needs of a query and its candidate, so that a worker reads its own shard and nothing else.
_QUERY_AND_KEY = [
    pa.field("query_text", pa.string(), nullable=False),
    pa.field("target", pa.string()),
    pa.field("positive_ids", pa.list_(pa.string())),  # the query's known positives (all of them, on every row)
    pa.field("relevance", GRADES),  # the query's graded judgments, when its input has them
    pa.field("key_text", pa.string(), nullable=False),  # the corpus key's text, or the history item's
    pa.field("key_title", pa.string()),
]

# Candidate shards are partitioned by query id: every candidate of a query is in its query's shard.
CANDIDATE = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("key_id", pa.string(), nullable=False),
        pa.field("retrieval_rank", pa.int32(), nullable=False),  # 1 = best
        pa.field("retrieval_score", pa.float32(), nullable=False),  # inner product of normalised embeddings
        *_QUERY_AND_KEY,
    ]
)

# log-probabilities are float64 so a reward recomputed from the shard equals the one labelled
REWARD = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("key_id", pa.string(), nullable=False),
        pa.field("retrieval_rank", pa.int32(), nullable=False),
        pa.field("target_logprob", pa.float64()),  # score of O under this candidate's prompt
        pa.field("target_tokens", pa.int32()),
        pa.field("samples", pa.list_(pa.string())),  # the distinct pooled samples (the query's pool)
        pa.field("sample_logprobs", pa.list_(pa.float64())),  # score of each distinct pooled sample
        pa.field("sample_counts", pa.list_(pa.int32())),  # multiplicity of each distinct sample
        pa.field("baseline_target_logprob", pa.float64()),  # score of O without any candidate
        pa.field("baseline_sample_logprobs", pa.list_(pa.float64())),
        pa.field("rank", pa.float64()),  # 1 + #above + 0.5 * #tied
        pa.field("pool_size", pa.int32(), nullable=False),  # N: competitors after dropping copies of O; 0 = no signal
        pa.field("reward", pa.float64()),  # (N + 1 - rank) / N; null when the query carries no signal
        pa.field("baseline_rank", pa.float64()),
        pa.field("skip_reason", pa.string()),  # why the query carries no signal (null when it does)
        *_QUERY_AND_KEY,  # copied from the candidate row: training reads the label shards and nothing else
    ]
)
CARRIED = tuple(f.name for f in _QUERY_AND_KEY)
# columns added after shards were first written: a shard without one reads as all-null (`with_later_columns`)
LATER_COLUMNS = {"relevance": GRADES}


def with_later_columns(table: pa.Table) -> pa.Table:
    """`table` with a null column for each of LATER_COLUMNS it lacks (a shard written by an earlier version)."""
    for name, kind in LATER_COLUMNS.items():
        if name not in table.schema.names:
            table = table.append_column(pa.field(name, kind), pa.nulls(table.num_rows, kind))
    return table


WHERE = "_where"  # column of streamed input batches: each record's line or row in its file, for error messages


def history_key_id(query_id: str, index: int) -> str:
    """Key id of the `index`-th history item of a query (chat / lrlm candidates are the query's own history)."""
    return f"{query_id}#h{index}"


def grades(value: Any) -> dict[str, int]:
    """A `relevance` value as read from Arrow (a list of (key_id, grade) pairs, or None) as a dict."""
    return dict(value) if value else {}


def by_query(rows: list[dict]) -> list[list[dict]]:
    """Rows grouped by query: queries in (task, query_id) order, each query's rows by retrieval rank."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["query_id"], []).append(r)
    ordered = sorted(groups.values(), key=lambda g: (g[0]["task"], g[0]["query_id"]))
    return [sorted(g, key=lambda r: r["retrieval_rank"]) for g in ordered]
