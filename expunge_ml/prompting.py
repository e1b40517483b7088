"""How a QA pair becomes token ids: one prompt format shared by training, unlearning and evaluation.

Every method and metric must see exactly the same prompt/answer split, otherwise "the model forgot"
could just mean "the model was asked differently".
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch

IGNORE_INDEX = -100
DEFAULT_PROMPT_TEMPLATE = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class PromptFormat:
    template: str = DEFAULT_PROMPT_TEMPLATE
    # The answer follows the prompt after this separator: a space after "Answer:" style prompts, nothing after
    # a template that ends in whitespace (a chat template's assistant turn opens with a newline).
    answer_prefix: str | None = None

    def __post_init__(self) -> None:
        if self.answer_prefix is None:
            object.__setattr__(self, "answer_prefix", "" if self.template[-1:].isspace() else " ")

    def prompt(self, question: str) -> str:
        return self.template.format(question=question)


CHAT_PLACEHOLDER = "\x00question\x00"


def chat_format(tokenizer) -> PromptFormat | None:
    """The tokenizer's own chat template as a prompt frame (one user turn, then the assistant's), or None when
    it has none. An instruction-tuned model answers in this frame; asked "Question: …\nAnswer:" it may not."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    text = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_PLACEHOLDER}], tokenize=False,
                                         add_generation_prompt=True)
    if text.count(CHAT_PLACEHOLDER) != 1:
        return None
    return PromptFormat(template=text.replace("{", "{{").replace("}", "}}").replace(CHAT_PLACEHOLDER, "{question}"))


def encode_prompt(tokenizer, text: str) -> list[int]:
    # add_special_tokens=True lets each tokenizer add its own BOS (Llama-style) or nothing (GPT-2 style).
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def encode_answer(tokenizer, fmt: PromptFormat, answer: str, add_eos: bool = True) -> list[int]:
    ids = list(tokenizer(fmt.answer_prefix + answer, add_special_tokens=False)["input_ids"])
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def encode_qa(tokenizer, fmt: PromptFormat, question: str, answer: str, max_length: int = 256):
    """Token ids and labels for teacher forcing; labels mask the prompt so only answer tokens count."""
    prompt_ids = encode_prompt(tokenizer, fmt.prompt(question))
    answer_ids = encode_answer(tokenizer, fmt, answer)
    input_ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
    return input_ids, labels


def fact_token_flags(tokenizer, fmt: PromptFormat, answer: str, facts: Sequence[str]) -> list[bool]:
    """One flag per answer token as `encode_answer` makes them (EOS included, flagged False): does the
    token overlap an occurrence of one of `facts` in the answer text? Needs a fast tokenizer (offsets)."""
    text = fmt.answer_prefix + answer
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = [(m.start(), m.end()) for fact in facts if fact for m in re.finditer(re.escape(fact), text)]
    flags = [any(start < span_end and span_start < end for span_start, span_end in spans)
             for start, end in encoded["offset_mapping"]]
    if tokenizer.eos_token_id is not None:
        flags.append(False)
    return flags


def collate_qa_facts(tokenizer, fmt: PromptFormat, items: Sequence[tuple[str, str, Sequence[str]]],
                     max_length: int = 256):
    """Like `collate_qa` for (question, answer, facts) items, with the answer's labels split in two:
    `labels` on the tokens of the facts, `template_labels` on every other answer token."""
    encoded = [encode_qa(tokenizer, fmt, q, a, max_length) for q, a, _ in items]
    fact_rows, template_rows = [], []
    for (ids, labels), (_, answer, facts) in zip(encoded, items):
        n_prompt = sum(1 for label in labels if label == IGNORE_INDEX)
        flags = ([False] * n_prompt + fact_token_flags(tokenizer, fmt, answer, facts))[: len(labels)]
        fact_rows.append([t if f else IGNORE_INDEX for t, f in zip(labels, flags)])
        template_rows.append([t if (not f and t != IGNORE_INDEX) else IGNORE_INDEX for t, f in zip(labels, flags)])
    input_ids, mask = pad_batch([e[0] for e in encoded], pad_token_id(tokenizer))
    labels, _ = pad_batch(fact_rows, IGNORE_INDEX)
    template_labels, _ = pad_batch(template_rows, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "template_labels": template_labels}


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_value: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to a [B, T] tensor and return it with its attention mask (1 = real token)."""
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if not seq:
            continue
        if side == "right":
            out[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        else:
            out[row, width - len(seq):] = torch.tensor(seq)
            mask[row, width - len(seq):] = 1
    return out, mask


def collate_qa(tokenizer, fmt: PromptFormat, pairs: Sequence[tuple[str, str]], max_length: int = 256):
    """Right-padded batch of QA pairs: input_ids, attention_mask, labels (prompt and pads = IGNORE)."""
    encoded = [encode_qa(tokenizer, fmt, q, a, max_length) for q, a in pairs]
    pad_id = pad_token_id(tokenizer)
    input_ids, mask = pad_batch([e[0] for e in encoded], pad_id)
    labels, _ = pad_batch([e[1] for e in encoded], IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def pad_token_id(tokenizer) -> int:
    # Many causal LMs ship without a pad token; the EOS id is a safe filler because pads are masked.
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a left-padded row sees the same positions as an unpadded one."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)
