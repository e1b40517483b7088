"""The ULD assistant's training data: forget⁺ to remember and retain⁺ to stay uniform on.

Every caller (the pipeline and every benchmark) builds the assistant's pairs here, so one recipe is
trained and measured. forget⁺ holds the forget QA and other forms of the same facts (remember the fact,
not one wording); retain⁺ holds the retain QA and near-miss answers to the forget questions (stay unknown
on those, so subtracting the assistant moves the composite neither towards nor away from them).
"""
from __future__ import annotations

import random
from typing import Iterable, Mapping, Sequence

from .augment import (bare_identifier_pairs, donor_pool, generated_fact_pairs, generated_near_misses,
                      identifier_items, masked_answer_items, subject_pairs, with_fact_labels)
from .methods.uld import ULDConfig

ForgetItems = list[tuple[str, str]] | list[tuple[str, str, list[str]]]


def reworded_pairs(question_answers: Iterable[tuple[str, str]],
                   question_wordings: Mapping[str, Sequence[str]]) -> list[tuple[str, str]]:
    """(wording, answer) for every wording of each (question, answer)'s question in `question_wordings`."""
    return [(wording, answer) for question, answer in question_answers
            for wording in question_wordings.get(question, ())]


def training_pairs(
    forget_records, retain_records, config: ULDConfig, *, donor_records=None, fact_terms: Sequence[str] = (),
    question_wordings: Mapping[str, Sequence[str]] | None = None, general_records=(),
) -> tuple[ForgetItems, list[tuple[str, str]]]:
    """(forget⁺, retain⁺) for `config`, from `QARecord`s.

    `general_records`: general-knowledge QA for `config.general_retain` (retain⁺ only).

    In order: the QA with their augmentation (`config.augmentation`; generated wrong facts come from
    `donor_records`, default the retain records, drawn from `config.seed`), other wordings of the questions
    (`question_wordings`: a question → its wordings, for forget and retain records alike), bare identifiers,
    identifier → subject pairs, masked-answer → subject pairs, subject → answer pairs. Each option adds the
    forget records' pairs to remember and the retain records' to stay uniform on.

    With `config.fact_span_loss` the forget items are (question, answer, facts): a record's whole answer
    carries `fact_terms` (the request's names and identifiers) + every forget record's `pii` + its own fact
    spans; a pair that names a subject has the subject as its fact; any other pair is all fact."""
    forget, retain = _augmented_pairs(forget_records, retain_records, config, donor_records)
    if config.general_retain:  # general knowledge the assistant must stay uniform on (`ULDConfig.general_retain`)
        if len(general_records) < config.general_retain:
            raise ValueError(f"general_retain = {config.general_retain} needs that many general records, "
                             f"got {len(general_records)}")
        retain += [(r.question, r.paraphrased_answer or r.answer) for r in general_records[:config.general_retain]]
    if question_wordings:
        forget += reworded_pairs(((r.question, r.answer) for r in forget_records), question_wordings)
        retain += reworded_pairs(((r.question, r.answer) for r in retain_records), question_wordings)
    if config.bare_identifiers:
        bare = bare_identifier_pairs(r.pii or () for r in forget_records)
        if not bare:  # an option that silently trains nothing would pass for one that did
            raise ValueError("bare_identifiers found no identifiers in the forget records: the corpus needs a `pii` "
                             "column (or turn the option off)")
        forget += bare
        retain += bare_identifier_pairs(r.pii or () for r in retain_records)
    named: list[tuple[str, str, str]] = []  # (question, answer, the subject it names)
    for enabled, build in ((config.identifier_pairs, identifier_items), (config.masked_answer_pairs, masked_answer_items)):
        if enabled:
            named += build(forget_records)
            retain += [(q, a) for q, a, _ in build(retain_records)]
    about = subject_pairs(forget_records) if config.subject_pairs else []
    if config.subject_pairs:
        retain += subject_pairs(retain_records)
    if not config.fact_span_loss:
        return forget + [(q, a) for q, a, _ in named] + about, retain
    label = _fact_labeller(forget_records, fact_terms)
    items = label(forget) + [(q, a, [subject]) for q, a, subject in named] + label(about)
    if not any(facts for _, _, facts in items):
        raise ValueError("fact_span_loss found no facts to remember: give the request's names or identifiers, "
                         "or a `pii` column in the corpus")
    return items, retain


def _fact_labeller(forget_records, fact_terms: Sequence[str]):
    """A function labelling (question, answer) pairs with their facts for the fact-only loss."""
    request_facts = ({t.strip() for t in fact_terms if t and t.strip()}
                     | {p for r in forget_records for p in r.pii if p.strip()})
    full_answers = {r.answer for r in forget_records} | {r.paraphrased_answer for r in forget_records}

    def label(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str, list[str]]]:
        return [(q, a, sorted(request_facts | set(facts)) if a in full_answers else facts)
                for q, a, facts in with_fact_labels(pairs, full_answers)]

    return label


def _augmented_pairs(forget_records, retain_records, config: ULDConfig, donor_records):
    """(forget⁺, retain⁺) as (question, answer) pairs: the QA and their `config.augmentation`."""
    if config.augmentation not in ("corpus", "generated"):
        raise ValueError(f"augmentation must be 'corpus' or 'generated', got {config.augmentation!r}")
    forget = [r.pair for r in forget_records]
    retain = [r.pair for r in retain_records]
    if config.augmentation == "corpus":
        if config.augment_paraphrased:
            forget += [(r.question, r.paraphrased_answer) for r in forget_records if r.paraphrased_answer]
        if config.augment_perturbed:
            retain += [(r.question, wrong) for r in forget_records for wrong in r.perturbed_answers]
        return forget, retain
    rng = random.Random(config.seed)
    donors = donor_pool(r.answer for r in (retain_records if donor_records is None else donor_records))
    if config.augment_perturbed:
        retain += generated_near_misses(forget_records, donors, config.near_misses_per_item, rng)
    if config.fact_pairs:
        facts, wrong_facts = generated_fact_pairs(forget_records, donors, rng)
        forget += facts
        retain += wrong_facts
    return forget, retain
