"""Retrieval throughput: lemb's encoder vs sentence-transformers `encode`, and faiss index kinds by corpus size.

    python bench/retrieve_throughput.py [--texts 512] [--sizes 1000 10000 100000] [--json OUT]

Encoding uses the NQ passages of ../shared/data/knowledge_qa/nq_oracle; index timings use synthetic
unit vectors (384 dimensions, as all-MiniLM-L6-v2), 1,000 queries, recall@10 against exact search.
Driver memory: peak Python allocations while the retrieve stage streams a synthetic corpus of each size
(~600-byte passages) into shard inputs, against reading it whole.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "knowledge_qa" / "nq_oracle"


def bench_encode(n_texts: int) -> dict:
    from lemb.stages.encoder import Encoder

    texts = [json.loads(line)["text"] for line in (DATA / "corpus.jsonl").read_text().splitlines()[:n_texts]]
    encoder = Encoder("all-minilm-l6-v2", max_length=256, batch_size=64)
    encoder.encode(texts[:64])  # warm-up
    start = time.perf_counter()
    ours = encoder.encode(texts)
    lemb_s = time.perf_counter() - start
    start = time.perf_counter()
    theirs = encoder.model.encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False)
    st_s = time.perf_counter() - start
    return {
        "texts": n_texts,
        "lemb_texts_per_s": n_texts / lemb_s,
        "sentence_transformers_texts_per_s": n_texts / st_s,
        "ratio": st_s / lemb_s,
        "max_abs_diff": float(np.abs(ours - theirs).max()),
    }


def bench_indexes(sizes: list[int], dim: int = 384, n_queries: int = 1000) -> list[dict]:
    from lemb.stages.index import TaskIndex

    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        # clustered vectors, closer to real embeddings than uniform noise (which no index can shortcut)
        centres = rng.standard_normal((max(n // 100, 10), dim)).astype(np.float32)
        vectors = centres[rng.integers(len(centres), size=n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        queries = vectors[rng.integers(n, size=n_queries)] + 0.1 * rng.standard_normal((n_queries, dim)).astype(
            np.float32
        )
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        ids = [str(i) for i in range(n)]
        exact = None
        for kind in ("flat", "ivf", "hnsw"):
            start = time.perf_counter()
            index = TaskIndex(dim, kind)
            for s in range(0, n, 50_000):  # filled shard by shard, as the stage does
                index.add(ids[s : s + 50_000], vectors[s : s + 50_000])
            build_s = time.perf_counter() - start
            start = time.perf_counter()
            found = [set(f) for f, _ in index.search_many(queries, 10)]
            search_s = time.perf_counter() - start
            exact = found if kind == "flat" else exact
            recall = float(np.mean([len(a & e) / 10 for a, e in zip(found, exact)]))
            rows.append(
                {
                    "n": n,
                    "kind": kind,
                    "build_s": build_s,
                    "search_ms_per_query": 1000 * search_s / n_queries,
                    "recall@10_vs_exact": recall,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_driver_memory(sizes: list[int], shards: int = 16) -> list[dict]:
    import tempfile
    import tracemalloc

    import pyarrow as pa

    from lemb.data import schemas
    from lemb.data.readers import iter_keys, read_keys
    from lemb.pipeline.shards import partition

    schema = schemas.KEY.append(pa.field(schemas.WHERE, pa.string(), nullable=False))  # as retrieve streams keys

    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            corpus = Path(tmp) / "corpus.jsonl"
            with open(corpus, "w") as fh:
                for i in range(n):
                    fh.write(json.dumps({"key_id": f"k{i}", "task": "qa", "text": f"passage {i} " + "w" * 600}) + "\n")
            peaks = {}
            for name in ("read_whole", "streamed"):
                tracemalloc.start()
                if name == "read_whole":
                    read_keys(corpus)
                else:
                    partition(iter_keys(corpus), "key_id", shards, Path(tmp) / "parts", corpus, schema)
                peaks[name] = tracemalloc.get_traced_memory()[1] / 2**20
                tracemalloc.stop()
            rows.append(
                {"n": n, "file_mb": corpus.stat().st_size / 2**20, **{f"{k}_peak_mb": v for k, v in peaks.items()}}
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    report = {"encode": bench_encode(args.texts)}
    print(json.dumps(report["encode"]), flush=True)
    report["index"] = bench_indexes(args.sizes)
    report["driver_memory"] = bench_driver_memory(args.sizes)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
