"""Batching: requests pending on one champion forgotten by one assistant, each evaluated and gated on its own,
one version serving them all; a ticket that fails its gates is split out and retried alone."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from expunge.cli import app
from expunge.settings import Settings, load_profile
from flows.drain import plan_runs

runner = CliRunner()


def _cli(home: Path, profile: str, *args: str):
    return runner.invoke(app, ["--home", str(home), "--profile", profile, *args])


def _subjects(tiny_home: Path, n: int) -> list[str]:
    corpus = (tiny_home / "sample_world" / "corpus.jsonl").read_text().splitlines()
    return sorted({json.loads(line)["subject"] for line in corpus})[:n]


def _submit_erasures(home: Path, tmp_path: Path, tiny_home: Path, profile: str, subjects: dict[str, str]) -> None:
    world = tiny_home / "sample_world"
    for ticket, subject in subjects.items():
        path = tmp_path / f"{ticket}.yaml"
        path.write_text(yaml.safe_dump({
            "ticket_id": ticket, "type": "privacy_erasure", "regulation": "GDPR", "subject": {"names": [subject]},
            "target_model": str(tiny_home / "models" / "sample-base"),
            "corpus": {"source": str(world / "corpus.jsonl"), "holdout": str(world / "holdout.jsonl")}}))
        submitted = _cli(home, profile, "submit", str(path))
        assert submitted.exit_code == 0, submitted.output


def _quick_profile(tmp_path: Path, **gates: float) -> str:
    """The tiny profile evaluating without the quantization attacks and fluency checks (this is about batching),
    gated on forgetting, utility and the regression of earlier erasures."""
    profile = load_profile("tiny")
    profile["evaluation"].update(quant_bits=[], quant_nf4=False, fluency=False, verbmem=False)
    profile["gates"]["privacy_erasure"] = {"max_forget_rougeL": 0.3, "min_retain_rougeL_ratio": 0.9,
                                           "max_earlier_erasure_rise": 0.25, **gates}
    path = tmp_path / "quick.yaml"
    path.write_text(yaml.safe_dump(profile))
    return str(path)


def _rows(home: Path, sql: str, *args) -> list[tuple]:
    with sqlite3.connect(home / "audit.db") as db:
        return list(db.execute(sql, args))


def _events(home: Path, ticket: str, event_type: str) -> list[dict]:
    return [json.loads(p) for (p,) in _rows(home, "SELECT payload_json FROM audit_events WHERE ticket_id = ? AND "
                                                  "event_type = ? ORDER BY seq", ticket, event_type)]


def test_runs_are_planned_by_urgency_with_one_batch_per_champion():
    def ticket(tid, key="k1", status="received", method="uld"):
        return {"ticket_id": tid, "batch_key": key if method == "uld" else None, "status": status, "method": method}

    tickets = [ticket("A"), ticket("B", "k2"), ticket("C"), ticket("D", status="evaluating"), ticket("E", method="npo"),
               ticket("F"), ticket("G"), ticket("H")]
    runs = [[t["ticket_id"] for t in run] for run in plan_runs(tickets, batch_max=3)]
    # A's batch fills to three (C, F); G opens the next batch on k1; a lost run's ticket and NPO run alone
    assert runs == [["A", "C", "F"], ["B"], ["D"], ["E"], ["G", "H"]]
    assert [[t["ticket_id"] for t in run] for run in plan_runs(tickets, batch_max=1)] == [[t] for t in "ABCDEFGH"]


def test_a_batch_of_three_is_one_assistant_one_version_and_three_verdicts(tiny_home, tmp_path, prefect_harness):
    """The drain forgets three erasures on one target with one assistant; each ticket is evaluated and gated on
    its own forget set; one version serves all three and says so; approving it releases all three."""
    from flows.drain import drain_requests

    home, profile = tmp_path / "home", _quick_profile(tmp_path)
    tickets = {f"BATCH-{i}": subject for i, subject in enumerate(_subjects(tiny_home, 3))}
    _submit_erasures(home, tmp_path, tiny_home, profile, tickets)
    outcomes = drain_requests(home=str(home), profile=profile)
    assert outcomes == {ticket: "completed" for ticket in tickets}, outcomes

    settings = Settings(home=home, profile_name="tiny")
    settings.apply_environment()
    client = MlflowClient()
    versions = client.search_model_versions("name = 'sample-base-unlearned'")
    assert len(versions) == 1  # one version for the three tickets
    tags = versions[0].tags
    assert tags["expunge.tickets"] == ",".join(sorted(tickets))
    assert all(tags[f"expunge.serves.{ticket}"] == "true" for ticket in tickets)
    batch_id = tags["expunge.batch_id"]
    forget_counts = {t: json.loads((home / "work" / t / "resolved.json").read_text())["forget_count"] for t in tickets}
    for ticket in tickets:
        (trained,) = _events(home, ticket, "unlearning_trained")
        assert trained["batch_id"] == batch_id
        (evaluated,) = _events(home, ticket, "evaluated")  # a verdict of its own
        assert evaluated["gates"] and all(g["passed"] for g in evaluated["gates"])
        (registered,) = _events(home, ticket, "model_registered")
        assert registered["model_uri"] == f"models:/sample-base-unlearned/{versions[0].version}"
        # the batch-mates' records are neither utility nor retain data in this ticket's evaluation
        target = json.loads((home / "work" / ticket / "target.json").read_text())
        assert target["batch_id"] == batch_id
        assert len(target["batch_erased_ids"]) == sum(forget_counts.values()) - forget_counts[ticket]
    assert int(tags["expunge.forget_count"]) == sum(forget_counts.values())  # the union of their forget sets
    assert sorted(p.name for p in (home / "work" / batch_id).glob("assistant*")) == ["assistant"]
    assert list((home / "work" / batch_id / "assistant").iterdir())[0].name == "assistant.sealed"

    first, *mates = sorted(tickets)
    approved = _cli(home, profile, "approve", first, "--reviewer", "dpo@example.org")
    assert approved.exit_code == 0, approved.output
    statuses = dict(_rows(home, "SELECT ticket_id, status FROM requests"))
    assert statuses == {ticket: "released" for ticket in tickets}
    for mate in mates:
        assert _events(home, mate, "status_changed")[-1]["decided_with"] == first
    assert client.get_model_version_by_alias("sample-base-unlearned", "champion").version == versions[0].version
    lineage = _cli(home, profile, "lineage", "models:/sample-base-unlearned@champion", "--json")
    assert lineage.exit_code == 0, lineage.output
    assert json.loads(lineage.output)[0]["ticket_ids"] == sorted(tickets)
    assert _cli(home, profile, "audit", "verify").exit_code == 0


def test_a_ticket_that_fails_its_gates_in_a_batch_is_split_out_and_retried_alone(tiny_home, tmp_path, prefect_harness):
    """With a gate nothing can pass, the batch registers nothing: both tickets go back to `received`
    (split_from_batch, audited) and are each run alone, where they end failed_gates."""
    from flows.drain import drain_requests

    profile_path = _quick_profile(tmp_path, max_forget_rougeL=-1.0)
    home = tmp_path / "home"
    tickets = {f"SPLIT-{i}": subject for i, subject in enumerate(_subjects(tiny_home, 2))}
    _submit_erasures(home, tmp_path, tiny_home, profile_path, tickets)
    outcomes = drain_requests(home=str(home), profile=profile_path)
    assert outcomes == {ticket: "failed_gates" for ticket in tickets}, outcomes
    for ticket in tickets:
        changes = _rows(home, "SELECT s.to_status, s.reason_code FROM status_changes s JOIN requests r ON "
                              "r.id = s.request_id WHERE r.ticket_id = ? ORDER BY s.id", ticket)
        assert ("received", "split_from_batch") in changes
        assert [s for s, _ in changes].count("training") == 2  # in the batch, then alone
        assert len(_events(home, ticket, "evaluated")) == 2
    Settings(home=home, profile_name="tiny").apply_environment()
    versions = MlflowClient().search_model_versions("name = 'sample-base-unlearned'")
    assert len(versions) == 2 and all("expunge.batch_id" not in v.tags for v in versions)  # the alone runs' only


def test_the_batching_report_shows_each_tickets_first_verdict_and_the_time_ratio(tmp_path):
    from benchmarks.batching import summarise, write_report

    rows = [{"profile": mode, "person_index": i, "ticket_id": f"T-{mode}-{i}", "status": "completed", "passed": True,
             "forget_rougeL": 0.1, "neighbour_rougeL_ratio": 1.0, "evaluations": 1 + (mode == "batch" and i == 0),
             "first_passed": not (mode == "batch" and i == 0), "first_failed_gates": ["max_forget_rougeL"]
             if mode == "batch" and i == 0 else [], "first_forget_rougeL": 0.1, "first_forget_nll": 0.4}
            for mode in ("one_at_a_time", "batch") for i in range(2)]
    summary = summarise(rows)
    assert summary["batch"]["passed_first_evaluation"] == 1 and summary["batch"]["evaluations"] == 3
    assert summary["one_at_a_time"]["passed_first_evaluation"] == 2
    result = {"command": "expunge benchmark batching", "date": "now", "machine": "here", "base_model_uri": "m",
              "options": {"people": [0, 1]}, "seconds": {"one_at_a_time": 100.0, "batch": 80.0},
              "batch_over_one": 1.6, "batch_over_all_alone": 0.8, "rows": rows, "summary": summary}
    json_path, md_path = write_report(result, tmp_path, "batching")
    text = md_path.read_text()
    assert "1.6× one erasure" in text and "| 0 | batch | max_forget_rougeL |" in text
    assert json.loads(json_path.read_text())["batch_over_one"] == 1.6
