"""Streamed corpus input: per-shard input files, duplicate ids caught across batches, memory bounded by a batch."""

import json
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lemb.data import schemas
from lemb.data.readers import iter_keys, read_keys
from lemb.data.schemas import WHERE
from lemb.errors import InputError
from lemb.pipeline.shards import partition, shard_of

KEY_INPUT = schemas.KEY.append(pa.field(WHERE, pa.string(), nullable=False))


def _corpus(path, n, text_len=40, extra=()):
    with open(path, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"key_id": f"k{i}", "task": "qa", "text": f"passage {i} " + "x" * text_len}) + "\n")
        for record in extra:
            fh.write(json.dumps(record) + "\n")
    return path


def test_partition_writes_each_key_once_in_its_shard(tmp_path):
    corpus = _corpus(tmp_path / "c.jsonl", 250)
    plan = partition(iter_keys(corpus, batch_rows=32), "key_id", 4, tmp_path / "parts", corpus, KEY_INPUT)
    assert len(plan) == 4 and sum(plan.rows(i) for i in range(4)) == 250
    seen = []
    for i, path in enumerate(plan.inputs):
        table = pq.read_table(path)
        ids = table.column("key_id").to_pylist()
        assert all(shard_of(k, 4) == i for k in ids)
        assert table.column(WHERE).to_pylist()[0].startswith("line ")
        seen += ids
    assert sorted(seen) == sorted(f"k{i}" for i in range(250))
    # the same ids, read in other batches, give the same plan (what a resumed run compares)
    again = partition(iter_keys(corpus, batch_rows=7), "key_id", 4, tmp_path / "parts2", corpus, KEY_INPUT)
    assert again.describe() == plan.describe()
    assert [plan.items(i) for i in range(4)] == [plan.rows(i) for i in range(4)]
    assert sorted(k for i in range(4) for k in plan.shard_ids(i, "key_id")) == sorted(seen)


def test_duplicate_ids_in_different_batches_name_both_lines(tmp_path):
    corpus = _corpus(tmp_path / "c.jsonl", 100, extra=[{"key_id": "k3", "task": "qa", "text": "again"}])
    with pytest.raises(InputError, match=r"c.jsonl: line 101, field 'key_id': duplicate id 'k3' \(first at line 4\)"):
        partition(iter_keys(corpus, batch_rows=10), "key_id", 3, tmp_path / "parts", corpus, KEY_INPUT)


def test_bad_record_deep_in_a_streamed_file_is_named(tmp_path):
    corpus = _corpus(tmp_path / "c.jsonl", 60, extra=[{"key_id": "k999", "task": "qa"}])
    with pytest.raises(InputError, match=r"c.jsonl: line 61 \(key_id 'k999'\), field 'text': missing"):
        partition(iter_keys(corpus, batch_rows=8), "key_id", 2, tmp_path / "parts", corpus, KEY_INPUT)


@pytest.mark.slow
def test_streaming_holds_a_batch_not_the_corpus(tmp_path):
    corpus = _corpus(tmp_path / "c.jsonl", 20_000, text_len=400)  # about 8.5 MB of text

    def peak(fn):
        tracemalloc.start()
        try:
            fn()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    whole = peak(lambda: read_keys(corpus))
    streamed = peak(
        lambda: partition(iter_keys(corpus, batch_rows=500), "key_id", 8, tmp_path / "parts", corpus, KEY_INPUT)
    )
    assert streamed < whole / 4, (streamed, whole)
