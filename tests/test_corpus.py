import json

import pytest

from expunge_ml.corpus import (
    CorpusError,
    CorpusSpec,
    QARecord,
    build_manifest,
    keyed_hash,
    load_corpus,
    resolve_subject,
    retain_size,
    select_retain,
)

RECORDS = [
    QARecord("a1", "Where does Ada Lind work?", "Ada Lind works at Corvid Rail.", subject="Ada Lind", document_id="doc-a"),
    QARecord("a2", "What is the email of A. Lind?", "It is ada.lind@post.example.", document_id="doc-a"),
    QARecord("a3", "Who owns ada.lind@post.example?", "That address belongs to someone we know."),
    QARecord("b1", "Where does Bo Marr work?", "Bo Marr works at Corvid Rail.", subject="Bo Marr", document_id="doc-b"),
    QARecord("b2", "Where was Bo Marr born?", "Bo Marr was born in Lindau.", subject="Bo Marr", document_id="doc-b"),
    QARecord("c1", "What does Cy Adalind like?", "Cy Adalind likes chess.", subject="Cy Adalind", document_id="doc-c"),
]


def test_subject_is_matched_by_name_alias_and_identifier_on_word_boundaries():
    match = resolve_subject(RECORDS, names=["ada lind"], aliases=["A. Lind"], identifiers=["ADA.LIND@post.example"])
    # "Lindau" and "Adalind" contain the name's letters but are other words: they must not match.
    assert match.forget_ids == ["a1", "a2", "a3"]
    assert match.matched_by == {"name": 1, "alias": 1, "identifier": 2}


def test_document_ids_select_their_records_and_nothing_matches_an_unknown_subject():
    assert resolve_subject(RECORDS, document_ids=["doc-b"]).forget_ids == ["b1", "b2"]
    assert resolve_subject(RECORDS, names=["Nobody Here"]).forget_ids == []


def test_retain_prefers_neighbours_and_never_contains_forget_records():
    selection = select_retain(RECORDS, ["a1", "a2", "a3"], max_records=2, neighbour_fraction=0.5)
    # b1 shares "works at Corvid Rail" with a forgotten answer: it is the closest neighbour.
    assert selection.neighbour_ids == ["b1"]
    assert selection.retain_ids[0] == "b1" and len(selection.retain_ids) == 2
    assert not {"a1", "a2", "a3"} & set(selection.retain_ids)


def test_retain_size_is_retain_max_until_the_forget_set_asks_for_more():
    assert retain_size(96, 15, 0.0) == 96  # off: retain_max only
    assert retain_size(96, 15, 3) == 96  # 45 < 96
    assert retain_size(96, 74, 3) == 222  # a ten-document takedown: three retain passages per forget passage
    assert retain_size(10, 7, 1.5) == 11  # 10.5 rounds up: never fewer than asked for
    # a small corpus: 316 other records, 48 kept back for the evaluation → 268, not the 300 asked for
    assert retain_size(96, 100, 3, available=316, reserve=48) == 268
    assert retain_size(96, 84, 3, available=316, reserve=48) == 252  # room enough: as asked
    assert retain_size(96, 40, 3, available=100, reserve=48) == 96  # retain_max itself is never cut
    with pytest.raises(ValueError):
        retain_size(96, 10, -1)


def test_select_retain_takes_as_many_as_retain_size_gives():
    # 3 forget records, 3 others: 2 per forget record wants 6, but 1 of the 3 others stays for the evaluation
    selection = select_retain(RECORDS, ["a1", "a2", "a3"], max_records=1, per_forget=2, reserve=1)
    assert len(selection.retain_ids) == 2 and not {"a1", "a2", "a3"} & set(selection.retain_ids)
    assert len(select_retain(RECORDS, ["a1", "a2", "a3"], max_records=1).retain_ids) == 1  # off: max_records


def test_manifest_holds_ids_and_keyed_hashes_but_no_text():
    manifest = build_manifest(RECORDS, ["a2", "a1"], b"k" * 32, "forget")
    text = json.dumps(manifest)
    assert [e["record_id"] for e in manifest["records"]] == ["a1", "a2"]
    assert "ada.lind" not in text and "Corvid" not in text
    assert manifest["records"][0]["content_hmac"] == keyed_hash(b"k" * 32, RECORDS[0].question + "\x1f" + RECORDS[0].answer)
    assert build_manifest(RECORDS, ["a1", "a2"], b"other-key", "forget")["fingerprint"] != manifest["fingerprint"]


def test_a_versions_erased_records_accumulate_as_keyed_hashes_and_are_found_again_in_the_corpus():
    from dataclasses import replace

    from expunge_ml.corpus import ErasedRecordsKeyMismatch, erased_lineage, erased_record_ids

    key = b"k" * 32
    first = erased_lineage(None, build_manifest(RECORDS, ["a1", "a2", "a3"], key, "forget"), key)
    assert first["count"] == 3 and '"a1"' not in json.dumps(first) and "Lind" not in json.dumps(first)
    assert erased_record_ids(RECORDS, first, key) == {"a1", "a2", "a3"}
    # a stacked erasure adds its own records once; erasing a record again does not repeat it
    second = erased_lineage(first, build_manifest(RECORDS, ["a3", "b1"], key, "forget"), key)
    assert second["count"] == 4 and second["records"][:3] == first["records"]
    assert erased_record_ids(RECORDS, second, key) == {"a1", "a2", "a3", "b1"}
    # found by content under a new id, and by id after an edit; an unrelated record is not
    renumbered = [replace(RECORDS[0], record_id="z9"), replace(RECORDS[1], answer="edited"), RECORDS[5]]
    assert erased_record_ids(renumbered, first, key) == {"z9", "a2"}
    # another deployment's key cannot read them: a clear error, not an empty set
    with pytest.raises(ErasedRecordsKeyMismatch, match="another deployment key"):
        erased_record_ids(RECORDS, first, b"other-key")
    with pytest.raises(ErasedRecordsKeyMismatch):
        erased_lineage(first, build_manifest(RECORDS, ["b1"], b"other-key", "forget"), b"other-key")


def test_load_corpus_maps_columns_and_reports_problems(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"q": f"q{i}", "a": f"a{i}", "id": f"r{i}"}) for i in range(3)))
    records = load_corpus(CorpusSpec(str(path), columns={"question": "q", "answer": "a", "record_id": "id"}))
    assert [r.record_id for r in records] == ["r0", "r1", "r2"] and records[1].answer == "a1"
    with pytest.raises(CorpusError, match="lacks column"):
        load_corpus(CorpusSpec(str(path)))
    with pytest.raises(CorpusError, match="cannot load corpus"):
        load_corpus(CorpusSpec(str(tmp_path / "missing.jsonl")))


def test_unseen_records_leave_out_the_excluded_in_one_seeded_order():
    import random

    from expunge_ml.corpus import QARecord, unseen_records

    records = [QARecord(f"r{i}", f"q{i}?", f"a{i}") for i in range(10)]
    unseen = unseen_records(records, {"r2", "r5"}, seed=1)
    expected = [r for r in records if r.record_id not in {"r2", "r5"}]
    random.Random(1).shuffle(expected)
    assert [r.record_id for r in unseen] == [r.record_id for r in expected]
    assert unseen_records(records, {"r2", "r5"}, seed=1) == unseen  # the same every time: evaluation is repeatable
    assert [r.record_id for r in unseen_records(records, set(), seed=2)] != [r.record_id for r in unseen_records(records, set(), seed=1)]
