"""`lemb export --format flagembedding`: the folder FlagEmbedding's llm_embedder code loads, and the same vectors."""

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from lemb.cli import app
from lemb.stages.encoder import embedding_dim, load_embedder
from lemb.stages.models import resolve_model_path
from lemb.trainer.export import export_flagembedding, st_modules

TEXTS = ["Represent this query for retrieving relevant documents: who wrote hamlet", "a passage about the tides"]


def _flagembedding_encode(folder, texts):
    """Encode the way FlagEmbedding's DenseRetriever does: AutoModel, pooling_method, optional dense pooler, cos."""
    from transformers import AutoModel, AutoTokenizer

    info = json.loads((folder / "export.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=info["max_length"], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].bool()
    if "mean" in info["pooling_method"]:
        pooled = hidden.masked_fill(~mask, 0.0).sum(1) / mask.sum(1)
    else:
        pooled = hidden[:, 0]
    if "dense" in info["pooling_method"]:
        pooled = pooled @ torch.load(folder / "dense_pooler.bin", weights_only=True)["weight"].T
    return F.normalize(pooled, dim=-1)


def test_export_gives_the_same_embeddings_and_instructions(tmp_path):
    model = load_embedder("all-minilm-l6-v2", 128)
    model.prompts = {"qa_query": "Represent this query: ", "qa_key": "Represent this document: ", "tool_query": "T: "}
    model.save(str(tmp_path / "model"))
    result = CliRunner().invoke(app, ["export", str(tmp_path / "model"), "--out", str(tmp_path / "fe")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "fe"
    info = json.loads((out / "export.json").read_text())
    assert info["pooling_method"] == ["mean"] and info["dense_metric"] == "cos" and info["max_length"] == 128
    assert "--pooling_method mean" in info["flags"]
    assert json.loads((out / "instructions.json").read_text()) == {
        "qa": {"query": "Represent this query: ", "key": "Represent this document: "},
        "tool": {"query": "T: ", "key": ""},
    }
    expected = torch.from_numpy(model.encode(TEXTS, normalize_embeddings=True))
    torch.testing.assert_close(_flagembedding_encode(out, TEXTS), expected, atol=1e-5, rtol=1e-4)
    # a second export to the same folder is refused, and nothing is overwritten
    again = CliRunner().invoke(app, ["export", str(tmp_path / "model"), "--out", str(out)])
    assert again.exit_code == 1 and "already exists" in again.output


def test_cls_pooling_with_a_dense_layer_maps_to_the_dense_pooler(tmp_path):
    from sentence_transformers import SentenceTransformer

    models = st_modules()

    encoder = models.Transformer(resolve_model_path("all-minilm-l6-v2", "embedder"), max_seq_length=64)
    dim = embedding_dim(encoder)
    torch.manual_seed(0)
    dense = models.Dense(dim, dim, bias=False, activation_function=torch.nn.Identity())
    model = SentenceTransformer(modules=[encoder, models.Pooling(dim, "cls"), dense, models.Normalize()], device="cpu")
    model.save(str(tmp_path / "model"))
    out = export_flagembedding(tmp_path / "model", tmp_path / "fe")
    assert json.loads((out / "export.json").read_text())["pooling_method"] == ["cls", "dense"]
    expected = torch.from_numpy(model.encode(TEXTS, normalize_embeddings=True))
    torch.testing.assert_close(_flagembedding_encode(out, TEXTS), expected, atol=1e-5, rtol=1e-4)


def test_unknown_format_and_missing_model_are_one_line_errors(tmp_path):
    bad = CliRunner().invoke(app, ["export", str(tmp_path), "--out", str(tmp_path / "x"), "--format", "onnx"])
    assert bad.exit_code == 1 and "known formats are flagembedding" in bad.output
    missing = CliRunner().invoke(app, ["export", str(tmp_path), "--out", str(tmp_path / "x")])
    assert missing.exit_code == 1 and "neither a model folder nor a run folder" in missing.output
    assert not (tmp_path / "x").exists()


def test_pooling_without_equivalent_is_refused(tmp_path):
    from sentence_transformers import SentenceTransformer

    models = st_modules()

    encoder = models.Transformer(resolve_model_path("all-minilm-l6-v2", "embedder"), max_seq_length=64)
    model = SentenceTransformer(modules=[encoder, models.Pooling(embedding_dim(encoder), "max")])
    model.save(str(tmp_path / "model"))
    with pytest.raises(Exception, match="no FlagEmbedding equivalent"):
        export_flagembedding(tmp_path / "model", tmp_path / "fe")
    assert not (tmp_path / "fe").exists() and not list(tmp_path.glob(".fe.tmp-*"))
