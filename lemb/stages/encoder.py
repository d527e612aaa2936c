"""The embedder: any sentence-transformers / Hugging Face encoder, with task instructions prepended."""

from __future__ import annotations

import numpy as np

from lemb.errors import LembError
from lemb.stages.models import resolve_model_path


def load_embedder(
    name: str, max_length: int | None = 256, trust_remote_code: bool = False, device: str | None = "cpu"
):
    """A SentenceTransformer; plain transformers folders get mean pooling from sentence-transformers.
    `max_length=None` keeps the model's own setting; `device=None` takes the GPU when one is visible (a Ray
    actor started with `num_gpus` sees its own), else the CPU."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(
        resolve_model_path(name, "embedder"), device=device, trust_remote_code=trust_remote_code
    )
    if max_length is not None:
        model.max_seq_length = max_length
    return model


def embedding_dim(model) -> int:
    """sentence-transformers renamed get_sentence_embedding_dimension to get_embedding_dimension."""
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(getter())


class Encoder:
    """Encodes texts into L2-normalised float32 vectors, counting the texts encoded and those cut at `max_length`
    tokens (`encoded`, `truncated`): a stage puts both in its shard stats, and its driver reports their sum once."""

    def __init__(self, model: str, max_length: int = 256, batch_size: int = 64, trust_remote_code: bool = False):
        self.model = load_embedder(model, max_length, trust_remote_code, device=None)  # one encoder per GPU
        self.name = model
        self.max_length = max_length
        self.batch_size = batch_size
        self.encoded = 0
        self.truncated = 0

    def _count_truncated(self, texts: list[str]) -> None:
        lengths = [
            len(ids) for ids in self.model.tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]
        ]
        self.encoded += len(texts)
        self.truncated += sum(n > self.max_length for n in lengths)

    def encode(self, texts: list[str], instruction: str = "") -> np.ndarray:
        if not texts:
            return np.zeros((0, embedding_dim(self.model)), dtype=np.float32)
        full = [instruction + t for t in texts]
        self._count_truncated(full)
        emb = self.model.encode(  # prompt="": the instruction is already in the text, never the model's default prompt
            full, prompt="", batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=False,
        )  # fmt: skip
        broken = ~np.isfinite(emb).all(axis=1)
        if broken.any():  # NaN vectors would rank nothing, silently: a model with broken weights stops here
            first = full[int(np.argmax(broken))]
            raise LembError(f"embedder {self.name} gave non-finite embeddings for {int(broken.sum())} of "
                            f"{len(full)} texts (first: {first[:60]!r}): its weights are broken (a diverged "
                            "training?)")  # fmt: skip
        return emb.astype(np.float32, copy=False)
