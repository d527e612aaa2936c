import numpy as np
import pyarrow as pa
import pytest

from lemb.data import schemas
from lemb.pipeline.shards import write_shard
from lemb.stages.index import TaskIndex, indexes_from_shards


def _vectors(n, d=32, seed=0):
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_exact_index_matches_numpy_and_scores_any_key():
    v = _vectors(200)
    ids = [f"k{i}" for i in range(200)]
    index = TaskIndex.exact(ids, v)
    q = _vectors(1, seed=1)[0]
    found, scores = index.search(q, 5)
    assert found == [ids[i] for i in np.argsort(-(v @ q))[:5]]
    assert index.score(q, "k17") == pytest.approx(float(v[17] @ q), abs=1e-6)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_find_most_exact_neighbours(kind):
    v = _vectors(4000)
    ids = [f"k{i}" for i in range(4000)]
    exact, approx = TaskIndex.exact(ids, v), TaskIndex(32, kind, nprobe=16)
    approx.add(ids[:3000], v[:3000])
    approx.add(ids[3000:], v[3000:])  # filled in two shards
    queries = _vectors(50, seed=2)
    hits = [
        len(set(a[0]) & set(e[0])) / 10
        for a, e in zip(approx.search_many(queries, 10), exact.search_many(queries, 10))
    ]
    assert np.mean(hits) > 0.8
    assert approx.score(queries[0], "k3500") == pytest.approx(float(v[3500] @ queries[0]), abs=1e-5)


def test_indexes_from_shards_split_by_task(tmp_path):
    v = _vectors(30)
    for s in range(3):
        rows = range(s * 10, s * 10 + 10)
        table = pa.table(
            {
                "key_id": [f"k{i}" for i in rows],
                "task": ["qa" if i % 2 else "tool" for i in rows],
                "text": [f"key {i}" for i in rows],
                "title": [None] * 10,
                "embedding": [v[i].tolist() for i in rows],
            },
            schema=schemas.KEY_EMBEDDING,
        )
        write_shard(tmp_path, s, table, schemas.KEY_EMBEDDING, {}, {})
    indexes = indexes_from_shards(tmp_path)
    assert sorted(indexes) == ["qa", "tool"] and len(indexes["qa"].ids) == 15
    assert indexes["qa"].search(v[7], 1)[0] == ["k7"]


def test_equal_scores_rank_by_key_id_also_at_the_depth_cut():
    # five copies of one vector (duplicate texts) added in reverse id order, and one other key
    v = _vectors(2)
    ids = ["e", "d", "c", "b", "a", "z"]
    index = TaskIndex.exact(ids, np.vstack([np.repeat(v[:1], 5, axis=0), v[1:]]))
    found, scores = index.search(v[0], 3)
    assert found == ["a", "b", "c"] and scores[0] == scores[2]
    assert index.search(v[0], 6)[0] == ["a", "b", "c", "d", "e", "z"]
