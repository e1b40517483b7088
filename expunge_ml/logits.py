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
from typing import Any, Protocol, Sequence

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
    ) -> tuple[torch.Tensor, Any]:
        """Logits for every position of `input_ids` (or only the last one), and the updated cache."""
        ...


@dataclass
class CausalLMLogits:
    """Wraps any Hugging Face causal LM; inputs are moved to the model's device, logits stay there."""

    model: torch.nn.Module

    def step(self, input_ids, attention_mask, position_ids, past=None, last_only=False):
        kwargs = {"logits_to_keep": 1} if last_only else {}
        device = model_device(self.model)
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


# How the assistants of one erasure's ensemble are combined (`combine_logits`).
ENSEMBLES = ("mean", "mixture")
# How each assistant's logits are subtracted from the base's (`combine_logits`).
SUBTRACTIONS = ("linear", "one_sided")


def combine_logits(
    base_logits: torch.Tensor,
    assistant_logits: list[torch.Tensor],
    weights: list[float],
    relative_top: float = 0.0,
    ensemble: str = "mean",
    subtractions: Sequence[str] = (),
) -> torch.Tensor:
    """ULD composite: z = z_base + Σ w_i · z_assistant_i (w_i < 0 subtracts what the assistant remembers).

    `subtractions` names each assistant's mode ("linear" for all when empty). "one_sided" subtracts only what
    the assistant finds more likely than uniform: w_i · max(log p_i + log V, 0), V the vocabulary size. The
    linear term also *raises* every token the assistant finds less likely than uniform by |w_i| times its
    deficit; one-sided, the remembered tokens go down and every other token keeps the base's ranking. Both
    leave the base alone where the assistant is uniform. Tried against the demo's word salad (session 27) and
    measured on 20 tickets (benchmarks/results/demo_subjects.md, session 28): the salad stayed, because after
    a memorised token the sample base's own ranking is itself fragments of memorised answers, and one-sided
    forgot less (more of the subject's facts stated). So nothing serves it by default.

    `ensemble="mixture"` treats the assistants as one mixture instead: z = z_base + W · log Σ_i (w_i / W) ·
    p_assistant_i, W = Σ w_i. The sum above subtracts the assistants' mean log-probability (a product of
    experts), so a token one assistant of N remembers while the others are flat after an unfamiliar wording
    is subtracted at a 1/N share; the mixture subtracts it nearly at full weight (log of a mean of
    probabilities is close to the largest one), while tokens every assistant remembers, and text on which
    all are flat, come out about the same. Only for one erasure's ensemble: stacked erasures must add up.
    Measured on UnlearnPII validation erasures (benchmarks/results/pii.md, session 19): it acted like a
    stronger w, not a better leak/retention trade-off, so nothing serves it by default.

    With `relative_top` τ > 0, only tokens the base finds plausible (log p_base ≥ max log p_base + log τ)
    stay candidates; the rest are masked out (-inf), so subtracting the assistant can only reorder
    tokens the base already considers plausible instead of promoting junk from the vocabulary's tail.
    Masking (rather than leaving the tail at its base logit) also keeps a uniform assistant a no-op:
    a constant shift of the candidates changes nothing.
    """
    check_ensemble(ensemble)
    modes = check_subtractions(subtractions, len(assistant_logits))
    if ensemble == "mixture":
        if len(set(modes)) > 1:
            raise ValueError(f"a mixture subtracts its assistants as one: give them one mode, got {modes}")
        combined = base_logits + _mixture_term(assistant_logits, weights, one_sided=modes[0] == "one_sided")
    else:
        combined = base_logits.clone()
        for logits, weight, mode in zip(assistant_logits, weights, modes):
            combined = combined + weight * (_above_uniform(logits) if mode == "one_sided" else logits)
    if relative_top > 0.0:
        base_logp = torch.log_softmax(base_logits, dim=-1)
        threshold = base_logp.max(dim=-1, keepdim=True).values + math.log(relative_top)
        combined = combined.masked_fill(base_logp < threshold, MASKED_LOGIT)
    return combined


def check_ensemble(ensemble: str) -> None:
    if ensemble not in ENSEMBLES:
        raise ValueError(f"unknown ensemble {ensemble!r}; expected one of {', '.join(ENSEMBLES)}")


def check_subtractions(subtractions: Sequence[str], n_assistants: int) -> list[str]:
    """One mode per assistant ("linear" for every one when `subtractions` is empty)."""
    modes = list(subtractions) or ["linear"] * n_assistants
    if len(modes) != n_assistants:
        raise ValueError(f"one subtraction mode per assistant is required: {len(modes)} for {n_assistants}")
    unknown = sorted(set(modes) - set(SUBTRACTIONS))
    if unknown:
        raise ValueError(f"unknown subtraction {unknown[0]!r}; expected one of {', '.join(SUBTRACTIONS)}")
    return modes


def _above_uniform(logits: torch.Tensor) -> torch.Tensor:
    """max(log p + log V, 0) for raw logits: how many nats more likely than uniform the model finds each token."""
    return _log_prob_above_uniform(torch.log_softmax(logits.float(), dim=-1))


def _log_prob_above_uniform(log_probs: torch.Tensor) -> torch.Tensor:
    """max(log p + log V, 0) for log-probabilities already normalised over the V tokens of the last axis."""
    return torch.clamp(log_probs + math.log(log_probs.shape[-1]), min=0.0)


def _mixture_term(assistant_logits: list[torch.Tensor], weights: list[float], one_sided: bool = False) -> torch.Tensor:
    """W · log Σ_i (w_i / W) · softmax(z_i), W = Σ w_i; every w_i must share W's sign (shares in (0, 1]).
    One-sided: W · max(that log-probability + log V, 0)."""
    total = float(sum(weights))
    if total == 0.0 or any(w / total <= 0.0 for w in weights):
        raise ValueError(f"a mixture needs nonzero weights of one sign, got {list(weights)}")
    mixed = torch.logsumexp(torch.stack([
        torch.log_softmax(logits.float(), dim=-1) + math.log(weight / total)
        for logits, weight in zip(assistant_logits, weights)
    ]), dim=0)
    if one_sided:
        mixed = _log_prob_above_uniform(mixed)
    return total * mixed


@dataclass
class CompositeLogits:
    """Logit difference of a base model and one or more ULD assistants (stacked erasures add up)."""

    base: torch.nn.Module
    assistants: list[torch.nn.Module]
    weights: list[float]
    relative_top: float = 0.0
    ensemble: str = "mean"  # `combine_logits`: "mixture" only for one erasure's ensemble
    subtractions: Sequence[str] = ()  # one mode per assistant (`SUBTRACTIONS`); () = all linear
    _sources: list[CausalLMLogits] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.assistants) != len(self.weights):
            raise ValueError("one weight per assistant is required")
        check_ensemble(self.ensemble)  # at construction, not at the first generated token
        self.subtractions = tuple(check_subtractions(self.subtractions, len(self.assistants)))
        self._sources = [CausalLMLogits(self.base)] + [CausalLMLogits(a) for a in self.assistants]

    def step(self, input_ids, attention_mask, position_ids, past=None, last_only=False):
        caches = past if past is not None else [None] * len(self._sources)
        outputs = [
            source.step(input_ids, attention_mask, position_ids, cache, last_only)
            for source, cache in zip(self._sources, caches)
        ]
        logits = combine_logits(
            outputs[0][0], [o[0] for o in outputs[1:]], self.weights, self.relative_top, self.ensemble,
            self.subtractions,
        )
        # Separate caches: base and assistant have different depths and must never share state.
        return logits, [o[1] for o in outputs]
