"""Evaluate a model (any `LogitSource`) on named QA splits: greedy-answer ROUGE-L and answer probability."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from .augment import fact_spans
from .corpus import QARecord
from .generation import greedy_generate, score_answers
from .logits import LogitSource
from .metrics import (fact_appears, fact_recall, facts_stated, facts_stated_anywhere, length_normalised_prob,
                      rouge_l_recall)
from .muse import knowmem
from .prompting import PromptFormat


@dataclass(frozen=True)
class SplitMetrics:
    n: int
    rougeL_recall: float  # TOFU's answer overlap
    answer_prob: float
    rougeL_f1: float = float("nan")  # MUSE's KnowMem on the same greedy answers
    # Share of the answers' facts (names, places, numbers, identifiers) the greedy answers state; None
    # when the split's answers carry none. A privacy erasure is about these, not about the wording.
    fact_recall: float | None = None
    n_facts: int = 0
    # Per record, in order (not in `as_dict`: the evidence keeps aggregates): each greedy answer's ROUGE-L
    # recall, and how many of its record's facts it states of how many. For intervals over the records.
    per_record_rougeL: tuple[float, ...] = ()
    per_record_facts: tuple[tuple[int, int], ...] = ()
    answers: tuple[str, ...] = ()  # the greedy answers, in memory only (`facts_anywhere`, forget fluency)

    def as_dict(self) -> dict[str, float]:
        return {"n": self.n, "rougeL_recall": self.rougeL_recall, "answer_prob": self.answer_prob,
                "rougeL_f1": self.rougeL_f1, "fact_recall": self.fact_recall, "n_facts": self.n_facts}


def record_facts(record: QARecord) -> list[str]:
    """The facts a correct answer gives away: the answer's fact spans and the record's identifiers, less
    those the question itself states (repeating the subject's name from the question reveals nothing)."""
    spans = [record.answer[start:end] for _, start, end in fact_spans(record.answer)]
    return [f for f in dict.fromkeys([*spans, *record.pii]) if not fact_appears(record.question, f)]


def evaluate_split(
    source: LogitSource,
    tokenizer,
    fmt: PromptFormat,
    records: Sequence[QARecord],
    max_new_tokens: int = 48,
    batch_size: int = 16,
) -> SplitMetrics:
    if not records:
        raise ValueError("cannot evaluate an empty split")
    prompts = [fmt.prompt(r.question) for r in records]
    answers = greedy_generate(source, tokenizer, prompts, max_new_tokens, batch_size)
    recalls = [rouge_l_recall(pred, r.answer) for pred, r in zip(answers, records)]
    scores = score_answers(source, tokenizer, fmt, [r.pair for r in records], batch_size)
    probs = [float(length_normalised_prob(s.sum_log_prob, s.n_tokens)) for s in scores]
    facts_per_record = [record_facts(r) for r in records]
    facts, n_facts = fact_recall(answers, facts_per_record)
    stated = tuple(facts_stated(answer, f) for answer, f in zip(answers, facts_per_record))
    return SplitMetrics(len(records), float(np.mean(recalls)), float(np.nanmean(probs)),
                        knowmem(answers, [r.answer for r in records]), facts, n_facts,
                        tuple(float(r) for r in recalls), stated, tuple(answers))


def evaluate_splits(
    source: LogitSource,
    tokenizer,
    fmt: PromptFormat,
    splits: Mapping[str, Sequence[QARecord]],
    max_new_tokens: int = 48,
    batch_size: int = 16,
) -> dict[str, SplitMetrics]:
    return {
        name: evaluate_split(source, tokenizer, fmt, records, max_new_tokens, batch_size)
        for name, records in splits.items()
    }


def facts_anywhere(forget: Sequence[QARecord], answers: Sequence[str], others: Sequence[QARecord]) -> dict:
    """The erased records' facts stated in *any* of the answers to the forget questions, beside the same share of
    each other person's facts (people of `others`, e.g. the retain split) in the same answers.

    Why the comparison: a composite that answers with word salad strings memorised fragments of everyone
    together, so some of anyone's facts turn up by chance; only a share above the other people's is memory of
    the subject. Numbers only: rate = stated / n_facts; the others' rate pooled over their facts, and the
    largest one person's."""
    questions = [r.question for r in forget]
    own = [f for r in forget for f in record_facts(r)]
    stated, n_facts = facts_stated_anywhere(answers, questions, own)
    erased_people = {r.subject or r.document_id for r in forget}
    people: dict[str, list[QARecord]] = {}
    for r in others:
        person = r.subject or r.document_id
        if person and person not in erased_people:
            people.setdefault(person, []).append(r)
    rates, own_set, others_stated, others_facts = [], set(own), 0, 0
    for records in people.values():
        # facts the erased subject shares (a city both live in) are the subject's, not a control
        theirs = [f for r in records for f in record_facts(r) if f not in own_set]
        hit, n = facts_stated_anywhere(answers, questions, theirs)
        if n:
            rates.append(hit / n)
            others_stated, others_facts = others_stated + hit, others_facts + n
    return {"stated": stated, "n_facts": n_facts, "rate": stated / n_facts if n_facts else None,
            # pooled over the other people (each has few facts in a retain split, so per-person rates are coarse)
            "others": {"n_people": len(rates), "stated": others_stated, "n_facts": others_facts,
                       "rate": others_stated / others_facts if others_facts else None,
                       "max_rate": max(rates) if rates else None}}
