"""Read query and key records from JSONL or Parquet, validating every row.

Any problem raises InputError naming the file, the line or id, and the field, before a stage
writes anything.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lemb.data import schemas
from lemb.errors import InputError
from lemb.files import atomic
from lemb.vocabulary import PER_QUERY_TASKS, TASKS


def _check_record(path: Path, where: str, record: dict[str, Any], schema: pa.Schema, id_field: str) -> dict[str, Any]:
    rid = record.get(id_field)
    label = f"{where} ({id_field} {rid!r})" if isinstance(rid, str) else where
    clean: dict[str, Any] = {}
    for f in schema:
        value = record.get(f.name)
        if pa.types.is_map(f.type):
            value = _check_grades(path, label, f.name, value)
        elif pa.types.is_list(f.type):
            value = [] if value is None else value
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise InputError(path, label, f.name, "expected a list of strings")
        elif value is None:
            if f.name not in record and not f.nullable:
                raise InputError(path, label, f.name, "missing")
            if not f.nullable:
                raise InputError(path, label, f.name, "must not be null")
        elif not isinstance(value, str):
            raise InputError(path, label, f.name, f"expected a string, got {type(value).__name__}")
        clean[f.name] = value
    if not clean["text"].strip():
        raise InputError(path, label, "text", "empty text")
    if not clean[id_field].strip():
        raise InputError(path, label, id_field, "empty id")
    if clean["task"] not in TASKS:
        raise InputError(path, label, "task", f"unknown task {clean['task']!r}; known: {', '.join(TASKS)}")
    if "relevance" in clean:
        _check_relevance(path, label, clean)
    return clean


def _check_grades(path: Path, label: str, field: str, value: Any) -> dict[str, int] | None:
    """{key_id: grade}: an object (JSONL) or (key, grade) pairs (Parquet map) of ids to integer grades >= 0."""
    if value is None:
        return None
    if isinstance(value, dict):
        pairs = value.items()
    elif isinstance(value, list) and path.suffix == ".parquet" and all(isinstance(v, tuple) for v in value):
        pairs = value  # a Parquet map reads as (key, value) tuples; a JSON list (`["k1"]`) is not an object
    else:
        raise InputError(path, label, field, f"expected an object of key ids to grades, got {type(value).__name__}")
    out: dict[str, int] = {}
    for item in pairs:
        kid, grade = item if isinstance(item, (tuple, list)) and len(item) == 2 else (None, None)
        if not isinstance(kid, str) or not kid.strip():
            raise InputError(path, label, field, f"key ids must be non-empty strings, got {kid!r}")
        if isinstance(grade, bool) or not isinstance(grade, int) or grade < 0:
            raise InputError(path, label, field, f"grade of {kid!r} must be an integer >= 0, got {grade!r}")
        out[kid] = grade
    return out


def _check_relevance(path: Path, label: str, record: dict[str, Any]) -> None:
    """Positives are the ids graded > 0: taken from `relevance` when `positive_ids` is empty, else they must agree."""
    graded = record.get("relevance")
    if graded is None:
        return
    positive = [k for k, g in graded.items() if g > 0]
    if not record["positive_ids"]:
        record["positive_ids"] = positive
    elif set(record["positive_ids"]) != set(positive):
        odd = sorted(set(record["positive_ids"]) ^ set(positive))[0]
        side = "is in positive_ids but not graded > 0" if odd in record["positive_ids"] else "is graded > 0"
        raise InputError(path, label, "relevance", f"{odd!r} {side} (positive_ids must be the ids graded > 0)")


def _check_file(path: Path, kind: str) -> None:
    if not path.exists():
        raise InputError(path, "file", None, "not found")
    if path.is_dir():
        raise InputError(path, "file", None, f"is a directory, not {kind}")


def iter_jsonl(path: Path, wrap: Callable[[dict, str], dict] | None = None) -> Iterator[tuple[str, dict]]:
    """("line N", object) for each non-blank line of a JSONL file, read line by line. A missing or unreadable file,
    a line that is not UTF-8, not JSON or not a JSON object is one InputError naming the file and the line. A UTF-8
    byte-order mark is skipped at the very start of the file (utf-8-sig), and only there. `wrap(obj, where)`, when
    given, is applied to every object the line holds (a `json.loads` object hook that knows the line)."""
    _check_file(path, "a JSONL file")
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except PermissionError:
        raise InputError(path, "file", None, "permission denied") from None
    with fh:
        for n, raw in enumerate(fh, start=1):
            where = f"line {n}"
            skipped = len(codecs.BOM_UTF8) if n == 1 and raw.startswith(codecs.BOM_UTF8) else 0
            try:
                line = raw[skipped:].decode("utf-8")
            except UnicodeDecodeError as exc:
                problem = f"not UTF-8 text (byte {skipped + exc.start} of the line)"  # counted from the line start
                raise InputError(path, where, None, problem) from None
            if not line.strip():
                continue
            hook = None if wrap is None else (lambda obj, where=where: wrap(obj, where))
            try:
                record = json.loads(line, object_hook=hook)
            except json.JSONDecodeError as exc:
                raise InputError(path, where, None, f"not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise InputError(path, where, None, "expected a JSON object")
            yield where, record


def _iter_raw(path: Path, batch_rows: int):
    """(location, record) pairs, read a batch at a time (JSONL line by line, Parquet by record batch)."""
    _check_file(path, "a JSONL or Parquet file")
    if path.suffix == ".parquet":
        try:
            parquet = pq.ParquetFile(path)
            n = 0
            for batch in parquet.iter_batches(batch_size=batch_rows):
                for r in batch.to_pylist():
                    n += 1
                    yield f"row {n}", r
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(path, "file", None, f"not a readable Parquet file ({exc})") from None
        return
    yield from iter_jsonl(path)


def _iter_records(path: str | Path, schema: pa.Schema, id_field: str, batch_rows: int, check=None):
    """Validated records of `schema` as tables of up to `batch_rows` rows, with a `_where` column (line or row), so
    a file of any size is read in bounded memory. Duplicate ids are left to `shards.partition`, which sees every
    copy of an id in the same shard."""
    path = Path(path)
    out_schema = schema.append(pa.field(schemas.WHERE, pa.string(), nullable=False))
    records: list[dict[str, Any]] = []
    any_records = False
    for where, raw in _iter_raw(path, batch_rows):
        record = _check_record(path, where, raw, schema, id_field)
        if check is not None:
            check(path, record)
        records.append({**record, schemas.WHERE: where})
        if len(records) == batch_rows:
            yield pa.Table.from_pylist(records, schema=out_schema)
            any_records, records = True, []
    if records:
        yield pa.Table.from_pylist(records, schema=out_schema)
    elif not any_records:
        raise InputError(path, "file", None, "no records")


def iter_keys(path: str | Path, batch_rows: int = 10_000):
    """Validated key records, a batch at a time (see `_iter_records`)."""
    return _iter_records(path, schemas.KEY, "key_id", batch_rows)


def _check_history(path: Path, record: dict[str, Any]) -> None:
    if record["task"] in PER_QUERY_TASKS and not record["history"]:
        raise InputError(path, f"query_id {record['query_id']!r}", "history", f"task {record['task']} needs a history")


def iter_queries(path: str | Path, batch_rows: int = 10_000):
    """Validated query records, a batch at a time (see `_iter_records`)."""
    return _iter_records(path, schemas.QUERY, "query_id", batch_rows, _check_history)


def _read(path: str | Path, schema: pa.Schema, id_field: str) -> pa.Table:
    path = Path(path)
    seen: dict[str, str] = {}
    records = []
    for where, raw in _iter_raw(path, 65_536):
        rec = _check_record(path, where, raw, schema, id_field)
        if rec[id_field] in seen:
            raise InputError(path, where, id_field, f"duplicate id {rec[id_field]!r} (first at {seen[rec[id_field]]})")
        seen[rec[id_field]] = where
        records.append(rec)
    if not records:
        raise InputError(path, "file", None, "no records")
    return pa.Table.from_pylist(records, schema=schema)


def read_queries(path: str | Path) -> pa.Table:
    table = _read(path, schemas.QUERY, "query_id")
    for rec in table.select(["query_id", "task", "history"]).to_pylist():
        _check_history(Path(path), rec)
    return table


def read_keys(path: str | Path) -> pa.Table:
    return _read(path, schemas.KEY, "key_id")


def write_jsonl(records: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    with atomic(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def key_texts(queries: list[dict[str, Any]], keys: pa.Table | None) -> dict[str, str]:
    """The text of every candidate id: corpus keys, plus each chat / lrlm query's own history items."""
    texts = dict(zip(keys.column("key_id").to_pylist(), keys.column("text").to_pylist())) if keys is not None else {}
    for q in queries:
        texts.update((schemas.history_key_id(q["query_id"], i), t) for i, t in enumerate(q["history"]))
    return texts
