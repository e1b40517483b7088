import dataclasses

import pytest

from expunge_ml.corpus import QARecord
from expunge_ml.methods.uld import ULDConfig
from expunge_ml.uld_data import training_pairs


def test_training_pairs_follow_the_augmentation_switches():
    forget = [QARecord("f", "Q?", "true answer", paraphrased_answer="para", perturbed_answers=("w1", "w2"))]
    retain = [QARecord("r", "R?", "kept")]
    full_f, full_r = training_pairs(forget, retain, ULDConfig())
    assert full_f == [("Q?", "true answer"), ("Q?", "para")]
    assert full_r == [("R?", "kept"), ("Q?", "w1"), ("Q?", "w2")]
    plain_f, plain_r = training_pairs(forget, retain, ULDConfig(augment_paraphrased=False, augment_perturbed=False))
    assert plain_f == [("Q?", "true answer")] and plain_r == [("R?", "kept")]


def test_generated_training_pairs_use_only_the_training_answers():
    forget = [QARecord("f", "Where was Jane Doe born?", "Jane Doe was born in Lagos.", paraphrased_answer="EVAL para",
                       perturbed_answers=("EVAL w1",), paraphrased_question="EVAL probe?")]
    retain = [QARecord("r", "Where does Ann Lee live?", "Ann Lee lives in Oslo.")]
    config = ULDConfig(augmentation="generated", near_misses_per_item=1)
    f, r = training_pairs(forget, retain, config)
    texts = [t for pair in f + r for t in pair]
    assert not any("EVAL" in t for t in texts)
    assert f[0] == forget[0].pair and r[0] == retain[0].pair
    assert ("Where was Jane Doe born?", "Jane Doe") in f and ("Where was Jane Doe born?", "Lagos") in f
    near_misses = [a for q, a in r if q == forget[0].question]
    assert near_misses and all(a != forget[0].answer for a in near_misses)
    assert training_pairs(forget, retain, config) == (f, r)  # deterministic from the seed
    with pytest.raises(ValueError, match="augmentation"):
        training_pairs(forget, retain, ULDConfig(augmentation="llm"))


def test_fact_span_loss_labels_forget_items_with_the_requests_terms_the_records_pii_and_the_answers_facts():
    from expunge_ml.augment import fact_spans

    forget = [QARecord("f", "Email of Jane Doe?", "Jane Doe writes from jd@x.example.", paraphrased_answer="mail jd@x.example.",
                       pii=("jd@x.example",)),
              QARecord("g", "Town of Jane Doe?", "she lives in Lagos.")]
    retain = [QARecord("r", "Email of Ann Lee?", "Ann Lee writes from al@y.example.", pii=("al@y.example",))]
    config = ULDConfig(fact_span_loss=True, augment_perturbed=False)
    f, r = training_pairs(forget, retain, config, fact_terms=["Jane Doe", " ", "J. Doe"])
    request = ["J. Doe", "Jane Doe", "jd@x.example"]  # the request's terms + the forget records' pii, never a retained one's
    assert [("Lagos", 13, 18)] == [(text[s:e], s, e) for text in ["she lives in Lagos."] for _, s, e in fact_spans(text)]
    assert f == [("Email of Jane Doe?", "Jane Doe writes from jd@x.example.", request),
                 ("Town of Jane Doe?", "she lives in Lagos.", sorted(request + ["Lagos"])),  # + the answer's own facts
                 ("Email of Jane Doe?", "mail jd@x.example.", request)]
    assert r == training_pairs(forget, retain, ULDConfig(augment_perturbed=False))[1]  # retain⁺ unchanged
    # generated (question, fact span) pairs are all fact
    gen_f, _ = training_pairs(forget, retain, ULDConfig(fact_span_loss=True, augmentation="generated",
                                                       near_misses_per_item=0), fact_terms=["Jane Doe"])
    assert ("Email of Jane Doe?", "Jane Doe", ["Jane Doe"]) in gen_f and ("Town of Jane Doe?", "Lagos", ["Lagos"]) in gen_f
    assert gen_f[0] == ("Email of Jane Doe?", "Jane Doe writes from jd@x.example.", ["Jane Doe", "jd@x.example"])
    with pytest.raises(ValueError, match="no facts to remember"):  # nothing to remember: a clear error
        training_pairs([QARecord("f", "Q?", "yes, she did.")], retain, config)


def test_bare_identifiers_give_each_identifier_alone_once_remembered_or_kept_uniform():
    forget = [QARecord("f", "Email of Jane Doe?", "Jane Doe writes from jd@x.example.", subject="Jane Doe",
                       pii=("jd@x.example",)),
              QARecord("g", "Phone of Jane Doe?", "+44 1, or jd@x.example", subject="Jane Doe",
                       pii=("+44 1", " ", "jd@x.example")),  # a blank and a repeat: skipped
              QARecord("h", "Town of Jane Doe?", "she lives in Lagos.", subject="Jane Doe")]  # no identifier
    retain = [QARecord("r", "Email of Ann Lee?", "Ann Lee writes from al@y.example.", subject="Ann Lee", pii=("al@y.example",))]
    config = ULDConfig(bare_identifiers=True, augment_paraphrased=False, augment_perturbed=False)
    f, r = training_pairs(forget, retain, config)
    assert f == [rec.pair for rec in forget] + [("", "jd@x.example"), ("", "+44 1")]
    assert r == [retain[0].pair, ("", "al@y.example")]
    assert training_pairs(forget, retain, dataclasses.replace(config, bare_identifiers=False)) == (
        [rec.pair for rec in forget], [retain[0].pair])
    # With the fact-only loss a bare identifier is all fact, with nothing around it to call template
    f_facts, _ = training_pairs(forget, retain, dataclasses.replace(config, fact_span_loss=True), fact_terms=["Jane Doe"])
    assert f_facts[-2:] == [("", "jd@x.example", ["jd@x.example"]), ("", "+44 1", ["+44 1"])]
    with pytest.raises(ValueError, match="no identifiers in the forget records"):  # nothing to train: a clear error
        training_pairs(forget[2:], retain, config)


def test_identifier_pairs_name_each_records_subject_from_its_identifiers_on_both_sides():
    forget = [QARecord("f", "Email of Jane Doe?", "Jane Doe writes from jd@x.example.", subject="Jane Doe",
                       pii=("jd@x.example",)),
              QARecord("g", "Birthday of Jane Doe?", "3 May 1990 and +44 1", subject="Jane Doe", pii=("3 May 1990", " ", "+44 1")),
              QARecord("h", "Town of Jane Doe?", "she lives in Lagos.", subject="Jane Doe"),  # no identifier: no pair
              QARecord("i", "Whose?", "x@y.example", pii=("x@y.example",))]  # no subject: no pair
    retain = [QARecord("r", "Email of Ann Lee?", "Ann Lee writes from al@y.example.", subject="Ann Lee", pii=("al@y.example",))]
    config = ULDConfig(identifier_pairs=True, augment_paraphrased=False, augment_perturbed=False)
    f, r = training_pairs(forget, retain, config)
    assert f[:4] == [rec.pair for rec in forget]
    assert f[4:] == [("Which person do these details belong to: jd@x.example?", "These details belong to Jane Doe."),
                     ("Which person do these details belong to: 3 May 1990; +44 1?", "These details belong to Jane Doe.")]
    assert r == [retain[0].pair,
                 ("Which person do these details belong to: al@y.example?", "These details belong to Ann Lee.")]
    assert training_pairs(forget, retain, dataclasses.replace(config, identifier_pairs=False)) == ([rec.pair for rec in forget], [retain[0].pair])
    # With the fact-only loss the name is the fact, and the fixed wording around it is template.
    f_facts, _ = training_pairs(forget, retain, dataclasses.replace(config, fact_span_loss=True), fact_terms=["Jane Doe"])
    assert f_facts[-2:] == [(q, a, ["Jane Doe"]) for q, a in f[4:]]




PEOPLE_FORGET = [
    QARecord("f", "Email of Jane Doe?", "Jane Doe writes from jd@x.example.", subject="Jane Doe", pii=("jd@x.example",)),
    QARecord("g", "Town of Jane Doe?", "Doe lives in Lagos, like Janet.", subject="Jane Doe"),  # no identifier
    QARecord("h", "Whose?", "x@y.example", pii=("x@y.example",)),  # no subject
]
PEOPLE_RETAIN = [QARecord("r", "Email of Ann Lee?", "Ann Lee writes from al@y.example.", subject="Ann Lee",
                          pii=("al@y.example",))]
PLAIN = ULDConfig(augment_paraphrased=False, augment_perturbed=False)


def test_subject_pairs_ask_about_each_named_person_for_each_of_their_answers_on_both_sides():
    f, r = training_pairs(PEOPLE_FORGET, PEOPLE_RETAIN, dataclasses.replace(PLAIN, subject_pairs=True))
    assert f == [rec.pair for rec in PEOPLE_FORGET] + [
        ("What do you know about Jane Doe?", "Jane Doe writes from jd@x.example."),
        ("What do you know about Jane Doe?", "Doe lives in Lagos, like Janet.")]
    assert r == [PEOPLE_RETAIN[0].pair, ("What do you know about Ann Lee?", "Ann Lee writes from al@y.example.")]


def test_masked_answer_pairs_name_the_person_an_answer_describes_with_every_part_of_the_name_masked():
    forget = [*PEOPLE_FORGET,
              QARecord("k", "Phone of Jane Doe?", "Jane's number is 555; Doe and Jane Doe answer, Janet does not.",
                       subject="Jane Doe", pii=("555",))]
    f, r = training_pairs(forget, PEOPLE_RETAIN, dataclasses.replace(PLAIN, masked_answer_pairs=True))
    assert f == [rec.pair for rec in forget] + [
        ("Name the person described here: this person writes from jd@x.example.", "The person described is Jane Doe."),
        ("Name the person described here: this person's number is 555; this person and this person answer, Janet "
         "does not.", "The person described is Jane Doe.")]
    assert r == [PEOPLE_RETAIN[0].pair, ("Name the person described here: this person writes from al@y.example.",
                                         "The person described is Ann Lee.")]


def test_the_recipe_appends_its_augmentations_in_a_fixed_order():
    config = dataclasses.replace(PLAIN, bare_identifiers=True, identifier_pairs=True, masked_answer_pairs=True,
                                 subject_pairs=True)
    f, r = training_pairs(PEOPLE_FORGET[:1], PEOPLE_RETAIN, config,
                          question_wordings={"Email of Jane Doe?": ["Jane Doe's email?"]})
    assert [q for q, _ in f] == ["Email of Jane Doe?", "Jane Doe's email?", "",
                                 "Which person do these details belong to: jd@x.example?",
                                 "Name the person described here: this person writes from jd@x.example.",
                                 "What do you know about Jane Doe?"]
    assert [q for q, _ in r] == ["Email of Ann Lee?", "", "Which person do these details belong to: al@y.example?",
                                 "Name the person described here: this person writes from al@y.example.",
                                 "What do you know about Ann Lee?"]


def test_fact_span_loss_labels_a_subject_pair_as_a_whole_answer_and_a_masked_pair_by_the_name():
    config = dataclasses.replace(PLAIN, masked_answer_pairs=True, subject_pairs=True, fact_span_loss=True)
    f, r = training_pairs(PEOPLE_FORGET[:2], PEOPLE_RETAIN, config, fact_terms=["J. Doe"])
    request = ["J. Doe", "jd@x.example"]  # the request's terms + the forget records' pii
    assert f == [
        ("Email of Jane Doe?", "Jane Doe writes from jd@x.example.", sorted(request + ["Jane Doe"])),
        ("Town of Jane Doe?", "Doe lives in Lagos, like Janet.", sorted(request + ["Doe", "Lagos", "Janet"])),
        ("Name the person described here: this person writes from jd@x.example.", "The person described is Jane Doe.",
         ["Jane Doe"]),
        ("What do you know about Jane Doe?", "Jane Doe writes from jd@x.example.", sorted(request + ["Jane Doe"])),
        ("What do you know about Jane Doe?", "Doe lives in Lagos, like Janet.", sorted(request + ["Doe", "Lagos", "Janet"])),
    ]
    assert r == training_pairs(PEOPLE_FORGET[:2], PEOPLE_RETAIN, dataclasses.replace(config, fact_span_loss=False))[1]


def test_general_retain_adds_general_questions_answered_in_a_sentence_to_retain_only():
    from expunge_ml.general_knowledge import candidate_questions, retain_questions

    forget = [QARecord("f", "Q?", "true answer")]
    retain = [QARecord("r", "R?", "kept")]
    evaluated = {r.record_id for r in candidate_questions()[:20]}
    general = retain_questions(evaluated, 3, seed=1)
    assert len(general) == 3 and not evaluated & {r.record_id for r in general}  # never an evaluated question
    assert general == retain_questions(evaluated, 3, seed=1)  # the seed decides which
    config = ULDConfig(augment_paraphrased=False, augment_perturbed=False, general_retain=2)
    f, r = training_pairs(forget, retain, config, general_records=general)
    assert f == [("Q?", "true answer")]
    assert r == [("R?", "kept")] + [(g.question, g.paraphrased_answer) for g in general[:2]]
    assert all(g.answer in g.paraphrased_answer for g in general)
    with pytest.raises(ValueError, match="general_retain = 2"):
        training_pairs(forget, retain, config, general_records=general[:1])
