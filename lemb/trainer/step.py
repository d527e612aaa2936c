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
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from lemb.stages.encoder import embedding_dim

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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


@dataclass
class MixedPrecision:
    """Mixed precision of the encoder's forward: autocast to bf16/fp16; fp16 also scales the loss.

    Embeddings leave the encoder in float32, so the loss and the all-gather always run in float32.
    The optimizer keeps float32 weights; with fp16, `unscale_and_step` skips steps with inf/nan gradients.
    """

    name: str = "fp32"
    device_type: str = "cpu"
    scaler: torch.amp.GradScaler | None = field(default=None, repr=False)

    @classmethod
    def make(cls, name: str, device: torch.device) -> MixedPrecision:
        scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None
        return cls(name, device.type, scaler)

    def autocast(self):
        return torch.autocast(self.device_type, dtype=_DTYPES.get(self.name), enabled=self.name in _DTYPES)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, max_grad_norm: float = 0.0) -> None:
        """One optimizer step; with `max_grad_norm` > 0 the gradients are first clipped to that total norm (after
        unscaling, with fp16)."""
        if max_grad_norm > 0:
            if self.scaler:
                self.scaler.unscale_(optimizer)
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        if self.scaler:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()


# texts per forward pass when a batch is embedded in length order: small on CPU (less padding, same speed),
# large on GPU, where many small passes leave it idle between kernel launches
LENGTH_BUCKET = {"cpu": 16, "cuda": 256}


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# sequence lengths are padded up to a multiple of this: on a GPU every new (batch, length) shape costs the attention
# kernels a plan of their own (cuDNN's), which a handful of lengths keeps cached (BENCHMARKS.md); on a CPU padding
# is only extra work
PAD_MULTIPLE = {"cpu": 1, "cuda": 64}


def pad_features(features: dict, multiple: int, pad_id: int, limit: int | None = None) -> dict:
    """Token features padded on the right to a length that is a multiple of `multiple`, never beyond `limit` (the
    model's maximum length); padded positions are masked, so the embeddings do not change. Features that are not
    a padded (batch, length) layout with an attention mask are returned as they are."""
    ids = features.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or "attention_mask" not in features:
        return features
    length = ids.shape[1]
    extra = -length % multiple
    if limit is not None:
        extra = min(extra, max(limit - length, 0))
    if not extra:
        return features
    out = dict(features)
    for key, value in features.items():
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[1] == length:
            out[key] = torch.nn.functional.pad(value, (0, extra), value=pad_id if key == "input_ids" else 0)
    return out


def _forward(
    model: torch.nn.Module, texts: list[str], precision: MixedPrecision | None = None, multiple: int | None = None
) -> torch.Tensor:
    precision = precision or MixedPrecision()
    features = model.preprocess(texts) if hasattr(model, "preprocess") else model.tokenize(texts)
    device = model_device(model)
    multiple = multiple or PAD_MULTIPLE.get(device.type, PAD_MULTIPLE["cuda"])
    if multiple > 1:
        limit = getattr(model, "max_seq_length", None)
        features = pad_features(features, multiple, model.tokenizer.pad_token_id or 0, limit)
    features = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in features.items()}
    with precision.autocast():
        return model(features)["sentence_embedding"].float()


def embed_texts(model: torch.nn.Module, texts: list[str], precision: MixedPrecision | None = None) -> torch.Tensor:
    """Float32 embeddings in input order, computed in buckets of similar length (short texts are not padded to the
    longest)."""
    precision = precision or MixedPrecision()
    bucket = LENGTH_BUCKET.get(model_device(model).type, LENGTH_BUCKET["cuda"])
    if len(texts) <= bucket:
        return _forward(model, texts, precision)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # characters: a free proxy for tokens
    parts = [
        _forward(model, [texts[i] for i in order[s : s + bucket]], precision) for s in range(0, len(order), bucket)
    ]
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return torch.cat(parts)[inverse.to(parts[0].device)]


def _embed_keys(model, keys: list[str], valid: list[bool], dim: int, precision: MixedPrecision) -> torch.Tensor:
    """(len(keys), dim) with zero rows at padding slots (masked out by the loss)."""
    idx = [i for i, ok in enumerate(valid) if ok]
    device = model_device(model)
    out = torch.zeros(len(keys), dim, device=device)
    if idx:
        rows = embed_texts(model, [keys[i] for i in idx], precision)
        out = out.index_copy(0, torch.tensor(idx, device=device), rows)
    return out


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The generators dropout draws from: the CPU's, and the model's GPU's when it runs on one."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


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
    precision: MixedPrecision | None = None,
) -> float:
    """Accumulate the gradients of scale(L) * L for the global batch into `model`; return L.

    `queries` (B) and `keys` (B*M, padding slots marked False in `valid`) are the global batch;
    `loss_fn(q (B, d), k (B, M, d))` is the loss on all of it, computed in float32.
    """
    world = world or World.current()
    precision = precision or MixedPrecision()
    b, group = valid.shape
    mine = world.part(b)
    local_q = queries[mine]
    key_slice = slice(mine.start * group, mine.stop * group)
    local_k, local_valid = keys[key_slice], valid.reshape(-1)[key_slice].tolist()
    dim = embedding_dim(model)
    device = model_device(model)

    if not chunk_size:
        q = _gather(embed_texts(model, local_q, precision), world)
        k = _gather(_embed_keys(model, local_k, local_valid, dim, precision), world).reshape(b, group, dim)
        loss = loss_fn(q, k)
        precision.backward(loss * scale(loss.item()))
    else:
        q_parts, k_parts, states = [], [], []
        with torch.no_grad():
            for s in _chunks(len(local_q), chunk_size):
                states.append(_rng_state(device))
                q_parts.append(embed_texts(model, local_q[s], precision))
            for s in _chunks(len(local_k), chunk_size * group):
                states.append(_rng_state(device))
                k_parts.append(_embed_keys(model, local_k[s], local_valid[s], dim, precision))
        q_leaf = torch.cat(q_parts).requires_grad_()
        k_leaf = torch.cat(k_parts).requires_grad_()
        loss = loss_fn(_gather(q_leaf, world), _gather(k_leaf, world).reshape(b, group, dim))
        precision.backward(loss * scale(loss.item()))
        rng_after = _rng_state(device)
        replay = iter(states)
        for s in _chunks(len(local_q), chunk_size):
            _set_rng_state(next(replay), device)
            embed_texts(model, local_q[s], precision).backward(q_leaf.grad[s])  # grads carry the loss scale
        for s in _chunks(len(local_k), chunk_size * group):
            _set_rng_state(next(replay), device)
            if any(local_valid[s]):
                _embed_keys(model, local_k[s], local_valid[s], dim, precision).backward(k_leaf.grad[s])
        _set_rng_state(rng_after, device)
    if world.size > 1:
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)  # sum of partial gradients = gradient of the global loss
    return loss.item()
