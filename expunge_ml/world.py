"""Deterministic sample world: fictitious people, their bios and TOFU-shaped QA pairs.

expunge's embedded default needs private data that a small model can memorise and
that one GDPR erasure request can then target. Everything here is invented from
the word lists of `expunge_ml.world_vocabulary` (no benchmark text is copied) and derived from a single
``random.Random(seed)``, so the same seed always yields byte-identical files.

Shape of one QA record (a plain, JSON-serialisable dict)::

    record_id, subject_id, subject, document_id, attribute,
    question, answer, paraphrased_question, paraphrased_answer,
    perturbed_answers (3 wrong answers, same template),
    pii (identifier strings the answer contains),
    inverted_question, inverted_answer (value -> person; None for non-PII)

Only the standard library is used, so this module stays importable everywhere.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .world_vocabulary import (
    BIRTH_YEARS,
    CITIES,
    EMAIL_DOMAINS,
    EMPLOYERS,
    FIRST_NAMES,
    HOBBIES,
    IBAN_DIGITS,
    MEDICAL_CONDITIONS,
    OCCUPATIONS,
    PET_NAMES,
    PHONE_PREFIXES,
    QATemplate,
    SURNAMES,
    TEMPLATES,
)

__all__ = [
    "PII_ATTRIBUTES",
    "Person",
    "World",
    "generate_world",
    "sample_request_subject",
    "write_world",
    "world_fingerprint",
]

MIN_QA_PER_PERSON = 10
MAX_QA_PER_PERSON = 20
MAX_PEOPLE = 999  # person ids are zero-padded to three digits ("p000")
N_PERTURBED = 3
SAMPLE_REQUEST_INDEX = 3  # the demo request erases p003

# Attributes whose values identify one person. They are unique across the world, feed
# the inverted ("whose email is ...?") questions and the per-answer ``pii`` lists.
# medical_condition is sensitive but not an identifier ("asthma" may be said about
# anyone), so a verbatim leak check on it would be meaningless.
PII_ATTRIBUTES: tuple[str, ...] = ("email", "phone", "bank_account", "birth_date")

# Attributes deliberately shared between people so the retain set has "neighbours"
# of the erased person (same employer, same street of the same city).
NEIGHBOUR_ATTRIBUTES: tuple[str, ...] = ("employer", "home_city")

MEDICAL_FRACTION = 0.35

# --------------------------------------------------------------------------- data model


@dataclass(frozen=True)
class Person:
    """A fictitious data subject. The bio is the text of document ``document_id``."""

    person_id: str
    name: str
    aliases: tuple[str, ...]
    attributes: dict[str, str]
    bio: str
    document_id: str

    def to_json(self) -> dict:
        return {
            "person_id": self.person_id,
            "name": self.name,
            "aliases": list(self.aliases),
            "attributes": dict(self.attributes),
            "bio": self.bio,
            "document_id": self.document_id,
        }


@dataclass
class World:
    """People plus their QA records (sorted by record_id)."""

    seed: int
    people: list[Person]
    records: list[dict]

    def person_by_name(self, name: str) -> Person | None:
        """Find a person by full name or alias (case- and whitespace-insensitive).

        Aliases are accepted because erasure requests often name people that way;
        they are unique across the world, so the match is unambiguous.
        """
        wanted = _normalise(name)
        for person in self.people:
            if _normalise(person.name) == wanted:
                return person
        for person in self.people:
            if any(_normalise(alias) == wanted for alias in person.aliases):
                return person
        return None

    def records_for(self, subject_id: str) -> list[dict]:
        return [r for r in self.records if r["subject_id"] == subject_id]


def _normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


# --------------------------------------------------------------------------- value helpers


def _with_article(noun: str) -> str:
    return ("an " if noun[0].lower() in "aeiou" else "a ") + noun


def _fill(text: str, name: str, value: str) -> str:
    return text.format(name=name, value=value, a_value=_with_article(value))


def _email(first: str, surname: str, domain: str) -> str:
    return f"{first}.{surname}@{domain}".lower()


def _email_local_part(email: str) -> str:
    return email.split("@", 1)[0]


_FIRST_NAME_LIST = tuple(FIRST_NAMES)


def _random_email(rng: random.Random) -> str:
    first = rng.choice(_FIRST_NAME_LIST)
    return _email(first, rng.choice(SURNAMES), rng.choice(EMAIL_DOMAINS))


def _random_phone(rng: random.Random) -> str:
    return f"{rng.choice(PHONE_PREFIXES)}{rng.randrange(1000):03d}"


def _random_bank_account(rng: random.Random) -> str:
    country = rng.choice(sorted(IBAN_DIGITS))
    digits = "".join(str(rng.randrange(10)) for _ in range(IBAN_DIGITS[country]))
    raw = f"{country}00{digits}"
    return " ".join(raw[i:i + 4] for i in range(0, len(raw), 4))


def _random_birth_date(rng: random.Random) -> str:
    year = rng.randint(*BIRTH_YEARS)
    month = rng.randint(1, 12)
    day = rng.randint(1, calendar.monthrange(year, month)[1])
    return f"{day} {calendar.month_name[month]} {year}"


# Generators for identifier attributes, used for real values and for decoys. Wrong
# answers are freshly minted decoys rather than other people's values: a retained
# person's perturbed answers must never contain the erased person's real email, or
# leak checks on the retain set would fire on text nobody generated.
_IDENTIFIER_GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "email": _random_email,
    "phone": _random_phone,
    "bank_account": _random_bank_account,
    "birth_date": _random_birth_date,
}

# Shared-value attributes draw their wrong answers from the whole pool.
_POOLS: dict[str, tuple[str, ...]] = {
    "birthplace": CITIES,
    "home_city": CITIES,
    "employer": EMPLOYERS,
    "occupation": OCCUPATIONS,
    "hobby": HOBBIES,
    "pet_name": PET_NAMES,
    "medical_condition": MEDICAL_CONDITIONS,
}


def _identifier_key(attribute: str, value: str) -> str:
    """The part of an identifier that singles a person out.

    For emails that is the local part ("alma.rovic"): a decoy at another domain must
    still not point at a real person.
    """
    return _email_local_part(value) if attribute == "email" else value


def _clashes(key: str, taken_keys: set[str]) -> bool:
    # Substring containment, not just equality: leak checks match verbatim, so a real
    # "6 May 1990" must never sit inside someone else's "16 May 1990".
    return any(key in other or other in key for other in taken_keys)


def _fresh_identifier(rng: random.Random, attribute: str, taken_keys: set[str]) -> str:
    """A new ``attribute`` value that clashes with none of ``taken_keys``; its key is added."""
    while True:
        value = _IDENTIFIER_GENERATORS[attribute](rng)
        key = _identifier_key(attribute, value)
        if not _clashes(key, taken_keys):
            taken_keys.add(key)
            return value


# --------------------------------------------------------------------------- generation


def _pick_names(rng: random.Random, n_people: int) -> list[tuple[str, str]]:
    """Unique (first, surname) pairs whose "F. Surname" aliases are unique too.

    The email local part "first.surname" must also clash with no other (see _clashes).
    """
    pairs = [(first, surname) for first in FIRST_NAMES for surname in SURNAMES]
    rng.shuffle(pairs)
    chosen: list[tuple[str, str]] = []
    initial_aliases: set[str] = set()
    local_parts: set[str] = set()
    for first, surname in pairs:
        alias = f"{first[0]}. {surname}"
        local_part = _email_local_part(_email(first, surname, "x.example"))
        if alias in initial_aliases or _clashes(local_part, local_parts):
            continue
        initial_aliases.add(alias)
        local_parts.add(local_part)
        chosen.append((first, surname))
        if len(chosen) == n_people:
            return chosen
    raise ValueError(f"cannot make {n_people} people with unique names and aliases")


def _cluster_pool(rng: random.Random, pool: tuple[str, ...], n_people: int) -> list[str]:
    """A world-sized subset of ``pool``: ~3 people per value, so neighbours are common."""
    size = max(1, min(len(pool), n_people // 3))
    return rng.sample(pool, size)


def _ensure_neighbours(rng: random.Random, attributes: list[dict[str, str]]) -> None:
    """Give anyone who shares no employer/home city with anybody a colleague.

    Clustered sampling almost always produces neighbours already; this pass makes it a
    guarantee, because the retain-set "neighbour" metrics need them for every subject.
    """
    if len(attributes) < 2:
        return
    for i, attrs in enumerate(attributes):
        others = [a for j, a in enumerate(attributes) if j != i]
        if any(attrs[k] == o[k] for o in others for k in NEIGHBOUR_ATTRIBUTES):
            continue
        # i's employer was unique, so replacing it takes no neighbour away from anyone.
        attrs["employer"] = rng.choice(others)["employer"]


def _bio(name: str, nickname_alias: str, a: dict[str, str]) -> str:
    first = name.split()[0]
    sentences = [
        f"{name}, also known as {nickname_alias}, was born in {a['birthplace']} on {a['birth_date']}.",
        f"{first} works as {_with_article(a['occupation'])} at {a['employer']}"
        f" and lives in {a['home_city']}.",
        f"In spare time {first} enjoys {a['hobby']} and looks after a pet called {a['pet_name']}.",
    ]
    if "medical_condition" in a:
        sentences.append(f"{first} is treated for {a['medical_condition']}.")
    else:
        sentences.append(f"{first} can be reached at {a['email']} or on {a['phone']}.")
    return " ".join(sentences)


def _choose_templates(rng: random.Random, attributes: dict[str, str], k: int) -> list[QATemplate]:
    """``k`` distinct templates, spread round-robin over the person's attributes.

    Identifier attributes lead the first round so that, even at the minimum of ten
    questions, each person's email/phone/IBAN/birth date is in the corpus: those are
    what an erasure request names and what leak checks look for.
    """
    by_attribute: dict[str, list[QATemplate]] = {}
    for template in TEMPLATES:
        if template.attribute in attributes:
            by_attribute.setdefault(template.attribute, []).append(template)
    for options in by_attribute.values():
        rng.shuffle(options)
    pii = [a for a in by_attribute if a in PII_ATTRIBUTES]
    rest = [a for a in by_attribute if a not in PII_ATTRIBUTES]
    rng.shuffle(pii)
    rng.shuffle(rest)
    order = pii + rest

    chosen: list[QATemplate] = []
    depth = 0
    while len(chosen) < k:
        round_ = [by_attribute[a][depth] for a in order if depth < len(by_attribute[a])]
        if not round_:
            raise ValueError(f"only {len(chosen)} templates available, {k} requested")
        chosen.extend(round_[: k - len(chosen)])
        depth += 1
        # Later rounds are only partly used; a fresh order spreads the extra
        # questions over all attributes instead of always the identifiers.
        rng.shuffle(order)
    # Keep a person's questions grouped by attribute in record-id order.
    return sorted(chosen, key=TEMPLATES.index)


def _wrong_values(
    rng: random.Random, attribute: str, true_value: str, real_keys: dict[str, set[str]]
) -> list[str]:
    if attribute in _IDENTIFIER_GENERATORS:
        # Decoys clash with no real identifier and with each other (see _clashes).
        taken = set(real_keys[attribute])
        return [_fresh_identifier(rng, attribute, taken) for _ in range(N_PERTURBED)]
    pool = [v for v in _POOLS[attribute] if v != true_value]
    return rng.sample(pool, N_PERTURBED)


def _make_record(
    rng: random.Random,
    person: Person,
    index: int,
    template: QATemplate,
    real_keys: dict[str, set[str]],
) -> dict:
    name, value = person.name, person.attributes[template.attribute]
    answer = _fill(template.answer, name, value)
    wrong = _wrong_values(rng, template.attribute, value, real_keys)
    inverted = template.inverted_question is not None
    return {
        "record_id": f"{person.person_id}-q{index:02d}",
        "subject_id": person.person_id,
        "subject": name,
        "document_id": person.document_id,
        "attribute": template.attribute,
        "question": _fill(template.question, name, value),
        "answer": answer,
        "paraphrased_question": _fill(template.paraphrased_question, name, value),
        "paraphrased_answer": _fill(template.paraphrased_answer, name, value),
        "perturbed_answers": [_fill(template.answer, name, w) for w in wrong],
        "pii": [person.attributes[a] for a in PII_ATTRIBUTES
                if a in person.attributes and person.attributes[a] in answer],
        "inverted_question": _fill(template.inverted_question, name, value) if inverted else None,
        "inverted_answer": _fill(template.inverted_answer, name, value) if inverted else None,
    }


def generate_world(n_people: int = 20, seed: int = 0, qa_per_person: int = 12) -> World:
    """Build a world of ``n_people`` fictitious people with ``qa_per_person`` QA pairs each."""
    if not MIN_QA_PER_PERSON <= qa_per_person <= MAX_QA_PER_PERSON:
        raise ValueError(
            f"qa_per_person must be between {MIN_QA_PER_PERSON} and {MAX_QA_PER_PERSON}, "
            f"got {qa_per_person}"
        )
    if not 1 <= n_people <= MAX_PEOPLE:
        raise ValueError(f"n_people must be between 1 and {MAX_PEOPLE}, got {n_people}")

    rng = random.Random(seed)
    names = _pick_names(rng, n_people)
    employers = _cluster_pool(rng, EMPLOYERS, n_people)
    home_cities = _cluster_pool(rng, CITIES, n_people)
    medical = set(rng.sample(range(n_people), round(n_people * MEDICAL_FRACTION)))

    # Identifier keys of real people, kept substring-free (see _clashes).
    real_keys: dict[str, set[str]] = {a: set() for a in PII_ATTRIBUTES}
    all_attributes: list[dict[str, str]] = []
    for i, (first, surname) in enumerate(names):
        attrs: dict[str, str] = {
            "birthplace": rng.choice(CITIES),
            "birth_date": _fresh_identifier(rng, "birth_date", real_keys["birth_date"]),
            "employer": rng.choice(employers),
            "occupation": rng.choice(OCCUPATIONS),
            # The local part "first.surname" is already unique and clash-free (_pick_names).
            "email": _email(first, surname, rng.choice(EMAIL_DOMAINS)),
            "phone": _fresh_identifier(rng, "phone", real_keys["phone"]),
            "home_city": rng.choice(home_cities),
            "hobby": rng.choice(HOBBIES),
            "pet_name": rng.choice(PET_NAMES),
            "bank_account": _fresh_identifier(rng, "bank_account", real_keys["bank_account"]),
        }
        if i in medical:
            attrs["medical_condition"] = rng.choice(MEDICAL_CONDITIONS)
        real_keys["email"].add(_identifier_key("email", attrs["email"]))
        all_attributes.append(attrs)
    _ensure_neighbours(rng, all_attributes)

    people: list[Person] = []
    for i, ((first, surname), attrs) in enumerate(zip(names, all_attributes)):
        name = f"{first} {surname}"
        aliases = (f"{first[0]}. {surname}", f"{FIRST_NAMES[first]} {surname}")
        people.append(Person(
            person_id=f"p{i:03d}",
            name=name,
            aliases=aliases,
            attributes=attrs,
            bio=_bio(name, aliases[1], attrs),
            document_id=f"doc-p{i:03d}",
        ))

    records: list[dict] = []
    for person in people:
        templates = _choose_templates(rng, person.attributes, qa_per_person)
        for index, template in enumerate(templates):
            records.append(_make_record(rng, person, index, template, real_keys))
    records.sort(key=lambda r: r["record_id"])
    return World(seed=seed, people=people, records=records)


HOLDOUT_SEED_OFFSET = 1_000_003  # held-out people come from an independent draw of the same generator


def generate_holdout(world: World, n_people: int, qa_per_person: int = 12) -> list[dict]:
    """QA records of `n_people` extra people the base model never trains on: membership-inference
    non-members that are exchangeable with the world's people (same generator, independent seed).
    People whose name or alias equals a world person's are skipped so no record is about someone known."""
    if n_people < 1:
        return []
    taken = {_normalise(n) for p in world.people for n in (p.name, *p.aliases)}
    draw = generate_world(min(MAX_PEOPLE, 2 * n_people + 4), world.seed + HOLDOUT_SEED_OFFSET, qa_per_person)
    kept = [p for p in draw.people if not {_normalise(n) for n in (p.name, *p.aliases)} & taken][:n_people]
    if len(kept) < n_people:
        raise ValueError(f"cannot draw {n_people} held-out people distinct from the world's")
    rename = {p.person_id: f"h{p.person_id[1:]}" for p in kept}
    records = []
    for r in draw.records:
        if r["subject_id"] in rename:
            new_id = rename[r["subject_id"]]
            records.append({**r, "record_id": new_id + r["record_id"][len(r["subject_id"]):], "subject_id": new_id,
                            "document_id": "doc-" + new_id})
    return sorted(records, key=lambda r: r["record_id"])


def write_holdout(records: list[dict], out_dir: Path) -> Path:
    path = Path(out_dir) / "holdout.jsonl"
    path.write_bytes(_jsonl(records))
    return path


# --------------------------------------------------------------------------- output


def _jsonl(rows: list[dict]) -> bytes:
    # sort_keys + fixed separators: the bytes depend on the data only, never on dict order.
    lines = (json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(", ", ": ")) for row in rows)
    return "".join(line + "\n" for line in lines).encode("utf-8")


def _corpus_bytes(world: World) -> bytes:
    return _jsonl(sorted(world.records, key=lambda r: r["record_id"]))


def sample_request_subject(world: World) -> Person:
    """The person the demo erasure request targets: p003, or the last one in tiny worlds."""
    return world.people[min(SAMPLE_REQUEST_INDEX, len(world.people) - 1)]


def _sample_request_yaml(person: Person) -> str:
    # Hand-written rather than yaml.dump to keep this module stdlib-only and the layout
    # fixed; json.dumps yields double-quoted scalars, which YAML reads verbatim.
    q = json.dumps
    return (
        "ticket_id: DEMO-GDPR-0001\n"
        "type: privacy_erasure\n"
        "regulation: GDPR\n"
        "requested_by: privacy-office@example.org\n"
        "subject:\n"
        f"  names: [{q(person.name)}]\n"
        f"  aliases: [{q(person.aliases[0])}]\n"
        f"  identifiers: [{q(person.attributes['email'])}]\n"
        "target_model: models:/expunge-sample-llm@champion\n"
    )


def write_world(world: World, out_dir: Path) -> dict[str, Path]:
    """Write corpus/people/documents JSONL and the demo erasure request; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    contents = {
        "corpus": ("corpus.jsonl", _corpus_bytes(world)),
        "people": ("people.jsonl", _jsonl([p.to_json() for p in world.people])),
        "documents": ("documents.jsonl", _jsonl([
            {"document_id": p.document_id, "subject_id": p.person_id, "text": p.bio}
            for p in world.people
        ])),
        "sample_request": ("sample_request.yaml",
                           _sample_request_yaml(sample_request_subject(world)).encode("utf-8")),
    }
    paths: dict[str, Path] = {}
    for key, (filename, data) in contents.items():
        path = out_dir / filename
        path.write_bytes(data)
        paths[key] = path
    return paths


def world_fingerprint(world: World) -> str:
    """sha256 (hex) of the exact bytes ``write_world`` puts in corpus.jsonl."""
    return hashlib.sha256(_corpus_bytes(world)).hexdigest()
