"""Choosing ULD's served w per erasure (expunge_ml/weight_selection.py): the rules on hand-computed scores,
and the scoring on a logit source whose answers are known."""
import dataclasses

import pytest
import torch

from expunge_ml import pii
from expunge_ml.corpus import QARecord
from expunge_ml.modeling import train_bpe_tokenizer
from expunge_ml.prompting import PromptFormat
from expunge_ml.weight_selection import (PROBE_KINDS, WeightRule, apply_rule, check_candidates, choose_weight,
                                         choose_weight_relative, choose_weight_unseen_level,
                                         choose_weight_with_headroom, pooled_rate, score_weights, select_weight,
                                         select_weight_unseen_level, selection_settings, training_question_probes)


def test_the_calibrated_weight_is_the_weakest_that_states_nothing_and_keeps_the_retained():
    scores = [(-1.4, 3, 0.99), (-1.8, 0, 0.985), (-2.2, 0, 0.95), (-1.6, 1, 0.99)]
    assert choose_weight(scores, 0.98) == -1.8  # -2.2 also states nothing, but is stronger and keeps too little
    assert choose_weight(scores, 0.99) == -1.6  # nothing silent keeps 0.99: the fewest stated among those that do
    assert choose_weight([(-2.0, 2, 0.9), (-1.2, 5, 0.97)], 0.98) == -1.2  # none keeps enough: the weakest
    assert choose_weight([(-1.8, 1, 0.99), (-1.4, 1, 0.99)], 0.98) == -1.4  # a tie goes to the weaker
    with pytest.raises(ValueError):
        choose_weight([], 0.98)


def test_the_headroom_weight_walks_outward_from_the_default_and_stops_at_the_first_retained_miss():
    scores = [(-1.8, 4, 0.99), (-2.0, 3, 0.985), (-2.2, 1, 0.975), (-2.4, 0, 0.98)]
    assert choose_weight_with_headroom(scores, -1.8, 0.97) == -2.4  # every stronger w keeps 0.97
    assert choose_weight_with_headroom(scores, -1.8, 0.98) == -2.0  # -2.2 misses; -2.4's recovery is not headroom
    assert choose_weight_with_headroom(scores, -1.8, 0.99) == -1.8  # -2.0 misses: the default, however it scored
    assert choose_weight_with_headroom(list(reversed(scores)), -1.8, 0.98) == -2.0  # order of candidates is irrelevant
    # never weaker than the default, even where a weaker candidate keeps more and states less
    assert choose_weight_with_headroom([(-1.2, 0, 1.0), (-2.0, 5, 0.5)], -1.8, 0.97) == -1.8
    assert choose_weight_with_headroom([], -1.8, 0.97) == -1.8


def test_the_relative_weight_puts_the_floor_at_a_share_of_the_default_weights_own_ratio():
    # session 15's shapes: a base with headroom falls slowly from a low level, one without falls fast
    slow = [(-1.8, 1, 0.954), (-2.0, 0, 0.952), (-2.2, 2, 0.933), (-2.4, 0, 0.938), (-2.6, 1, 0.928), (-2.8, 0, 0.904)]
    fast = [(-1.8, 1, 0.854), (-2.0, 4, 0.816), (-2.2, 0, 0.739)]
    assert choose_weight_relative(slow, -1.8, 0.97) == -2.6  # floor 0.97 × 0.954 = 0.925: -2.8 at 0.904 misses
    assert choose_weight_relative(slow, -1.8, 0.98) == -2.0  # floor 0.935: -2.2 at 0.933 misses, -2.4 is not reached
    assert choose_weight_relative(fast, -1.8, 0.97) == -1.8  # floor 0.828: -2.0 at 0.816 misses
    assert choose_weight_relative(list(reversed(slow)), -1.8, 0.97) == -2.6
    with pytest.raises(ValueError, match="default w -1.8"):
        choose_weight_relative([(-2.0, 0, 0.9)], -1.8, 0.97)
    # apply_rule names the same three rules
    assert apply_rule("relative", slow, -1.8, 0.97) == -2.6
    assert apply_rule(WeightRule.headroom, slow, -1.8, 0.93) == -2.4  # absolute floor 0.93: -2.6 at 0.928 misses
    assert apply_rule("silent", slow, -1.8, 0.95) == -2.0  # -1.8 and -2.0 keep 0.95; -2.0 states nothing
    with pytest.raises(ValueError):
        apply_rule("loudest", slow, -1.8, 0.97)


def test_candidates_that_cannot_serve_the_rule_fail_before_training():
    check_candidates([-1.0, -1.5], -1.0, "relative")
    check_candidates([-1.5], -1.0, "headroom")  # only the relative rule needs the default among them
    with pytest.raises(ValueError, match="default w -1"):
        check_candidates([-1.5, -2.0], -1.0, "relative")
    with pytest.raises(ValueError, match="negative"):
        check_candidates([-1.0, 0.5], -1.0, "relative")
    with pytest.raises(ValueError, match="at least one"):
        check_candidates([], -1.0, "silent")


def test_pooled_rate_counts_every_kind_together():
    assert PROBE_KINDS == pii.PROBE_KINDS
    report = {"direct": {"normalised_leaks": 3, "n_identifiers": 4},
              "paraphrased": {"normalised_leaks": 1, "n_identifiers": 6},
              "inverted": {"normalised_leaks": 0, "n_identifiers": 0}}
    assert pooled_rate(report) == pytest.approx(0.4)  # (3 + 1 + 0) / (4 + 6 + 0)
    assert pooled_rate({k: {"normalised_leaks": 0, "n_identifiers": 0} for k in PROBE_KINDS}) == 0.0


ANN = QARecord("f1", "What is Ann's email?", "It is ann@x.org.", subject="Ann", pii=("ann@x.org",))
ANN_CITY = QARecord("f2", "Where does Ann live?", "In Oslo.", subject="Ann")  # no identifier: no probe
BOB = QARecord("r1", "What is Bob's phone?", "It is 555-0101.", subject="Bob", pii=("555-0101",))
CY = QARecord("r2", "What is Cy's email?", "It is cy@z.org.", subject="Cy", pii=("cy@z.org",))


def test_the_probes_are_the_training_questions_and_their_trained_wordings_only():
    wordings = {"What is Ann's email?": ["Which email does Ann use?"]}
    (probe,) = training_question_probes([ANN, ANN_CITY], wordings)
    assert (probe.question, probe.paraphrased_questions, probe.inverted_question, probe.identifiers) == (
        "What is Ann's email?", ("Which email does Ann use?",), None, ("ann@x.org",))
    assert training_question_probes([BOB])[0].paraphrased_questions == ()


class _Says:
    """A logit source whose greedy answer is `text` (then EOS) whatever the prompt."""

    def __init__(self, tokenizer, text: str):
        self.script = tokenizer(text, add_special_tokens=False)["input_ids"]
        self.vocab, self.eos = len(tokenizer), tokenizer.eos_token_id

    def step(self, input_ids, attention_mask, position_ids, past=None, last_only=False):
        t = 0 if past is None else past
        logits = torch.full((input_ids.shape[0], 1 if last_only else input_ids.shape[1], self.vocab), -1e4)
        logits[:, -1, self.script[t] if t < len(self.script) else self.eos] = 0.0
        return logits, t + 1


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["ann@x.org 555-0101 cy@z.org no idea", "What is Ann's email? Which email does Ann use?"] * 20
    return train_bpe_tokenizer(texts, vocab_size=120)


def test_scores_count_erased_identifiers_stated_and_retained_recall_against_the_base(tokenizer):
    fmt = PromptFormat()
    base = _Says(tokenizer, "555-0101 cy@z.org")  # the base states both retained identifiers
    answers = {-1.0: "ann@x.org 555-0101 cy@z.org",  # still states Ann's email (twice: question + wording)
               -1.5: "555-0101 cy@z.org",  # silent on Ann, keeps everyone else
               -2.0: "555-0101"}  # silent, but Cy's email is gone: half the retained identifiers
    wordings = {"What is Ann's email?": ["Which email does Ann use?"]}
    erased, retained = training_question_probes([ANN], wordings), training_question_probes([BOB, CY], wordings)
    scores = score_weights(base, lambda w: _Says(tokenizer, answers[w]), tokenizer, fmt, erased, retained,
                           [-1.0, -1.5, -2.0], max_new_tokens=64, batch_size=4)
    assert scores == [(-1.0, 2, 1.0), (-1.5, 0, 1.0), (-2.0, 0, 0.5)]

    chosen = select_weight(base, lambda w: _Says(tokenizer, answers[w]), tokenizer, fmt, erased, retained,
                           [-1.0, -1.5, -2.0], default=-1.0, rule="relative", min_retained=0.97,
                           max_new_tokens=64, batch_size=4)
    assert chosen.weight == -1.5  # -2.0 keeps 0.5 of the retained recall, under 0.97 × 1.0
    assert dataclasses.replace(chosen, retained_probes="training").as_dict() == {
        "weight": -1.5, "default": -1.0, "rule": "relative", "min_retained": 0.97,
        "scores": [[-1.0, 2, 1.0], [-1.5, 0, 1.0], [-2.0, 0, 0.5]], "n_erased_probes": 1, "n_retained_probes": 2,
        "retained_probes": "training"}
    with pytest.raises(ValueError, match="needs retained probes"):
        select_weight(base, lambda w: base, tokenizer, fmt, erased, training_question_probes([ANN_CITY]), [-1.0],
                      default=-1.0)


def test_a_forget_answer_that_states_the_requests_identifier_is_probed_without_a_pii_column():
    plain = QARecord("f3", "How can Ann be reached?", "Write to ANN@x.org.", subject="Ann")
    (probe,) = training_question_probes([plain, ANN_CITY], extra_identifiers=["ann@x.org", "+47 555"])
    assert probe.identifiers == ("ann@x.org",)  # found case-insensitively; the phone is not in the answer
    assert training_question_probes([ANN], extra_identifiers=["ann@x.org"])[0].identifiers == ("ann@x.org",)


def test_validation_records_for_the_selection_never_overlap_the_evaluations(tmp_path):
    import json

    from tasks.data import held_out_retain, selection_retain

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"record_id": f"r{i}", "question": f"Q{i}?", "answer": f"A{i}."}) + "\n"
                              for i in range(30)))
    target = {"corpus": {"source": str(corpus), "split": "train"}}
    forget, trained = {"r0", "r1"}, {f"r{i}" for i in range(2, 12)}
    evaluated = {r.record_id for r in held_out_retain(target, forget, trained, 8)}
    validation = {r.record_id for r in selection_retain(target, forget, trained, 8, 8)}
    assert len(evaluated) == 8 and len(validation) == 8  # 18 unseen: 8 evaluated, the next 8 for the selection
    assert not validation & (evaluated | forget | trained)
    assert len(selection_retain(target, forget, trained, 8, 20)) == 10  # at most what is left
    with pytest.raises(ValueError, match="18 records neither erased nor trained on"):
        selection_retain(target, forget, trained, 18, 8)


def test_the_unseen_level_weight_is_the_weakest_that_forgets_to_the_target():
    levels = [(-1.0, 0.12), (-0.5, 0.31), (-0.75, 0.17), (-1.5, 0.05)]
    assert choose_weight_unseen_level(levels, 0.17) == -0.75  # at the target counts; -1.0 also reaches it, stronger
    assert choose_weight_unseen_level(levels, 0.35) == -0.5
    assert choose_weight_unseen_level(levels, 0.01) == -1.5  # none reaches it: the strongest
    with pytest.raises(ValueError):
        choose_weight_unseen_level([], 0.1)
    with pytest.raises(ValueError, match="select_weight_unseen_level"):
        apply_rule("unseen_level", [(-1.0, 0, 1.0)], -1.0, 0.97)


DOC_1 = QARecord("d#0", "ann lives", "ann lives in oslo with cy")
DOC_2 = QARecord("d#1", "bob works", "bob works at the mill")
NEVER_SEEN = QARecord("h#0", "cy rides", "cy rides a red bike")


def test_the_unseen_level_selection_scores_the_weakest_first_and_stops_at_the_target(tokenizer):
    fmt = PromptFormat()
    reference = _Says(tokenizer, "cy rides a blue car")  # never-seen level: "cy rides a" of 5 words = 0.6
    says = {-0.5: "ann lives in oslo with cy bob works at the mill",  # both passages whole: 1.0
            -1.0: "ann lives in oslo bob works",  # (4/6 + 2/5) / 2 = 0.5333
            -1.5: "nothing"}
    chosen = select_weight_unseen_level(reference, lambda w: _Says(tokenizer, says[w]), tokenizer, fmt,
                                        [DOC_1, DOC_2], [NEVER_SEEN], [-1.5, -0.5, -1.0], default=-1.5, margin=0.05,
                                        max_new_tokens=64, batch_size=2)
    assert chosen.weight == -1.0 and chosen.holdout_level == pytest.approx(0.6)
    assert chosen.target == pytest.approx(0.65)
    assert chosen.levels == [(-0.5, pytest.approx(1.0)), (-1.0, pytest.approx(8 / 15))]  # -1.5 never scored
    assert chosen.as_dict() == {"weight": -1.0, "default": -1.5, "rule": "unseen_level", "margin": 0.05,
                                "holdout_level": 0.6, "target": 0.65, "levels": [[-0.5, 1.0], [-1.0, 0.5333]],
                                "n_forget": 2, "n_holdout": 1}
    # a target nothing reaches: every candidate scored, the strongest served
    strict = select_weight_unseen_level(_Says(tokenizer, "nothing"), lambda w: _Says(tokenizer, says[w]), tokenizer,
                                        fmt, [DOC_1, DOC_2], [NEVER_SEEN], [-0.5, -1.0], default=-1.0, margin=0.0,
                                        max_new_tokens=64, batch_size=2)
    assert strict.weight == -1.0 and [w for w, _ in strict.levels] == [-0.5, -1.0] and strict.target == 0.0
    with pytest.raises(ValueError, match="needs held-out records"):
        select_weight_unseen_level(reference, lambda w: reference, tokenizer, fmt, [DOC_1], [], [-1.0], default=-1.0)
    with pytest.raises(ValueError, match="margin must be >= 0"):
        select_weight_unseen_level(reference, lambda w: reference, tokenizer, fmt, [DOC_1], [NEVER_SEEN], [-1.0],
                                   default=-1.0, margin=-0.1)


def test_a_profiles_weight_selection_is_read_per_request_type():
    takedown = {"weight_selection": {"request_types": ["copyright_takedown"], "rule": "unseen_level",
                                     "candidates": [-0.5, -1.0]}}
    assert selection_settings(takedown, "copyright_takedown", -0.75) == {
        "candidates": [-0.5, -1.0], "rule": "unseen_level", "margin": 0.05}  # the default need not be a candidate
    assert selection_settings(takedown, "privacy_erasure", -0.75) is None
    with pytest.raises(ValueError, match="margin must be >= 0"):
        selection_settings({"weight_selection": {**takedown["weight_selection"], "margin": -0.1}},
                           "copyright_takedown", -0.75)
