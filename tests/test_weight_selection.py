"""Choosing ULD's served w per erasure (expunge_ml/weight_selection.py): the relative rule on hand-computed
scores, and the scoring on a logit source whose answers are known."""
import dataclasses

import pytest
import torch

from expunge_ml import pii
from expunge_ml.corpus import QARecord
from expunge_ml.modeling import train_bpe_tokenizer
from expunge_ml.prompting import PromptFormat
from expunge_ml.weight_selection import (PROBE_KINDS, check_candidates, choose_weight_relative, pooled_rate,
                                         score_weights, select_weight, selection_settings, training_question_probes)


def test_the_relative_weight_walks_outward_from_the_default_and_stops_at_the_first_retained_miss():
    # a base with headroom falls slowly from a low level, one without falls fast
    slow = [(-1.8, 1, 0.954), (-2.0, 0, 0.952), (-2.2, 2, 0.933), (-2.4, 0, 0.938), (-2.6, 1, 0.928), (-2.8, 0, 0.904)]
    fast = [(-1.8, 1, 0.854), (-2.0, 4, 0.816), (-2.2, 0, 0.739)]
    assert choose_weight_relative(slow, -1.8, 0.97) == -2.6  # floor 0.97 × 0.954 = 0.925: -2.8 at 0.904 misses
    assert choose_weight_relative(slow, -1.8, 0.98) == -2.0  # floor 0.935: -2.2 misses; -2.4's recovery is not headroom
    assert choose_weight_relative(fast, -1.8, 0.97) == -1.8  # floor 0.828: -2.0 at 0.816 misses
    assert choose_weight_relative(list(reversed(slow)), -1.8, 0.97) == -2.6  # order of candidates is irrelevant
    # never weaker than the default, even where a weaker candidate keeps more and states less
    assert choose_weight_relative([(-1.2, 0, 1.0), (-1.8, 3, 0.9), (-2.0, 5, 0.5)], -1.8, 0.97) == -1.8
    with pytest.raises(ValueError, match="default w -1.8"):
        choose_weight_relative([(-2.0, 0, 0.9)], -1.8, 0.97)


def test_candidates_that_cannot_serve_the_rule_fail_before_training():
    check_candidates([-1.0, -1.5], -1.0)
    with pytest.raises(ValueError, match="default w -1"):
        check_candidates([-1.5, -2.0], -1.0)
    with pytest.raises(ValueError, match="negative"):
        check_candidates([-1.0, 0.5], -1.0)
    with pytest.raises(ValueError, match="at least one"):
        check_candidates([], -1.0)


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

    def step(self, input_ids, attention_mask, position_ids, past=None, last_only=False, keep=None):
        t = 0 if past is None else past
        width = 1 if last_only else input_ids.shape[1] if keep is None else len(keep)
        logits = torch.full((input_ids.shape[0], width, self.vocab), -1e4)
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
                           [-1.0, -1.5, -2.0], default=-1.0, min_retained=0.97,
                           max_new_tokens=64, batch_size=4)
    assert chosen.weight == -1.5  # -2.0 keeps 0.5 of the retained recall, under 0.97 × 1.0
    assert dataclasses.replace(chosen, retained_probes="training").as_dict() == {
        "weight": -1.5, "default": -1.0, "min_retained": 0.97,
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


def test_a_profiles_weight_selection_is_read_per_request_type_and_checked_before_training():
    profile = {"weight_selection": {"candidates": [-1.0, -1.5], "min_retained": 0.95}}
    assert selection_settings({}, "privacy_erasure", -1.0) is None
    assert selection_settings(profile, "privacy_erasure", -1.0) == {
        "candidates": [-1.0, -1.5], "min_retained": 0.95, "retained": "held_out"}
    assert selection_settings(profile, "copyright_takedown", -1.0) is None  # privacy erasures unless listed
    listed = {"weight_selection": {**profile["weight_selection"], "request_types": ["copyright_takedown"],
                                   "retained": "training"}}
    assert selection_settings(listed, "copyright_takedown", -1.0)["retained"] == "training"
    with pytest.raises(ValueError, match=r"unknown keys \['rule'\]"):
        selection_settings({"weight_selection": {**profile["weight_selection"], "rule": "relative"}},
                           "privacy_erasure", -1.0)
    with pytest.raises(ValueError, match=r"\(uld weight -2\): the relative rule needs the default w -2"):
        selection_settings(profile, "privacy_erasure", -2.0)
    with pytest.raises(ValueError, match="retained: 'eval'"):
        selection_settings({"weight_selection": {**profile["weight_selection"], "retained": "eval"}},
                           "privacy_erasure", -1.0)
