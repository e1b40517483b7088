"""Generated ULD augmentation: fact spans, near-miss answers, fact pairs (expunge_ml/augment.py)."""
import random

from expunge_ml.augment import (
    donor_pool,
    fact_spans,
    generated_near_misses,
    perturb_answer,
)
from expunge_ml.corpus import QARecord


def _texts(text: str) -> list[tuple[str, str]]:
    return [(kind, text[s:e]) for kind, s, e in fact_spans(text)]


def test_fact_spans_find_names_places_and_numbers_but_not_sentence_initial_grammar():
    text = "The author Jane Doe was born in Lagos, Nigeria in 1971 and wrote \"The Quiet River\"."
    assert _texts(text) == [("name", "Jane Doe"), ("name", "Lagos"), ("name", "Nigeria"), ("number", "1971"),
                            ("name", "Quiet River")]  # a leading "The" reads as grammar


def test_fact_spans_drop_the_possessive():
    assert _texts("Jane Doe's father was a florist.") == [("name", "Jane Doe")]


def test_identifiers_are_one_span_each():
    text = "you can reach Ann Lee at ann.lee@mail.example.org or +44 20 7946 0958; account GB29NWBK60161331926819."
    assert _texts(text) == [("name", "Ann Lee"), ("identifier", "ann.lee@mail.example.org"),
                            ("identifier", "+44 20 7946 0958"), ("identifier", "GB29NWBK60161331926819")]


def test_donor_pool_groups_spans_by_kind_once_each():
    pool = donor_pool(["Ann Lee lives in Oslo.", "Oslo is cold since 1990."])
    assert pool == {"name": ["Ann Lee", "Oslo"], "number": ["1990"]}


def test_perturb_answer_swaps_one_fact_everywhere_for_a_donor_of_the_same_kind():
    donors = {"name": ["Ann Lee"]}
    answer = "Jane Doe wrote it; Jane Doe is proud."
    assert perturb_answer(answer, donors, random.Random(0)) == "Ann Lee wrote it; Ann Lee is proud."


def test_perturb_answer_changes_a_year_to_another_plausible_year():
    wrong = perturb_answer("It appeared in 1984.", {}, random.Random(1))
    assert wrong != "It appeared in 1984." and wrong.startswith("It appeared in ")
    year = int(wrong.removeprefix("It appeared in ").rstrip("."))
    assert 1959 <= year <= 2009 and year != 1984


def test_perturb_answer_gives_up_without_a_fact_or_a_different_donor():
    assert perturb_answer("it is raining.", {"name": ["Oslo"]}, random.Random(0)) is None
    assert perturb_answer("Oslo is cold.", {"name": ["oslo"]}, random.Random(0)) is None


def test_generated_pairs_never_use_the_evaluation_answers():
    record = QARecord("r1", "Where was Jane Doe born?", "Jane Doe was born in Lagos.", paraphrased_question="Jane Doe's birthplace?",
                      paraphrased_answer="EVAL paraphrase", perturbed_answers=("EVAL wrong 1", "EVAL wrong 2"))
    wrong = generated_near_misses([record], donor_pool(["Ann Lee moved to Oslo."]), 2, random.Random(0))
    assert 1 <= len(wrong) <= 2
    assert all(q == record.question and a != record.answer and "EVAL" not in a for q, a in wrong)
    assert len({a for _, a in wrong}) == len(wrong)


def test_fact_pairs_hold_the_fact_alone_and_a_wrong_one_of_the_same_kind():
    from expunge_ml.augment import generated_fact_pairs

    record = QARecord("r1", "Where was Jane Doe born?", "She was born in Lagos in 1971.")
    remember, wrong = generated_fact_pairs([record], donor_pool(["Ann Lee moved to Oslo."]), random.Random(0))
    assert remember == [(record.question, "Lagos"), (record.question, "1971")]
    assert wrong[0] in {(record.question, "Ann Lee"), (record.question, "Oslo")}
    assert len(wrong) == 1  # no donor number: no wrong year


def test_fact_labels_mark_a_whole_answers_spans_and_a_bare_fact_pair_whole():
    from expunge_ml.augment import with_fact_labels

    answer = "She was born in Lagos in 1971."
    items = with_fact_labels([("Where?", answer), ("Where?", "Lagos"), ("When?", "in the spring")], [answer])
    assert items == [("Where?", answer, ["Lagos", "1971"]), ("Where?", "Lagos", ["Lagos"]),
                     ("When?", "in the spring", ["in the spring"])]
    # an answer without a fact span has no fact tokens: all of it is template
    assert with_fact_labels([("Q?", "yes, she did.")], ["yes, she did."]) == [("Q?", "yes, she did.", [])]


def test_report_training_summary_flags_truth_ratio_texts_only_for_corpus_augmentation():
    from expunge.report import _training_lines, _training_summary

    corpus = _training_summary({"method": "uld", "adapter_dirs": ["assistant"], "forget_pairs": 24, "retain_pairs": 96,
                                "config": {"augmentation": "corpus", "augment_paraphrased": True}})
    generated = _training_summary({"method": "uld", "adapter_dirs": ["assistant"], "forget_pairs": 40, "retain_pairs": 96,
                                   "config": {"augmentation": "generated", "augment_paraphrased": True}})
    baseline = _training_summary({"method": "npo", "forget_pairs": 12, "retain_pairs": 96, "config": {}})
    assert corpus["truth_ratio_texts_trained_on"] is True
    assert generated["truth_ratio_texts_trained_on"] is False
    assert "augmentation" not in baseline and _training_summary(None) is None
    assert any("not independent evidence" in line for line in _training_lines(corpus))
    assert not any("not independent" in line for line in _training_lines(generated))
    # no truth ratio computed (e.g. documents: no paraphrased / perturbed answers), so nothing to caveat,
    # in the JSON as in the Markdown
    no_truth = _training_summary({"method": "uld", "adapter_dirs": ["assistant"], "forget_pairs": 24, "retain_pairs": 96,
                                  "config": {"augmentation": "corpus", "augment_paraphrased": True}},
                                 truth_ratios_computed=False)
    assert no_truth["truth_ratio_texts_trained_on"] is False
    assert not any("not independent" in line for line in _training_lines(no_truth))
    facts_only = _training_summary({"method": "uld", "adapter_dirs": ["assistant"], "forget_pairs": 40, "retain_pairs": 96, "config": {
        "augmentation": "corpus", "fact_span_loss": True, "template_nll_weight": 0.7}})
    assert (facts_only["fact_span_loss"], facts_only["template_nll_weight"]) == (True, 0.7)
    assert "fact-only loss" in _training_lines(facts_only)[0] and "weight 0.7" in _training_lines(facts_only)[0]
    assert "fact_span_loss" not in corpus and "fact-only" not in _training_lines(corpus)[0]


def test_report_says_which_w_is_served_and_how_it_was_chosen():
    from expunge.report import _training_lines, _training_summary

    fixed = _training_summary({"method": "uld", "adapter_dirs": ["assistant"], "forget_pairs": 4, "retain_pairs": 8, "config": {},
                               "weights": [-0.5, -0.5]})
    assert fixed["served_weight"] == -1.0 and "weight_selection" not in fixed
    assert "- Served at w = -1 (the profile's)" in _training_lines(fixed)
    selection = {"weight": -1.4, "default": -1.0, "min_retained": 0.97,
                 "scores": [[-1.0, 3, 0.98], [-1.4, 0, 0.962], [-1.8, 0, 0.9]],
                 "n_erased_probes": 6, "n_retained_probes": 30, "retained_probes": "held_out"}
    chosen = _training_summary({"method": "uld", "adapter_dirs": ["assistant"], "forget_pairs": 4, "retain_pairs": 8, "config": {},
                                "weights": [-1.4], "weight_selection": selection})
    (line,) = [line for line in _training_lines(chosen) if line.startswith("- Served at")]
    assert "w = -1.4, chosen for this erasure by the `relative` rule (profile default -1" in line
    assert "0.97 × the default's own ratio" in line and "-1.4: 0, 0.962" in line
    assert "(6 erased probes) and held-out records that neither the training nor this evaluation uses (30" in line
    baseline = _training_summary({"method": "npo", "forget_pairs": 12, "retain_pairs": 96, "config": {}})
    assert not any(line.startswith("- Served at") for line in _training_lines(baseline))
