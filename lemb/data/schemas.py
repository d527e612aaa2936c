"""Every record that crosses a stage boundary, with its pyarrow schema.

Parquet is always written with one of these schemas, never inferred from rows.
"""

from __future__ import annotations

import pyarrow as pa

# Task kinds of the LLM-Embedder paper. `chat` and `lrlm` candidates belong to one query (its own history).
TASKS = ("qa", "icl", "chat", "lrlm", "tool", "convsearch")
PER_QUERY_TASKS = frozenset({"chat", "lrlm"})

QUERY = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("target", pa.string()),  # desired output O; null where the task has none
        pa.field("positive_ids", pa.list_(pa.string())),  # known relevant key ids; may be empty
        pa.field("history", pa.list_(pa.string())),  # earlier turns / chunks for chat, lrlm, convsearch
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

KEY_EMBEDDING = pa.schema(
    [
        pa.field("key_id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("embedding", pa.list_(pa.float32()), nullable=False),
    ]
)

CANDIDATE = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("key_id", pa.string(), nullable=False),
        pa.field("retrieval_rank", pa.int32(), nullable=False),  # 1 = best
        pa.field("retrieval_score", pa.float32(), nullable=False),  # inner product of normalised embeddings
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
        pa.field("n_samples", pa.int32(), nullable=False),  # pool size N after dropping; 0 = no signal
        pa.field("reward", pa.float64()),  # (N + 1 - rank) / N; null when the query carries no signal
        pa.field("baseline_rank", pa.float64()),
        pa.field("skip_reason", pa.string()),  # why the query carries no signal (null when it does)
    ]
)


WHERE = "_where"  # column of streamed input batches: each record's line or row in its file, for error messages


def history_key_id(query_id: str, index: int) -> str:
    """Key id of the `index`-th history item of a query (chat / lrlm candidates are the query's own history)."""
    return f"{query_id}#h{index}"
