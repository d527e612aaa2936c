"""The transformers backend: a causal LM in eval mode, composed of the shared `Prompts`, `HFSampler` (per-sample
generators, Gumbel-max picks: hf_sampler.py) and `HFScorer` (packed rows after a cached common prefix:
hf_scorer.py). Every method is gradient-free."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from lemb.stages.llm.base import LLMBackend, check_reduce, forwarded, reduced
from lemb.stages.llm.hf_sampler import HFSampler
from lemb.stages.llm.hf_scorer import HFScorer
from lemb.stages.models import resolve_model_path
from lemb.vocabulary import DEFAULT_LLM


class TransformersBackend(LLMBackend):
    """A causal LM run with transformers (see the module's notes)."""

    prefilled_tokens = forwarded("scorer", "prefilled_tokens")  # tokens scoring ran through the model

    def __init__(
        self,
        model: str = DEFAULT_LLM,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        device: str | None = None,
    ) -> None:
        path = resolve_model_path(model, "LLM")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # scoring passes its own 4-D attention mask, which the sdpa and eager attentions honour (flash kernels don't)
        load = {"dtype": getattr(torch, dtype), "trust_remote_code": trust_remote_code}
        try:
            self.model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", **load)
        except ValueError:  # an architecture without sdpa support
            self.model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", **load)
        self.model.to(self.device).eval().requires_grad_(False)
        self._open(model, path, trust_remote_code, eos=self.model.generation_config.eos_token_id)
        pad = self.tokenizer.pad_token_id
        self.pad_id = self.eos_ids[0] if pad is None else pad
        # generate() fills whatever a call leaves unset from the model's generation_config.json (a repetition
        # penalty, top_k, a temperature that warns under greedy decoding): only the stop tokens are kept, so both
        # methods decode from the model's own logits, as vLLM does with generation_config="vllm".
        self.model.generation_config = GenerationConfig(
            bos_token_id=self.model.generation_config.bos_token_id, eos_token_id=self.eos_ids, pad_token_id=self.pad_id
        )
        self.sampler = HFSampler(self.model, self.tokenizer, self.eos_ids, self.pad_id, self.device)
        self.scorer = HFScorer(self.model, self.tokenizer, self.pad_id, self.device)

    def score_naive(
        self, user_message: str, continuations: list[str], reduce: str = "mean", batch_size: int = 32
    ) -> list[tuple[float, int]]:
        """Reference for score(): every prompt + continuation runs as its own full sequence (same tokens)."""
        check_reduce(reduce)
        prompt = self.prompts.encode(user_message)
        conts = self.prompts.continuations(continuations)
        return [reduced(t, len(c), reduce) for t, c in zip(self.scorer.naive(prompt, conts, batch_size), conts)]
