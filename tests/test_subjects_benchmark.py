"""`expunge benchmark subjects`: a profile's gates across several erased people, by index, never by name."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from benchmarks.subjects import (
    SubjectsOptions, check_profiles_share_a_base, markdown_table, parse_people, person_request, run_subjects,
    settings_digest, summarise, write_outputs,
)

TINY = Path(__file__).resolve().parents[1] / "expunge" / "profiles" / "tiny.yaml"


def test_people_are_indices_and_ranges():
    assert parse_people("0-2,5") == (0, 1, 2, 5)
    assert parse_people("3, 3,1") == (3, 1)  # each once, in the order given
    for bad in ("", "a-b", "-1"):
        with pytest.raises(ValueError, match="--people"):
            parse_people(bad)


def test_profiles_compared_on_one_champion_must_share_its_world_and_base(tmp_path):
    profile = yaml.safe_load(TINY.read_text())
    profile["unlearning"]["uld"]["weight"] = -1.5  # a different unlearning setting is what is compared
    same_base = tmp_path / "same.yaml"
    same_base.write_text(yaml.safe_dump(profile))
    check_profiles_share_a_base(["tiny", str(same_base)])
    profile["world"]["seed"] += 1
    other_world = tmp_path / "other.yaml"
    other_world.write_text(yaml.safe_dump(profile))
    with pytest.raises(ValueError, match="differs from 'tiny' in world"):
        check_profiles_share_a_base(["tiny", str(other_world)])


def test_the_summary_counts_tickets_passing_every_gate_and_failed_gates():
    rows = [
        {"profile": "a", "passed": True, "gates": {"g1": {"passed": True}, "g2": {"passed": True}}},
        {"profile": "a", "passed": False, "gates": {"g1": {"passed": False}, "g2": {"passed": False}}},
        {"profile": "b", "status": "failed"},  # a run that failed before its evaluation
    ]
    assert summarise(rows) == {"a": {"tickets": 2, "passed_every_gate": 1, "failed_gates": 2, "quant_failures_within_interval": 0},
                               "b": {"tickets": 1, "passed_every_gate": 0, "failed_gates": 0, "quant_failures_within_interval": 0}}


def test_the_summary_reads_the_word_salad_gate_apart_from_the_others():
    judge = "max_forget_answer_perplexity_ratio"
    rows = [
        {"profile": "a", "passed": False, "gates": {"g1": {"passed": True}, judge: {"passed": False, "value": 24.0}}},
        {"profile": "a", "passed": False, "gates": {"g1": {"passed": False}, judge: {"passed": False, "value": 7.0}}},
        {"profile": "a", "passed": True, "gates": {"g1": {"passed": True}, judge: {"passed": True, "value": 3.0}}},
        {"profile": "b", "passed": True, "gates": {"g1": {"passed": True}}},  # no judge: no ratio keys
    ]
    summary = summarise(rows)
    assert summary["a"]["passed_every_gate_but_the_judges"] == 2 and summary["a"]["judge_ratio_over_threshold"] == 2
    assert summary["a"]["judge_ratio_min_median_max"] == [3.0, 7.0, 24.0]
    assert "judge_ratio_min_median_max" not in summary["b"]
    from benchmarks.subjects import markdown_table
    text = markdown_table({"rows": [], "summary": summary})
    assert "| a | 2 | 2 | 3.0 / 7.0 / 24.0 |" in text


def test_seeds_give_each_profile_one_variant_per_assistant_seed(tmp_path):
    import yaml

    from benchmarks.subjects import parse_seeds, profile_variants
    from expunge.settings import load_profile

    assert parse_seeds("") == () and parse_seeds("0, 1,1") == (0, 1)
    for bad in ("a", "-1"):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)
    assert profile_variants(["demo", "tiny"], (), tmp_path) == [("demo", "demo", None), ("tiny", "tiny", None)]
    variants = profile_variants(["demo", "tiny"], (0, 3), tmp_path / "p")
    assert [label for label, _, _ in variants] == ["demo (seed 0)", "demo (seed 3)", "tiny (seed 0)", "tiny (seed 3)"]
    assert [seed for _, _, seed in variants] == [0, 3, 0, 3]
    for (_, path, _), (name, seed) in zip(variants, [("demo", 0), ("demo", 3), ("tiny", 0), ("tiny", 3)]):
        derived, original = yaml.safe_load(open(path)), load_profile(name)
        assert derived["unlearning"]["uld"].pop("seed") == seed
        original["unlearning"]["uld"].pop("seed", None)
        assert derived == original  # nothing else changes


def test_quantization_failures_inside_their_interval_are_counted():
    from benchmarks.subjects import failed_within_interval

    def row(recovery_value, intervals):
        return {"gates": {"max_quant_recovery": {"value": recovery_value, "threshold": 0.05, "passed": recovery_value <= 0.05}},
                "quant_intervals": {name: {"recovery": iv, "fact_recovery": None} for name, iv in intervals.items()}}

    # int4 fails at 0.07, and 0.05 lies inside its interval (int8's is below the bar): noise.
    assert failed_within_interval(row(0.07, {"int4": [0.0, 0.14], "int8": [0.0, 0.03]})) == 1
    # nf4's interval is all above the bar: a recovery the dozen answers do show.
    assert failed_within_interval(row(0.3, {"int4": [0.0, 0.14], "nf4": [0.12, 0.5]})) == 0
    assert failed_within_interval(row(0.03, {"int4": [0.0, 0.14]})) == 0  # passed
    assert failed_within_interval({"gates": {"max_quant_recovery": {"value": 0.07, "threshold": 0.05, "passed": False}}}) == 0


def test_each_person_is_erased_and_reported_by_index_only(prefect_harness, tmp_path, monkeypatch):
    for name in ("EXPUNGE_HOME", "EXPUNGE_PROFILE"):  # the run points these at its home; later tests get theirs back
        monkeypatch.setenv(name, os.environ.get(name, ""))
    # the tiny profile with a forget gate no model can pass (ROUGE-L is never negative): one outcome, whatever
    # the training gives
    profile = yaml.safe_load(TINY.read_text())
    profile["gates"]["privacy_erasure"]["max_forget_rougeL"] = -1.0
    strict = tmp_path / "strict.yaml"
    strict.write_text(yaml.safe_dump(profile))
    result = run_subjects(SubjectsOptions(profiles=(str(strict),), people=(1,), home=str(tmp_path / "home")), log=print)
    [row] = result["rows"]
    assert (row["profile"], row["person_index"]) == (str(strict), 1)
    assert row["ticket_id"] == f"SUBJ-{settings_digest(str(strict))}-1"  # another profile's ticket is never reused
    assert (row["status"], row["passed"]) == ("failed_gates", False)
    assert row["gates"]["max_forget_rougeL"]["passed"] is False and row["gates"]["max_forget_rougeL"]["value"] >= 0
    assert row["served_weight"] == profile["unlearning"]["uld"]["weight"]
    summary = result["summary"][str(strict)]
    assert summary["tickets"] == 1 and summary["passed_every_gate"] == 0 and summary["failed_gates"] >= 1
    anywhere = row["facts_anywhere"]  # counts of the served model's forget answers, pooled in the summary
    assert 0 <= anywhere["stated"] <= anywhere["n_facts"] and anywhere["others_n_facts"] > 0
    assert summary["facts_anywhere_n_facts"] == anywhere["n_facts"]
    json_path, md_path = write_outputs(result, tmp_path / "out", "subjects")
    person = json.loads((tmp_path / "home" / "sample_world" / "people.jsonl").read_text().splitlines()[1])
    request = person_request(person, "X")
    written = json_path.read_text() + md_path.read_text()
    for secret in [*request["subject"]["names"], *request["subject"]["aliases"], *request["subject"]["identifiers"]]:
        assert secret not in written
    assert f"| {strict} | 1 | failed_gates |" in markdown_table(result)
    assert f"| {strict} | {anywhere['stated']} of {anywhere['n_facts']} |" in markdown_table(result)

    # A ticket whose run raises is an error, not a measurement: the row says so, the summary counts it
    import expunge.service

    secret = request["subject"]["identifiers"][0]

    def broken(settings, ticket_id):  # a message that quotes a record, as a data error's might
        raise ImportError(f"cannot import name 'x' while reading {secret}")

    monkeypatch.setattr(expunge.service, "run_request", broken)
    logged: list[str] = []
    failed = run_subjects(SubjectsOptions(profiles=(str(strict),), people=(2,), home=str(tmp_path / "home")),
                          log=logged.append)
    [row] = failed["rows"]
    assert row["error"] == "ImportError" and "gates" not in row and failed["summary"][str(strict)]["errors"] == 1
    assert any("the run failed: ImportError" in line for line in logged)
    assert not any(secret in line for line in logged)  # the console gets the type only
    assert f"| {strict} | 2 | received, error: ImportError |" in markdown_table(failed)


def test_the_command_fails_when_a_ticket_run_raised(monkeypatch, tmp_path):
    import typer
    from typer.testing import CliRunner

    import benchmarks.subjects as subjects

    row = {"profile": "tiny", "person_index": 0, "ticket_id": "SUBJ-0-0", "status": "received", "error": "ImportError"}
    ran = []
    monkeypatch.setattr(subjects, "run_subjects", lambda options, log, command, checkpoint=None: ran.append(options) or {
        "command": command, "seconds": 1.0, "base_model_uri": "m", "rows": [row], "summary": subjects.summarise([row])})
    app = typer.Typer()
    app.command()(subjects.subjects_command)
    config = tmp_path / "run.yaml"
    config.write_text("people: [0]\nprofiles: [demo]\n")  # the flags given override the file
    result = CliRunner().invoke(app, ["--config", str(config), "--profile", "tiny", "--out-dir", str(tmp_path)])
    assert result.exit_code == 1 and "1 of 1 ticket runs raised" in result.output
    assert (tmp_path / "subjects.json").exists()  # written first: the log and the table stay readable
    assert (ran[0].people, ran[0].profiles, ran[0].out_dir) == ((0,), ("tiny",), str(tmp_path))
