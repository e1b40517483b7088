"""Nothing lost: a runner killed mid-run frees its ticket when its lease runs out, and the next run completes it;
two runners started together process each ticket exactly once."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, HTTPServer
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


def _lease(home: Path, ticket: str) -> tuple[str | None, datetime | None]:
    """Who holds the ticket and until when (UTC)."""
    with sqlite3.connect(home / "audit.db") as db:
        holder, until = db.execute("SELECT claimed_by, lease_expires_at FROM requests WHERE ticket_id = ?",
                                   (ticket,)).fetchone()
    return holder, datetime.fromisoformat(until).replace(tzinfo=timezone.utc) if until else None


def _events(home: Path, ticket: str) -> list[tuple[str, dict]]:
    with sqlite3.connect(home / "audit.db") as db:
        return [(e, json.loads(p)) for e, p in db.execute(
            "SELECT event_type, payload_json FROM audit_events WHERE ticket_id = ? ORDER BY seq", (ticket,))]


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
    assert [e for e, _ in _events(home, "CRASH-0001") if e == "training_reused"] == []  # cut short: trained again
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


# Runs `expunge run TICKET` with a pause at one point of the pipeline: there it writes argv[1] (a marker) and waits
# for argv[2] to exist. Prefect runs the tasks in this process, so the patches below reach them.
PAUSED_RUN = r"""
import sys, time
from pathlib import Path

import db.session
import flows.process_request
import models_registry.registry as registry

marker, go, where, ticket = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]


def pause(note):
    marker.write_text(note)
    while not go.exists():
        time.sleep(0.1)


if where == "version_created":  # MLflow made the version; nothing tagged it yet
    created = registry._registered_version

    def _registered_version(info, name):
        ref = created(info, name)
        pause(ref.uri)
        return ref

    registry._registered_version = _registered_version
elif where == "before_registering":  # evaluated; the move to `registering` waits (a DB outage begins meanwhile)
    db.session.SQLITE_BUSY_TIMEOUT_S = 1.0  # before any engine is made: a locked DB fails fast
    move = flows.process_request.transition

    def transition(*args, **kwargs):
        if args[3] == "registering":
            pause("")
        return move(*args, **kwargs)

    flows.process_request.transition = transition
else:
    raise SystemExit(f"unknown pause point {where}")

from expunge.cli import app

app(["run", ticket], prog_name="expunge")
"""
ROOT = Path(__file__).resolve().parents[1]


def _paused_run(home: Path, tmp_path: Path, ticket: str, where: str, lease_seconds: int,
                profile: str = "tiny") -> tuple[subprocess.Popen, Path, Path, Path]:
    """`expunge run ticket` in its own process group, pausing at `where`: (process, marker, go file, its output)."""
    marker, go, output = tmp_path / f"{where}.reached", tmp_path / f"{where}.go", tmp_path / f"{where}.out"
    with output.open("w") as out:
        process = subprocess.Popen([sys.executable, "-c", PAUSED_RUN, str(marker), str(go), where, ticket],
                                   cwd=ROOT, env=_env(home, profile, lease_seconds), stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    return process, marker, go, output


def _wait_for(marker: Path, process: subprocess.Popen, output: Path, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"the run never reached the pause point:\n{output.read_text()[-4000:]}")
        time.sleep(0.2)
    time.sleep(0.2)  # the note is written
    return marker.read_text()


def _sample_request(tiny_home: Path, ticket: str) -> dict:
    sample = yaml.safe_load((tiny_home / "sample_world" / "sample_request.yaml").read_text())
    return {**{k: sample[k] for k in ("type", "regulation", "subject")}, "ticket_id": ticket,
            "target_model": str(tiny_home / "models" / "sample-base"),
            "corpus": {"source": str(tiny_home / "sample_world" / "corpus.jsonl"),
                       "holdout": str(tiny_home / "sample_world" / "holdout.jsonl")}}


def _completing_run(home: Path, lease_seconds: int) -> subprocess.CompletedProcess:
    """The scheduled-run form (`expunge run`), in a process of its own: torch here is not held to one thread,
    which on a busy machine slows training a hundredfold."""
    return subprocess.run([*EXPUNGE, "run"], env=_env(home, "tiny", lease_seconds), capture_output=True, text=True,
                          timeout=600)


def _one_live_version(home: Path, ticket: str, orphans: list[str]):
    """Every version of the ticket's registered name: `orphans` tagged orphaned without `challenger`, exactly one
    other (the completing run's) holding `challenger`. By name, not tag: an untagged stray counts too."""
    from tasks.context import settings_for

    settings_for(str(home), "tiny")  # MLflow: this home's store
    client = MlflowClient()
    (ours,) = {v.name for v in client.search_model_versions(f"tags.`expunge.ticket_id` = '{ticket}'")}
    versions = client.search_model_versions(f"name = '{ours}'")
    for uri in orphans:
        _, name, number = uri.rsplit("/", 2)
        orphan = client.get_model_version(name, number)
        assert orphan.tags.get("expunge.orphaned") == "lease_expired", (uri, orphan.tags)
        assert "challenger" not in orphan.aliases
    live = [v for v in versions if "expunge.orphaned" not in v.tags]
    assert len(live) == 1, [(v.version, v.tags) for v in versions]
    (live,) = live
    assert live.tags["expunge.ticket_id"] == ticket and f"models:/{live.name}/{live.version}" not in orphans
    assert "challenger" in client.get_model_version(live.name, live.version).aliases  # search leaves aliases out
    return live


def test_a_run_killed_during_registering_leaves_an_orphan_the_next_run_marks(tiny_home, tmp_path):
    """kill -9 after MLflow made the version, before anything tagged it: the next run (once the lease ran out)
    finds it through its MLflow run, tags it orphaned, and completes the ticket with a version of its own. (A
    tagged version holding `challenger` is marked the same way: test_a_run_killed_during_training_….)"""
    home, ticket, where = tmp_path / "home", "REGCRASH-0001", "version_created"
    _submit(home, tmp_path, "tiny", _sample_request(tiny_home, ticket))
    lease = 6
    crashed, marker, _, output = _paused_run(home, tmp_path, ticket, where, lease)
    orphan = _wait_for(marker, crashed, output)
    os.killpg(crashed.pid, signal.SIGKILL)  # kill -9: no hook runs, the lease is left to run out
    crashed.wait()
    assert orphan.startswith("models:/") and _status(home, ticket) == "registering"

    held = runner.invoke(app, ["--home", str(home), "--profile", "tiny", "run", ticket])
    assert held.exit_code == 2 and "held by runner" in held.output + held.stderr
    time.sleep(lease + 1)
    again = _completing_run(home, lease)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert _status(home, ticket) == "completed"
    assert ("registering", "received") in _changes(home, ticket)  # lease_expired, audited
    trainings = [e for e, _ in _events(home, ticket) if e in ("unlearning_trained", "training_reused")]
    assert trainings == ["unlearning_trained", "training_reused"]  # the lost run's finished training is kept
    marked = [p for e, p in _events(home, ticket) if e == "orphaned_versions_marked"]
    assert [p["model_uris"] for p in marked] == [[orphan]]
    _one_live_version(home, ticket, [orphan])
    verified = runner.invoke(app, ["--home", str(home), "--profile", "tiny", "audit", "verify"])
    assert verified.exit_code == 0, verified.output


def test_a_run_that_loses_its_database_mid_run_is_repaired_by_the_next_run(tiny_home, tmp_path):
    """The audit DB is locked by another writer past the busy timeout just as the run moves to `registering`: the
    move fails, and so does recording `failed`. The ticket is stranded in progress under the dead run's lease
    (no model registered); once that lease runs out the next `expunge run` takes it up and completes it."""
    home, ticket = tmp_path / "home", "DBDOWN-0001"
    _submit(home, tmp_path, "tiny", _sample_request(tiny_home, ticket))
    lease = 40  # outlasts the failing run's retries, so the stranded lease is still held when the DB is back
    stranded, marker, go, output = _paused_run(home, tmp_path, ticket, "before_registering", lease)
    _wait_for(marker, stranded, output)
    assert _status(home, ticket) == "evaluating"
    outage = sqlite3.connect(home / "audit.db", isolation_level=None)
    try:
        outage.execute("BEGIN EXCLUSIVE")  # readers and writers alike get "database is locked"
        go.touch()
        stranded.wait(timeout=300)
    finally:
        outage.rollback()
        outage.close()
    log = output.read_text()
    assert stranded.returncode != 0 and "database is locked" in log, log[-4000:]

    assert _status(home, ticket) == "evaluating"  # left in progress: neither `registering` nor `failed` was written
    holder, until = _lease(home, ticket)
    assert holder is not None and until > datetime.now(timezone.utc), (holder, until)
    held = runner.invoke(app, ["--home", str(home), "--profile", "tiny", "run", ticket])
    assert held.exit_code == 2 and "held by runner" in held.output + held.stderr
    from tasks.context import settings_for

    settings_for(str(home), "tiny")  # MLflow: this home's store, where nothing was registered
    assert MlflowClient().search_model_versions(f"tags.`expunge.ticket_id` = '{ticket}'") == []

    time.sleep(max(0.0, (until - datetime.now(timezone.utc)).total_seconds()) + 1)
    again = _completing_run(home, lease)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert _status(home, ticket) == "completed"
    assert ("evaluating", "received") in _changes(home, ticket)  # lease_expired, audited
    trainings = [e for e, _ in _events(home, ticket) if e in ("unlearning_trained", "training_reused")]
    assert trainings == ["unlearning_trained", "training_reused"]
    assert _lease(home, ticket) == (None, None)
    _one_live_version(home, ticket, [])
    verified = runner.invoke(app, ["--home", str(home), "--profile", "tiny", "audit", "verify"])
    assert verified.exit_code == 0, verified.output


def test_two_runners_started_together_process_each_ticket_once(tiny_home, tmp_path):
    """Five erasures of a person the model never learned, under a profile that stops them at `needs_review`
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
    tickets = [f"RACE-{i}" for i in range(5)]
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


def _receiver_into(received: list):
    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the http.server API
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    return Receiver


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
    received: list[dict] = []
    server = HTTPServer(("127.0.0.1", 0), _receiver_into(received))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for ticket, regulation in (("LATER-1", "GDPR"), ("SOONER-1", "DMCA")):  # DMCA: due in 14 days, GDPR a month
        _submit(home, tmp_path, str(profile_path), {
            "ticket_id": ticket, "type": "privacy_erasure", "regulation": regulation,
            "subject": {"names": [stranger]}, "target_model": str(tiny_home / "models" / "sample-base"),
            "corpus": {"source": str(corpus), "holdout": str(others)},
            "callback_url": f"http://127.0.0.1:{server.server_port}/expunge"})
    try:
        outcomes = drain_requests(home=str(home), profile=str(profile_path))
    finally:
        server.shutdown()
    assert list(outcomes) == ["SOONER-1", "LATER-1"] and set(outcomes.values()) == {"needs_review"}
    # the drain sent each ticket's status changes to its callback, in order
    assert [c["status"] for c in received if c["ticket_id"] == "SOONER-1"] == ["received", "resolving", "needs_review"]
    assert drain_requests(home=str(home), profile=str(profile_path)) == {}  # nothing left waiting
    for ticket in outcomes:
        assert _changes(home, ticket).count(("received", "resolving")) == 1


def test_a_finished_training_is_reused_only_for_the_same_inputs_and_intact_files(tiny_home, completed, tmp_path):
    """What `reusable_training` compares: the keyed fingerprint of the training's inputs (method, request, data,
    target, settings) and the sealed assistants' integrity; the training file reads back as it was written.
    The fingerprint holds after the decision purged the request's subject (the request is taken as filed)."""
    assert _status(tiny_home, "DEMO-GDPR-0001") in ("completed", "released")  # released (purged) in the full suite
    import dataclasses
    import shutil

    from tasks.context import read_json
    from tasks.contracts import ResolvedRequest, TrainedUnlearning
    from tasks.resume import _intact, training_inputs_fingerprint

    settings = Settings(home=tiny_home, profile_name="tiny")
    work = tiny_home / "work" / "DEMO-GDPR-0001"
    trained = TrainedUnlearning.from_json(read_json(work / "training.json"))
    assert trained.as_json() == read_json(work / "training.json")
    resolved = ResolvedRequest(**{**read_json(work / "resolved.json")})
    fingerprint = training_inputs_fingerprint(settings, "DEMO-GDPR-0001", resolved, "uld")
    assert trained.inputs_fingerprint == fingerprint
    assert training_inputs_fingerprint(settings, "DEMO-GDPR-0001", resolved, "npo") != fingerprint
    changed = Settings(home=tiny_home, profile_name="tiny")
    changed.profile["unlearning"]["uld"]["epochs"] = 1
    assert training_inputs_fingerprint(changed, "DEMO-GDPR-0001", resolved, "uld") != fingerprint
    assert _intact(settings, trained)
    torn = tmp_path / "torn"
    shutil.copytree(trained.adapter_dirs[0], torn)
    sealed = next(torn.iterdir())
    sealed.write_bytes(sealed.read_bytes()[:-10])
    assert not _intact(settings, dataclasses.replace(trained, adapter_dirs=(str(torn),)))
