"""Batched greedy decoding and teacher-forced answer scoring over any `LogitSource`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .logits import LogitSource
from .metrics import sequence_log_probs
from .prompting import (
    IGNORE_INDEX,
    PromptFormat,
    collate_qa,
    encode_prompt,
    pad_batch,
    pad_token_id,
    position_ids_from_mask,
)


@torch.no_grad()
def greedy_generate(
    source: LogitSource,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 48,
    batch_size: int = 16,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[str]:
    """Continuations of `prompts` (left-padded batches, KV-cached), decoded without specials: greedy, or with
    `temperature` > 0 sampled from the softened distribution (reproducible for a given `seed`)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    generator = torch.Generator().manual_seed(seed) if temperature > 0 else None
    results: list[str] = []
    pad_id = pad_token_id(tokenizer)
    eos_id = tokenizer.eos_token_id
    for start in range(0, len(prompts), batch_size):
        chunk = [encode_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
        input_ids, mask = pad_batch(chunk, pad_id, side="left")
        positions = position_ids_from_mask(mask)
        generated = torch.empty((len(chunk), 0), dtype=torch.long)
        finished = torch.zeros(len(chunk), dtype=torch.bool)
        past = None
        step_ids, step_positions = input_ids, positions
        for _ in range(max_new_tokens):
            logits, past = source.step(step_ids, mask, step_positions, past, last_only=True)
            next_ids = pick_next(logits[:, -1, :], temperature, generator)
            if next_ids.device != generated.device:
                # Keep the decoding state where the logits are (a GPU): one host sync per token is
                # the `finished.all()` check below, not a copy of every tensor every step.
                generated, finished = generated.to(next_ids.device), finished.to(next_ids.device)
                mask, step_positions = mask.to(next_ids.device), step_positions.to(next_ids.device)
            next_ids = torch.where(finished, torch.full_like(next_ids, pad_id), next_ids)
            generated = torch.cat([generated, next_ids[:, None]], dim=1)
            if eos_id is not None:
                finished |= next_ids == eos_id
            if bool(finished.all()):
                break
            step_ids = next_ids[:, None]
            step_positions = step_positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones((len(chunk), 1), dtype=mask.dtype, device=mask.device)], dim=1)
        for row in generated.tolist():
            if eos_id is not None and eos_id in row:
                row = row[: row.index(eos_id)]
            results.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return results


def pick_next(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """The next token per row: the most likely, or a draw at `temperature` (on the CPU, so a seed reproduces)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)


@dataclass(frozen=True)
class AnswerScore:
    sum_log_prob: float
    n_tokens: int

    @property
    def mean_log_prob(self) -> float:
        return self.sum_log_prob / max(self.n_tokens, 1)


@torch.no_grad()
def score_answers(
    source: LogitSource,
    tokenizer,
    fmt: PromptFormat,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 16,
) -> list[AnswerScore]:
    """Teacher-forced log-probability of each answer given its question, one forward pass per batch, in the order
    of `pairs`. Batches hold pairs of similar length (less padding to run through the model), and logits are
    computed only at the positions some row's answer is scored at, not over prompts and padding."""
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    by_length = [pairs[i] for i in order]
    scores: list[AnswerScore] = []
    for start in range(0, len(by_length), batch_size):
        batch = collate_qa(tokenizer, fmt, by_length[start : start + batch_size])
        positions = position_ids_from_mask(batch["attention_mask"])
        labels = batch["labels"][:, 1:]  # the logit at position t predicts the label at t + 1
        scored = (labels != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
        if scored.numel() == 0:  # no answer tokens at all: every score is an empty sum
            scores.extend(AnswerScore(0.0, 0) for _ in range(labels.shape[0]))
            continue
        logits, _ = source.step(batch["input_ids"], batch["attention_mask"], positions, keep=scored)
        sums, counts = sequence_log_probs(logits, labels[:, scored].to(logits.device))
        scores.extend(AnswerScore(float(s), int(c)) for s, c in zip(sums, counts))
    in_order: list[AnswerScore] = [None] * len(pairs)  # type: ignore[list-item]
    for position, score in zip(order, scores):
        in_order[position] = score
    return in_order
