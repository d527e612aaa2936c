"""faiss indexes over one task's key embeddings: exact inner product, IVF or HNSW.

Vectors are L2-normalised, so inner product is cosine similarity. Indexes are filled shard by
shard from `retrieve/keys/`, so peak memory is the index plus one shard, not two copies of the corpus.

Ties: keys with equal scores are ranked by key id, ascending (duplicate texts in a corpus make such ties real).
The index is asked for `TIE_MARGIN` more keys than wanted, so the cut at depth k follows the same rule unless more
than that many keys tie there. This order is the one the LLM's prompts use and the one every metric scores.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from lemb.errors import MissingDependency
from lemb.vocabulary import INDEX_KINDS

TIE_MARGIN = 8


def faiss_module() -> Any:
    try:
        import faiss
    except ImportError:
        raise MissingDependency("faiss", "pip install faiss-cpu") from None
    return faiss


class TaskIndex:
    """Search one task's keys; `kind` flat (exact, default), ivf (nprobe lists of sqrt(n)) or hnsw."""

    def __init__(self, dim: int, kind: str = "flat", nprobe: int = 16, hnsw_m: int = 32, ef_search: int = 128) -> None:
        if kind not in INDEX_KINDS:
            raise ValueError(f"unknown index kind {kind!r}; known: {', '.join(INDEX_KINDS)}")
        self.faiss = faiss_module()
        self.dim, self.kind, self.nprobe = dim, kind, nprobe
        self.ids: list[str] = []
        self.position: dict[str, int] = {}
        if kind == "hnsw":
            self.index = self.faiss.IndexHNSWFlat(dim, hnsw_m, self.faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efSearch = ef_search
        elif kind == "flat":
            self.index = self.faiss.IndexFlatIP(dim)
        else:
            self.index = None  # IVF is built on the first vectors it sees (its training sample)

    @classmethod
    def exact(cls, ids: list[str], vectors: np.ndarray) -> TaskIndex:
        index = cls(vectors.shape[1])
        index.add(ids, vectors)
        return index

    def add(self, ids: list[str], vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if self.index is None:
            # sqrt(n) lists with at least 39 training points each (faiss's own lower bound)
            nlist = max(1, min(int(math.sqrt(len(vectors))), len(vectors) // 39))
            self._quantizer = self.faiss.IndexFlatIP(self.dim)  # must outlive the IVF index that points to it
            self.index = self.faiss.IndexIVFFlat(self._quantizer, self.dim, nlist, self.faiss.METRIC_INNER_PRODUCT)
            self.index.train(vectors)
            self.index.nprobe = min(self.nprobe, nlist)
            self.index.make_direct_map()
        self.position.update((k, len(self.ids) + i) for i, k in enumerate(ids))
        self.ids += ids
        self.index.add(vectors)

    def search_many(self, q: np.ndarray, k: int) -> list[tuple[list[str], list[float]]]:
        wide = min(k + TIE_MARGIN, len(self.ids))
        scores, found = self.index.search(np.ascontiguousarray(q, dtype=np.float32), wide)
        out = []
        for row_scores, row in zip(scores, found):
            hits = sorted(((-float(s), self.ids[i]) for s, i in zip(row_scores, row) if i >= 0))[:k]
            out.append(([kid for _, kid in hits], [-s for s, _ in hits]))
        return out

    def search(self, q: np.ndarray, k: int) -> tuple[list[str], list[float]]:
        return self.search_many(q[None, :], k)[0]

    def score(self, q: np.ndarray, key_id: str) -> float:
        return float(self.index.reconstruct(self.position[key_id]) @ q)


def indexes_from_shards(keys_dir: Path, kind: str = "flat", **options: Any) -> dict[str, TaskIndex]:
    """One index per task, filled from the key-embedding shards one record batch at a time."""
    indexes: dict[str, TaskIndex] = {}
    for path in sorted(keys_dir.glob("part-*.parquet")):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=8192, columns=["key_id", "task", "embedding"]):
            data = batch.to_pydict()
            if not data["key_id"]:
                continue
            vectors = np.asarray(data["embedding"], dtype=np.float32)
            tasks = np.asarray(data["task"])
            for task in sorted(set(data["task"])):
                rows = np.flatnonzero(tasks == task)
                if task not in indexes:
                    indexes[task] = TaskIndex(vectors.shape[1], kind, **options)
                indexes[task].add([data["key_id"][i] for i in rows], vectors[rows])
    return indexes
