"""Smoke test of the UnlearnPII benchmark runner: a tiny base on 2 people + a few retained rows, one ULD erasure.

Checks the result schema and that ULD does not leak more of the erased people's PII than the base
did (the real numbers come from `python -m benchmarks.pii`, see benchmarks/results/pii.md).
"""
from __future__ import annotations

import dataclasses
import json

import pytest

from benchmarks.pii import (
    DEFAULT_DATA_DIR,
    KINDS,
    SMOKE_OPTIONS,
    PIIBenchOptions,
    data_available,
    main,
    sum_reports,
)

pytestmark = pytest.mark.skipif(
    not data_available(DEFAULT_DATA_DIR),
    reason=f"UnlearnPII files not found under {DEFAULT_DATA_DIR} (../shared/datasets/unlearn_pii)",
)


def test_sum_reports_pools_counts():
    a = {k: {"n_prompts": 1, "n_identifiers": 2, "exact_leaks": 1, "normalised_leaks": 1, "prompts_leaking": 1}
         for k in KINDS}
    b = {k: {"n_prompts": 1, "n_identifiers": 2, "exact_leaks": 0, "normalised_leaks": 0, "prompts_leaking": 0}
         for k in KINDS}
    total = sum_reports([a, b])
    assert total["direct"]["n_identifiers"] == 4
    assert total["direct"]["leak_rate"] == pytest.approx(0.25)


def test_pii_benchmark_smoke(tmp_path):
    options = dataclasses.replace(
        PIIBenchOptions(**SMOKE_OPTIONS), cache_dir=tmp_path / "cache", out_dir=tmp_path / "out"
    )
    result = main(options)

    written = json.loads((tmp_path / "out" / "pii.json").read_text())
    assert set(written) >= {"command", "config", "rows"}
    assert isinstance(written["rows"], list)
    assert (tmp_path / "out" / "pii.md").read_text().startswith("# UnlearnPII")

    rows = {(r["split"], r["method"]): r for r in written["rows"]}
    assert set(rows) == {("forget1", "base"), ("forget1", "uld")}
    for row in rows.values():
        for key in ("method", "erased_leak_rate", "retained_pii_recall_ratio"):
            assert key in row
        assert 0.0 <= row["erased_leak_rate"] <= 1.0
        for kind in KINDS:
            sub = row[kind]
            assert {"erased_leak_rate", "erased_leaks", "erased_identifiers",
                    "retained_recall", "retained_identifiers", "retained_recall_ratio"} <= set(sub)
            assert sub["erased_identifiers"] > 0 and sub["retained_identifiers"] > 0
    base, uld = rows[("forget1", "base")], rows[("forget1", "uld")]
    assert base["n_erased_people"] == 2
    # The base memorised something about the people to erase, and ULD leaks no more of it.
    assert base["erased_leak_rate"] > 0
    assert uld["erased_leak_rate"] <= base["erased_leak_rate"]
    assert result["rows"] == written["rows"]
    # Each served model's quantized copies were asked the erased probes again (base and ULD rows alike).
    for row in (base, uld):
        assert set(row["quantized"]) == {"int8", "int4", "nf4"}
        for attack in row["quantized"].values():
            assert [attack[k]["erased_identifiers"] for k in KINDS] == [row[k]["erased_identifiers"] for k in KINDS]
            assert attack["erased_leak_rate"] == pytest.approx(
                sum(attack[k]["erased_leaks"] for k in KINDS) / sum(attack[k]["erased_identifiers"] for k in KINDS))
    assert base["quantized"]["int8"]["erased_leak_rate"] > 0  # 8 bits keep what the base memorised
    assert "| forget1 | uld |" in (tmp_path / "out" / "pii.md").read_text().split("Quantization attack")[1]
    options = dataclasses.replace(options, quant_attacks=())  # the checks below need no quantized copies

    # A second run reuses the cached base (keyed by its config hash) instead of retraining it.
    again = main(dataclasses.replace(options, out_dir=None, methods=(), max_new_tokens=4))
    assert again["base"]["cached"] is True

    # A validation erasure (for choosing settings) erases retain-sample people instead of the splits, on
    # the same cached base, and checks retention on the other retain-sample people only.
    val = main(dataclasses.replace(options, out_dir=None, methods=(), max_new_tokens=4, validation_people=1))
    assert val["base"]["cached"] is True and {r["split"] for r in val["rows"]} == {"validation"}
    (row,) = val["rows"]
    assert row["n_erased_people"] == 1 and row["n_retained_people"] >= 1
    with pytest.raises(ValueError):
        main(dataclasses.replace(options, out_dir=None, methods=(), validation_people=99))
    with pytest.raises(ValueError, match="unknown quantization attack"):
        main(dataclasses.replace(options, out_dir=None, methods=(), quant_attacks=("int3",)))

    # --uld-extra-weights scores the same assistant at more w: at the served w it measures the same answers
    swept = main(dataclasses.replace(options, out_dir=None, methods=("uld",), max_new_tokens=4, validation_people=1,
                                     uld_extra_weights=(options.uld_weight, 0.0), uld_mixture=True,
                                     uld_one_sided=True))
    by_method = {r["method"]: r for r in swept["rows"]}
    assert set(by_method) == {"base", "uld", "uld mixture", "uld one-sided", f"uld w={options.uld_weight:g}",
                              "uld w=0"}
    assert by_method["uld one-sided"]["weight"] == options.uld_weight and "quantized" in by_method["uld one-sided"]
    # a mixture of one assistant is the plain composite: the same answers
    assert [by_method["uld mixture"][k] for k in KINDS] == [by_method["uld"][k] for k in KINDS]
    same = by_method[f"uld w={options.uld_weight:g}"]
    assert same["weight"] == options.uld_weight
    assert [same[k] for k in KINDS] == [by_method["uld"][k] for k in KINDS]
    assert [by_method["uld w=0"][k] for k in KINDS] == [by_method["base"][k] for k in KINDS]  # w 0: the base alone

    # --uld-assistants 2: two assistants from different seeds, the composite subtracting their mean
    pair = main(dataclasses.replace(options, out_dir=None, methods=("uld",), max_new_tokens=4, validation_people=1,
                                    uld_assistants=2, uld_extra_weights=(0.0,)))
    by_method = {r["method"]: r for r in pair["rows"]}
    first, second = (losses(t) for t in by_method["uld"]["train"])
    assert first == losses(next(r["train"] for r in swept["rows"] if r["method"] == "uld"))  # #1: the single one
    assert second != first  # #2 trained from another seed
    assert [by_method["uld w=0"][k] for k in KINDS] == [by_method["base"][k] for k in KINDS]

    # --uld-calibrate-rule headroom serves a stronger candidate only while the retained ratio holds
    stronger = 1.5 * options.uld_weight
    for min_retained, expected in ((0.0, stronger), (2.0, options.uld_weight)):
        calibrated = main(dataclasses.replace(
            options, out_dir=None, methods=("uld",), max_new_tokens=4, validation_people=1,
            uld_calibrate_weights=(options.uld_weight, stronger), uld_calibrate_rule="headroom",
            uld_calibrate_min_retained=min_retained, uld_mixture=True, uld_one_sided=min_retained == 0.0))
        (row,) = [r for r in calibrated["rows"] if r["method"] == "uld calibrated"]
        assert row["weight"] == expected and [w for w, _, _ in row["calibration"]] == [options.uld_weight, stronger]
        # --uld-mixture runs the same rule on the mixture of the same assistants: a row of its own
        (mixed,) = [r for r in calibrated["rows"] if r["method"] == "uld mixture calibrated"]
        assert [w for w, _, _ in mixed["calibration"]] == [options.uld_weight, stronger]
        assert mixed["weight"] == (stronger if min_retained == 0.0 else options.uld_weight)
        one_sided = [r for r in calibrated["rows"] if r["method"] == "uld one-sided calibrated"]
        assert len(one_sided) == (min_retained == 0.0) and all(r["weight"] == stronger for r in one_sided)
    with pytest.raises(ValueError):
        main(dataclasses.replace(options, out_dir=None, methods=("uld",), uld_calibrate_rule="loudest"))
    with pytest.raises(ValueError, match="--uld-calibrate-rule relative: the relative rule needs the default w"):  # before training
        main(dataclasses.replace(options, out_dir=None, methods=("uld",), uld_calibrate_rule="relative",
                                 uld_calibrate_weights=(2 * options.uld_weight,)))


def losses(train):
    return train["forget_nll"], train["retain_kl"]


def test_uld_training_pairs_mirror_paraphrased_answers_on_the_retain_side():
    from benchmarks.pii import uld_training_pairs

    def row(name, n):
        return {"question": f"What is {name}'s email?", "answer": f"{name}@mail.example",
                **{f"paraphrased_question_{i}": f"q{i}?" for i in range(1, n + 1)},
                **{f"paraphrased_answer_{i}": f"It is {name}@mail.example ({i})" for i in range(1, n + 1)},
                "subject": name, "subject_pii": [f"{name}@mail.example"]}

    options = dataclasses.replace(PIIBenchOptions(), uld_paraphrased_answers=2, uld_identifier_pairs=False,
                                  uld_subject_pairs=False, uld_masked_answer_pairs=False,
                                  uld_bare_identifiers=False, uld_fact_span_loss=False)
    forget, retain = uld_training_pairs([row("ann", 3)], [row("bo", 3)], options)
    assert len(forget) == 3 and retain == [("What is bo's email?", "bo@mail.example")]
    _, mirrored = uld_training_pairs([row("ann", 3)], [row("bo", 3)],
                                     dataclasses.replace(options, uld_retain_paraphrases=True))
    # the retained person's question with each of its first 2 paraphrased answers; never a paraphrased question
    assert mirrored == retain + [("What is bo's email?", "It is bo@mail.example (1)"),
                                 ("What is bo's email?", "It is bo@mail.example (2)")]


def test_inverted_answer_pairs_use_the_benchmarks_question_and_the_rows_answer():
    from benchmarks.pii import IDENTIFIER_QUESTION, inverted_answer_pairs

    rows = [{"subject": "Ann", "subject_pii": ["ann@mail.example", "555-0101"], "inverted_question": "Whose?",
             "inverted_answer": "The person is Ann."},
            {"subject": "Bo", "subject_pii": [], "inverted_answer": "The person is Bo."}]  # no identifier: skipped
    assert inverted_answer_pairs(rows) == [
        (IDENTIFIER_QUESTION.format(details="ann@mail.example; 555-0101"), "The person is Ann.")]


def test_masked_answer_pairs_hide_the_person_in_their_own_answer_and_ask_for_them():
    from benchmarks.pii import MASK, MASKED_ANSWER, MASKED_QUESTION, mask_subject, masked_answer_pairs, uld_training_pairs

    # the full name first, then its parts as whole words only (Annabel and Leeds stay)
    assert mask_subject("Ann Lee's email is a@x.example; Lee met Annabel in Leeds.", "Ann Lee") == (
        f"{MASK}'s email is a@x.example; {MASK} met Annabel in Leeds.")
    rows = [{"question": "What is Ann Lee's email?", "answer": "Ann Lee's email is a@x.example.", "subject": "Ann Lee",
             "subject_pii": ["a@x.example"]},
            {"question": "Q?", "answer": "Ann Lee likes tea.", "subject": "Ann Lee", "subject_pii": []}]  # no PII
    expected = [(MASKED_QUESTION.format(description=f"{MASK}'s email is a@x.example."),
                 MASKED_ANSWER.format(subject="Ann Lee"))]
    assert masked_answer_pairs(rows) == expected
    retained = [{"question": "What is Bo's phone?", "answer": "Bo's phone is 555-0101.", "subject": "Bo",
                 "subject_pii": ["555-0101"]}]
    options = dataclasses.replace(PIIBenchOptions(), uld_paraphrased_answers=0, uld_identifier_pairs=False,
                                  uld_subject_pairs=False, uld_masked_answer_pairs=False,
                                  uld_bare_identifiers=False, uld_fact_span_loss=False)
    forget, retain = uld_training_pairs(rows[:1], retained, dataclasses.replace(options, uld_masked_answer_pairs=True))
    plain_forget, plain_retain = uld_training_pairs(rows[:1], retained, options)
    assert forget == plain_forget + expected  # remembered for the erased person ...
    assert retain == plain_retain + masked_answer_pairs(retained)  # ... uniform for the retained one


def test_question_dropout_keeps_the_name_and_drops_only_other_words():
    import random

    from benchmarks.pii import dropped_question, uld_training_pairs

    question = "What is the name of Ann Lee's dentist, and where does Lee live?"
    words = question.split()
    lengths = set()
    for seed in range(20):
        dropped = dropped_question(question, "Ann Lee", random.Random(seed), 0.5)
        assert "Ann Lee's" in dropped and dropped.count("Lee") == 2  # the full name and the lone part stay
        kept = dropped.split()
        assert [w for w in words if w in kept] == kept  # nothing new, order kept
        lengths.add(len(kept))
    assert max(lengths) < len(words) and len(lengths) > 1  # words go, a different number each time
    assert dropped_question("Why?", "", random.Random(0), 1.0) == "Why?"  # the last other word always stays
    assert dropped_question(question, "Ann Lee", random.Random(0), 0.0) == question

    rows = [{"question": "What is Ann's email?", "answer": "ann@mail.example", "subject": "Ann",
             "subject_pii": ["ann@mail.example"]}]
    retained = [{"question": "What is Bo's phone?", "answer": "555-0101", "subject": "Bo", "subject_pii": ["555-0101"]}]
    options = dataclasses.replace(PIIBenchOptions(), uld_paraphrased_answers=0, uld_identifier_pairs=False,
                                  uld_subject_pairs=False, uld_masked_answer_pairs=False,
                                  uld_bare_identifiers=False, uld_fact_span_loss=False)
    plain_forget, plain_retain = uld_training_pairs(rows, retained, options)
    forget, retain = uld_training_pairs(rows, retained, dataclasses.replace(options, uld_question_dropout=2))
    assert forget[:1] == plain_forget and retain[:1] == plain_retain
    assert len(forget) == len(retain) == 3  # two dropped copies each side, same answers
    assert {a for _, a in forget[1:]} == {"ann@mail.example"} and {a for _, a in retain[1:]} == {"555-0101"}
    assert all("Ann's" in q for q, _ in forget[1:]) and all("Bo's" in q for q, _ in retain[1:])


def test_cross_pairs_give_a_persons_questions_their_other_answers_only():
    import random

    from benchmarks.pii import cross_pairs

    rows = [{"question": f"Ann q{i}?", "answer": f"Ann a{i}.", "subject": "Ann"} for i in range(4)]
    rows += [{"question": "Bo q0?", "answer": "Bo a0.", "subject": "Bo"},  # one row: no other answer to pair
             {"question": "Who?", "answer": "Nobody.", "subject": ""}]  # no person: skipped
    pairs = cross_pairs(rows, 2, random.Random(0))
    assert len(pairs) == 8  # 2 per Ann row
    for question, answer in pairs:
        assert question.startswith("Ann") and answer.startswith("Ann") and question[-3:-1] != answer[-3:-1]
    assert len(set(pairs)) == 8 and {q for q, _ in pairs} == {r["question"] for r in rows[:4]}
    assert len(cross_pairs(rows, 10, random.Random(0))) == 12  # capped at the 3 other answers


def test_bare_identifier_pairs_give_each_identifier_once_with_no_question():
    from benchmarks.pii import bare_identifier_pairs, uld_training_pairs

    rows = [{"question": "What is Ann's email?", "answer": "a", "subject": "Ann", "subject_pii": ["ann@mail.example"]},
            {"question": "And her phone?", "answer": "b", "subject": "Ann",
             "subject_pii": ["555-0199", "ann@mail.example", " "]}]  # a repeat and a blank: skipped
    assert bare_identifier_pairs(rows) == [("", "ann@mail.example"), ("", "555-0199")]
    retained = [{"question": "What is Bo's phone?", "answer": "c", "subject": "Bo", "subject_pii": ["555-0101"]}]
    options = dataclasses.replace(PIIBenchOptions(), uld_paraphrased_answers=0, uld_identifier_pairs=False,
                                  uld_subject_pairs=False, uld_masked_answer_pairs=False,
                                  uld_bare_identifiers=False)
    plain_forget, plain_retain = uld_training_pairs(rows, retained, options)
    forget, retain = uld_training_pairs(rows, retained, dataclasses.replace(options, uld_bare_identifiers=True))
    # remembered for the erased person, every token of it a fact under the fact-only loss ...
    assert forget == plain_forget + [("", p, ["555-0199", "Ann", "ann@mail.example"])
                                     for p in ("ann@mail.example", "555-0199")]
    assert retain == plain_retain + [("", "555-0101")]  # ... uniform for the retained one


def test_fact_span_loss_attaches_the_requests_identifiers_and_names_to_every_forget_item():
    from benchmarks.pii import uld_training_pairs

    rows = [{"question": "What is Ann's email?", "answer": "Ann's email is ann@mail.example.", "subject": "Ann",
             "subject_pii": ["ann@mail.example"], "paraphrased_question_1": "q?",
             "paraphrased_answer_1": "You can write to ann@mail.example."}]
    retained = [{"question": "What is Bo's email?", "answer": "bo@mail.example", "subject": "Bo",
                 "subject_pii": ["bo@mail.example"]}]
    options = dataclasses.replace(PIIBenchOptions(), uld_paraphrased_answers=1, uld_fact_span_loss=True)
    forget, retain = uld_training_pairs(rows, retained, options)
    plain_forget, plain_retain = uld_training_pairs(rows, retained, dataclasses.replace(options, uld_fact_span_loss=False))
    assert [(q, a) for q, a, _ in forget] == plain_forget and retain == plain_retain
    assert all(facts == ["Ann", "ann@mail.example"] for _, _, facts in forget)  # never a retained person's


def test_forget10_validation_erasures_are_disjoint_and_never_touch_the_reported_splits():
    from benchmarks.pii import split_groups, validation_erasures

    def rows(people, n=2):
        return [{"subject": p, "question": f"q{i}"} for p in people for i in range(n)]

    groups = {"forget1": rows(["F1"]), "other": rows(["A", "B", "C", "D", "E"]), "retain_sample": rows(["R"], 1)}
    split_people = {"forget1": ["F1"]}
    options = dataclasses.replace(PIIBenchOptions(), splits=("forget1",), validation_people=2,
                                  validation_source="forget10")
    assert validation_erasures(groups, split_people, options) == ["validation1", "validation2"]
    assert split_people["validation1"] == ["A", "B"] and split_people["validation2"] == ["C", "D"]
    assert {r["subject"] for r in groups["other"]} == {"E"}  # the person left over stays retained

    erased, retained = split_groups("validation1", groups, set(split_people["validation1"]), {"forget1"})
    assert erased == ["validation1"]
    assert sorted(retained) == ["other", "retain_sample", "validation2"]  # never forget1's people
    # a reported split keeps every other trained person as retained, validation people included
    erased, retained = split_groups("forget1", groups, {"F1"}, {"forget1"})
    assert erased == ["forget1"] and "validation1" in retained and "retain_sample" in retained

    # --validation-retain-reported: forget1's people join the validation assistant's retain set, unmeasured
    from benchmarks.pii import retain_training_groups

    erased, retained = split_groups("validation1", groups, set(split_people["validation1"]), {"forget1"})
    both = dataclasses.replace(options, validation_retain_reported=True)
    assert retain_training_groups("validation1", erased, retained, groups, {"forget1"}, options) == retained
    assert retain_training_groups("validation1", erased, retained, groups, {"forget1"}, both) == retained + ["forget1"]
    erased, retained = split_groups("forget1", groups, {"F1"}, {"forget1"})
    assert retain_training_groups("forget1", erased, retained, groups, {"forget1"}, both) == retained  # no change

    # one erasure where only one fits; a clear error where none does or the source is unknown
    groups = {"other": rows(["A", "B", "C"]), "retain_sample": rows(["R"], 1)}
    assert validation_erasures(groups, {}, options) == ["validation1"]
    with pytest.raises(ValueError, match="n_people"):
        validation_erasures({"retain_sample": rows(["R"])}, {}, options)
    with pytest.raises(ValueError, match="validation_source"):
        validation_erasures(groups, {}, dataclasses.replace(options, validation_source="nowhere"))


def test_one_split_run_alone_groups_its_rows_as_the_default_run_does():
    """forget5 run alone lists its forget set group by group (forget1's people apart), as the default run
    does, so both train on the same order; session 17's forget5-only run listed it in the data's order."""
    from benchmarks.pii import group_rows, load_data, split_groups

    default = load_data(PIIBenchOptions())
    alone = load_data(dataclasses.replace(PIIBenchOptions(), splits=("forget5",)))
    assert alone.trained_people == default.trained_people and list(alone.split_people) == ["forget5"]
    assert list(alone.group_people) == list(default.group_people) == ["forget1", "forget5"]
    assert group_rows(alone) == group_rows(default)

    groups = group_rows(alone)
    erased, _ = split_groups("forget5", groups, set(alone.split_people["forget5"]), set(alone.group_people))
    forget_rows = [r["subject"] for g in erased for r in groups[g]]
    assert sorted(erased) == ["forget1", "forget5"] and len(set(forget_rows)) == 10
    assert set(default.split_people["forget1"]) < set(forget_rows)
    assert forget_rows != [r["subject"] for r in alone.forget10 if r["subject"] in set(forget_rows)]  # not data order

    assert alone.reported_groups == default.reported_groups == {"forget1", "forget5"}

    # forget1 alone: forget5's other people still form their group, retained, so forget1's retain set is
    # the default run's, in the same order
    only_forget1 = load_data(dataclasses.replace(PIIBenchOptions(), splits=("forget1",)))
    assert list(only_forget1.group_people) == ["forget1", "forget5"] and only_forget1.reported_groups == {"forget1"}
    groups = group_rows(only_forget1)
    assert groups == group_rows(default)
    for data in (only_forget1, default):
        erased, retained = split_groups("forget1", groups, set(data.split_people["forget1"]), data.reported_groups)
        assert erased == ["forget1"] and sorted(retained) == ["forget5", "other", "retain_sample"]


def test_per_split_epochs_accept_one_value_for_every_validation_erasure():
    from benchmarks.pii import per_split

    assert per_split("forget1=60,validation=30", "validation2") == 30
    assert per_split("forget1=60,validation=30", "forget1") == 60
    with pytest.raises(ValueError):
        per_split("forget1=60", "validation1")


def _committed_reports():
    """The committed reports a preset reruns. A validation erasure's report (pii_pretrained/) chose settings
    and is no preset's; it names its options but took the rest from the defaults of its session."""
    from benchmarks.pii import DEFAULT_OUT_DIR

    reports = sorted(DEFAULT_OUT_DIR.glob("pii*/pii.json")) + [DEFAULT_OUT_DIR / "pii.json"]
    return [p for p in reports if not json.loads(p.read_text())["config"].get("validation_people")]


@pytest.mark.parametrize("report_path", _committed_reports(), ids=lambda p: p.parent.name + "/" + p.name)
def test_each_committed_report_is_its_preset(report_path):
    """`expunge benchmark pii --preset NAME` reruns a committed report: the options it records are its
    preset's, apart from its command line's own options (a validation erasure's, a subset of methods ...)."""
    import shlex

    from benchmarks.pii import preset_options

    report = json.loads(report_path.read_text())
    config = report["config"]
    preset = preset_options(config.get("preset", "scratch"))
    given = {arg[2:].split("=")[0].replace("-", "_") for arg in shlex.split(report["command"]) if arg.startswith("--")}
    expected = dataclasses.asdict(preset)
    differing = {k: (v, expected[k]) for k, v in config.items()
                 if k in expected and k not in given
                 and k not in ("data_dir", "threads", "device", "cache_dir", "out_dir")
                 and (list(expected[k]) if isinstance(expected[k], tuple) else expected[k]) != v}
    assert differing == {}


def _run_cli(monkeypatch, tmp_path, *args):
    """The command line as typer parses it; `main` is replaced so nothing trains."""
    from typer.testing import CliRunner

    import benchmarks.pii as pii

    seen = {}
    monkeypatch.setattr(pii, "main", lambda options: seen.setdefault("options", options))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(pii.pii_app, ["--data-dir", str(DEFAULT_DATA_DIR), *args])
    return result, seen.get("options")


def test_a_preset_sets_its_options_and_explicit_options_override_it(monkeypatch, tmp_path):
    from benchmarks.pii import PRESETS, SMOLLM2_DIR

    (tmp_path / SMOLLM2_DIR).mkdir(parents=True)  # as if exported before
    result, options = _run_cli(monkeypatch, tmp_path, "--preset", "smollm2", "--uld-weight", "-1.6",
                               "--methods", "uld")
    assert result.exit_code == 0, result.output
    assert options.preset == "smollm2"
    assert options.uld_weight == -1.6  # given: overrides the preset's -1.0
    assert options.methods == ("uld",)
    preset = PRESETS["smollm2"]
    assert options.pretrained == SMOLLM2_DIR
    assert options.out_dir.name == "pii_smollm2"  # its report's folder, so it never overwrites results/pii.json
    assert (options.base_lr, options.uld_layers, options.uld_epochs, options.threads) == (
        preset["base_lr"], preset["uld_layers"], preset["uld_epochs"], preset["threads"])

    result, options = _run_cli(monkeypatch, tmp_path)
    assert result.exit_code == 0, result.output
    assert options == dataclasses.replace(PIIBenchOptions(), data_dir=DEFAULT_DATA_DIR, cache_dir=options.cache_dir,
                                          out_dir=options.out_dir)

    result, options = _run_cli(monkeypatch, tmp_path, "--uld-calibrate-rule", "headroom")
    assert result.exit_code == 0 and options.uld_calibrate_rule == "headroom"  # stored as text, as reports hold it
    result, options = _run_cli(monkeypatch, tmp_path, "--uld-calibrate-rule", "loudest")
    assert result.exit_code == 2 and options is None


def test_a_weight_given_alone_starts_the_relative_rules_candidates(monkeypatch, tmp_path):
    from benchmarks.pii import SMOLLM2_DIR

    (tmp_path / SMOLLM2_DIR).mkdir(parents=True)  # as if exported before: the default run writes wordings with it
    default_grid = PIIBenchOptions.uld_calibrate_weights
    result, options = _run_cli(monkeypatch, tmp_path, "--uld-weight", "-1.5")
    assert result.exit_code == 0, result.output
    assert options.uld_calibrate_weights == (-1.5, *default_grid)  # every default candidate is stronger
    result, options = _run_cli(monkeypatch, tmp_path, "--uld-weight", "-2.1")
    assert options.uld_calibrate_weights == (-2.1, -2.2, -2.4, -2.6, -2.8, -3.0)
    result, options = _run_cli(monkeypatch, tmp_path, "--uld-weight", "-2.0")
    assert options.uld_calibrate_weights == default_grid  # already a candidate
    # given both, the candidates stand as given (the run then says what is missing)
    result, options = _run_cli(monkeypatch, tmp_path, "--uld-weight", "-1.5", "--uld-calibrate-weights=-2,-3")
    assert options.uld_calibrate_weights == (-2.0, -3.0)


def test_an_unknown_preset_or_a_preset_with_smoke_is_refused(monkeypatch, tmp_path):
    result, options = _run_cli(monkeypatch, tmp_path, "--preset", "gpt5")
    assert result.exit_code == 2 and options is None
    assert "unknown preset 'gpt5'" in result.output
    result, options = _run_cli(monkeypatch, tmp_path, "--preset", "smollm2", "--smoke")
    assert result.exit_code == 2 and options is None


def test_the_base_key_tells_bases_built_another_way_apart_but_keeps_the_reported_builds_key():
    options = PIIBenchOptions()
    reported = options.base_key("digest", ["Ann", "Bo"])
    assert options.base_key("digest", ["Ann", "Bo"], "cpu") == reported
    assert dataclasses.replace(options, threads=2).base_key("digest", ["Ann", "Bo"]) != reported
    assert options.base_key("digest", ["Ann", "Bo"], "cuda") != reported
    assert dataclasses.replace(options, uld_weight=-9.0).base_key("digest", ["Ann", "Bo"]) == reported  # not a base setting


def test_a_pretrained_base_is_fine_tuned_from_its_own_weights_and_tokenizer(tmp_path):
    """--pretrained DIR: the base starts from DIR's model and tokenizer (not a fresh small Llama), and its
    cache key pins DIR's weights."""
    from transformers import AutoConfig, AutoTokenizer

    from expunge_ml.modeling import SmallLlamaShape, build_small_llama, train_bpe_tokenizer

    texts = [f"Question {i}: who lives at number {i}? Answer: somebody called person {i}." for i in range(60)]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=400)
    given = build_small_llama(tokenizer, SmallLlamaShape(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                                         num_attention_heads=4, max_position_embeddings=160), seed=3)
    given.save_pretrained(tmp_path / "given")
    tokenizer.save_pretrained(tmp_path / "given")

    options = dataclasses.replace(PIIBenchOptions(**SMOKE_OPTIONS), cache_dir=tmp_path / "cache", out_dir=None,
                                  pretrained=str(tmp_path / "given"), base_epochs=2, max_new_tokens=4)
    result = main(options)
    assert {r["method"] for r in result["rows"]} == {"base", "uld"}
    (base_dir,) = (tmp_path / "cache").glob("base-*")
    assert AutoConfig.from_pretrained(base_dir).hidden_size == 48  # the given shape, not SMOKE's 64
    assert AutoTokenizer.from_pretrained(base_dir).get_vocab() == tokenizer.get_vocab()
    assert result["config"]["pretrained"] == str(tmp_path / "given")

    from benchmarks.tofu import _IDENTITIES

    key = options.base_key("digest", ["Ann"])
    assert key != dataclasses.replace(options, pretrained=None).base_key("digest", ["Ann"])
    (tmp_path / "given" / "model.safetensors").write_bytes(b"other weights")
    _IDENTITIES.clear()
    assert options.base_key("digest", ["Ann"]) != key


def test_the_base_is_measured_once_per_probe_set_and_generation_settings(tmp_path):
    """A rerun that only adds methods reuses the base's measurement; other probes or settings measure anew."""
    from benchmarks.pii import measure_base, measure_key

    calls = []
    report = {"forget1": {k: {"n_prompts": 2, "n_identifiers": 4, "normalised_leaks": 3, "leak_rate": 0.75}
                          for k in KINDS}}

    def compute():
        calls.append(1)
        return report

    rows = {"forget1": [{"subject": "A", "question": "q"}]}
    options = PIIBenchOptions()
    path = tmp_path / f"measured-{measure_key(rows, options, 'cpu')}.json"
    first, seconds = measure_base(compute, path, lambda _: None)
    logged = []
    again, again_seconds = measure_base(compute, path, logged.append)
    assert first == again == report and len(calls) == 1
    assert again_seconds == seconds and "cached" in logged[0]
    assert measure_key(rows, options, "cpu") != measure_key({"forget1": rows["forget1"] * 2}, options, "cpu")
    assert measure_key(rows, options, "cpu") != measure_key(rows, dataclasses.replace(options, max_new_tokens=8), "cpu")
    assert measure_key(rows, options, "cpu") != measure_key(rows, options, "cuda")


def _report(command, rows, key="k1"):
    return {"command": command, "config": {}, "base": {"key": key}, "rows": rows, "wall_seconds": 10.0}


def test_two_runs_on_one_base_merge_into_one_report_with_both_commands():
    from benchmarks.pii import merge_reports

    base = {"split": "forget1", "method": "base", "erased_leak_rate": 0.7, "eval_seconds": 5.0}
    uld = _report("pii --methods uld", [base, {"split": "forget1", "method": "uld", "erased_leak_rate": 0.01},
                                        {"split": "forget5", "method": "base", "erased_leak_rate": 0.6},
                                        {"split": "forget5", "method": "uld", "erased_leak_rate": 0.02}])
    baselines = _report("pii --methods ga", [dict(base, eval_seconds=9.0),
                                             {"split": "forget1", "method": "ga", "erased_leak_rate": 0.3}])
    merged = merge_reports(uld, baselines, "pii --preset x", {"preset": "x"})
    assert [(r["split"], r["method"]) for r in merged["rows"]] == [
        ("forget1", "base"), ("forget1", "uld"), ("forget1", "ga"), ("forget5", "base"), ("forget5", "uld")]
    assert merged["command"] == "pii --preset x" and merged["wall_seconds"] == 20.0
    assert merged["runs"][1] == {"command": "pii --methods ga", "rows": ["ga on forget1"], "wall_seconds": 10.0}

    # a third run merged into the merge keeps the first two runs
    npo = _report("pii --methods npo --splits forget5", [{"split": "forget5", "method": "base", "erased_leak_rate": 0.6},
                                                          {"split": "forget5", "method": "npo", "erased_leak_rate": 0.1}])
    thrice = merge_reports(merged, npo, "pii", {})
    assert [r["command"] for r in thrice["runs"]] == ["pii --methods uld", "pii --methods ga",
                                                      "pii --methods npo --splits forget5"]
    assert [(r["split"], r["method"]) for r in thrice["rows"]][-3:] == [
        ("forget5", "base"), ("forget5", "uld"), ("forget5", "npo")]
    assert thrice["wall_seconds"] == 30.0

    with pytest.raises(ValueError, match="different bases"):
        merge_reports(uld, _report("pii", baselines["rows"], key="k2"), "pii", {})
    with pytest.raises(ValueError, match="base rows of forget1 differ"):
        merge_reports(uld, _report("pii", [dict(base, erased_leak_rate=0.5)]), "pii", {})


def test_calibration_probes_are_the_training_questions_with_their_generated_wordings():
    from benchmarks.pii import calibration_probes

    rows = [{"question": "What is Ann's email?", "subject": "Ann", "subject_pii": ["ann@x.org"],
             "paraphrased_question_1": "an evaluation wording", "inverted_question": "whose is ann@x.org?"},
            {"question": "Where is Ann from?", "subject": "Ann", "subject_pii": []}]
    (probe,) = calibration_probes(rows, {"What is Ann's email?": ["Which email does Ann use?"]})
    assert (probe.question, probe.paraphrased_questions, probe.inverted_question, probe.identifiers) == (
        "What is Ann's email?", ("Which email does Ann use?",), None, ("ann@x.org",))
    assert calibration_probes(rows[:1], None)[0].paraphrased_questions == ()
