"""The model card written with every trained or exported model, and `lemb push`'s checks up to the upload."""

import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from collections import defaultdict

import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from lemb.cli import app
from lemb.errors import LembError
from lemb.pipeline.config import EvalConfig, TrainConfig, load_config
from lemb.pipeline.shards import stage_files
from lemb.trainer.card import CITATION, EXAMPLE, read_facts, write_card
from lemb.trainer.evaluate import evaluate_run
from lemb.trainer.export import export_flagembedding
from lemb.trainer.push import check_repo, load_finished, model_to_push
from lemb.trainer.recipe import train
from lemb.vocabulary import TASKS

SETTINGS = {"steps": 4, "batch_size": 2, "group_size": 2, "tau": 0.07, "alpha": 0.2, "loss": {"tool": "kl"}}


@pytest.fixture(scope="module")
def trained(labelled_run, tmp_path_factory):
    """A run of its own (the labelled fixture's retrieve and label stages), trained with non-default settings."""
    run = tmp_path_factory.mktemp("card") / "run"
    for stage in ("retrieve", "label"):
        shutil.copytree(labelled_run / stage, run / stage)
    return run, train(load_config(TrainConfig, run=str(run), **SETTINGS), progress=False)


def _card(path):
    from huggingface_hub import ModelCard

    return ModelCard.load(path / "README.md")


def _expected_groups(run, group_size):
    """Per task, from the label shards themselves: queries with a pool, and their candidates cut to the group."""
    rows = defaultdict(list)
    for f in stage_files(run / "label"):
        for r in pq.read_table(f, columns=["query_id", "task", "pool_size"]).to_pylist():
            rows[(r["task"], r["query_id"])].append(r["pool_size"])
    out = {}
    for (task, _), pools in rows.items():
        if pools[0]:
            counts = out.setdefault(task, {"queries": 0, "candidates": 0})
            counts["queries"] += 1
            counts["candidates"] += min(group_size, len(pools))
    return out


@pytest.mark.slow
def test_card_names_the_llm_reward_loss_and_counts_of_the_run(trained):
    from lemb.stages.models import resolve_model_path

    run, path = trained
    card = _card(path)
    # the metadata the Hub reads
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert {"sentence-transformers", "lemb"} <= set(card.data.tags)
    assert card.data.pipeline_tag == "sentence-similarity" and card.data.library_name == "sentence-transformers"
    assert card.data.language == ["en"] and card.data.license == "apache-2.0"  # the base card's
    # the run's facts, against the label stage's own record and the train config
    facts = card.data["lemb"]
    manifest = json.loads((run / "label" / "_manifest.json").read_text())["config"]
    meta = pq.read_schema(stage_files(run / "label")[0]).metadata
    assert facts["labels"]["llm"]["name"] == manifest["llm"] == meta[b"lemb.llm"].decode() == "smollm2-135m-instruct"
    assert facts["labels"]["llm"]["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert facts["labels"]["n_samples"] == manifest["n_samples"] == 3
    assert facts["labels"]["per_candidate_samples"] == manifest["per_candidate_samples"] == 1
    assert facts["labels"]["tie_tolerance"] == manifest["tie_tolerance"]
    assert facts["labels"]["backend"] == manifest["backend"]
    assert (facts["reward"], facts["tau"], facts["alpha"], facts["group_size"]) == ("rank", 0.07, 0.2, 2)
    assert (facts["steps"], facts["batch_size"], facts["precision"]) == (4, 2, "fp32")
    expected = _expected_groups(run, group_size=2)
    assert {t: {k: n[k] for k in ("queries", "candidates")} for t, n in facts["tasks"].items()} == expected
    assert {t: n["loss"] for t, n in facts["tasks"].items()} == {"qa": "graded", "chat": "graded", "tool": "kl"}
    stats = json.loads((run / "train" / "_stats.json").read_text())
    assert {t: n["queries"] for t, n in facts["tasks"].items()} == stats["groups_per_task"]
    # ... and in the text a reader sees
    text = card.text
    assert "# all-MiniLM-L6-v2 trained by lemb on the rewards of SmolLM2-135M-Instruct" in text
    assert "[HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct)" in text
    assert "**Reward:** `rank`, rank-aware" in text
    assert "**tau:** 0.07, **alpha:** 0.2, **group size:** 2" in text
    assert f"| tool | {expected['tool']['queries']} | {expected['tool']['candidates']} | kl | yes |" in text
    assert f"| chat | {expected['chat']['queries']} | {expected['chat']['candidates']} | graded | no |" in text
    assert "3 without a candidate (`n_samples`) and 1 from each candidate's prompt" in text
    assert "- lemb: 0.1.0" in text and CITATION in text and 'doi = "10.18653/v1/2024.acl-long.194"' in text
    assert "## Evaluation" not in text  # no eval yet
    # not the base model's card, which sentence-transformers would have copied
    base = os.path.join(resolve_model_path("all-minilm-l6-v2", "embedder"), "README.md")
    assert (path / "README.md").read_text() != open(base).read()


@pytest.mark.slow
def test_the_card_shows_how_to_call_the_model_and_sentence_transformers_loads_it(trained):
    from sentence_transformers import SentenceTransformer

    _, path = trained
    model = SentenceTransformer(str(path), device="cpu")
    text = _card(path).text
    for task in TASKS:  # every prompt the model saved, by its name, with its instruction
        query, key = model.prompts[f"{task}_query"], model.prompts[f"{task}_key"]
        shown = (f'`"{query}"`' if query else "(none)", f'`"{key}"`' if key else "(none)")
        assert f"| `{task}_query` | {shown[0]} | `{task}_key` | {shown[1]} |" in text
    assert 'prompt_name="qa_query"' in text and 'prompt_name="qa_key"' in text
    # the snippet's printed similarities are what the saved model gives
    printed = re.search(r"# tensor\(\[\[([-\d., ]+)\]\]\)", text).group(1)
    q = model.encode(EXAMPLE["query"], prompt_name="qa_query", convert_to_tensor=True)
    k = model.encode(EXAMPLE["keys"], prompt_name="qa_key", convert_to_tensor=True)
    torch.testing.assert_close(torch.tensor([float(x) for x in printed.split(",")]), model.similarity(q, k)[0],
                               atol=1e-4, rtol=0)  # fmt: skip


@pytest.mark.slow
def test_eval_metrics_go_into_the_card_and_stay(trained, tiny_data, tmp_path):
    run, path = trained
    model_dir = tmp_path / "model"
    shutil.copytree(path, model_dir)
    cfg = load_config(EvalConfig, run=str(run), queries=str(tiny_data["queries"]), corpus=str(tiny_data["corpus"]),
                      executor="local", answer_k=0)  # fmt: skip
    metrics = evaluate_run(cfg, progress=False)
    card = _card(path)  # eval scored the run's trained model: its card gained the metrics
    shutil.copy(path / "README.md", model_dir / "README.md")
    assert "## Evaluation" in card.text
    row = next(line for line in card.text.splitlines() if line.startswith("| ndcg@10 |"))
    assert row.startswith(f"| ndcg@10 | {metrics['base']['all']['ndcg@10']:.3f} | "
                          f"{metrics['trained']['all']['ndcg@10']:.3f} |")  # fmt: skip
    assert "\n#### qa (2 queries)\n" in card.text  # each task's own metrics, under the section
    assert card.data["lemb"]["tau"] == 0.07  # the training facts are kept
    # written again without metrics (as `lemb push` does), the card keeps them
    write_card(model_dir, repo="someone/zorbia")
    again = _card(model_dir)
    assert row in again.text and 'SentenceTransformer("someone/zorbia")' in again.text
    assert again.data["lemb"]["eval"]["trained"]["all"]["ndcg@10"] == pytest.approx(
        metrics["trained"]["all"]["ndcg@10"]
    )


@pytest.mark.slow
def test_export_writes_a_card_for_its_layout(trained, tmp_path):
    from lemb.stages.encoder import load_embedder

    _, path = trained
    out = export_flagembedding(path, tmp_path / "fe")
    card = _card(out)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "feature-extraction"
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2" and "lemb" in card.data.tags
    assert card.data["lemb"]["tasks"] == read_facts(path)["tasks"]
    assert json.loads((out / "export.json").read_text())["flags"] in card.text
    # a model lemb did not train: a card without training facts, still a valid one
    plain = tmp_path / "plain"
    load_embedder("all-minilm-l6-v2").save(str(plain))
    bare = _card(export_flagembedding(plain, tmp_path / "fe-plain"))
    assert "## Training Details" not in bare.text and "lemb" in bare.data.tags
    # trained from groups given directly (no label stage in the run): the LLM is not recorded, the rest is
    write_card(plain, {**read_facts(path), "labels": {}})
    unlabelled = _card(plain).text
    assert "**Labelled by the LLM:** not recorded" in unlabelled and "**tau:** 0.07" in unlabelled
    assert "**Pool:**" not in unlabelled


def test_repo_ids_are_checked_by_huggingface_hub_rules():
    assert check_repo("someone/zorbia-embedder") == "someone/zorbia-embedder"
    for bad, why in (("a/b/c", "not a Hugging Face repo id"), ("some--one/x", "Cannot have -- or .."),
                     ("zorbia", "give the owner too"), ("someone/x.git", "not a Hugging Face repo id")):  # fmt: skip
        with pytest.raises(LembError, match=re.escape(why)):
            check_repo(bad)
    result = CliRunner().invoke(app, ["push", "runs/none", "--repo", "a/b/c"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: --repo 'a/b/c': not a Hugging Face repo id (Repo id must be in the form 'repo_name' or "
        "'namespace/repo_name': 'a/b/c'. Use `repo_type` argument if needed.)"
    ]


@pytest.mark.slow
def test_push_refuses_a_folder_without_lemb_card_or_finished_model(trained, tmp_path):
    from lemb.stages.encoder import load_embedder

    _, path = trained
    with pytest.raises(LembError, match="neither a model folder nor a run folder"):
        model_to_push(tmp_path)
    plain = tmp_path / "plain"  # saved by sentence-transformers: the base model's card, not lemb's
    load_embedder("all-minilm-l6-v2").save(str(plain))
    with pytest.raises(LembError, match=r"plain: no model card written by lemb"):
        model_to_push(plain)
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    (broken / "model.safetensors").unlink()
    assert model_to_push(broken) == broken  # the card is there...
    with pytest.raises(LembError, match=r"broken: not a finished model \("):  # ... the weights are not
        load_finished(broken)


class _Refusing(http.server.BaseHTTPRequestHandler):
    """A hub that refuses every request, as the Hub refuses a token without the rights to a namespace."""

    def do_POST(self):  # noqa: N802 (http.server's name)
        self._answer(403, 'You don\'t have the rights to create a model under the namespace "someone"')

    def do_GET(self):  # noqa: N802 (huggingface_hub then asks whether the repo exists)
        self._answer(404, "Repository not found")

    def _answer(self, status, message):
        body = json.dumps({"error": message})
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


PUSH = textwrap.dedent("""
    import json, os, sys, time
    from lemb.errors import LembError
    from lemb.trainer.push import push
    out = []
    for token in sys.argv[2:]:  # HF_TOKEN of each try, "-" for none
        os.environ.pop("HF_TOKEN", None)
        if token != "-":
            os.environ["HF_TOKEN"] = token
        start = time.perf_counter()
        try:
            push(sys.argv[1], "someone/zorbia-embedder")
            out.append({"error": None})
        except LembError as exc:
            out.append({"error": str(exc), "seconds": time.perf_counter() - start})
    print(json.dumps(out))
""")


def _push(model, endpoint, tokens, home):
    """`push` in a process whose HF_ENDPOINT is `endpoint` (huggingface_hub reads it as it starts), once per token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(HF_HOME=str(home), HF_ENDPOINT=endpoint, HF_HUB_DISABLE_TELEMETRY="1")  # HF_HOME: no token stored
    done = subprocess.run([sys.executable, "-c", PUSH, str(model), *tokens], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_push_without_a_token_or_a_reachable_hub_is_one_line_naming_the_repo(trained, tmp_path):
    _, path = trained
    model = tmp_path / "model"
    shutil.copytree(path, model)
    no_token, unreachable = _push(model, "http://127.0.0.1:9", ["-", "hf_test"], tmp_path / "hf-home")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        (refused,) = _push(model, f"http://127.0.0.1:{server.server_port}", ["hf_test"], tmp_path / "hf-home")
    finally:
        server.shutdown()
    assert (
        no_token["error"] == "no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)"
    )
    assert unreachable["error"].startswith("push to someone/zorbia-embedder failed: ")
    assert "Connection refused" in unreachable["error"] and "http://127.0.0.1:9" in unreachable["error"]
    assert unreachable["seconds"] < 20  # huggingface_hub retries the upload itself, not the repo's creation
    assert refused["error"].startswith("push to someone/zorbia-embedder failed: 403")
    assert "rights to create a model" in refused["error"] and "\n" not in unreachable["error"] + refused["error"]
    # what would have been sent: the model folder, its card now loading the model from the repo
    card = _card(model)
    assert card.data["lemb"]["repo"] == "someone/zorbia-embedder"
    assert 'SentenceTransformer("someone/zorbia-embedder")' in card.text
    assert card.data["lemb"]["tasks"] == read_facts(path)["tasks"]
