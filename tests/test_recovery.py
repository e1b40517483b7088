"""Nothing lost: a runner killed mid-run frees its ticket when its lease runs out, and the next run completes it;
two runners started together process each ticket exactly once."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from expunge.cli import app
from expunge.settings import Settings, load_profile

runner = CliRunner()
EXPUNGE = [sys.executable, "-m", "expunge.cli"]


@pytest.fixture(autouse=True)
def _back_to_the_shared_home(tiny_home):
    """These tests run the CLI on homes of their own, which points MLflow there; later tests expect tiny_home."""
    yield
    Settings(home=tiny_home, profile_name="tiny").apply_environment()


def _env(home: Path, profile: str, lease_seconds: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}  # each run its own Prefect
    return {**env, "EXPUNGE_HOME": str(home), "EXPUNGE_PROFILE": profile, "EXPUNGE_THREADS": "1",
            "EXPUNGE_LEASE_SECONDS": str(lease_seconds), "CI": "true"}


def _status(home: Path, ticket: str) -> str | None:
    with sqlite3.connect(home / "audit.db") as db:
        row = db.execute("SELECT status FROM requests WHERE ticket_id = ?", (ticket,)).fetchone()
    return row[0] if row else None


def _changes(home: Path, ticket: str) -> list[tuple[str, str]]:
    with sqlite3.connect(home / "audit.db") as db:
        return list(db.execute(
            "SELECT s.from_status, s.to_status FROM status_changes s JOIN requests r ON r.id = s.request_id "
            "WHERE r.ticket_id = ? ORDER BY s.id", (ticket,)))


def _submit(home: Path, tmp_path: Path, profile: str, request: dict) -> None:
    path = tmp_path / f"{request['ticket_id']}.yaml"
    path.write_text(yaml.safe_dump(request))
    result = runner.invoke(app, ["--home", str(home), "--profile", profile, "submit", str(path)])
    assert result.exit_code == 0, result.output


def test_a_run_killed_during_training_is_taken_up_when_its_lease_runs_out(tiny_home, tmp_path):
    home = tmp_path / "home"  # its own home: `expunge run` below takes up whatever is runnable there
    sample = yaml.safe_load((tiny_home / "sample_world" / "sample_request.yaml").read_text())
    _submit(home, tmp_path, "tiny", {
        **{k: sample[k] for k in ("type", "regulation", "subject")}, "ticket_id": "CRASH-0001",
        "target_model": str(tiny_home / "models" / "sample-base"),
        "corpus": {"source": str(tiny_home / "sample_world" / "corpus.jsonl"),
                   "holdout": str(tiny_home / "sample_world" / "holdout.jsonl")}})
    lease = 6
    crashed = subprocess.Popen([*EXPUNGE, "run", "CRASH-0001"], env=_env(home, "tiny", lease),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while _status(home, "CRASH-0001") != "training":
        assert crashed.poll() is None and time.monotonic() < deadline, "the run never reached training"
        time.sleep(0.2)
    time.sleep(1.0)
    os.killpg(crashed.pid, signal.SIGKILL)  # kill -9, mid-training: nothing gets to clean up
    crashed.wait()
    assert _status(home, "CRASH-0001") == "training"

    held = runner.invoke(app, ["--home", str(home), "--profile", "tiny", "run", "CRASH-0001"])
    assert held.exit_code == 2 and "held by runner" in held.output + held.stderr  # its lease has not run out yet
    time.sleep(lease + 1)
    again = runner.invoke(app, ["--home", str(home), "--profile", "tiny", "run"])  # the scheduled-run form
    assert again.exit_code == 0, again.output
    assert _status(home, "CRASH-0001") == "completed"
    assert ("training", "received") in _changes(home, "CRASH-0001")  # lease_expired, audited
    versions = MlflowClient().search_model_versions("tags.`expunge.ticket_id` = 'CRASH-0001'")
    assert len(versions) == 1  # the killed run had registered nothing
    verified = runner.invoke(app, ["--home", str(home), "--profile", "tiny", "audit", "verify"])
    assert verified.exit_code == 0, verified.output

    # Had the run been lost during registering, its version would be an orphan: what the next run does to it.
    from models_registry.registry import mark_orphaned_versions

    (version,) = versions
    assert "challenger" in MlflowClient().get_model_version(version.name, version.version).aliases
    assert mark_orphaned_versions("CRASH-0001", "lease_expired") == [f"models:/{version.name}/{version.version}"]
    marked = MlflowClient().get_model_version(version.name, version.version)
    assert "challenger" not in marked.aliases and marked.tags["expunge.orphaned"] == "lease_expired"
    assert mark_orphaned_versions("CRASH-0001", "lease_expired") == []  # once


def test_two_runners_started_together_process_each_ticket_once(tiny_home, tmp_path):
    """Four erasures of a person the model never learned, under a profile that stops them at `needs_review`
    before training (so the test is about claiming, not training): each is resolved by exactly one runner."""
    world = tiny_home / "sample_world"
    holdout = [json.loads(line) for line in (world / "holdout.jsonl").read_text().splitlines()]
    strangers = sorted({r["subject"] for r in holdout})[:1]  # the others stay holdout
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text((world / "corpus.jsonl").read_text()
                      + "".join(json.dumps(r) + "\n" for r in holdout if r["subject"] in strangers))
    others = tmp_path / "holdout.jsonl"
    others.write_text("".join(json.dumps(r) + "\n" for r in holdout if r["subject"] not in strangers))
    profile = load_profile("tiny")
    profile["unlearning"]["nothing_to_forget"] = "review"
    profile_path = tmp_path / "review.yaml"
    profile_path.write_text(yaml.safe_dump(profile))
    home = tmp_path / "home"
    tickets = [f"RACE-{i}" for i in range(4)]
    for i, ticket in enumerate(tickets):
        _submit(home, tmp_path, str(profile_path), {
            "ticket_id": ticket, "type": "privacy_erasure", "regulation": "GDPR",
            "subject": {"names": strangers}, "target_model": str(tiny_home / "models" / "sample-base"),
            "corpus": {"source": str(corpus), "holdout": str(others)}})
    env = _env(home, str(profile_path), 300)
    runs = [subprocess.Popen([*EXPUNGE, "run"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=600)[0] for run in runs]
    for ticket in tickets:
        assert _status(home, ticket) == "needs_review", outputs
        assert _changes(home, ticket).count(("received", "resolving")) == 1, outputs  # processed once
    verified = runner.invoke(app, ["--home", str(home), "--profile", "tiny", "audit", "verify"])
    assert verified.exit_code == 0, verified.output


def test_an_approval_interrupted_after_the_aliases_moved_is_completed_by_the_next_command(
        tiny_home, tmp_path, monkeypatch):
    """The DB write after the alias move fails (as in an outage): the version is champion but the ticket still
    says completed. The next approve completes the recorded decision instead of refusing it as stale."""
    import flows.release
    from sqlalchemy.exc import OperationalError

    from tests.test_pipeline_e2e import with_gates_every_run_passes

    home = tmp_path / "home"
    profile_path = tmp_path / "passing.yaml"
    profile_path.write_text(yaml.safe_dump(with_gates_every_run_passes(load_profile("tiny"))))
    args = ["--home", str(home), "--profile", str(profile_path)]
    sample = yaml.safe_load((tiny_home / "sample_world" / "sample_request.yaml").read_text())
    _submit(home, tmp_path, str(profile_path), {
        **{k: sample[k] for k in ("type", "regulation", "subject")}, "ticket_id": "OUTAGE-0001",
        "target_model": str(tiny_home / "models" / "sample-base"),
        "corpus": {"source": str(tiny_home / "sample_world" / "corpus.jsonl")}})
    assert runner.invoke(app, [*args, "run", "OUTAGE-0001"]).exit_code == 0
    real_transition = flows.release.transition

    def outage(*_args, **_kwargs):
        raise OperationalError("UPDATE requests", {}, Exception("database is locked"))

    monkeypatch.setattr(flows.release, "transition", outage)
    interrupted = runner.invoke(app, [*args, "approve", "OUTAGE-0001", "--reviewer", "dpo@example.org"])
    assert interrupted.exit_code == 1 and "completes it" in interrupted.stderr, interrupted.output
    assert _status(home, "OUTAGE-0001") == "completed"
    version = MlflowClient().get_model_version_by_alias("sample-base-unlearned", "champion")  # aliases moved

    monkeypatch.setattr(flows.release, "transition", real_transition)
    again = runner.invoke(app, [*args, "approve", "OUTAGE-0001", "--reviewer", "dpo@example.org"])
    assert again.exit_code == 0, again.output
    assert _status(home, "OUTAGE-0001") == "released"
    assert MlflowClient().get_model_version_by_alias("sample-base-unlearned", "champion").version == version.version
    with sqlite3.connect(home / "audit.db") as db:
        events = [e for (e,) in db.execute("SELECT event_type FROM audit_events WHERE ticket_id = 'OUTAGE-0001' "
                                          "ORDER BY seq")]
    assert events.count("release_intent") == 1 and events[-2:] == ["status_changed", "subject_purged"]
    assert runner.invoke(app, [*args, "audit", "verify"]).exit_code == 0


def test_the_scheduled_drain_takes_every_waiting_ticket_once_most_urgent_first(tiny_home, tmp_path, prefect_harness):
    """`drain_requests` (the cron deployment in prefect.yaml): the due-soon ticket first, each resolved once."""
    from flows.drain import drain_requests

    world = tiny_home / "sample_world"
    holdout = [json.loads(line) for line in (world / "holdout.jsonl").read_text().splitlines()]
    stranger = sorted({r["subject"] for r in holdout})[0]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text((world / "corpus.jsonl").read_text()
                      + "".join(json.dumps(r) + "\n" for r in holdout if r["subject"] == stranger))
    others = tmp_path / "holdout.jsonl"
    others.write_text("".join(json.dumps(r) + "\n" for r in holdout if r["subject"] != stranger))
    profile = load_profile("tiny")
    profile["unlearning"]["nothing_to_forget"] = "review"  # each stops before training: this is about the drain
    profile_path = tmp_path / "review.yaml"
    profile_path.write_text(yaml.safe_dump(profile))
    home = tmp_path / "home"
    for ticket, regulation in (("LATER-1", "GDPR"), ("SOONER-1", "DMCA")):  # DMCA: due in 14 days, GDPR a month
        _submit(home, tmp_path, str(profile_path), {
            "ticket_id": ticket, "type": "privacy_erasure", "regulation": regulation,
            "subject": {"names": [stranger]}, "target_model": str(tiny_home / "models" / "sample-base"),
            "corpus": {"source": str(corpus), "holdout": str(others)}})
    outcomes = drain_requests(home=str(home), profile=str(profile_path))
    assert list(outcomes) == ["SOONER-1", "LATER-1"] and set(outcomes.values()) == {"needs_review"}
    assert drain_requests(home=str(home), profile=str(profile_path)) == {}  # nothing left waiting
    for ticket in outcomes:
        assert _changes(home, ticket).count(("received", "resolving")) == 1
