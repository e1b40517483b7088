"""UnlearnPII benchmark runner: a smoke run (a tiny base on 2 people + a few retained rows, one ULD erasure),
its settings (presets, YAML, flags, cache keys) and its bookkeeping (groups, validation erasures, merges).

The smoke run checks the result schema and that ULD does not leak more of the erased people's PII than the
base did; the real numbers come from `python -m benchmarks.pii` (benchmarks/results/pii.md).
"""
from __future__ import annotations

import dataclasses
import json

import pytest

from benchmarks.pii import DEFAULT_DATA_DIR, KINDS, PIIBenchOptions, data_available, main, smoke_options, sum_reports

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


def _recording_recipe(monkeypatch):
    """`expunge_ml.uld_data.training_pairs`, recording each call and delegating to the real recipe."""
    from expunge_ml import uld_data

    calls = []
    real = uld_data.training_pairs

    def recording(forget_records, retain_records, config, **kwargs):
        calls.append((forget_records, retain_records, config, kwargs))
        return real(forget_records, retain_records, config, **kwargs)

    monkeypatch.setattr(uld_data, "training_pairs", recording)
    return calls


def test_pii_benchmark_smoke(tmp_path, monkeypatch):
    calls = _recording_recipe(monkeypatch)
    options = dataclasses.replace(smoke_options(), cache_dir=tmp_path / "cache", out_dir=tmp_path / "out")
    result = main(options)

    # ULD's training data came from the pipeline's recipe, with the options' ULDConfig for the split
    from expunge_ml.corpus import QARecord

    ((forget_records, retain_records, config, kwargs),) = calls
    assert config == options.uld_for_split("forget1") and config.epochs == 10
    assert all(isinstance(r, QARecord) for r in [*forget_records, *retain_records])
    erased = {r.subject for r in forget_records}
    assert len(erased) == 2 and sorted(kwargs["fact_terms"]) == sorted(erased)
    assert all(r.pii for r in forget_records) and any(r.paraphrased_answer for r in forget_records)
    assert kwargs["question_wordings"] is None  # the smoke configuration asks the paraphraser for none

    written = json.loads((tmp_path / "out" / "pii.json").read_text())
    assert set(written) >= {"command", "config", "rows"}
    assert written["config"]["uld"]["n_layers"] == options.uld.n_layers  # nested, as --config reads it
    assert (tmp_path / "out" / "pii.md").read_text().startswith("# UnlearnPII")
    from benchmarks.run_config import load_options

    assert load_options(PIIBenchOptions(), tmp_path / "out" / "pii.yaml") == options  # the effective config

    rows = {(r["split"], r["method"]): r for r in written["rows"]}
    assert set(rows) == {("forget1", "base"), ("forget1", "uld")}
    for row in rows.values():
        assert 0.0 <= row["erased_leak_rate"] <= 1.0
        for kind in KINDS:
            assert {"erased_leak_rate", "erased_leaks", "erased_identifiers", "retained_recall",
                    "retained_identifiers", "retained_recall_ratio"} <= set(row[kind])
            assert row[kind]["erased_identifiers"] > 0 and row[kind]["retained_identifiers"] > 0
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
    _reruns_on_the_cached_base(dataclasses.replace(options, quant_attacks=(), out_dir=None), result)


def _reruns_on_the_cached_base(options, first):
    # A second run reuses the cached base (keyed by its config hash) instead of retraining it.
    again = main(dataclasses.replace(options, methods=(), max_new_tokens=4))
    assert again["base"]["cached"] is True

    # A validation erasure (for choosing settings) erases retain-sample people instead of the splits, on
    # the same cached base, and checks retention on the other retain-sample people only.
    val = main(dataclasses.replace(options, methods=(), max_new_tokens=4, validation_people=1))
    assert val["base"]["cached"] is True and {r["split"] for r in val["rows"]} == {"validation"}
    (row,) = val["rows"]
    assert row["n_erased_people"] == 1 and row["n_retained_people"] >= 1
    with pytest.raises(ValueError):
        main(dataclasses.replace(options, methods=(), validation_people=99))
    with pytest.raises(ValueError, match="unknown quantization attack"):
        main(dataclasses.replace(options, methods=(), quant_attacks=("int3",)))

    # uld.assistants 2: two assistants from different seeds; the first is the single one of the first run
    two = dataclasses.replace(options.uld, assistants=2)
    pair = main(dataclasses.replace(options, uld=two))
    first_train, second_train = (losses(t) for t in next(r for r in pair["rows"] if r["method"] == "uld")["train"])
    assert first_train == losses(next(r for r in first["rows"] if r["method"] == "uld")["train"])
    assert second_train != first_train

    # the calibrated row: the relative rule walks from uld.weight to a stronger candidate only while the
    # retained ratio on the training questions holds
    weight = options.uld.weight
    for floor, expected in ((0.0, 1.5 * weight), (1e9, weight)):
        calibrated = main(dataclasses.replace(options, max_new_tokens=4, validation_people=1,
                                              uld_calibrate_weights=(weight, 1.5 * weight),
                                              uld_calibrate_min_retained=floor))
        (row,) = [r for r in calibrated["rows"] if r["method"] == "uld calibrated"]
        assert row["weight"] == expected and [w for w, _, _ in row["calibration"]] == [weight, 1.5 * weight]
    with pytest.raises(ValueError, match="uld_calibrate_weights"):  # before any training
        main(dataclasses.replace(options, uld_calibrate_weights=(2 * weight,)))


def losses(train):
    return train["forget_nll"], train["retain_kl"]


def test_forget10_validation_erasures_are_disjoint_and_never_touch_the_reported_splits():
    from benchmarks.pii import retain_training_groups, split_groups, validation_erasures

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

    # validation_retain_reported: forget1's people join the validation assistant's retain set, unmeasured
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
    does, so both train on the same order."""
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


def test_per_split_values_and_the_uld_config_of_a_split():
    from benchmarks.pii import per_split

    assert per_split("forget1=60,validation=30", "validation2") == 30
    assert per_split("forget1=60,validation=30", "forget1") == 60
    assert per_split("forget1=60,9", "forget5") == 9 and per_split(7, "forget5") == 7
    with pytest.raises(ValueError):
        per_split("forget1=60", "validation1")

    options = PIIBenchOptions()
    assert options.uld_for_split("forget5") == dataclasses.replace(options.uld, epochs=15)
    own = dataclasses.replace(options, uld_epochs="", uld=dataclasses.replace(options.uld, epochs=3))
    assert own.uld_for_split("forget5").epochs == 3
    with pytest.raises(ValueError, match="uld_epochs"):  # a uld.epochs that uld_epochs would silently override
        dataclasses.replace(options, uld=dataclasses.replace(options.uld, epochs=3))


def test_the_records_carry_what_an_erasure_request_supplies_and_no_evaluation_prompt():
    from benchmarks.pii import qa_records

    row = {"question": "What is Ann's email?", "answer": "It is a@x.example.", "subject": "Ann",
           "subject_pii": ["a@x.example", " "], "paraphrased_answer_1": "Write to a@x.example.",
           "paraphrased_answer_2": "a@x.example it is.", "paraphrased_question_1": "an evaluation wording",
           "inverted_question": "Whose is a@x.example?", "perturbed_answer_1": "It is b@x.example."}
    (record,) = qa_records([row], "forget")
    assert (record.question, record.answer, record.subject, record.pii) == (
        row["question"], row["answer"], "Ann", ("a@x.example",))
    assert record.paraphrased_answer == "Write to a@x.example." and record.perturbed_answers == ("It is b@x.example.",)
    assert not record.paraphrased_question and not record.inverted_question


def test_the_base_and_wordings_cache_keys_stay_those_of_the_reported_base(tmp_path):
    """The reported base (and its cached measurement) keep their keys: a change to the options' shape must not
    retrain or re-measure it."""
    from benchmarks.pii import group_rows, load_data, measure_key

    options = PIIBenchOptions()
    data = load_data(options)
    assert options.base_key(data.digest, data.trained_people) == "f0b0744bc4f2e6b3"
    assert options.base_key(data.digest, data.trained_people, "cpu") == "f0b0744bc4f2e6b3"
    assert dataclasses.replace(options, threads=2).base_key(data.digest, data.trained_people) != "f0b0744bc4f2e6b3"
    assert options.base_key(data.digest, data.trained_people, "cuda") != "f0b0744bc4f2e6b3"
    other_uld = dataclasses.replace(options, uld=dataclasses.replace(options.uld, weight=-9.0))
    assert other_uld.base_key(data.digest, data.trained_people) == "f0b0744bc4f2e6b3"  # not a base setting
    assert measure_key(group_rows(data), options, "cpu") == measure_key(group_rows(data), other_uld, "cpu")


def test_a_preset_a_config_file_and_the_flags_stack_in_that_order(tmp_path):
    from benchmarks.pii import PRESETS, SMOLLM2_DIR, command_options

    config = tmp_path / "run.yaml"
    config.write_text("uld:\n  weight: -1.6\nquant_attacks: [int4]\nsplits: [forget1, forget5]\n")
    options = command_options("smollm2", config, False, {"splits": ("forget5",), "methods": None})
    assert options.preset == "smollm2" and options.pretrained == SMOLLM2_DIR
    assert options.out_dir.name == "pii_smollm2"  # its report's folder, so it never overwrites results/pii.json
    assert options.uld.weight == -1.6 and options.uld.n_layers == PRESETS["smollm2"]["uld"]["n_layers"]
    assert options.quant_attacks == ("int4",) and options.splits == ("forget5",)  # the flag wins
    assert options.methods == PIIBenchOptions.methods
    assert command_options("scratch", None, False, {}) == PIIBenchOptions()
    assert command_options("scratch", None, True, {}) == smoke_options()

    config.write_text("uld:\n  wieght: -1.6\n")
    with pytest.raises(ValueError, match="wieght"):
        command_options("scratch", config, False, {})
    with pytest.raises(ValueError, match="unknown preset 'gpt5'"):
        command_options("gpt5", None, False, {})
    with pytest.raises(ValueError, match="--smoke"):
        command_options("smollm2", None, True, {})


def test_the_command_line_runs_the_options_it_reads(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import benchmarks.pii.run as run
    from benchmarks.pii import pii_app

    seen = []
    monkeypatch.setattr(run, "main", seen.append)
    config = tmp_path / "run.yaml"
    config.write_text("uld:\n  assistants: 2\n  question_paraphrases: 0\n")  # no paraphraser LM needed
    result = CliRunner().invoke(pii_app, ["--config", str(config), "--splits", "forget5", "--methods", "uld",
                                          "--data-dir", str(DEFAULT_DATA_DIR), "--out-dir", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    (options,) = seen
    assert (options.uld.assistants, options.uld.question_paraphrases) == (2, 0)
    assert (options.splits, options.methods) == (("forget5",), ("uld",))
    assert options.out_dir == tmp_path / "out"
    result = CliRunner().invoke(pii_app, ["--preset", "gpt5"])
    assert result.exit_code == 2 and "unknown preset" in result.output


def test_a_pretrained_base_is_fine_tuned_from_its_own_weights_and_tokenizer(tmp_path):
    """`pretrained: DIR`: the base starts from DIR's model and tokenizer (not a fresh small Llama), and its
    cache key pins DIR's weights."""
    from transformers import AutoConfig, AutoTokenizer

    from expunge_ml.modeling import SmallLlamaShape, build_small_llama, train_bpe_tokenizer

    texts = [f"Question {i}: who lives at number {i}? Answer: somebody called person {i}." for i in range(60)]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=400)
    given = build_small_llama(tokenizer, SmallLlamaShape(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                                         num_attention_heads=4, max_position_embeddings=160), seed=3)
    given.save_pretrained(tmp_path / "given")
    tokenizer.save_pretrained(tmp_path / "given")

    options = dataclasses.replace(smoke_options(), cache_dir=tmp_path / "cache", out_dir=None,
                                  pretrained=str(tmp_path / "given"), base_epochs=2, max_new_tokens=4)
    result = main(options)
    assert {r["method"] for r in result["rows"]} == {"base", "uld"}
    (base_dir,) = (tmp_path / "cache").glob("base-*")
    assert AutoConfig.from_pretrained(base_dir).hidden_size == 48  # the given shape, not the smoke run's 64
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
    return {"command": command, "config": {"methods": [command]}, "base": {"key": key}, "rows": rows,
            "wall_seconds": 10.0}


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
    assert merged["runs"][1] == {"command": "pii --methods ga", "rows": ["ga on forget1"], "wall_seconds": 10.0,
                                 "config": {"methods": ["pii --methods ga"]}}

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

    rows = [{"question": "What is Ann's email?", "answer": "a", "subject": "Ann", "subject_pii": ["ann@x.org"],
             "paraphrased_question_1": "an evaluation wording", "inverted_question": "whose is ann@x.org?"},
            {"question": "Where is Ann from?", "answer": "b", "subject": "Ann", "subject_pii": []}]
    (probe,) = calibration_probes(rows, {"What is Ann's email?": ["Which email does Ann use?"]})
    assert (probe.question, probe.paraphrased_questions, probe.inverted_question, probe.identifiers) == (
        "What is Ann's email?", ("Which email does Ann use?",), None, ("ann@x.org",))
    assert calibration_probes(rows[:1], None)[0].paraphrased_questions == ()
