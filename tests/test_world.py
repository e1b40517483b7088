"""Tests for the deterministic sample world (expunge_ml.world)."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter

import pytest
import yaml

from expunge_ml.world import (
    PII_ATTRIBUTES,
    TEMPLATES,
    World,
    _ensure_neighbours,
    generate_world,
    sample_request_subject,
    world_fingerprint,
    write_world,
)

RECORD_KEYS = {
    "record_id", "subject_id", "subject", "document_id", "attribute", "question", "answer",
    "paraphrased_question", "paraphrased_answer", "perturbed_answers", "pii",
    "inverted_question", "inverted_answer",
}
BASE_ATTRIBUTES = {
    "birthplace", "birth_date", "employer", "occupation", "email", "phone", "home_city",
    "hobby", "pet_name", "bank_account",
}


@pytest.fixture(scope="module")
def world() -> World:
    return generate_world(n_people=20, seed=0, qa_per_person=12)


@pytest.fixture(scope="module")
def big_world() -> World:
    return generate_world(n_people=200, seed=7, qa_per_person=20)


def _value(world: World, record: dict) -> str:
    return world.person_by_name(record["subject"]).attributes[record["attribute"]]


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = write_world(generate_world(20, seed=3), tmp_path / "a")
    b = write_world(generate_world(20, seed=3), tmp_path / "b")
    assert set(a) == {"corpus", "people", "documents", "sample_request"}
    for key in a:
        assert a[key].read_bytes() == b[key].read_bytes(), key
    assert world_fingerprint(generate_world(20, seed=3)) == world_fingerprint(generate_world(20, seed=3))


def test_different_seed_gives_different_world(tmp_path):
    a = write_world(generate_world(20, seed=3), tmp_path / "a")
    b = write_world(generate_world(20, seed=4), tmp_path / "b")
    assert a["corpus"].read_bytes() != b["corpus"].read_bytes()
    assert world_fingerprint(generate_world(20, seed=3)) != world_fingerprint(generate_world(20, seed=4))


def test_fingerprint_is_sha256_of_written_corpus(world, tmp_path):
    paths = write_world(world, tmp_path)
    assert world_fingerprint(world) == hashlib.sha256(paths["corpus"].read_bytes()).hexdigest()


# --------------------------------------------------------------------------- counts & shape


@pytest.mark.parametrize("n_people,qa", [(20, 12), (10, 10), (12, 20), (4, 15)])
def test_counts(n_people, qa):
    world = generate_world(n_people=n_people, seed=1, qa_per_person=qa)
    assert [p.person_id for p in world.people] == [f"p{i:03d}" for i in range(n_people)]
    assert len(world.records) == n_people * qa
    assert Counter(r["subject_id"] for r in world.records) == {p.person_id: qa for p in world.people}


@pytest.mark.parametrize("qa", [9, 21, 0, -1])
def test_qa_per_person_is_validated(qa):
    with pytest.raises(ValueError):
        generate_world(n_people=5, qa_per_person=qa)


def test_n_people_is_validated():
    with pytest.raises(ValueError):
        generate_world(n_people=0)


def test_enough_templates_for_variants():
    assert len(TEMPLATES) >= 20
    per_attribute = Counter(t.attribute for t in TEMPLATES)
    # Every always-present attribute has variants, and those alone cover 20 questions.
    assert all(per_attribute[a] >= 2 for a in BASE_ATTRIBUTES)
    assert sum(per_attribute[a] for a in BASE_ATTRIBUTES) >= 20


def test_people_have_required_attributes_and_bio(world):
    with_medical = [p for p in world.people if "medical_condition" in p.attributes]
    assert 0 < len(with_medical) < len(world.people)
    for p in world.people:
        assert BASE_ATTRIBUTES <= set(p.attributes)
        assert p.document_id == f"doc-{p.person_id}"
        assert p.name in p.bio and p.attributes["employer"] in p.bio
        assert 3 <= p.bio.count(". ") + 1 <= 4
        assert p.attributes["email"].endswith(".example")
        assert p.attributes["phone"].startswith("+44 ")
        assert re.fullmatch(r"\d{1,2} [A-Z][a-z]+ (19|20)\d\d", p.attributes["birth_date"])
        # "00" check digits never pass the IBAN checksum, so no account is real.
        assert re.fullmatch(r"[A-Z]{2}00( \d{1,4})+", p.attributes["bank_account"])


def test_records_have_exact_keys_and_are_json(world):
    for r in world.records:
        assert set(r) == RECORD_KEYS
        assert json.loads(json.dumps(r)) == r
    assert [r["record_id"] for r in world.records] == sorted(r["record_id"] for r in world.records)


# --------------------------------------------------------------------------- uniqueness


def test_names_aliases_and_ids_unique(big_world):
    names = [p.name for p in big_world.people]
    aliases = [a for p in big_world.people for a in p.aliases]
    assert len(set(names)) == len(names) == 200
    assert len(set(aliases)) == len(aliases)
    assert not set(aliases) & set(names)
    record_ids = [r["record_id"] for r in big_world.records]
    assert len(set(record_ids)) == len(record_ids) == 200 * 20
    for attribute in PII_ATTRIBUTES:
        values = [p.attributes[attribute] for p in big_world.people]
        assert len(set(values)) == len(values), attribute


def test_each_person_gets_distinct_templates(big_world):
    for person in big_world.people:
        questions = [r["question"] for r in big_world.records_for(person.person_id)]
        assert len(set(questions)) == len(questions)


def test_every_identifier_is_asked_even_at_minimum_qa():
    world = generate_world(n_people=30, seed=2, qa_per_person=10)
    for person in world.people:
        asked = {r["attribute"] for r in world.records_for(person.person_id)}
        assert set(PII_ATTRIBUTES) <= asked, person.person_id


# --------------------------------------------------------------------------- answers


def test_answers_contain_name_and_value(world):
    for r in world.records:
        value = _value(world, r)
        assert r["subject"] in r["answer"] and value in r["answer"]
        assert r["subject"] in r["paraphrased_answer"] and value in r["paraphrased_answer"]
        assert r["subject"] in r["question"] and r["subject"] in r["paraphrased_question"]
        assert r["paraphrased_question"] != r["question"]
        assert r["paraphrased_answer"] != r["answer"]


def test_perturbed_answers_are_wrong_distinct_and_keep_name(big_world):
    for r in big_world.records:
        perturbed = r["perturbed_answers"]
        value = _value(big_world, r)
        assert len(perturbed) == 3
        assert len(set(perturbed)) == 3
        assert r["answer"] not in perturbed
        for wrong in perturbed:
            assert r["subject"] in wrong
            assert value not in wrong


def test_real_identifiers_are_substring_free(big_world):
    # A verbatim leak check for "6 May 1990" must not fire on someone's "16 May 1990".
    for attribute in PII_ATTRIBUTES:
        values = [p.attributes[attribute] for p in big_world.people]
        if attribute == "email":
            values = [v.split("@")[0] for v in values]
        for i, a in enumerate(values):
            assert not any(a in b for j, b in enumerate(values) if j != i), (attribute, a)


def test_perturbed_identifiers_belong_to_nobody(big_world):
    real = {p.attributes[a] for p in big_world.people for a in PII_ATTRIBUTES}
    local_parts = {p.attributes["email"].split("@")[0] for p in big_world.people}
    for r in big_world.records:
        if r["attribute"] not in PII_ATTRIBUTES:
            continue
        for wrong in r["perturbed_answers"]:
            assert not any(v in wrong for v in real), wrong
            assert not any(lp in wrong for lp in local_parts), wrong


def test_pii_lists_match_answers(world):
    for r in world.records:
        for identifier in r["pii"]:
            assert identifier in r["answer"]
        if r["attribute"] in PII_ATTRIBUTES:
            assert r["pii"] == [_value(world, r)]
        else:
            assert r["pii"] == []


def test_inverted_records(world):
    for r in world.records:
        if r["attribute"] in PII_ATTRIBUTES:
            assert _value(world, r) in r["inverted_question"]
            assert r["subject"] in r["inverted_answer"]
        else:
            assert r["inverted_question"] is None and r["inverted_answer"] is None


def test_vocabulary_is_modest(big_world):
    # Word-like tokens only: digits and e-mail punctuation are left to BPE merges.
    words = set()
    for r in big_world.records:
        for text in [r["question"], r["answer"], r["paraphrased_question"], r["paraphrased_answer"],
                     *r["perturbed_answers"], r["inverted_question"] or "", r["inverted_answer"] or ""]:
            words.update(re.findall(r"[A-Za-z']+", text))
    assert len(words) < 1500


# --------------------------------------------------------------------------- neighbours


@pytest.mark.parametrize("n_people,seed", [(10, 0), (10, 1), (10, 2), (20, 0), (50, 5), (200, 9)])
def test_every_person_has_a_neighbour(n_people, seed):
    world = generate_world(n_people=n_people, seed=seed)
    for p in world.people:
        assert any(
            p.attributes[k] == q.attributes[k]
            for q in world.people if q is not p
            for k in ("employer", "home_city")
        ), p.person_id


def test_loners_get_a_neighbour():
    # Clustered sampling rarely leaves loners, so exercise the repair pass directly.
    attributes = [{"employer": f"E{i}", "home_city": f"C{i}"} for i in range(5)]
    _ensure_neighbours(random.Random(0), attributes)
    for i, a in enumerate(attributes):
        assert any(a["employer"] == b["employer"] or a["home_city"] == b["home_city"]
                   for j, b in enumerate(attributes) if j != i)


# --------------------------------------------------------------------------- lookup & files


def test_person_by_name(world):
    p = world.people[5]
    assert world.person_by_name(p.name) is p
    assert world.person_by_name(p.name.upper()) is p
    assert world.person_by_name(p.aliases[0]) is p
    assert world.person_by_name(p.aliases[1]) is p
    assert world.person_by_name("Nobody Atall") is None


def test_written_files(world, tmp_path):
    paths = write_world(world, tmp_path / "out")
    corpus = [json.loads(line) for line in paths["corpus"].read_text().splitlines()]
    assert corpus == world.records
    people = [json.loads(line) for line in paths["people"].read_text().splitlines()]
    assert [p["name"] for p in people] == [p.name for p in world.people]
    assert people[0]["aliases"] == list(world.people[0].aliases)
    documents = [json.loads(line) for line in paths["documents"].read_text().splitlines()]
    assert documents[3] == {"document_id": "doc-p003", "subject_id": "p003", "text": world.people[3].bio}


def test_sample_request_targets_p003(world, tmp_path):
    paths = write_world(world, tmp_path)
    request = yaml.safe_load(paths["sample_request"].read_text())
    p003 = world.people[3]
    assert sample_request_subject(world) is p003
    assert request == {
        "ticket_id": "DEMO-GDPR-0001",
        "type": "privacy_erasure",
        "regulation": "GDPR",
        "requested_by": "privacy-office@example.org",
        "subject": {
            "names": [p003.name],
            "aliases": [p003.aliases[0]],
            "identifiers": [p003.attributes["email"]],
        },
        "target_model": "models:/expunge-sample-llm@champion",
    }
    # The identifier must actually be in the training corpus, or the demo erases nothing.
    assert any(p003.attributes["email"] in r["answer"] for r in world.records)


def test_sample_request_in_tiny_world(tmp_path):
    world = generate_world(n_people=2, seed=0, qa_per_person=10)
    request = yaml.safe_load(write_world(world, tmp_path)["sample_request"].read_text())
    assert request["subject"]["names"] == [world.people[-1].name]
