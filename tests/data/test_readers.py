import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lemb.data.readers import read_keys, read_queries
from lemb.errors import InputError

GOOD = {
    "query_id": "q1",
    "task": "qa",
    "text": "What is the capital of Zorbia?",
    "target": "Quelm",
    "positive_ids": ["k1"],
}


def _jsonl(tmp_path, rows, name="q.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_reads_jsonl_and_parquet_with_defaults(tmp_path):
    table = read_queries(_jsonl(tmp_path, [GOOD]))
    assert table.to_pylist()[0]["history"] == []
    pq.write_table(table, tmp_path / "q.parquet")
    assert read_queries(tmp_path / "q.parquet").to_pylist() == table.to_pylist()


@pytest.mark.parametrize(
    "rows, pattern",
    [
        ([GOOD, "{not json"], r"q.jsonl: line 2: not valid JSON"),
        ([{k: v for k, v in GOOD.items() if k != "text"}], r"line 1 \(query_id 'q1'\), field 'text': missing"),
        ([{**GOOD, "text": "   "}], r"query_id 'q1'\), field 'text': empty text"),
        ([{**GOOD, "task": "poetry"}], r"field 'task': unknown task 'poetry'"),
        ([GOOD, GOOD], r"line 2, field 'query_id': duplicate id 'q1' \(first at line 1\)"),
        ([{**GOOD, "text": 5}], r"field 'text': expected a string, got int"),
        ([{**GOOD, "positive_ids": "k1"}], r"field 'positive_ids': expected a list of strings"),
        ([{**GOOD, "task": "chat"}], r"query_id 'q1', field 'history': task chat needs a history"),
        (["[1, 2]"], r"line 1: expected a JSON object"),
    ],
)
def test_bad_query_rows_name_file_row_and_field(tmp_path, rows, pattern):
    with pytest.raises(InputError, match=pattern) as err:
        read_queries(_jsonl(tmp_path, rows))
    assert "\n" not in str(err.value)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(InputError, match=r"nope.jsonl: file: not found"):
        read_keys(tmp_path / "nope.jsonl")
    bad = tmp_path / "k.parquet"
    bad.write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        read_keys(bad)
    with pytest.raises(InputError, match="no records"):
        read_keys(_jsonl(tmp_path, [], "empty.jsonl"))


def test_parquet_missing_column(tmp_path):
    pq.write_table(pa.table({"key_id": ["k1"], "task": ["qa"]}), tmp_path / "k.parquet")
    with pytest.raises(InputError, match=r"row 1 \(key_id 'k1'\), field 'text': missing"):
        read_keys(tmp_path / "k.parquet")
