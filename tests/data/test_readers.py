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


def test_graded_relevance_gives_the_positives_and_survives_parquet(tmp_path):
    row = {k: v for k, v in GOOD.items() if k != "positive_ids"} | {"relevance": {"k1": 2, "k2": 0, "k3": 1}}
    table = read_queries(_jsonl(tmp_path, [row]))
    record = table.to_pylist()[0]
    assert record["positive_ids"] == ["k1", "k3"] and dict(record["relevance"]) == {"k1": 2, "k2": 0, "k3": 1}
    pq.write_table(table, tmp_path / "q.parquet")
    assert read_queries(tmp_path / "q.parquet").to_pylist() == table.to_pylist()
    assert read_queries(_jsonl(tmp_path, [GOOD])).to_pylist()[0]["relevance"] is None


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
        ([{**GOOD, "relevance": {"k1": 1.5}}], r"field 'relevance': grade of 'k1' must be an integer >= 0, got 1.5"),
        ([{**GOOD, "relevance": {"k1": -1}}], r"field 'relevance': grade of 'k1' must be an integer >= 0, got -1"),
        ([{**GOOD, "relevance": {"k1": True}}], r"field 'relevance': grade of 'k1' must be an integer >= 0, got True"),
        (
            [{**GOOD, "relevance": ["k1"]}],
            r"line 1 \(query_id 'q1'\), field 'relevance': expected an object of key ids to grades, got list$",
        ),
        (
            [{**GOOD, "relevance": [["k1", 1]]}],
            r"field 'relevance': expected an object of key ids to grades, got list$",
        ),
        ([{**GOOD, "relevance": "k1"}], r"field 'relevance': expected an object of key ids to grades, got str$"),
        (
            [{**GOOD, "relevance": {"k1": 0, "k2": 2}}],
            r"field 'relevance': 'k1' is in positive_ids but not graded > 0",
        ),
        ([{**GOOD, "relevance": {"k1": 1, "k2": 2}}], r"field 'relevance': 'k2' is graded > 0 \(positive_ids must"),
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


def test_a_directory_non_utf8_bytes_and_an_unreadable_file_are_one_line_each(tmp_path, monkeypatch):
    (tmp_path / "corpus").mkdir()
    with pytest.raises(InputError, match=r"corpus: file: is a directory, not a JSONL or Parquet file"):
        read_keys(tmp_path / "corpus")
    good = json.dumps({"key_id": "k1", "task": "qa", "text": "fine"})
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(good.encode() + b"\n" + b'{"key_id": "k2", "task": "qa", "text": "caf\xe9"}\n')
    with pytest.raises(InputError, match=r"latin1.jsonl: line 2: not UTF-8 text \(byte 43 of the line\)"):
        read_keys(latin)
    locked = _jsonl(tmp_path, [json.loads(good)], "locked.jsonl")
    real_open = open

    def refuse(path, *args, **kwargs):  # what open() raises on a file without read permission (tests run as root)
        if str(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refuse)
    with pytest.raises(InputError, match=r"locked.jsonl: file: permission denied"):
        read_keys(locked)


def test_relevance_that_is_not_a_map_in_parquet_names_the_row_and_field(tmp_path):
    pq.write_table(pa.table({**{k: [v] for k, v in GOOD.items()}, "relevance": [["k1"]]}), tmp_path / "q.parquet")
    with pytest.raises(
        InputError, match=r"row 1 \(query_id 'q1'\), field 'relevance': expected an object .*, got list$"
    ):
        read_queries(tmp_path / "q.parquet")


def test_a_byte_order_mark_is_skipped_at_the_start_of_a_file_only(tmp_path):
    first, second = (json.dumps({"key_id": k, "task": "qa", "text": "fine"}).encode() for k in ("k1", "k2"))
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + first + b"\n" + second + b"\n")
    assert read_keys(bom).column("key_id").to_pylist() == ["k1", "k2"]
    bom.write_bytes(first + b"\n\xef\xbb\xbf" + second + b"\n")  # inside the file it is a stray character
    with pytest.raises(InputError, match=r"bom.jsonl: line 2: not valid JSON \(Unexpected UTF-8 BOM"):
        read_keys(bom)
    latin = b"\xef\xbb\xbf" + first[:-1] + b', "title": "caf\xe9"}\n'
    bom.write_bytes(latin)  # the byte is counted from the start of the line, the mark included
    at = latin.index(b"\xe9")
    with pytest.raises(InputError, match=rf"bom.jsonl: line 1: not UTF-8 text \(byte {at} of the line\)"):
        read_keys(bom)
