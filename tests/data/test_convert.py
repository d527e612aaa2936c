"""`lemb convert`: shared data of each kind to stage-ready files, cut with positives kept; bad input is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lemb.cli import app
from lemb.data.convert import SOURCES, cut
from lemb.data.flagembedding import read_flagembedding
from lemb.data.readers import read_keys, read_queries
from lemb.data.split import hash_fraction

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
runner = CliRunner()


@pytest.fixture(scope="module")
def data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA}")
    return DATA


def convert(*args: str):
    return runner.invoke(app, ["convert", *args])


def test_every_source_folder_exists(data):
    for name, source in SOURCES.items():
        assert (data / source.folder).exists(), name


def test_six_kinds_into_one_set(data, tmp_path):
    out = tmp_path / "mix"
    sources = ["nq_oracle", "sst2", "msc", "gutenberg", "gorilla:huggingface", "trec_cast:automatic"]
    result = convert(*sources, "--data", str(data), "--out", str(out), "--limit", "3", "--max-keys", "5")
    assert result.exit_code == 0, result.stderr
    assert "18 queries (chat 3, convsearch 3, icl 3, lrlm 3, qa 3, tool 3)" in result.stdout
    queries, keys = read_queries(out / "queries.jsonl").to_pylist(), read_keys(out / "corpus.jsonl").to_pylist()
    by_task = {t: [k for k in keys if k["task"] == t] for t in ("qa", "icl", "tool", "convsearch")}
    assert all(len(part) == 5 for part in by_task.values())  # chat and lrlm candidates are the queries' own history
    key_ids = {k["key_id"] for k in keys}
    assert all(set(q["positive_ids"]) <= key_ids for q in queries if q["task"] not in ("chat", "lrlm"))
    assert any(q["query_id"].startswith("gorilla-huggingface-") for q in queries)


def test_dev_fraction_holds_out_a_stable_share_of_every_source(data, tmp_path):
    sources = ["nq_oracle", "toolalpaca"]
    result = convert(
        *sources, "--data", str(data), "--out", str(tmp_path / "a"), "--limit", "40", "--dev-fraction", "0.25"
    )
    assert result.exit_code == 0, result.stderr
    train = read_queries(tmp_path / "a" / "queries.jsonl").to_pylist()
    dev = read_queries(tmp_path / "a" / "dev.jsonl").to_pylist()
    ids = {q["query_id"] for q in train} | {q["query_id"] for q in dev}
    assert len(ids) == len(train) + len(dev) == 80  # disjoint, nothing dropped
    assert {q["query_id"] for q in dev} == {i for i in ids if hash_fraction(i) < 0.25}
    assert {q["task"] for q in dev} == {"qa", "tool"} and 10 <= len(dev) <= 30
    assert f"{len(dev)} held-out queries" in result.stdout and "dev.jsonl" in result.stdout
    # every held-out query's positives are in the one corpus both files share
    keys = {k["key_id"] for k in read_keys(tmp_path / "a" / "corpus.jsonl").to_pylist()}
    assert all(set(q["positive_ids"]) <= keys for q in dev)
    # the same id falls on the same side whatever else is converted with it
    more = convert(
        *sources, "--data", str(data), "--out", str(tmp_path / "b"), "--limit", "60", "--dev-fraction", "0.25"
    )
    assert more.exit_code == 0, more.stderr
    dev_more = {q["query_id"] for q in read_queries(tmp_path / "b" / "dev.jsonl").to_pylist()}
    assert {q["query_id"] for q in dev} <= dev_more
    assert not dev_more & {q["query_id"] for q in read_queries(tmp_path / "a" / "queries.jsonl").to_pylist()}
    # converted again without a split, the folder keeps no held-out file whose queries are now training queries
    again = convert(*sources, "--data", str(data), "--out", str(tmp_path / "a"), "--limit", "40")
    assert again.exit_code == 0 and not (tmp_path / "a" / "dev.jsonl").exists()


def test_cut_keeps_positives_first():
    queries = [{"query_id": "q", "positive_ids": ["k9"]}, {"query_id": "r", "positive_ids": ["k8"]}]
    keys = [{"key_id": f"k{i}"} for i in range(10)]
    kept_q, kept_k = cut(queries, keys, limit=1, max_keys=3)
    assert [q["query_id"] for q in kept_q] == ["q"]
    assert [k["key_id"] for k in kept_k] == ["k0", "k1", "k9"]  # source order kept, the positive never dropped


def test_flagembedding_in_and_out(data, tmp_path):
    result = convert("flagembedding", "--data", str(data / "llm_embedder_toy"), "--out", str(tmp_path / "toy"))
    assert result.exit_code == 0, result.stderr
    assert "48 queries" in result.stdout and len(read_queries(tmp_path / "toy" / "queries.jsonl")) == 48
    out = tmp_path / "fe"
    result = convert(
        "nq_oracle", "msc", "--data", str(data), "--out", str(out), "--limit", "2", "--format", "flagembedding"
    )
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["chat.json", "qa.json"]
    queries, keys, _ = read_flagembedding(out / "qa.json")
    first = json.loads((out / "qa.json").read_text().splitlines()[0])
    assert first["query_id"] == "nq-q16e1d23474" and len(first["pos"]) == 1 and first["answers"]
    assert queries[0]["positive_ids"] == [keys[0]["key_id"]]
    chat, _, _ = read_flagembedding(out / "chat.json")
    assert len(chat) == 2 and len(chat[0]["history"]) == 12


@pytest.mark.parametrize(
    "args, message",
    [
        (["poem"], "unknown source 'poem'; known: nq_oracle"),
        (["gorilla:pypi"], "source gorilla: unknown split 'pypi'; its splits: torchhub, tensorflowhub, huggingface"),
        (["nq_oracle", "--limit", "0"], "--limit must be >= 1"),
        (["nq_oracle", "nq_oracle"], "comes from both nq_oracle and nq_oracle"),
        (["nq_oracle", "--format", "csv"], "--format must be one of lemb, flagembedding"),
        (["nq_oracle", "--dev-fraction", "1"], "--dev-fraction must be a fraction in (0, 1), got 1.0"),
        (["nq_oracle", "--dev-fraction", "0.2", "--format", "flagembedding"], "use it with --format lemb"),
        (["nq_oracle", "--limit", "2", "--dev-fraction", "0.001"], "--dev-fraction 0.001 leaves dev.jsonl empty"),
    ],
)
def test_bad_arguments_one_line(data, tmp_path, args, message):
    result = convert(*args, "--data", str(data), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "source, path, content, message",
    [
        (
            "msc",
            "conv_memory/msc/session_3_test.jsonl",
            '{"dialog": []}\n',
            "line 1, field 'previous_dialogs': missing",
        ),
        (
            "nq_oracle",
            "knowledge_qa/nq_oracle/corpus.jsonl",
            '{"id": "p1", "text": "x"}\n{oops\n',
            "line 2: not valid JSON",
        ),
        ("sst2", "icl/sst2/stsa.binary.dev", "1 fine\n5 bad label\n", "line 2, field 'label'"),
        ("toolalpaca", "tool_retrieval/toolalpaca/eval_real.json", "[3]", "not in the layout of source toolalpaca"),
    ],
)
def test_bad_data_names_file_line_and_field(data, tmp_path, source, path, content, message):
    root = tmp_path / "data"
    for name in {
        "msc": [],
        "nq_oracle": ["queries.jsonl"],
        "sst2": ["stsa.binary.train"],
        "toolalpaca": ["eval_simulated.json"],
    }[source]:
        target = root / Path(path).parent / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((data / Path(path).parent / name).read_bytes())
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / path).write_text(content)
    result = convert(source, "--data", str(root), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert str(root / Path(path).parent) in lines[0]  # the file, or for a layout problem its folder
    assert not (tmp_path / "out").exists()


def _beir_folder(root: Path, qrels: str = "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td3\t0\nq2\td2\t1\n") -> Path:
    (root / "qrels").mkdir(parents=True)
    corpus = [
        {"_id": "d1", "title": "Paris", "text": "Paris is the capital of France."},
        {"_id": "d2", "title": "", "text": "Berlin is a city in Germany."},
        {"_id": 3, "text": "Rome is in Italy."},  # numeric ids (some BEIR sets) become strings
    ]
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    queries = [{"_id": "q1", "text": "capital of France"}, {"_id": "q2", "text": "a German city"},
               {"_id": "q9", "text": "not judged in this split"}]  # fmt: skip
    (root / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    (root / "qrels" / "test.tsv").write_text(qrels.replace("d3", "3"))
    return root


@pytest.mark.parametrize("header", ["query-id\tcorpus-id\tscore\n", "qid\tdocid\trel\r\n", "", "\ufeff"])
def test_beir_folder_in_with_grades(tmp_path, header):
    folder = _beir_folder(tmp_path / "beir", header + "q1\td1\t2\r\nq1\td3\t0\nq2\td2\t1\n")
    result = convert("beir", "--data", str(folder), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    queries = read_queries(tmp_path / "out" / "queries.jsonl").to_pylist()
    keys = read_keys(tmp_path / "out" / "corpus.jsonl").to_pylist()
    assert [q["query_id"] for q in queries] == ["q1", "q2"]  # the judged ones, in the queries file's order
    assert dict(queries[0]["relevance"]) == {"d1": 2, "3": 0} and queries[0]["positive_ids"] == ["d1"]
    assert dict(queries[1]["relevance"]) == {"d2": 1} and queries[1]["target"] is None
    assert [(k["key_id"], k["title"]) for k in keys] == [("d1", "Paris"), ("d2", None), ("3", None)]
    assert {q["task"] for q in queries} | {k["task"] for k in keys} == {"qa"}


@pytest.mark.parametrize(
    "qrels, message",
    [
        ("query-id\tcorpus-id\tscore\nq1\td1\n", "qrels/test.tsv: line 2: expected 3 tab-separated fields, got 2"),
        ("query-id\tcorpus-id\tscore\nq1\td1\t0.5\n", "line 2, field 'score': expected an integer grade >= 0"),
        ("query-id\tcorpus-id\tscore\nq1\td1\t-1\n", "line 2, field 'score': expected an integer grade >= 0"),
        ("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td7\t1\n", "line 3, field 'corpus-id': 'd7' is not in corpus"),
        ("query-id\tcorpus-id\tscore\nq5\td1\t1\n", "line 2, field 'query-id': 'q5' is not in queries.jsonl"),
        ("q1\td1\t0.5\n", "line 1, field 'score': expected an integer grade >= 0, got '0.5'"),  # no header
    ],
)
def test_bad_beir_lines_are_one_line_each(tmp_path, qrels, message):
    folder = _beir_folder(tmp_path / "beir", qrels)
    result = convert("beir", "--data", str(folder), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_bad_beir_records_and_a_missing_split(tmp_path):
    folder = _beir_folder(tmp_path / "beir")
    result = convert("beir:dev", "--data", str(folder), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1 and "qrels/dev.tsv: file: not found; splits here: test" in result.stderr
    with open(folder / "corpus.jsonl", "a") as fh:
        fh.write('{"title": "no id", "text": "x"}\n')
    result = convert("beir", "--data", str(folder), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1 and "corpus.jsonl: line 4, field '_id': missing" in result.stderr


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("corpus.jsonl", b'{"_id": "d1", "text": "x"}\n\n[1, 2]\n', "corpus.jsonl: line 3: expected a JSON object"),
        ("queries.jsonl", b'{"_id": "q1", "text": "x"}\n"q2"\n', "queries.jsonl: line 2: expected a JSON object"),
        (
            "corpus.jsonl",
            b'{"_id": "d1", "text": "x"}\n{"_id": "d2", "text": "caf\xe9"}\n',
            "corpus.jsonl: line 2: not UTF-8 text (byte 26 of the line)",
        ),
        (
            "queries.jsonl",
            b'{"_id": "q1", "text": "\xff"}\n',
            "queries.jsonl: line 1: not UTF-8 text (byte 23 of the line)",
        ),
        ("corpus.jsonl", None, "corpus.jsonl: file: is a directory, not a JSONL file"),
        (
            "corpus.jsonl",
            b'{"_id": "d1", "text": "x"}\n\xef\xbb\xbf{"_id": "d2", "text": "y"}\n',
            "corpus.jsonl: line 2: not valid JSON (Unexpected UTF-8 BOM",  # a mark is skipped at the start only
        ),
    ],
)
def test_bad_beir_jsonl_lines_name_the_file_and_the_line(tmp_path, name, content, message):
    folder = _beir_folder(tmp_path / "beir")
    (folder / name).unlink()
    if content is None:
        (folder / name).mkdir()
    else:
        (folder / name).write_bytes(content)
    result = convert("beir", "--data", str(folder), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception  # no traceback
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{folder / message.split(':')[0]}:" in lines[0] and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_beir_and_lemb_files_may_start_with_a_byte_order_mark(tmp_path):
    folder = _beir_folder(tmp_path / "beir")
    for name in ("corpus.jsonl", "queries.jsonl"):
        (folder / name).write_bytes(b"\xef\xbb\xbf" + (folder / name).read_bytes())
    result = convert("beir", "--data", str(folder), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    for name in ("corpus.jsonl", "queries.jsonl"):  # lemb's own reader takes what a BOM-writing editor saved
        path = tmp_path / "out" / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert [q["query_id"] for q in read_queries(tmp_path / "out" / "queries.jsonl").to_pylist()] == ["q1", "q2"]
    assert read_keys(tmp_path / "out" / "corpus.jsonl").column("key_id").to_pylist() == ["d1", "d2", "3"]
