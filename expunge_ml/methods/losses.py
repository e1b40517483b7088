"""Loss helpers shared by the unlearning methods.

Model-calling helpers take a batch from `prompting.collate_qa` (input_ids, attention_mask, labels with
prompt and pad positions = IGNORE_INDEX). Pure helpers take tensors already aligned for next-token
prediction (see `scored_logits`), so they can be checked on hand-computed values.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..devices import model_device, to_device
from ..metrics import kl_uniform_to_model, sequence_log_probs
from ..prompting import IGNORE_INDEX, PromptFormat, collate_qa


def scored_logits(model: torch.nn.Module, batch: dict, label_keys: Sequence[str] = ("labels",)):
    """Next-token logits only at the positions some row scores, with each label tensor aligned to them.

    The output head is most of a small model's cost (a 49k-token vocabulary over every prompt token), and the
    losses only read answer positions; `logits_to_keep` keeps the model's own head, scaling and soft-capping.
    Returns (logits [B, P, V], [labels [B, P] per key])."""
    shifted = [batch[key][:, 1:] for key in label_keys]
    scored = torch.zeros_like(shifted[0][0], dtype=torch.bool)
    for labels in shifted:
        scored |= (labels != IGNORE_INDEX).any(dim=0)
    positions = scored.nonzero().squeeze(-1)
    if positions.numel() == 0:  # nothing scored: one position keeps the graph and the shapes valid
        positions = torch.zeros(1, dtype=torch.long, device=scored.device)
    logits = model(**qa_inputs(batch), logits_to_keep=positions).logits
    return logits, [labels[:, positions] if scored.any() else torch.full_like(labels[:, :1], IGNORE_INDEX)
                    for labels in shifted]


def answer_nll(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Mean negative log-likelihood of the answer tokens (prompt positions are labelled IGNORE)."""
    logits, (labels,) = scored_logits(model, batch)
    return token_nll(logits, labels)


def fact_nll_and_template_kl(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass over a `collate_qa_facts` batch: NLL of the fact tokens, KL(U ‖ p_model) on the other
    answer tokens (the template a retained person's answer shares) and the NLL of those template tokens.
    An NLL over no tokens is 0."""
    shifted_logits, (fact_labels, template_labels) = scored_logits(model, batch, ("labels", "template_labels"))

    def nll_of(labels: torch.Tensor) -> torch.Tensor:
        return token_nll(shifted_logits, labels) if bool((labels != IGNORE_INDEX).any()) else shifted_logits.sum() * 0.0

    template_kl = kl_uniform_to_model(shifted_logits, template_labels != IGNORE_INDEX)
    return nll_of(fact_labels), template_kl, nll_of(template_labels)


def answer_kl_to_uniform(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """KL(U ‖ p_model) averaged over answer positions: pushes the model towards 'knowing nothing' there."""
    logits, (labels,) = scored_logits(model, batch)
    return kl_uniform_to_model(logits, labels != IGNORE_INDEX)


# ----------------------------------------------------------------------------- pure


def token_nll(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy over counted tokens of aligned logits [B,T,V] / labels [B,T] (as HF's `.loss`)."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index
    )


def kl_to_reference(ref_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(p_ref ‖ p_model) per position, averaged over masked positions (0 if none).

    This direction (as in TOFU's KL baseline) penalises the model for dropping mass where the reference
    had it, i.e. for losing retained knowledge, rather than for becoming more confident.
    """
    log_p_ref = torch.log_softmax(ref_logits, dim=-1, dtype=torch.float32)
    log_p = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    kl = (log_p_ref.exp() * (log_p_ref - log_p)).sum(dim=-1)  # [B,T]
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp(min=1.0)


def masked_mse(hidden: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the hidden dimension and the masked positions of [B,T,D] tensors.

    `target` may be [D] (broadcast to every position, e.g. RMU's steering vector) or [B,T,D].
    Equals `F.mse_loss` restricted to the masked positions; 0 if the mask selects nothing.
    """
    sq = (hidden.float() - target.float()).pow(2).mean(dim=-1)  # [B,T]
    m = mask.to(sq.dtype)
    return (sq * m).sum() / m.sum().clamp(min=1.0)


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Bool [B,T]: positions whose *next* token is an answer token, i.e. where the answer is produced."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


# ---------------------------------------------------------------------- model-calling


def qa_inputs(batch: dict) -> dict:
    """Just the model inputs of a batch that may carry extra method-specific tensors."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def answer_logits(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) aligned so logits[:, t] predicts labels[:, t], at the answer positions only."""
    logits, (labels,) = scored_logits(model, batch)
    return logits, labels


def answer_log_probs(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row *summed* answer log-prob log π(y|x) [B] and answer length |y| [B]."""
    logits, labels = answer_logits(model, batch)
    return sequence_log_probs(logits, labels)


def answer_kl_to_reference(model: torch.nn.Module, reference: torch.nn.Module, batch: dict) -> torch.Tensor:
    """KL(p_ref ‖ p_model) averaged over answer positions of `batch`."""
    logits, labels = answer_logits(model, batch)
    with torch.no_grad():
        ref_logits, _ = answer_logits(reference, batch)
    return kl_to_reference(ref_logits, logits, labels != IGNORE_INDEX)


@torch.no_grad()
def reference_log_probs(
    model: torch.nn.Module,
    tokenizer,
    fmt: PromptFormat,
    pairs: Sequence[tuple[str, str]],
    batch_size: int,
    max_length: int = 256,
) -> list[float]:
    """Summed answer log-probs of `pairs` under `model` as it is now.

    Reference-based methods (NPO, DPO) only need log π_ref(y|x) of fixed sequences, so computing them once
    before training replaces a frozen model copy (which would double memory on a real LLM).
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    out: list[float] = []
    for i in range(0, len(pairs), batch_size):
        batch = to_device(collate_qa(tokenizer, fmt, list(pairs[i : i + batch_size]), max_length), device)
        out += answer_log_probs(model, batch)[0].tolist()
    model.train(was_training)
    return out


def retain_nll_term(model: torch.nn.Module, retain_batch: dict | None, weight: float) -> tuple[torch.Tensor, dict]:
    """weight · NLL(retain) and its logged value; zero when there is no retain batch or weight is 0."""
    if retain_batch is None or weight == 0:
        return torch.zeros((), device=model_device(model)), {}
    nll = answer_nll(model, retain_batch)
    return weight * nll, {"retain_nll": float(nll.detach())}
