"""Gradient cache and data-parallel steps give the gradients of the plain single-process step."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lemb.stages.encoder import load_embedder
from lemb.trainer.batches import Group, collate
from lemb.trainer.losses import graded_loss
from lemb.trainer.step import MixedPrecision, World, backward_step

TEXTS = ["capital of Zorbia", "Quelm is the seat of government", "tide tables of the harbor", "my pet glimmerfox"]


def _batch():
    groups = []
    for i in range(4):
        keys = [f"{TEXTS[(i + j) % 4]} {j}" for j in range(3 - (i == 2))]  # one group has a padding slot
        groups.append(
            Group(
                f"q{i}",
                "qa",
                f"question {i} about {TEXTS[i]}",
                keys,
                [f"k{i}{j}" for j in range(len(keys))],
                [1.0, 0.5, 0.0][: len(keys)],
                [True] + [False] * (len(keys) - 1),
            )
        )
    return collate(groups, 3)


def _grads(chunk_size=0, world=None, dropout=False, precision=None, checkpointing=False):
    torch.manual_seed(0)
    model = load_embedder("all-minilm-l6-v2", 64)
    model.train(dropout)  # eval: no dropout, so any chunking sees the same function
    if checkpointing:
        model.train()  # transformers checkpoints only in training mode; dropout stays off below
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        model[0].auto_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    data = _batch()

    def loss_fn(q, k):
        return graded_loss(
            q, k, data["rewards"], data["valid"], tau=0.05, alpha=0.5, in_batch_mask=data["in_batch_mask"]
        )

    loss = backward_step(
        model, data["queries"], data["keys"], data["valid"], loss_fn, chunk_size=chunk_size, world=world,
        precision=precision,
    )  # fmt: skip
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def reference():
    return _grads()


@pytest.mark.parametrize("chunk", [1, 3])
def test_gradient_cache_equals_plain_backward(reference, chunk):
    loss, grads = _grads(chunk_size=chunk)
    # one text per chunk pads differently from the whole batch: float32 sums in another order (a few ulps of 6.0)
    assert loss == pytest.approx(reference[0], rel=1e-6, abs=1e-6)
    assert grads.keys() == reference[1].keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, reference[1][name], atol=1e-5, rtol=1e-4)


def test_gradient_cache_replays_dropout_masks():
    # with dropout on, one chunk per side draws the same masks as the plain pass; the recompute pass
    # must replay them, or the gradients belong to other embeddings than the loss saw
    loss, grads = _grads(chunk_size=len(TEXTS), dropout=True)
    plain_loss, plain = _grads(dropout=True)
    assert loss == pytest.approx(plain_loss, abs=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, plain[name], atol=1e-5, rtol=1e-4)
    assert _grads(chunk_size=1, dropout=True)[0] != pytest.approx(plain_loss, abs=1e-9)  # other chunks, other masks


def test_gradient_checkpointing_gives_the_same_gradients(reference):
    loss, grads = _grads(checkpointing=True)
    assert loss == pytest.approx(reference[0], abs=1e-6)
    assert grads.keys() == reference[1].keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, reference[1][name], atol=1e-5, rtol=1e-4)


def _cosine(a: dict, b: dict) -> float:
    x = torch.cat([a[n].flatten() for n in sorted(a)])
    y = torch.cat([b[n].flatten() for n in sorted(a)])
    return float(torch.nn.functional.cosine_similarity(x, y, dim=0))


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_autocast_tracks_float32(reference, name):
    precision = MixedPrecision.make(name, torch.device("cpu"))
    loss, grads = _grads(precision=precision)
    assert loss == pytest.approx(reference[0], rel=0.05)
    assert grads.keys() == reference[1].keys()
    assert all(g.dtype == torch.float32 for g in grads.values())  # float32 master weights and gradients
    scale = precision.scaler.get_scale() if precision.scaler else 1.0
    assert (scale > 1.0) == (name == "fp16")  # fp16 scales the loss so small gradients survive
    unscaled = {n: g / scale for n, g in grads.items()}
    assert _cosine(unscaled, reference[1]) > 0.98
    # the gradient cache keeps the loss scale through the chunked backward
    chunked_loss, chunked = _grads(chunk_size=1, precision=MixedPrecision.make(name, torch.device("cpu")))
    assert _cosine({n: g / scale for n, g in chunked.items()}, reference[1]) > 0.98


def _worker(rank, port, chunk, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        loss, grads = _grads(chunk_size=chunk, world=World(rank, 2))
        out[rank] = (loss, grads)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [0, 1])
def test_two_gloo_workers_equal_one_process(reference, chunk):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(port, chunk, out), nprocs=2, join=True)
    for rank in (0, 1):
        loss, grads = out[rank]
        assert loss == pytest.approx(reference[0], abs=1e-5)
        for name, g in reference[1].items():
            torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4)


def test_length_buckets_keep_input_order():
    from lemb.trainer.step import LENGTH_BUCKET, _forward, embed_texts

    model = load_embedder("all-minilm-l6-v2", 64)
    model.eval()
    texts = [("word " * (i * 7 % 23 + 1)).strip() + f" {i}" for i in range(LENGTH_BUCKET["cpu"] * 2 + 5)]
    with torch.no_grad():
        torch.testing.assert_close(embed_texts(model, texts), _forward(model, texts), atol=2e-5, rtol=1e-4)


def test_padding_to_a_multiple_keeps_embeddings_and_gradients():
    """GPU runs pad token features to a multiple of 64: padded positions are masked, so the embeddings and the
    gradients are those of the unpadded batch."""
    from lemb.trainer.step import _forward

    model = load_embedder("all-minilm-l6-v2", 64)
    model.eval()  # no dropout: the two passes must be comparable
    texts = ["a short one", "a somewhat longer text about the capital of a small country", "three words here"]
    features = model.preprocess(texts)
    assert features["input_ids"].shape[1] % 64 != 0, "the batch must need padding"
    runs = []
    for multiple in (1, 64):
        model.zero_grad(set_to_none=True)
        emb = _forward(model, texts, multiple=multiple)
        (emb * torch.linspace(-1, 1, emb.shape[1])).sum().backward()
        runs.append((emb.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (plain, plain_grads), (padded, padded_grads) = runs
    torch.testing.assert_close(padded, plain, atol=1e-5, rtol=1e-4)
    assert plain_grads.keys() == padded_grads.keys() and plain_grads
    for name, g in plain_grads.items():
        torch.testing.assert_close(padded_grads[name], g, atol=1e-5, rtol=1e-4)


def test_padding_stops_at_the_model_limit_and_skips_unpadded_layouts():
    from lemb.trainer.step import pad_features

    ids = torch.ones(2, 77, dtype=torch.long)
    features = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    assert pad_features(features, 64, pad_id=0)["input_ids"].shape == (2, 128)
    capped = pad_features(features, 64, pad_id=0, limit=96)
    assert {k: tuple(v.shape) for k, v in capped.items()} == {k: (2, 96) for k in features}
    assert capped["attention_mask"][:, 77:].sum() == 0 and capped["input_ids"][:, 77:].sum() == 0
    assert pad_features(features, 64, pad_id=0, limit=77) is features
    flat = {"input_ids": torch.ones(5, dtype=torch.long), "offsets": torch.tensor([0, 2])}
    assert pad_features(flat, 64, pad_id=0) is flat


def test_max_grad_norm_clips_the_step_and_is_a_train_option():
    from typer.testing import CliRunner

    from lemb.cli import app
    from lemb.errors import ConfigError
    from lemb.pipeline.config import TrainConfig, load_config

    def sgd_update(max_grad_norm):
        torch.manual_seed(0)
        layer = torch.nn.Linear(4, 3)
        before = [p.detach().clone() for p in layer.parameters()]
        optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
        (layer(torch.randn(5, 4)) ** 2).sum().mul(100).backward()  # a gradient of norm well above 0.5
        MixedPrecision.make("fp32", torch.device("cpu")).step(optimizer, max_grad_norm)
        return torch.cat([(p.detach() - b).flatten() for p, b in zip(layer.parameters(), before)]).norm().item()

    assert sgd_update(0.0) > 1.0
    assert sgd_update(0.5) == pytest.approx(0.5, rel=1e-4)  # SGD at lr 1 moves by the clipped gradient
    assert load_config(TrainConfig, max_grad_norm=0.5).max_grad_norm == 0.5
    with pytest.raises(ConfigError, match="max_grad_norm must be >= 0, got -1.0"):
        load_config(TrainConfig, max_grad_norm=-1)
    assert "--max-grad-norm" in CliRunner().invoke(app, ["train", "--help"], terminal_width=200).output
