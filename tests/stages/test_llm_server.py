"""The server backend against a real vLLM OpenAI-compatible server of the default LLM (started by the session's
`llm_server` fixture): the same log-probabilities as the transformers backend, reproducible shards, faults retried
or reported in one line."""

import json
import shutil
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from lemb.cli import app
from lemb.pipeline.config import LLMServer, load_config
from tests.conftest import CORPUS, QUERIES, write_jsonl
from tests.llm_server import Proxy, free_port

runner = CliRunner()
slow = pytest.mark.slow


def test_settings_name_the_missing_half():
    from lemb.errors import ConfigError
    from lemb.pipeline.config import LabelConfig

    with pytest.raises(ConfigError, match="backend 'server' needs llm_url"):
        load_config(LabelConfig, backend="server")
    with pytest.raises(ConfigError, match="add --backend server"):
        load_config(LabelConfig, backend="transformers", llm_url="http://h:8000/v1")
    with pytest.raises(ConfigError, match="must start with http"):
        load_config(LabelConfig, backend="server", llm_url="h:8000/v1")
    config = load_config(LabelConfig, backend="server", llm_url="http://a:1/v1/, http://b:2/v1")
    assert config.server.urls == ["http://a:1/v1", "http://b:2/v1"]
    assert LLMServer(llm_url=["http://a:1/v1"]).urls == ["http://a:1/v1"]


def test_urls_lose_their_credentials_and_errors_their_envelope():
    from lemb.stages.llm.server_client import error_message, public_url

    assert public_url("https://user:secret@gpu1:8000/v1") == "https://gpu1:8000/v1"
    assert error_message('{"error": {"message": "too long", "code": 400}}') == "too long"
    assert error_message('{"object": "error", "message": "no such model"}') == "no such model"
    assert error_message("Internal Server Error") == "Internal Server Error"


def test_a_failing_server_is_set_aside_and_the_other_takes_its_requests():
    from lemb.stages.llm.server_client import SET_ASIDE_AFTER, _Servers

    servers = _Servers(["http://a/v1", "http://b/v1"])
    servers.in_flight["http://b/v1"] = 5
    assert servers.pick() == "http://a/v1"  # fewest in flight
    for _ in range(SET_ASIDE_AFTER):
        servers.failed("http://a/v1", "refused")
    assert servers.pick() == "http://b/v1"  # a rests, though b is busier
    servers.aside_until["http://a/v1"] = 0.0
    servers.succeeded("http://a/v1")
    assert servers.pick() == "http://a/v1" and servers.failures["http://a/v1"] == 0


def test_the_served_model_is_hashed_and_the_servers_are_not():
    from lemb.pipeline.config import LabelConfig, config_hash
    from lemb.stages.label import LabelStage
    from lemb.stages.llm.server import ServedModel

    def digest(url, served):
        config = load_config(LabelConfig, backend="server", llm_url=url, max_concurrency=8)
        return config_hash(config, LabelStage(config, served).fingerprint())

    llama = ServedModel("llama", "/models/llama-70b", "/models/llama-70b", "abc")
    other = ServedModel("llama", "/models/llama-70b-v2", "/models/llama-70b-v2", "def")
    assert digest("http://a:8000/v1", llama) == digest("http://b:9000/v1,http://c:9000/v1", llama)
    assert digest("http://a:8000/v1", llama) != digest("http://a:8000/v1", other)
    assert not LabelStage(load_config(LabelConfig, backend="server", llm_url="http://a/v1"), llama).holds_model


# -- against the real server ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_run(tiny_data, tmp_path_factory):
    """Candidates of the tiny data (retrieve only), copied into each test's own run folder."""
    from lemb.pipeline.config import RetrieveConfig
    from lemb.stages.retrieve import retrieve

    run = tmp_path_factory.mktemp("server-run")
    config = load_config(RetrieveConfig, run=str(run), executor="local", queries=str(tiny_data["queries"]),
                         corpus=str(tiny_data["corpus"]), top_k=2, shards=2)  # fmt: skip
    retrieve(config, progress=False)
    return run


def fresh_run(server_run, tmp_path, name="run"):
    run = tmp_path / name
    shutil.copytree(server_run / "retrieve", run / "retrieve")
    return run


def label(run, url, *extra):
    args = ["label", "--run", str(run), "--backend", "server", "--llm-url", url, "--executor", "local",
            "--n-samples", "3", "--per-candidate-samples", "1", "--quiet", *extra]  # fmt: skip
    return runner.invoke(app, args)


def rewards(run):
    table = pa.concat_tables(pq.read_table(p) for p in sorted((run / "label").glob("part-*.parquet")))
    return table.sort_by([("query_id", "ascending"), ("key_id", "ascending")]).to_pylist()


@pytest.fixture(scope="module")
def reference(llm_server, server_run, tmp_path_factory):
    """One uninterrupted server-labelled run: the shards every other run must equal."""
    run = fresh_run(server_run, tmp_path_factory.mktemp("reference"))
    result = label(run, llm_server.url)
    assert result.exit_code == 0, result.output
    return run


@pytest.mark.slow
@slow
def test_scores_equal_the_transformers_backend_across_a_merging_boundary(llm_server):
    from lemb.stages.llm import load_llm
    from lemb.stages.llm.hf import TransformersBackend

    server = load_llm("server", server=LLMServer(llm_url=llm_server.url))
    local = TransformersBackend()
    prompt = "Answer in one word. Which planet is known as the red planet?"
    rendered = server.render(prompt)
    # a continuation whose first token merges with the prompt's end when the two are tokenized as one string
    merging = "\n\nMars"
    joint = server.tokenizer(rendered + merging, add_special_tokens=False)["input_ids"]
    apart = server.prompts.encode(prompt) + server.prompts.continuations([merging])[0]
    assert joint != apart, "the example must merge across the boundary"
    items = [(prompt, ["Mars", " Mars", merging, "The red planet is Mars, the fourth from the sun."]),
             ("Say hello.", ["Hello!", "hi"])]  # fmt: skip
    for reduce in ("sum", "mean"):
        got, want = server.score_many(items, reduce=reduce), local.score_many(items, reduce=reduce)
        for row_got, row_want in zip(got, want):
            for (a, n), (b, m) in zip(row_got, row_want):
                assert n == m and abs(a - b) < 1e-3, (reduce, a, b)
    # the same seeds give the same samples, and greedy answers equal the transformers backend's
    first = server.sample_many([prompt, "Say hello."], [4, 2], 12, 1.0, [5, 6])
    assert server.sample_many(["Say hello.", prompt], [2, 4], 12, 1.0, [6, 5]) == first[::-1]
    assert server.greedy([prompt], 12) == local.greedy([prompt], 12)
    server.close()


@pytest.mark.slow
@slow
def test_a_shard_labelled_twice_is_identical_and_names_the_served_model(llm_server, server_run, reference, tmp_path):
    run = fresh_run(server_run, tmp_path)
    result = label(run, llm_server.url)
    assert result.exit_code == 0, result.output
    assert rewards(run) == rewards(reference)
    meta = pq.read_schema(next((run / "label").glob("part-*.parquet"))).metadata
    served = json.loads(meta[b"lemb.llm_server"])
    assert served["served_model"] == llm_server.model and served["urls"] == [llm_server.url]
    assert meta[b"lemb.backend"] == b"server"
    # labelling again from another URL of the same model is the same run: nothing to redo
    with Proxy(llm_server.url) as proxy:
        result = label(run, proxy.url)
        assert result.exit_code == 0, result.output
        assert proxy.requests <= 2  # its model list and tokenizer check only


@pytest.mark.slow
@slow
def test_many_model_free_ray_workers_share_one_server(llm_server, server_run, reference, tmp_path):
    """Workers of the server backend take no CPU in Ray: more of them than this machine has CPUs all start."""
    run = fresh_run(server_run, tmp_path)
    args = ["label", "--run", str(run), "--backend", "server", "--llm-url", llm_server.url, "--executor", "ray",
            "--workers", "4", "--n-samples", "3", "--per-candidate-samples", "1", "--quiet"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert rewards(run) == rewards(reference)


@pytest.mark.slow
@slow
def test_injected_500s_are_retried_and_change_nothing(llm_server, server_run, reference, tmp_path):
    run = fresh_run(server_run, tmp_path)
    with Proxy(llm_server.url, fault=lambda n, path: 500 if path.endswith("/completions") and n % 3 == 0 else None)\
            as proxy:  # fmt: skip
        result = label(run, proxy.url)
    assert result.exit_code == 0, result.output
    assert proxy.injected > 5
    assert rewards(run) == rewards(reference)


@pytest.mark.slow
@slow
def test_a_server_killed_mid_shard_and_restarted_gives_the_uninterrupted_shards(
    llm_server, server_run, reference, tmp_path
):
    run = fresh_run(server_run, tmp_path)
    restarted = threading.Event()

    def kill_then_restart(n, path):
        if n == 12:  # mid-way through the first shard's scoring requests
            llm_server.kill()
            threading.Thread(target=lambda: (llm_server.start(), restarted.set()), daemon=True).start()
        return None

    with Proxy(llm_server.url, fault=kill_then_restart) as proxy:
        result = label(run, proxy.url, "--request-retries", "16")
    restarted.wait(600)
    assert proxy.requests > 12 and restarted.is_set()
    assert result.exit_code == 0, result.output
    assert rewards(run) == rewards(reference)


@pytest.mark.slow
@slow
def test_the_api_key_comes_from_its_variable_and_is_never_written(llm_server, server_run, tmp_path, monkeypatch):
    run = fresh_run(server_run, tmp_path)
    with Proxy(llm_server.url, require_key="s3cret-key") as proxy:
        monkeypatch.delenv("LEMB_TEST_KEY", raising=False)
        result = label(run, proxy.url, "--api-key-env", "LEMB_TEST_KEY")
        assert result.exit_code == 1 and result.stderr.strip().count("\n") == 0
        assert "HTTP 401" in result.stderr and "$LEMB_TEST_KEY" in result.stderr
        monkeypatch.setenv("LEMB_TEST_KEY", "s3cret-key")
        result = label(run, proxy.url, "--api-key-env", "LEMB_TEST_KEY")
        assert result.exit_code == 0, result.output
    written = b"".join(p.read_bytes() for p in (run / "label").rglob("*") if p.is_file())
    assert b"s3cret-key" not in written and b"LEMB_TEST_KEY" in (run / "label" / "config.yaml").read_bytes()


@slow
def test_a_wrong_url_or_model_is_one_line_before_any_work(llm_server, server_run, tmp_path):
    run = fresh_run(server_run, tmp_path)
    result = label(run, f"http://127.0.0.1:{free_port()}/v1")
    assert result.exit_code == 1 and result.stderr.strip().count("\n") == 0
    assert "cannot reach the LLM server" in result.stderr
    result = label(run, llm_server.url, "--llm", "meta-llama/Llama-3.1-70B-Instruct")
    assert result.exit_code == 1 and result.stderr.strip().count("\n") == 0
    assert "not 'meta-llama/Llama-3.1-70B-Instruct'" in result.stderr and "--llm" in result.stderr
    result = label(run, llm_server.url.removesuffix("/v1"))
    assert result.exit_code == 1 and "ends in /v1" in result.stderr
    assert not (run / "label").exists()


@slow
def test_a_prompt_over_the_served_context_fails_its_shard_naming_the_query(llm_server, tmp_path):
    from lemb.pipeline.config import RetrieveConfig
    from lemb.stages.retrieve import retrieve

    long_key = {"key_id": "k-long", "task": "qa", "title": None,
                "text": "Zorbia " + " ".join(f"fact{i} is recorded." for i in range(1200))}  # fmt: skip
    queries = write_jsonl(tmp_path / "q.jsonl", [QUERIES[0]])
    corpus = write_jsonl(tmp_path / "c.jsonl", [*CORPUS, long_key])
    run = tmp_path / "run"
    config = load_config(RetrieveConfig, run=str(run), executor="local", queries=str(queries), corpus=str(corpus),
                         top_k=5, shards=1)  # fmt: skip
    retrieve(config, progress=False)
    result = label(run, llm_server.url)
    assert result.exit_code == 1 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "query_id 'q1'" in result.stderr and "HTTP 400" in result.stderr and "context" in result.stderr


@pytest.mark.slow
@slow
def test_dry_run_calibrates_against_the_server(llm_server, server_run, tmp_path):
    run = fresh_run(server_run, tmp_path)
    result = runner.invoke(app, ["label", "--run", str(run), "--backend", "server", "--llm-url", llm_server.url,
                                 "--dry-run", "--calibrate", "2"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "server backend" in result.stdout and "estimated wall time" in result.stdout
    assert "requests in flight" in result.stdout
    assert not (run / "label").exists()


@pytest.mark.slow
@slow
def test_eval_downstream_metrics_through_the_server_equal_the_transformers_backend(llm_server, tiny_data, tmp_path):
    from lemb.pipeline.config import EvalConfig
    from lemb.trainer.evaluate import evaluate_run
    from lemb.vocabulary import DEFAULT_EMBEDDER

    got = {}
    for backend, extra in (("transformers", {}), ("server", {"llm_url": llm_server.url})):
        cfg = load_config(EvalConfig, run=str(tmp_path / backend), queries=str(tiny_data["queries"]),
                          corpus=str(tiny_data["corpus"]), executor="local", backend=backend, **extra)  # fmt: skip
        got[backend] = evaluate_run(cfg, {"base": DEFAULT_EMBEDDER}, progress=False)["base"]
    # greedy answers (qa) and the perplexity of the desired output (chat) through either backend
    assert "answer_em" in got["server"]["qa"] and "perplexity" in got["server"]["chat"]
    for task in ("qa", "chat"):
        assert got["server"][task] == pytest.approx(got["transformers"][task], rel=1e-4), task
