"""Other wordings of a training question, written by a small instruction-tuned LM.

Why: a ULD assistant recalls an erased fact only after the question wordings it was trained on, so the
composite leaks wherever the base model answers a wording the assistant never saw. The ULD authors
trained their assistant on LLM-written paraphrases of the forget set for the same reason. This module
does that offline with any local causal LM (e.g. SmolLM2-135M-Instruct): few-shot prompts in a plain
"Original: … / Reworded: …" format, because a model this small answers the question instead of
rewording it when asked in a chat turn.

Only the training question goes in. On a benchmark the generated wordings are independent of the
evaluation's own paraphrased questions (the model never sees those), so training on them is
augmentation, not fitting the metric. Pure torch / transformers; deterministic given the seed.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch

# Invented people and questions (no dataset text): the shape of the task, not its content.
FEW_SHOT = (
    ("What is the phone number listed for Maria Gonzalez at her office?",
     "Which office phone number does Maria Gonzalez have on record?"),
    ("Where does Peter Olsen keep his savings account?",
     "At which bank is Peter Olsen's savings account held?"),
    ("What condition was Anna Kowalski diagnosed with last year?",
     "Last year, which diagnosis did Anna Kowalski receive?"),
    ("Can you tell me the home address of Rahul Mehta?",
     "Where does Rahul Mehta live, what is his address?"),
)
_FEW_SHOT_NAMES = ("Maria Gonzalez", "Peter Olsen", "Anna Kowalski", "Rahul Mehta")


def paraphrase_prompt(question: str) -> str:
    shots = "".join(f"Original: {a}\nReworded: {b}\n\n" for a, b in FEW_SHOT)
    return f"{shots}Original: {question.strip()}\nReworded:"


def _normalised(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def keep_paraphrase(candidate: str, original: str, subject: str, min_words: int = 4) -> bool:
    """Whether a generated line is usable as another wording of `original` about `subject`.

    It must be one question (ends with "?"), name the subject in full (the pairs teach *this person's*
    facts; a small model often swaps in a few-shot name or drops the name), differ from the original
    beyond punctuation and case, and carry no few-shot name or prompt label.
    """
    text = candidate.strip()
    if not text.endswith("?") or len(text.split()) < min_words:
        return False
    if subject.strip() and subject.strip().lower() not in text.lower():
        return False
    if any(name.lower() in text.lower() for name in _FEW_SHOT_NAMES if name.lower() not in subject.lower()):
        return False
    if "original:" in text.lower() or "reworded:" in text.lower():
        return False
    return _normalised(text) != _normalised(original)


def generate_question_paraphrases(
    model: torch.nn.Module,
    tokenizer,
    items: Sequence[tuple[str, str]],
    n: int,
    *,
    candidates: int = 8,
    batch_size: int = 8,
    max_new_tokens: int = 48,
    temperature: float = 0.9,
    top_p: float = 0.95,
    seed: int = 0,
    progress=None,
) -> list[list[str]]:
    """Up to `n` distinct rewordings of each (question, subject) in `items`, in order.

    Samples `candidates` continuations per question and keeps the first `n` that `keep_paraphrase`
    accepts; a question may get fewer (a small model misses often), never a rejected one.
    """
    if n < 1:
        return [[] for _ in items]
    pad_side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues on the right
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    out: list[list[str]] = []
    try:
        model.eval()
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            enc = tokenizer([paraphrase_prompt(q) for q, _ in batch], return_tensors="pt", padding=True)
            with torch.no_grad():
                generated = model.generate(
                    **enc, do_sample=True, temperature=temperature, top_p=top_p,
                    max_new_tokens=max_new_tokens, num_return_sequences=candidates,
                    pad_token_id=tokenizer.pad_token_id,
                )
            texts = tokenizer.batch_decode(generated[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for index, (question, subject) in enumerate(batch):
                kept: list[str] = []
                for text in texts[index * candidates:(index + 1) * candidates]:
                    line = text.strip().split("\n")[0].strip()
                    if keep_paraphrase(line, question, subject) and _normalised(line) not in map(_normalised, kept):
                        kept.append(line)
                    if len(kept) == n:
                        break
                out.append(kept)
            if progress is not None:
                progress(len(out), len(items))
    finally:
        tokenizer.padding_side = pad_side
        torch.random.set_rng_state(generator_state)
    return out


def wordings_by_question(model: torch.nn.Module, tokenizer, items: Sequence[tuple[str, str]], n: int,
                         **sampling) -> dict[str, list[str]]:
    """Question → up to `n` LM-written wordings, for each distinct (question, subject) of `items` (a subject
    may be "": then a wording only has to differ from the question). `sampling` goes to
    `generate_question_paraphrases`. A question asked about two subjects gets both sets of wordings."""
    distinct = list(dict.fromkeys(items))
    wordings: dict[str, list[str]] = {}
    for (question, _), found in zip(distinct, generate_question_paraphrases(model, tokenizer, distinct, n, **sampling)):
        kept = wordings.setdefault(question, [])
        kept += [w for w in found if w not in kept]
    return wordings
