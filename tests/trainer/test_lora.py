"""`lemb train --lora`: LoRA adapters on the default embedder, trained, saved, merged and resumed; the settings'
problems; gradient cache, gradient checkpointing and two data-parallel ranks with adapters."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lemb.errors import ConfigError, MissingDependency
from lemb.pipeline.config import EvalConfig, LoraSpec, TrainConfig, load_config, parse_lora
from lemb.stages.encoder import load_embedder
from lemb.trainer.batches import Group, collate
from lemb.trainer.card import read_facts
from lemb.trainer.evaluate import evaluate_run
from lemb.trainer.export import export_flagembedding
from lemb.trainer.lora import add_adapters
from lemb.trainer.losses import graded_loss
from lemb.trainer.recipe import CHECKPOINT, TrainRecipe, train
from lemb.trainer.step import World, backward_step
from tests.trainer.test_export import _flagembedding_encode

SETTINGS = {"steps": 4, "batch_size": 2, "group_size": 2, "lr": 1e-3, "save_every": 2, "lora": "r=4,alpha=8"}
TEXTS = ["What is the capital of Zorbia?", "Quelm is the seat of government of Zorbia.", "tide tables"]


def _copy_run(labelled_run, dest):
    for stage in ("retrieve", "label"):
        shutil.copytree(labelled_run / stage, dest / stage)
    return dest


@pytest.fixture(scope="module")
def lora_run(labelled_run, tmp_path_factory):
    """Four steps with adapters and --merge; the checkpoint of step 2 kept aside (saving the model removes it)."""
    run = _copy_run(labelled_run, tmp_path_factory.mktemp("lora"))
    recipe = TrainRecipe(load_config(TrainConfig, run=str(run), merge=True, **SETTINGS))
    recipe.setup()
    recipe.train(progress=False)
    checkpoint = (run / "train" / CHECKPOINT).read_bytes()
    path = recipe.save()
    recipe.cleanup()
    return recipe, path, checkpoint


@pytest.mark.slow
def test_only_the_adapters_train(lora_run):
    recipe, _, _ = lora_run
    base = load_embedder("all-minilm-l6-v2").state_dict()
    trained = recipe.model.state_dict()
    adapters = {k for k in trained if ".lora_A." in k or ".lora_B." in k}
    # peft keeps an adapted layer's own weights under `base_layer`: every one of the base's weights is still there
    frozen = {k.replace(".base_layer", ""): k for k in trained if k not in adapters}
    assert adapters and frozen.keys() == base.keys()
    for name, key in frozen.items():
        assert torch.equal(trained[key], base[name]), name
    # B starts at zero (the model starts as the base); training moved every B
    assert all(trained[k].abs().max() > 0 for k in adapters if ".lora_B." in k)
    optimized = [p for group in recipe.optimizer.param_groups for p in group["params"]]
    assert len(optimized) == len(adapters) == 4 * 6  # A and B of query and value, in each of the 6 layers


@pytest.mark.slow
def test_adapter_and_merged_folders_load_and_embed_like_the_trained_model(lora_run, monkeypatch):
    from sentence_transformers import SentenceTransformer

    recipe, path, _ = lora_run
    merged_path = recipe.layout.merged_model
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(os.listdir(path))
    assert not (path / "model.safetensors").exists()  # the adapters only; the base is the folder the config names
    adapter_config = json.loads((path / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (4, 8)
    assert sorted(adapter_config["target_modules"]) == ["query", "value"]  # peft's defaults for BERT
    loaded = SentenceTransformer(str(path), device="cpu")
    assert loaded.prompts["qa_query"] == recipe.model.prompts["qa_query"]
    expected = recipe.model.encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(loaded.encode(TEXTS, convert_to_tensor=True), expected, atol=1e-5, rtol=1e-4)
    base = load_embedder("all-minilm-l6-v2").encode(TEXTS, convert_to_tensor=True)
    assert (base - expected).abs().max() > 1e-3
    # the merged copy: a full model, no adapters, loaded without peft
    assert not (merged_path / "adapter_config.json").exists() and (merged_path / "model.safetensors").exists()
    monkeypatch.setitem(sys.modules, "peft", None)
    merged = SentenceTransformer(str(merged_path), device="cpu")
    assert merged.prompts == loaded.prompts
    torch.testing.assert_close(merged.encode(TEXTS, convert_to_tensor=True), expected, atol=1e-5, rtol=1e-4)
    # both cards carry the adapters' settings
    assert read_facts(path)["lora"] == {"r": 4, "alpha": 8, "dropout": 0.0, "targets": []}
    assert read_facts(merged_path)["lora"]["merged"] is True
    assert "- **LoRA:** r 4, alpha 8, dropout 0.0, on peft's default layers" in (path / "README.md").read_text()
    assert "merged into the base weights in this folder" in (merged_path / "README.md").read_text()
    # the adapters name their base by its path on this machine: `lemb push` sends the merged copy instead
    from lemb.errors import LembError
    from lemb.trainer.push import model_to_push

    with pytest.raises(LembError, match="LoRA adapters over the local base .*push <run>/train/model-merged"):
        model_to_push(path)
    assert model_to_push(merged_path) == merged_path


@pytest.mark.slow
def test_a_resumed_run_ends_with_the_adapters_of_an_uninterrupted_one(lora_run, labelled_run, tmp_path):
    recipe, _, checkpoint = lora_run
    run = _copy_run(labelled_run, tmp_path / "resumed")
    (run / "train").mkdir()
    (run / "train" / CHECKPOINT).write_bytes(checkpoint)
    resumed = TrainRecipe(load_config(TrainConfig, run=str(run), merge=True, resume=True, **SETTINGS))
    resumed.setup()
    assert resumed.start_step == 2
    resumed.train(progress=False)
    resumed.cleanup()
    want, got = recipe.model.state_dict(), resumed.model.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0)


def test_lora_settings_problems_are_one_message_each():
    assert parse_lora("r=16,alpha=32") == LoraSpec(16, 32)
    assert parse_lora(" r=8, alpha=16, dropout=0.1, targets=query+key+value ") == LoraSpec(
        8, 16, 0.1, ("query", "key", "value")
    )
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, lora="r=0,alpha=x,dropout=1,targets=+,rank=4,bias")
    problems = str(err.value)
    for message in (
        "lora: r must be a positive integer, got '0'",
        "lora: alpha must be a positive integer, got 'x'",
        "lora: dropout must be a number in [0, 1), got '1'",
        "lora: targets must name at least one layer, as NAME+NAME (e.g. query+value), got '+'",
        "lora: unknown key 'rank' (keys: r, alpha, dropout, targets)",
        "lora: 'bias' is not KEY=VALUE (e.g. r=16,alpha=32)",
    ):
        assert message in problems
    with pytest.raises(ConfigError, match="lora: alpha is required"):
        load_config(TrainConfig, lora="r=4")
    with pytest.raises(ConfigError, match="merge needs --lora"):
        load_config(TrainConfig, merge=True)


def test_targets_that_match_no_layer_are_one_line_naming_the_layers():
    with pytest.raises(ConfigError, match=r"targets qkv match no linear layer .*: dense, key, query, value\)"):
        add_adapters(load_embedder("all-minilm-l6-v2"), parse_lora("r=4,alpha=8,targets=query+qkv"))


def test_a_missing_peft_is_one_line_before_training(labelled_run, tmp_path, monkeypatch):
    run = _copy_run(labelled_run, tmp_path / "run")
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    with pytest.raises(MissingDependency, match=r"^peft \(for LoRA adapters\) is not installed; .*'lemb\[lora\]'$"):
        train(load_config(TrainConfig, run=str(run), **SETTINGS), progress=False)
    assert not (run / "train" / "model").exists() and not (run / "train" / CHECKPOINT).exists()


@pytest.mark.slow
def test_export_and_eval_take_the_adapter_folder(lora_run, tiny_data, tmp_path):
    recipe, path, _ = lora_run
    out = export_flagembedding(path, tmp_path / "fe")  # the adapters merged into the encoder's weights
    expected = recipe.model.encode(TEXTS, convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(_flagembedding_encode(out, TEXTS), expected, atol=1e-5, rtol=1e-4)
    cfg = load_config(EvalConfig, run=str(recipe.run), queries=str(tiny_data["queries"]),
                      corpus=str(tiny_data["corpus"]), executor="local", answer_k=0)  # fmt: skip
    metrics = evaluate_run(cfg, progress=False)
    assert set(metrics) == {"base", "trained"} and 0 <= metrics["trained"]["all"]["ndcg@10"] <= 1
    saved = json.loads((recipe.run / "eval" / "metrics.json").read_text())
    assert saved["trained"]["embedded_with"]["instructions"]["source"] == "saved with the model by lemb train"


def _batch():
    """Two queries of two keys each, the first the positive."""
    keys = [[TEXTS[(i + j) % 3] for j in range(2)] for i in range(2)]
    groups = [Group(f"q{i}", "qa", f"question {i}", keys[i], [f"k{i}{j}" for j in range(2)], [1.0, 0.0], [True, False])
              for i in range(2)]  # fmt: skip
    return collate(groups, 2)


def _grads(chunk_size=0, checkpointing=False, world=None):
    """The step's gradients on a model with adapters (B drawn at random, so that A gets gradients too), dropout off
    so that every variant computes one function."""
    torch.manual_seed(0)
    model = load_embedder("all-minilm-l6-v2", 64)
    add_adapters(model, parse_lora("r=4,alpha=8,dropout=0.1"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.1)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if checkpointing:
        model[0].auto_model.gradient_checkpointing_enable({"use_reentrant": False})
    data = _batch()

    def loss_fn(q, k):
        return graded_loss(q, k, data["rewards"], data["valid"], tau=0.05, alpha=0.5,
                           in_batch_mask=data["in_batch_mask"])  # fmt: skip

    loss = backward_step(model, data["queries"], data["keys"], data["valid"], loss_fn, chunk_size=chunk_size,
                         world=world)  # fmt: skip
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(got, want):
    assert got[0] == pytest.approx(want[0], abs=1e-5)
    assert got[1].keys() == want[1].keys()
    for name, g in got[1].items():
        torch.testing.assert_close(g, want[1][name], atol=1e-5, rtol=1e-4)


def test_gradient_cache_and_checkpointing_give_the_adapters_the_plain_gradients():
    reference = _grads()
    assert reference[1] and all(".lora_" in n for n in reference[1])  # the frozen weights get no gradient
    assert all(g.abs().max() > 0 for g in reference[1].values())
    _assert_same(_grads(chunk_size=1), reference)
    _assert_same(_grads(checkpointing=True), reference)


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        out[rank] = _grads(chunk_size=1, world=World(rank, 2))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_workers_with_adapters_equal_one_process():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(port, out), nprocs=2, join=True)
    reference = _grads()
    for rank in (0, 1):
        _assert_same(out[rank], reference)


ROOT = Path(__file__).resolve().parents[2]
BENCH_DATA = ROOT.parent / "shared" / "data" / "knowledge_qa" / "nq_oracle"  # bench/train_throughput.py's data


@pytest.mark.slow
@pytest.mark.skipif(not BENCH_DATA.is_dir(), reason=f"the benchmark data is not at {BENCH_DATA}")
def test_the_lora_benchmark_runs_in_a_smoke_mode(tmp_path):
    """bench/lora_memory.py at tiny sizes (BENCHMARKS.md has its figures at full size)."""
    out = tmp_path / "lora.json"
    args = ["--steps", "2", "--batch", "2", "--group", "2", "--max-length", "32", "--lora", "r=4,alpha=8"]
    done = subprocess.run([sys.executable, "bench/lora_memory.py", *args, "--json", str(out)], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["lora"]["trainable_weights"] < report["full"]["trainable_weights"] / 100
    assert report["lora"]["optimizer_state_mb"] < report["full"]["optimizer_state_mb"] / 100
    assert report["ratio_lora_over_full"]["examples_per_s"] > 0 and report["full"]["peak_rss_mb"] > 0
