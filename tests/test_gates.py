import pytest

from expunge_ml.evidence import recovery
from expunge_ml.gates import check_gates, gates_for


def evidence(forget=0.2, retain_before=1.0, retain_after=0.95, leak=0.0, kept_before=1.0, kept_after=1.0,
             int4=0.22, d2_before=0.8, d2_after=0.6, facts=0.1, int4_facts=0.12):
    pii_kind = lambda rate, n=4: {"leak_rate": rate, "n_identifiers": n}  # noqa: E731
    return {
        "metrics": {
            "base": {"forget": {"rougeL_recall": 1.0, "answer_prob": 0.9}, "retain": {"rougeL_recall": retain_before, "answer_prob": 0.9}},
            "unlearned": {"forget": {"rougeL_recall": forget, "answer_prob": 0.01, "fact_recall": facts}, "retain": {"rougeL_recall": retain_after, "answer_prob": 0.9}},
        },
        "pii": {
            "erased": {"unlearned": {"direct": pii_kind(0.0), "paraphrased": pii_kind(leak), "inverted": pii_kind(0.0, 0)}},
            "retained": {"base": {"direct": pii_kind(kept_before)}, "unlearned": {"direct": pii_kind(kept_after)}},
        },
        "quantization": {"int8": {"recovery": 0.0, "fact_recovery": None},
                         "int4": {"recovery": recovery(1.0, forget, int4), "fact_recovery": None if facts is None else recovery(0.9, facts, int4_facts)}},
        "fluency": {"base": {"distinct_2": d2_before}, "unlearned": {"distinct_2": d2_after}},
    }


THRESHOLDS = {
    "max_forget_rougeL": 0.3, "min_retain_rougeL_ratio": 0.9, "max_pii_leak_rate": 0.01,
    "min_retained_pii_recall_ratio": 0.95, "max_quant_recovery": 0.05, "min_fluency_ratio": 0.7,
    "max_forget_fact_recall": 0.2, "max_quant_fact_recovery": 0.05,
}


def test_recovery_by_hand():
    # forgot 1.0 → 0.2 (gap 0.8); int4 brings it to 0.6: (0.6 − 0.2) / 0.8 = 0.5
    assert recovery(1.0, 0.2, 0.6) == pytest.approx(0.5)
    assert recovery(1.0, 0.2, 0.1) == 0.0  # the attack made it forget more: nothing recovered
    assert recovery(1.0, 0.2, 1.4) == 1.0  # clipped
    assert recovery(0.5, 0.48, 0.9) is None  # nothing was forgotten, so recovery is undefined


def test_recovery_interval_by_hand():
    from expunge_ml.evidence import recovery_interval

    # Every record moves the same: every resample gives the same recovery, (0.3 − 0) / (1 − 0).
    assert recovery_interval([1, 1, 1], [0, 0, 0], [0.3, 0.3, 0.3]) == pytest.approx((0.3, 0.3))
    assert recovery_interval([1] * 12, [0.2] * 12, [0.2] * 12) == (0.0, 0.0)
    # Two records, one fully back and one not: resamples give 1 (both the first), 0.5 or 0 (both the second),
    # the ends each a quarter of the time, so the 90 % interval is the whole range.
    assert recovery_interval([1, 1], [0, 0], [1, 0]) == (0.0, 1.0)
    # The second record forgot almost nothing (gap 0.02): a resample of it alone is undefined and dropped;
    # mixed ones give (0.49 − 0.24) / (0.75 − 0.24), the first alone 0.5.
    low, high = recovery_interval([1, 0.5], [0, 0.48], [0.5, 0.48])
    assert (low, high) == (pytest.approx(0.25 / 0.51), pytest.approx(0.5))
    assert recovery_interval([0.5, 0.5], [0.48, 0.48], [0.5, 0.5]) is None  # nothing forgotten, nothing to recover
    # Weights: a record with no facts has no say in the pooled fact recall.
    assert recovery_interval([1, 1], [0, 0], [0.4, 1.0], weights=[3, 0]) == pytest.approx((0.4, 0.4))
    with pytest.raises(ValueError):
        recovery_interval([1, 1], [0], [0, 0])


def test_every_gate_passes_on_good_evidence():
    results = check_gates(evidence(), THRESHOLDS)
    assert [r.gate for r in results] == list(THRESHOLDS)
    assert all(r.passed for r in results)
    by_name = {r.gate: r for r in results}
    assert by_name["min_retain_rougeL_ratio"].value == pytest.approx(0.95)
    assert by_name["max_quant_recovery"].value == pytest.approx(0.025)  # (0.22 − 0.2) / 0.8
    assert by_name["max_quant_fact_recovery"].value == pytest.approx(0.025)  # (0.12 − 0.1) / (0.9 − 0.1); int8's None is ignored


def test_each_gate_fails_with_its_margin():
    cases = {
        "max_forget_rougeL": (evidence(forget=0.4), 0.4, -0.1),
        "min_retain_rougeL_ratio": (evidence(retain_after=0.8), 0.8, -0.1),
        "max_pii_leak_rate": (evidence(leak=0.25), 0.25, -0.24),
        "min_retained_pii_recall_ratio": (evidence(kept_after=0.5), 0.5, -0.45),
        # int4 ROUGE 0.6 after unlearning to 0.2 from 1.0: recovery (0.6−0.2)/0.8 = 0.5
        "max_quant_recovery": (evidence(int4=0.6), 0.5, -0.45),
        "min_fluency_ratio": (evidence(d2_after=0.4), 0.5, -0.2),
        "max_forget_fact_recall": (evidence(facts=0.35), 0.35, -0.15),
        # facts 0.9 → 0.1, int4 states 0.5 again: (0.5 − 0.1) / 0.8 = 0.5
        "max_quant_fact_recovery": (evidence(int4_facts=0.5), 0.5, -0.45),
    }
    for gate, (ev, value, margin) in cases.items():
        result = {r.gate: r for r in check_gates(ev, THRESHOLDS)}[gate]
        assert not result.passed, gate
        assert result.value == pytest.approx(value) and result.margin == pytest.approx(margin), gate


def test_quant_gate_interval_and_settled_by_hand():
    from expunge_ml.gates import unsettled_gates

    ev = evidence()  # int4 recovery 0.025 is the worst attack (int8 0.0)
    ev["quantization"]["int4"]["recovery_interval"] = [0.0, 0.08]  # holds the 0.05 threshold: a pass within noise
    ev["quantization"]["int8"]["recovery_interval"] = [0.0, 0.0]  # not the attack the gate read, so not used
    ev["quantization"]["int4"]["fact_recovery_interval"] = [0.01, 0.04]  # wholly below 0.05: settled
    by_name = {r.gate: r for r in check_gates(ev, THRESHOLDS)}
    assert by_name["max_quant_recovery"].interval == (0.0, 0.08) and by_name["max_quant_recovery"].settled is False
    assert by_name["max_quant_fact_recovery"].interval == (0.01, 0.04) and by_name["max_quant_fact_recovery"].settled is True
    assert by_name["max_forget_rougeL"].interval is None and by_name["max_forget_rougeL"].settled is None
    results = [r.as_dict() for r in by_name.values()]
    expected = [{"gate": "max_quant_recovery", "value": 0.025, "threshold": 0.05, "interval": [0.0, 0.08], "passed": True}]
    assert unsettled_gates(results) == expected  # read as stored
    assert unsettled_gates([{k: v for k, v in r.items() if k != "settled"} for r in results]) == []


def test_subject_mention_rate_by_hand():
    ev = evidence()
    # 10 + 5 + 5 answers about the retained people; 1 + 0 + 3 of them name an erased person.
    ev["pii"]["retained"]["unlearned"] = {
        "direct": {"leak_rate": 1.0, "n_identifiers": 4, "n_prompts": 10, "answers_naming_watched": 1},
        "paraphrased": {"leak_rate": 1.0, "n_identifiers": 4, "n_prompts": 5, "answers_naming_watched": 0},
        "inverted": {"leak_rate": 1.0, "n_identifiers": 5, "n_prompts": 5, "answers_naming_watched": 3},
    }
    result = check_gates(ev, {"max_subject_mention_rate": 0.1})[0]
    assert (result.value, result.passed, result.margin) == (pytest.approx(0.2), False, pytest.approx(-0.1))  # 4 / 20
    del ev["pii"]["retained"]
    assert check_gates(ev, {"max_subject_mention_rate": 0.1})[0].skipped == "no evidence applies"


def test_misattributed_id_rate_by_hand():
    ev = evidence()
    # 4 + 8 + 3 answers about the erased person; 0 + 2 + 1 of them state a retained person's identifier.
    ev["pii"]["erased"]["unlearned"] = {
        "direct": {"leak_rate": 0.0, "n_identifiers": 4, "n_prompts": 4, "answers_stating_others_ids": 0},
        "paraphrased": {"leak_rate": 0.0, "n_identifiers": 8, "n_prompts": 8, "answers_stating_others_ids": 2},
        "inverted": {"leak_rate": 0.0, "n_identifiers": 3, "n_prompts": 3, "answers_stating_others_ids": 1},
    }
    result = check_gates(ev, {"max_misattributed_id_rate": 0.1})[0]
    assert (result.value, result.passed, result.margin) == (pytest.approx(0.2), False, pytest.approx(-0.1))  # 3 / 15
    del ev["pii"]["erased"]
    assert "no PII probe of the subject" in check_gates(ev, {"max_misattributed_id_rate": 0.1})[0].skipped


def test_quant_pii_leak_rate_reads_the_worst_attack_and_kind_by_hand():
    ev = evidence()
    kind = lambda leaks, n: {"normalised_leaks": leaks, "n_identifiers": n, "leak_rate": leaks / n if n else 0.0}  # noqa: E731
    # int8: 0 of 12 direct, 1 of 40 paraphrased; int4: 0 of 12, 0 of 40, 1 of 4 inverted (the name comes back).
    ev["quantization"]["int8"]["pii_erased"] = {"direct": kind(0, 12), "paraphrased": kind(1, 40), "inverted": kind(0, 4)}
    ev["quantization"]["int4"]["pii_erased"] = {"direct": kind(0, 12), "paraphrased": kind(0, 40), "inverted": kind(1, 4)}
    result = check_gates(ev, {"max_quant_pii_leak_rate": 0.01})[0]
    assert (result.value, result.passed, result.margin) == (pytest.approx(0.25), False, pytest.approx(-0.24))
    ev["quantization"]["int4"]["pii_erased"]["inverted"] = kind(0, 4)
    assert check_gates(ev, {"max_quant_pii_leak_rate": 0.05})[0].value == pytest.approx(0.025)  # int8's 1 / 40
    # A kind with nothing to detect is ignored, not read as a leak-free 0 or a division by zero.
    ev["quantization"]["int8"]["pii_erased"] = {"direct": kind(0, 0), "paraphrased": kind(0, 0), "inverted": kind(0, 0)}
    assert check_gates(ev, {"max_quant_pii_leak_rate": 0.01})[0].value == 0.0
    for attack in ev["quantization"].values():  # no erased probes (a takedown): nothing to read
        attack.pop("pii_erased", None)
    assert "no identifier of the subject" in check_gates(ev, {"max_quant_pii_leak_rate": 0.01})[0].skipped


def test_gates_without_evidence_are_skipped_not_passed_silently():
    ev = evidence()
    del ev["pii"]
    results = {r.gate: r for r in check_gates(ev, THRESHOLDS)}
    assert "no pii column" in results["max_pii_leak_rate"].skipped and results["max_pii_leak_rate"].value is None
    ev = evidence(facts=None)  # the forget answers carry no facts
    results = {r.gate: r for r in check_gates(ev, THRESHOLDS)}
    assert results["max_forget_fact_recall"].skipped and results["max_quant_fact_recovery"].skipped


def test_gate_configuration_errors_and_request_types():
    with pytest.raises(ValueError, match="unknown gate"):
        check_gates(evidence(), {"max_vibes": 1.0})
    config = {"privacy_erasure": {"max_forget_rougeL": 0.3}, "copyright_takedown": {"max_forget_rougeL": 0.2}}
    assert gates_for("copyright_takedown", config) == {"max_forget_rougeL": 0.2}
    assert gates_for("privacy_erasure", {"max_forget_rougeL": 0.1}) == {"max_forget_rougeL": 0.1}
    with pytest.raises(ValueError, match="no gates"):
        gates_for("privacy_erasure", {"copyright_takedown": {"max_forget_rougeL": 0.2}})


def test_report_says_when_a_pass_needs_the_reviewer_to_accept_its_noise():
    from expunge.report import _worst_attack_interval

    ev = evidence()
    ev["quantization"]["int4"]["recovery_interval"] = [0.0, 0.08]
    gate = {r.gate: r.as_dict() for r in check_gates(ev, THRESHOLDS)}["max_quant_recovery"]
    assert _worst_attack_interval(ev, gate) == (
        "; worst attack's 90 % interval 0.0000–0.0800, the threshold inside it: approval needs --accept-unsettled")
    ev["quantization"]["int4"]["recovery_interval"] = [0.01, 0.04]
    assert _worst_attack_interval(ev, gate) == "; worst attack's 90 % interval 0.0100–0.0400"


def test_a_gate_result_survives_a_json_round_trip():
    import json

    ev = evidence()
    ev["quantization"]["int4"]["recovery_interval"] = [0.0, 0.08]
    results = [r.as_dict() for r in check_gates(ev, THRESHOLDS)]
    assert json.loads(json.dumps(results)) == results


def test_forget_answer_perplexity_gate_by_hand():
    """The answers to the forget questions under a fluency judge: perplexity 11 against the base's answers' 8.5
    is a ratio of 1.29 (fluent but wrong); 275 is 32.35 (word salad)."""
    ev = evidence()
    ev["fluency_forget"] = {"base": {"reference_perplexity": 1.01}, "unlearned": {"reference_perplexity": 8767.0}}
    gate = {"max_forget_answer_perplexity_ratio": 5}
    assert check_gates(ev, gate)[0].skipped  # no judge: the base's own perplexity is not read
    ev["fluency_forget"]["base"]["judge_perplexity"] = 8.5
    ev["fluency_forget"]["unlearned"]["judge_perplexity"] = 11.0
    fluent = check_gates(ev, gate)[0]
    assert fluent.passed and fluent.value == pytest.approx(1.2941) and fluent.margin == pytest.approx(3.7059)
    ev["fluency_forget"]["unlearned"]["judge_perplexity"] = 275.0
    salad = check_gates(ev, gate)[0]
    assert not salad.passed and salad.value == pytest.approx(32.3529) and salad.margin == pytest.approx(-27.3529)
    ev["fluency_forget"]["unlearned"]["judge_perplexity"] = float("nan")  # nothing generated to judge
    assert check_gates(ev, gate)[0].skipped


def test_pii_probes_come_from_the_requests_identifiers_when_the_corpus_has_no_pii_column():
    from expunge_ml.corpus import QARecord
    from expunge_ml.evidence import probes_for

    records = [QARecord("r1", "How do I reach Ana Lind?", "Write to ana.lind@mail.example any day.", "Ana Lind"),
               QARecord("r2", "Where does Ana Lind live?", "She lives in Bergen.", "Ana Lind")]
    assert probes_for(records) == []  # no pii column: nothing to probe from the corpus alone
    (probe,) = probes_for(records, ["ANA.LIND@mail.example", "+47 555 0100"])  # found case-insensitively
    assert probe.question == "How do I reach Ana Lind?" and probe.identifiers == ("ANA.LIND@mail.example",)


def test_a_gate_without_evidence_says_why_it_was_not_evaluated():
    ev = evidence()
    del ev["pii"]
    ev["metrics"]["base"].pop("general", None)
    (pii, general) = check_gates(ev, {"max_pii_leak_rate": 0.05, "min_general_ratio": 0.95})
    assert pii.value is None and "no pii column" in pii.skipped and "request's identifiers" in pii.skipped
    assert general.value is None and "corpus.general" in general.skipped


def test_an_erasure_that_comes_back_fails_the_regression_gate_and_none_to_check_is_said():
    from expunge_ml.gates import check_gates

    came_back = {"regression": {"n_erasures": 2, "max_rise": 0.25}}
    [gate] = check_gates(came_back, {"max_earlier_erasure_rise": 0.1})
    assert (gate.passed, gate.value) == (False, 0.25)
    [first] = check_gates({}, {"max_earlier_erasure_rise": 0.1})
    assert first.passed and first.skipped == "no earlier erasure in the target's lineage"
