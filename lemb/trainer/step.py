"""One optimisation step's forward and backward: plain, gradient-cached, and data-parallel.

Gradient cache (Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup", RepL4NLP 2021): embed the batch in chunks without a graph, compute the loss on those
embeddings, then re-embed chunk by chunk with a graph and backpropagate the embeddings' gradients.
Memory is bounded by the chunk, not the batch; the gradients are those of the whole batch. Each
chunk's RNG state is replayed, so dropout masks match between the two passes.

Data parallel: every rank sees the same global batch, embeds only its slice, and all-gathers the
embeddings (gradients kept for the local slice), so every query sees every other query's keys as
in-batch negatives. Every rank computes the same global loss; summing the partial gradients across
ranks gives exactly the single-process gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lemb.stages.encoder import embedding_dim


@dataclass
class World:
    rank: int = 0
    size: int = 1

    @classmethod
    def current(cls) -> World:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def part(self, n: int) -> slice:
        """This rank's slice of a global batch of n items (n divisible by the world size)."""
        if n % self.size:
            raise ValueError(f"global batch of {n} is not divisible by {self.size} ranks")
        per = n // self.size
        return slice(self.rank * per, (self.rank + 1) * per)


LENGTH_BUCKET = 16  # texts per forward pass when a batch is embedded in length order


def _forward(model: torch.nn.Module, texts: list[str]) -> torch.Tensor:
    features = model.preprocess(texts) if hasattr(model, "preprocess") else model.tokenize(texts)
    return model(features)["sentence_embedding"]


def embed_texts(model: torch.nn.Module, texts: list[str]) -> torch.Tensor:
    """Embeddings in input order, computed in buckets of similar length (short texts are not padded to the longest)."""
    if len(texts) <= LENGTH_BUCKET:
        return _forward(model, texts)
    lengths = [len(ids) for ids in model.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    parts = [
        _forward(model, [texts[i] for i in order[s : s + LENGTH_BUCKET]]) for s in range(0, len(order), LENGTH_BUCKET)
    ]
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return torch.cat(parts)[inverse]


def _embed_keys(model, keys: list[str], valid: list[bool], dim: int, dtype) -> torch.Tensor:
    """(len(keys), dim) with zero rows at padding slots (masked out by the loss)."""
    idx = [i for i, ok in enumerate(valid) if ok]
    out = torch.zeros(len(keys), dim, dtype=dtype)
    if idx:
        out = out.index_copy(0, torch.tensor(idx), embed_texts(model, [keys[i] for i in idx]))
    return out


def _gather(local: torch.Tensor, world: World) -> torch.Tensor:
    """Concatenate every rank's tensor; only the local part carries gradient."""
    if world.size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(world.size)]
    dist.all_gather(parts, local.detach().contiguous())
    parts[world.rank] = local
    return torch.cat(parts)


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def backward_step(
    model: torch.nn.Module,
    queries: list[str],
    keys: list[str],
    valid: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    chunk_size: int = 0,
    world: World | None = None,
    scale: Callable[[float], float] = lambda loss: 1.0,
) -> float:
    """Accumulate the gradients of scale(L) * L for the global batch into `model`; return L.

    `queries` (B) and `keys` (B*M, padding slots marked False in `valid`) are the global batch;
    `loss_fn(q (B, d), k (B, M, d))` is the loss on all of it.
    """
    world = world or World.current()
    b, group = valid.shape
    mine = world.part(b)
    local_q = queries[mine]
    key_slice = slice(mine.start * group, mine.stop * group)
    local_k, local_valid = keys[key_slice], valid.reshape(-1)[key_slice].tolist()
    dim = embedding_dim(model)
    dtype = next(model.parameters()).dtype

    if not chunk_size:
        q = _gather(embed_texts(model, local_q), world)
        k = _gather(_embed_keys(model, local_k, local_valid, dim, dtype), world).reshape(b, group, dim)
        loss = loss_fn(q, k)
        (loss * scale(loss.item())).backward()
    else:
        q_parts, k_parts, states = [], [], []
        with torch.no_grad():
            for s in _chunks(len(local_q), chunk_size):
                states.append(torch.get_rng_state())
                q_parts.append(embed_texts(model, local_q[s]))
            for s in _chunks(len(local_k), chunk_size * group):
                states.append(torch.get_rng_state())
                k_parts.append(_embed_keys(model, local_k[s], local_valid[s], dim, dtype))
        q_leaf = torch.cat(q_parts).requires_grad_()
        k_leaf = torch.cat(k_parts).requires_grad_()
        loss = loss_fn(_gather(q_leaf, world), _gather(k_leaf, world).reshape(b, group, dim))
        (loss * scale(loss.item())).backward()
        rng_after = torch.get_rng_state()
        replay = iter(states)
        for s in _chunks(len(local_q), chunk_size):
            torch.set_rng_state(next(replay))
            embed_texts(model, local_q[s]).backward(q_leaf.grad[s])
        for s in _chunks(len(local_k), chunk_size * group):
            torch.set_rng_state(next(replay))
            if any(local_valid[s]):
                _embed_keys(model, local_k[s], local_valid[s], dim, dtype).backward(k_leaf.grad[s])
        torch.set_rng_state(rng_after)
    if world.size > 1:
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)  # sum of partial gradients = gradient of the global loss
    return loss.item()
