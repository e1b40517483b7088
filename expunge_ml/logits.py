"""Next-token logit sources: a plain causal LM, or the ULD composite `base + w·assistant`.

Evaluation and generation only ever talk to a `LogitSource`, so every metric is computed the same
way for the original model, a baseline-unlearned model and a ULD composite (whose two models are run
in the same pass, each with its own KV cache).
"""
from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .devices import model_device


# Logit given to tokens the relative-top filter excludes: zero probability in float32 (e^-10000), yet
# finite, so teacher-forced scores of an excluded answer stay comparable numbers instead of -inf/NaN.
MASKED_LOGIT = -1e4


class LogitSource(Protocol):
    def step(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: Any = None,
        last_only: bool = False,
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """Logits for every position of `input_ids` (or only the last one, or only the positions `keep` lists),
        and the updated cache."""
        ...


@dataclass
class CausalLMLogits:
    """Wraps any Hugging Face causal LM; inputs are moved to the model's device, logits stay there."""

    model: torch.nn.Module

    def step(self, input_ids, attention_mask, position_ids, past=None, last_only=False, keep=None):
        device = model_device(self.model)
        # The output head over a large vocabulary is most of a small model's cost: compute it where it is read.
        kwargs = {"logits_to_keep": 1} if last_only else {} if keep is None else {"logits_to_keep": keep.to(device)}
        cache_name = cache_argument(self.model)
        out = self.model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=position_ids.to(device),
            use_cache=True,
            **{cache_name: past},
            **kwargs,
        )
        return out.logits.float(), getattr(out, cache_name)


def cache_argument(model: torch.nn.Module) -> str:
    """The name a model's forward takes its KV cache by: `cache` in recent transformers (which warns that
    `past_key_values` goes away), `past_key_values` before; its output field has the same name."""
    inner = getattr(model, "get_base_model", lambda: model)()  # a peft wrapper forwards **kwargs to its base
    return _cache_argument_of(type(inner))


@functools.lru_cache(maxsize=None)
def _cache_argument_of(model_class: type) -> str:  # once per class: step() runs once per generated token
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def combine_logits(
    base_logits: torch.Tensor,
    assistant_logits: list[torch.Tensor],
    weights: list[float],
    relative_top: float = 0.0,
) -> torch.Tensor:
    """ULD composite: z = z_base + Σ w_i · z_assistant_i (w_i < 0 subtracts what the assistant remembers).

    With `relative_top` τ > 0, only tokens the base finds plausible (log p_base ≥ max log p_base + log τ)
    stay candidates; the rest are masked out, so subtracting the assistant can only reorder tokens the base
    already considers plausible instead of promoting junk from the vocabulary's tail. Masking (rather than
    leaving the tail at its base logit) also keeps a uniform assistant a no-op: a constant shift of the
    candidates changes nothing.
    """
    combined = base_logits.clone()
    for logits, weight in zip(assistant_logits, weights):
        combined = combined + weight * logits
    if relative_top > 0.0:
        base_logp = torch.log_softmax(base_logits, dim=-1)
        threshold = base_logp.max(dim=-1, keepdim=True).values + math.log(relative_top)
        combined = combined.masked_fill(base_logp < threshold, MASKED_LOGIT)
    return combined


def end_of_answer_ids(model: torch.nn.Module) -> tuple[int, ...]:
    """The token ids that end an answer for `model`: its config's and generation config's EOS ids."""
    ids: set[int] = set()
    for config in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        value = getattr(config, "eos_token_id", None)
        ids.update([value] if isinstance(value, int) else (value or []))
    return tuple(sorted(ids))


def keep_end_of_answer(combined: torch.Tensor, base_logits: torch.Tensor, end_ids: tuple[int, ...]) -> torch.Tensor:
    """Raise each end-of-answer token's composite probability to at least the base's (in place).

    The assistant remembers where forgotten answers end, so subtracting it would push the end token down and
    the unlearned model would run on past its answer. With q_e the base's probability of end token e and Q
    their sum, logit log q_e + logsumexp(other logits) − log(1 − Q) gives e exactly probability q_e."""
    if not end_ids:
        return combined
    ids = torch.tensor(end_ids, device=combined.device)
    end_logp = torch.log_softmax(base_logits.float(), dim=-1)[..., ids]
    all_lse = torch.logsumexp(combined, dim=-1, keepdim=True)
    end_lse = torch.logsumexp(combined[..., ids], dim=-1, keepdim=True)
    share_of_ends = torch.exp(end_lse - all_lse).clamp(max=1.0 - 1e-6)
    others_lse = all_lse + torch.log1p(-share_of_ends)
    base_end_total = end_logp.exp().sum(dim=-1, keepdim=True).clamp(max=1.0 - 1e-6)
    floor = end_logp + others_lse - torch.log1p(-base_end_total)
    combined[..., ids] = torch.maximum(combined[..., ids], floor)
    return combined


@dataclass
class CompositeLogits:
    """Logit difference of a base model and one or more ULD assistants (stacked erasures add up)."""

    base: torch.nn.Module
    assistants: list[torch.nn.Module]
    weights: list[float]
    relative_top: float = 0.0
    # Tokens whose probability the composite never lowers below the base's; None: the base's end-of-answer ids.
    end_ids: tuple[int, ...] | None = None
    _sources: list[CausalLMLogits] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.assistants) != len(self.weights):
            raise ValueError("one weight per assistant is required")
        if self.end_ids is None:
            self.end_ids = end_of_answer_ids(self.base)
        self._sources = [CausalLMLogits(self.base)] + [CausalLMLogits(a) for a in self.assistants]

    def step(self, input_ids, attention_mask, position_ids, past=None, last_only=False, keep=None):
        caches = past if past is not None else [None] * len(self._sources)
        outputs = [
            source.step(input_ids, attention_mask, position_ids, cache, last_only, keep)
            for source, cache in zip(self._sources, caches)
        ]
        logits = combine_logits(outputs[0][0], [o[0] for o in outputs[1:]], self.weights, self.relative_top)
        logits = keep_end_of_answer(logits, outputs[0][0], self.end_ids)
        # Separate caches: base and assistant have different depths and must never share state.
        return logits, [o[1] for o in outputs]
