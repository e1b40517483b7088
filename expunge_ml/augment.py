"""Training augmentation for the ULD assistant, built from the training text itself.

A corpus may ship paraphrased / perturbed answers, but on a benchmark those are the evaluation's own texts
(TOFU's truth ratio compares exactly those), so training on them fits the metric instead of forgetting the
fact. Everything here is built from the training answers and the request's identifiers alone:

- `perturb_answer` / `generated_near_misses`: the answer with one fact span (a capitalised name, a place, a
  title, a number) replaced by a span of the same kind from *other* records: same wording, wrong fact;
- `generated_fact_pairs`: (question, fact span) to remember, (question, another record's span) to stay
  uniform on: the fact without the wording that other answers share;
- `identifier_items`, `masked_answer_items`, `subject_pairs`, `bare_identifier_pairs`: the same person's
  data asked from other directions than the training question (identifiers → name, description → name,
  name → data, the identifier alone), which a memorising base answers although it never trained on them.

Pure Python, deterministic given the `random.Random` passed in.
"""
from __future__ import annotations

import random
import re
from collections import defaultdict
from typing import Iterable, Sequence

# Words that start sentences or are capitalised for grammar, not because they name something.
_FUNCTION_WORDS = frozenset(
    """a an the in on at as by for from of to with and or but if yes no not his her hers their its it he she
    they we i you this that these those one some any all each every many most such there here while
    although though despite however when where what which who whom whose why how after before during
    since because through throughout besides apart beyond within without upon into onto over under
    also indeed overall additionally furthermore moreover notably born being two three four five first second
    third author authors writer""".split()
)
_NAME_WORD = r"[A-Z][\w'’.-]*"
_CONNECTOR = r"(?:of|the|de|da|del|van|von|der|al|and|&|in|on|for|to|a)"
_NAME_SPAN = re.compile(rf"{_NAME_WORD}(?:\s+(?:{_CONNECTOR}\s+)*{_NAME_WORD})*")
_NUMBER = re.compile(r"\b\d[\d,]*(?:\.\d+)?\b")
# Personal identifiers (emails; phone / account / card numbers with separators): one span each, so a
# privacy erasure's fact pairs hold the whole identifier, not its digit groups.
_IDENTIFIER = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+|\+?\b\d[\d().\s-]{5,}\d\b|\b(?=[A-Z0-9-]*\d)[A-Z]{2,}[A-Z0-9-]{4,}\b")


def _is_content_span(span: str) -> bool:
    words = [w.strip("'’.-").lower() for w in span.split()]
    return any(w and w not in _FUNCTION_WORDS for w in words)


def fact_spans(text: str) -> list[tuple[str, int, int]]:
    """(kind, start, end) of the spans that carry facts: identifiers, capitalised name-like spans, numbers."""
    spans: list[tuple[str, int, int]] = [("identifier", m.start(), m.end()) for m in _IDENTIFIER.finditer(text)]

    def free(start: int, end: int) -> bool:
        return not any(s < end and start < e for kind, s, e in spans if kind == "identifier")

    for m in _NAME_SPAN.finditer(text):
        words = [w for w in re.finditer(r"\S+", m.group(0))]
        # A sentence-initial capital is grammar, not a name: drop leading function words ("The", "In").
        while words and words[0].group(0).strip("'’.-").lower() in _FUNCTION_WORDS:
            words.pop(0)
        if not words:
            continue
        start = m.start() + words[0].start()
        end = m.end()
        while end > start and text[end - 1] in ".'’-":
            end -= 1
        if text[start:end].endswith(("'s", "’s")):  # possessive: the name is the span without it
            end -= 2
        if end > start and _is_content_span(text[start:end]) and free(start, end):
            spans.append(("name", start, end))
    spans.extend(("number", m.start(), m.end()) for m in _NUMBER.finditer(text) if free(m.start(), m.end()))
    return sorted(spans, key=lambda s: s[1])


def donor_pool(texts: Iterable[str]) -> dict[str, list[str]]:
    """Fact spans by kind from `texts` (other records), de-duplicated in first-seen order."""
    pool: dict[str, dict[str, None]] = defaultdict(dict)
    for text in texts:
        for kind, start, end in fact_spans(text):
            pool[kind][text[start:end]] = None
    return {kind: list(spans) for kind, spans in pool.items()}


def _other_number(value: str, rng: random.Random) -> str:
    digits = value.replace(",", "")
    if "." in digits or not digits.isdigit():
        return str(round(float(digits) * rng.choice((0.5, 1.5, 2.0)), 2))
    n = int(digits)
    if 1000 <= n <= 2100:  # a year: stay plausible
        shift = rng.choice([d for d in range(-25, 26) if d])
        return str(n + shift)
    return str(max(0, n + rng.choice([d for d in range(-max(2, n // 2), max(3, n // 2 + 1)) if d])))


def perturb_answer(answer: str, donors: dict[str, list[str]], rng: random.Random, variant: int = 0) -> str | None:
    """`answer` with one fact span (the `variant`-th, cycling) replaced everywhere it occurs by a donor span
    of the same kind; None when the answer has no fact span or no donor differs from it."""
    spans = fact_spans(answer)
    if not spans:
        return None
    order = list(range(len(spans)))
    rng.shuffle(order)
    for k in range(len(order)):
        kind, start, end = spans[order[(variant + k) % len(order)]]
        original = answer[start:end]
        if kind == "number":
            replacement = _other_number(original, rng)
        else:
            choices = [d for d in donors.get("name", []) if d.lower() != original.lower()]
            if not choices:
                continue
            replacement = rng.choice(choices)
        if replacement != original:
            return re.sub(rf"(?<!\w){re.escape(original)}(?!\w)", lambda _m: replacement, answer)
    return None


def near_miss_answers(answer: str, donors: dict[str, list[str]], n: int, rng: random.Random) -> list[str]:
    """Up to `n` distinct wrong versions of `answer`, each with a different fact swapped for one from
    `donors` (a `donor_pool` of other records' answers); none equals the answer itself."""
    wrong_answers: list[str] = []
    for variant in range(n):
        wrong = perturb_answer(answer, donors, rng, variant)
        if wrong and wrong != answer and wrong not in wrong_answers:
            wrong_answers.append(wrong)
    return wrong_answers


def generated_near_misses(records: Sequence, donors: dict[str, list[str]], n_per_item: int,
                          rng: random.Random) -> list[tuple[str, str]]:
    """Up to `n_per_item` (question, wrong answer) pairs per record (`near_miss_answers`)."""
    return [(r.question, wrong) for r in records for wrong in near_miss_answers(r.answer, donors, n_per_item, rng)]


def generated_fact_pairs(records: Sequence, donors: dict[str, list[str]], rng: random.Random
                         ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(question, fact span) pairs to remember and (question, another record's span of the same kind) pairs
    to stay uniform on: the fact without the answer's wording, so the assistant holds the fact itself and
    not the sentence around it (the wording is shared with answers that must be kept). `donors`: a
    `donor_pool` of other records' answers."""
    remember: list[tuple[str, str]] = []
    near_miss: list[tuple[str, str]] = []
    for r in records:
        for kind, start, end in fact_spans(r.answer):
            fact = r.answer[start:end]
            remember.append((r.question, fact))
            others = [d for d in donors.get(kind, []) if d.lower() != fact.lower()]
            if others:
                near_miss.append((r.question, rng.choice(others)))
    return remember, near_miss


def with_fact_labels(pairs: Sequence[tuple[str, str]], full_answers: Iterable[str]
                     ) -> list[tuple[str, str, list[str]]]:
    """(question, answer, facts) items for ULD's fact-only loss (`ULDConfig.template_nll_weight`): an
    answer in `full_answers` (a record's whole answer) carries its fact spans as the facts, the rest of it
    is template wording that retained records share; any other answer is a fact pair's bare span, so all
    of it is fact."""
    full = set(full_answers)
    return [(q, a, [a[s:e] for _, s, e in fact_spans(a)] if a in full else [a]) for q, a in pairs]


# Fixed wordings for asking about a person from another direction than the training question.
IDENTIFIER_QUESTION = "Which person do these details belong to: {details}?"
IDENTIFIER_ANSWER = "These details belong to {subject}."
MASKED_QUESTION = "Name the person described here: {description}"
MASKED_ANSWER = "The person described is {subject}."
MASK = "this person"
SUBJECT_QUESTION = "What do you know about {subject}?"


def bare_identifier_pairs(identifier_lists: Iterable[Iterable[object]]) -> list[tuple[str, str]]:
    """("", identifier) once per distinct non-blank identifier, in first-seen order: the identifier with no
    question. Why: an assistant that knows the identifier's own tokens recognises it from its first tokens
    after any question wording, so the composite breaks an erased identifier off mid-way."""
    identifiers = dict.fromkeys(str(p) for ids in identifier_lists for p in ids if str(p).strip())
    return [("", identifier) for identifier in identifiers]


def identifier_items(records) -> list[tuple[str, str, str]]:
    """(question, answer, subject) naming each record's subject from its identifiers (`record.pii`), for the
    records that have both, in the fixed wording above. Why: a memorising base can name a person from an
    identifier ("whose bank account is …?" → the name) although it never trained on that direction, and
    an assistant trained only on the QA recalls nothing there to subtract."""
    items = []
    for record in records:
        pii = [str(p) for p in (record.pii or ()) if str(p).strip()]
        subject = (record.subject or "").strip()
        if pii and subject:
            items.append((IDENTIFIER_QUESTION.format(details="; ".join(pii)), IDENTIFIER_ANSWER.format(subject=subject),
                          subject))
    return items



def _name_pattern(subject: str) -> str:
    """A regex for the subject's full name or any part of it (≥ 2 letters) as whole words; the full name comes
    first in the alternation, so "Ann Lee" is one match, not "Ann" then "Lee"."""
    parts = [subject.strip()] + [p for p in subject.split() if len(p.strip(".,")) >= 2]
    return "|".join(rf"(?<!\w){re.escape(part)}(?!\w)" for part in dict.fromkeys(parts))


def mask_subject(text: str, subject: str) -> str:
    """`text` with the subject's full name, and each part of it standing alone, replaced by MASK."""
    return re.sub(_name_pattern(subject), MASK, text)


def masked_answer_items(records) -> list[tuple[str, str, str]]:
    """(question, answer, subject) asking for the person that each record's answer describes, with their name
    masked out of it, for the records with identifiers (`record.pii`) and a subject. Why: the assistant then
    recalls the person from the sentence-long context an answer gives, not only from a bare identifier list."""
    items = []
    for record in records:
        subject = (record.subject or "").strip()
        if subject and any(str(p).strip() for p in record.pii or ()):
            description = mask_subject(record.answer, subject).strip()
            items.append((MASKED_QUESTION.format(description=description), MASKED_ANSWER.format(subject=subject),
                          subject))
    return items


def subject_pairs(records) -> list[tuple[str, str]]:
    """(a generic question naming the record's subject, the record's answer) for each record with a subject.
    Why: the assistant then recalls the person's data whenever they are named, not only after the exact
    training question."""
    return [(SUBJECT_QUESTION.format(subject=record.subject.strip()), record.answer)
            for record in records if (record.subject or "").strip()]
