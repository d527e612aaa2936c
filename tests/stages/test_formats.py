"""The field's formats end to end: a titled corpus embeds and prompts with its titles (key templates), a BEIR
folder with graded qrels converts, and `lemb eval` writes a TREC run and graded qrels that trec_eval scores as lemb
does."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from lemb.cli import app
from lemb.errors import ConfigError, InputError, StageConflict
from lemb.pipeline.config import RetrieveConfig, load_config
from lemb.pipeline.shards import stage_files
from lemb.stages.encoder import Encoder
from lemb.stages.label import query_prompts
from lemb.stages.retrieve import retrieve

runner = CliRunner()
CORPUS = [
    {"_id": "d1", "title": "Zorbia", "text": "Its capital is Quelm, on the river Ost."},
    {"_id": "d2", "title": "Vantra", "text": "Its capital is Plok, a port."},
    {"_id": "d3", "title": "", "text": "Tobble is a board game played with stones."},
    {"_id": "d4", "title": "Ost", "text": "A river that floods every spring."},
]
QUERIES = [
    {"_id": "q1", "text": "What is the capital of Zorbia?"},
    {"_id": "q2", "text": "Which port is the capital of Vantra?"},
    {"_id": "q3", "text": "How is Tobble played?"},
]
QRELS = "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td4\t1\nq2\td2\t3\nq2\td1\t0\nq3\td3\t1\n"


@pytest.fixture(scope="module")
def beir(tmp_path_factory):
    root = tmp_path_factory.mktemp("beir")
    (root / "qrels").mkdir()
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CORPUS))
    (root / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in QUERIES))
    (root / "qrels" / "test.tsv").write_text(QRELS)
    out = root / "lemb"
    result = runner.invoke(app, ["convert", "beir", "--data", str(root), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _candidates(folder):
    return [r for p in stage_files(folder / "candidates") for r in pq.read_table(p).to_pylist()]


def test_titled_keys_are_embedded_and_prompted_with_their_title(beir, tmp_path):
    config = load_config(RetrieveConfig, run=str(tmp_path / "run"), queries=str(beir / "queries.jsonl"),
                         corpus=str(beir / "corpus.jsonl"), top_k=4, executor="local")  # fmt: skip
    retrieve(config, progress=False)
    keys = {
        r["key_id"]: r
        for p in stage_files(tmp_path / "run" / "retrieve" / "keys")
        for r in pq.read_table(p).to_pylist()
    }
    assert keys["d1"]["text"] == "Zorbia: Its capital is Quelm, on the river Ost."
    assert keys["d3"]["text"] == CORPUS[2]["text"]  # no title: the text alone
    want = Encoder("all-minilm-l6-v2").encode([keys["d1"]["text"]])[0]  # the base has no instructions: none
    assert np.allclose(keys["d1"]["embedding"], want, atol=1e-5)
    rows = [r for r in _candidates(tmp_path / "run" / "retrieve") if r["query_id"] == "q1"]
    assert {r["key_id"]: r["key_text"] for r in rows}["d1"] == keys["d1"]["text"]
    assert any("Zorbia: Its capital is Quelm" in p for p in query_prompts(rows)[1:])  # the LLM sees the title
    assert {r["key_id"]: r["key_title"] for r in rows}["d1"] == "Zorbia"

    # another template is another run: its hash differs, so the same folder refuses it without --restart
    other = load_config(RetrieveConfig, **{**config.__dict__, "cluster": config.cluster.__dict__,
                                           "key_template": "{text} ({title})"})  # fmt: skip
    with pytest.raises(StageConflict):
        retrieve(other, progress=False)
    retrieve(load_config(RetrieveConfig, **{**other.__dict__, "cluster": other.cluster.__dict__, "restart": True,
                                            "key_template": {"qa": "{text} ({title})"}}), progress=False)  # fmt: skip
    texts = {r["key_id"]: r["key_text"] for r in _candidates(tmp_path / "run" / "retrieve")}
    assert texts["d1"] == "Its capital is Quelm, on the river Ost. (Zorbia)"


@pytest.mark.parametrize(
    "template, message",
    [
        ("{title}", "must contain {text}"),
        ("{text} {url}", "unknown field {url}"),
        ("{text", "is not a template"),
        ({"poetry": "{text}"}, "key_template: unknown task 'poetry'"),
        (3, "key_template must be a template"),
    ],
)
def test_bad_key_templates_are_refused(template, message):
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("(", r"\(")):
        load_config(RetrieveConfig, queries="q.jsonl", key_template=template)


def test_eval_writes_graded_trec_files_that_trec_eval_scores_as_lemb(beir, tmp_path):
    import pytrec_eval

    run = tmp_path / "run"
    result = runner.invoke(app, ["eval", "--run", str(run), "--queries", str(beir / "queries.jsonl"),
                                 "--corpus", str(beir / "corpus.jsonl"), "--embedder", "base=all-minilm-l6-v2",
                                 "--answer-k", "0", "--executor", "local"])  # fmt: skip
    assert result.exit_code == 0, result.output
    folder = run / "eval" / "base"
    qrels: dict[str, dict[str, int]] = {}
    for qid, _, key, grade in (line.split() for line in (folder / "qrels.trec").read_text().splitlines()):
        qrels.setdefault(qid, {})[key] = int(grade)
    assert qrels == {"q1": {"d1": 2, "d4": 1}, "q2": {"d2": 3, "d1": 0}, "q3": {"d3": 1}}
    trec_run: dict[str, dict[str, float]] = {}
    for qid, q0, key, rank, _, tag in (line.split() for line in (folder / "run.trec").read_text().splitlines()):
        assert q0 == "Q0" and tag == "base|instructions=none|keys={title}:_{text}"  # what it was embedded with
        trec_run.setdefault(qid, {})[key] = -float(rank)  # the list's own order, as every lemb metric scores it
    found = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.1", "recip_rank"}).evaluate(trec_run)
    metrics = json.loads((run / "eval" / "metrics.json").read_text())["base"]
    for lemb_name, trec_name in (("ndcg@10", "ndcg_cut_10"), ("recall@1", "recall_1"), ("mrr@10", "recip_rank")):
        assert metrics[lemb_name] == pytest.approx(np.mean([m[trec_name] for m in found.values()]), abs=1e-12)
    binary = pytrec_eval.RelevanceEvaluator({q: {k: int(g > 0) for k, g in j.items()} for q, j in qrels.items()},
                                            {"ndcg_cut.10"}).evaluate(trec_run)  # fmt: skip
    assert metrics["ndcg@10"] != pytest.approx(np.mean([m["ndcg_cut_10"] for m in binary.values()]))  # graded used


def test_a_graded_id_absent_from_the_corpus_is_one_line_before_any_output(beir, tmp_path):
    queries = tmp_path / "q.jsonl"
    queries.write_text(
        json.dumps({"query_id": "q1", "task": "qa", "text": "x", "relevance": {"d1": 1, "zz": 0}}) + "\n"
    )
    result = runner.invoke(app, ["retrieve", "--run", str(tmp_path / "run"), "--queries", str(queries),
                                 "--corpus", str(beir / "corpus.jsonl"), "--executor", "local"])  # fmt: skip
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "query_id 'q1', field 'relevance': 'zz' is not in the corpus (qa keys)" in lines[0]
    assert not (tmp_path / "run").exists()


def test_eval_takes_the_key_template_of_the_run_it_evaluates(tmp_path):
    """Eval embeds the corpus as retrieve did: with the template retrieve's key shards record (never by reading
    retrieve's config.yaml), unless eval is given its own."""
    import json

    import pyarrow.parquet as pq

    from lemb.pipeline.config import EvalConfig
    from lemb.stages.key_reuse import IDENTITY, run_key_template
    from lemb.vocabulary import TASKS

    def template(**settings):
        config = load_config(EvalConfig, run=str(tmp_path), queries="q.jsonl", **settings)
        return run_key_template(config.run, config.key_template)

    def record(templates):
        meta = {IDENTITY: json.dumps({"key_template": templates})} if templates is not None else {}
        pq.write_table(pa.table({"key_id": ["k1"]}).replace_schema_metadata(meta), keys / "part-00000.parquet")

    assert template() == "{title}: {text}"  # no retrieve stage in the run: the default
    keys = tmp_path / "retrieve" / "keys"
    keys.mkdir(parents=True)
    record(dict.fromkeys(TASKS, "{text}"))
    assert template() == "{text}"  # one template for every task: that template
    record({**dict.fromkeys(TASKS, "{title}: {text}"), "qa": "{text} ({title})"})
    assert template() == {**dict.fromkeys(TASKS, "{title}: {text}"), "qa": "{text} ({title})"}
    assert template(key_template="{title} | {text}") == "{title} | {text}"  # eval's own setting wins
    record(None)  # keys of an earlier lemb, which recorded none: the default
    assert template() == "{title}: {text}"


@pytest.mark.slow
def test_label_reads_candidate_shards_written_before_grades_existed(labelled_run, tmp_path):
    import shutil

    from lemb.data import schemas
    from lemb.pipeline.config import LabelConfig
    from lemb.pipeline.shards import read_stage, write_shard
    from lemb.stages.label import label

    run = tmp_path / "run"
    shutil.copytree(labelled_run / "retrieve", run / "retrieve")
    old = pa.schema([f for f in schemas.CANDIDATE if f.name != "relevance"])
    for i, path in enumerate(stage_files(run / "retrieve" / "candidates")):
        table = pq.read_table(path)
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        write_shard(run / "retrieve" / "candidates", i, table.drop_columns(["relevance"]), old, meta, {})
    label(load_config(LabelConfig, run=str(run), executor="local", n_samples=3, per_candidate_samples=1),
          progress=False)  # fmt: skip
    got = read_stage(run / "label").sort_by([("query_id", "ascending"), ("key_id", "ascending")])
    want = read_stage(labelled_run / "label").sort_by([("query_id", "ascending"), ("key_id", "ascending")])
    assert got.column("relevance").null_count == got.num_rows
    assert got.column("reward").to_pylist() == want.column("reward").to_pylist()


def test_rescore_reads_label_shards_written_before_grades_existed(labelled_run, tmp_path):
    import shutil

    from lemb.data import schemas
    from lemb.pipeline.shards import read_stage, write_shard
    from lemb.stages.rescore import rescore

    run = tmp_path / "run"
    shutil.copytree(labelled_run / "label", run / "label")
    old = pa.schema([f for f in schemas.REWARD if f.name != "relevance"])
    for i, path in enumerate(stage_files(run / "label")):
        table = pq.read_table(path)
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        write_shard(run / "label", i, table.drop_columns(["relevance"]), old, meta, {})
    summary = rescore(run, "likelihood")
    out = read_stage(run / "rescore" / "likelihood")
    assert summary["rows"] == out.num_rows and out.column("relevance").null_count == out.num_rows
    assert out.schema.names == schemas.REWARD.names


@pytest.mark.parametrize(
    "query, field",
    [
        ({"relevance": {"d1": 1, "zz": 2}}, "relevance"),  # positive_ids left out: the reader takes them from here
        ({"positive_ids": ["d1", "zz"], "relevance": {"d1": 1, "zz": 2}}, "relevance"),  # written in both
        ({"positive_ids": ["d1", "zz"]}, "positive_ids"),
    ],
)
def test_an_absent_positive_is_reported_in_the_field_the_user_wrote(beir, tmp_path, query, field):
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"query_id": "q1", "task": "qa", "text": "x", **query}) + "\n")
    config = load_config(RetrieveConfig, run=str(tmp_path / "run"), queries=str(queries),
                         corpus=str(beir / "corpus.jsonl"), executor="local")  # fmt: skip
    with pytest.raises(InputError) as err:
        retrieve(config, progress=False)
    assert str(err.value) == f"{queries}: query_id 'q1', field '{field}': 'zz' is not in the corpus (qa keys)"
    assert not (tmp_path / "run").exists()
