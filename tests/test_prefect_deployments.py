"""prefect.yaml for real: a Prefect server, `prefect deploy --all`, a process worker, a deployment run.

The CLI's local mode is covered by test_pipeline_e2e; this runs the other documented way to operate
expunge (prefect.yaml's header): server + work pool + worker, a request processed by the
`process-request` deployment on the tiny home the test session already bootstrapped, and a batch of three
requests forgotten by the `drain-requests` deployment when its schedule fires.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from expunge.cli import app
from expunge.settings import Settings

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(process: subprocess.Popen, name: str) -> None:
    """Prefect's server and process worker stop on SIGINT (not SIGTERM); a second SIGINT forces it."""
    for _ in range(2):
        if process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
            return
        except subprocess.TimeoutExpired:
            continue
    process.kill()
    process.wait(timeout=10)
    raise AssertionError(f"{name} ignored SIGINT twice")


def _wait_until_healthy(port: int, server: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline and server.poll() is None, "Prefect server did not start"
        time.sleep(0.5)


def test_a_request_runs_through_the_deployments_on_a_server_and_worker(tiny_home, tmp_path):
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        # one torch thread in the worker's flow run: torch's default pool spins against any other busy process
        "EXPUNGE_THREADS": "1",
    }
    env.pop("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", None)

    def prefect(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
        done = subprocess.run([PREFECT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"prefect {' '.join(args)}: {done.stdout[-2000:]} {done.stderr[-2000:]}"
        return done

    # a request for a person the session's other tests never erase
    people = [json.loads(line) for line in (tiny_home / "sample_world" / "people.jsonl").read_text().splitlines()]
    person = people[-2]
    request = {"ticket_id": "DEPLOY-0001", "type": "privacy_erasure", "regulation": "GDPR",
               "subject": {"names": [person["name"]]}, "target_model": "models:/expunge-sample-llm@champion"}
    path = tmp_path / "request.yaml"
    path.write_text(yaml.safe_dump(request))
    submitted = CliRunner().invoke(app, ["--home", str(tiny_home), "--profile", "tiny", "submit", str(path)])
    assert submitted.exit_code == 0, submitted.output
    # the tiny profile with gates no outcome can fail: the run completes, so the test reads one outcome
    profile = yaml.safe_load((REPO / "expunge" / "profiles" / "tiny.yaml").read_text())
    profile["gates"] = {kind: {"max_forget_rougeL": 1.0, "min_retain_rougeL_ratio": 0.0} for kind in profile["gates"]}
    profile_path = tmp_path / "passing.yaml"
    profile_path.write_text(yaml.safe_dump(profile))

    # a batch for the scheduled drain, in a home of its own: three people erased on one target
    batch_home = tmp_path / "batch-home"
    batch = _submit_batch(tiny_home, tmp_path, batch_home, str(profile_path), [p["name"] for p in people[:3]])
    prefect_file = _with_drain_every_minute(tmp_path, batch_home, profile_path)

    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=tmp_path, env={**env, "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    worker = None
    try:
        _wait_until_healthy(port, server)
        prefect("work-pool", "create", "expunge", "--type", "process")
        deployed = prefect("--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file))
        assert "process_request/process-request" in deployed.stdout
        assert "drain_requests/drain-requests" in deployed.stdout
        # The worker's own log is kept: a run that never leaves "Submitting" can only be diagnosed from what the
        # worker said.
        worker_log = tmp_path / "worker.log"
        with worker_log.open("wb") as log:
            worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "expunge"], cwd=REPO, env=env,
                                      stdout=log, stderr=subprocess.STDOUT)
        try:
            ran = prefect("deployment", "run", "process_request/process-request", "-p", "ticket_id=DEPLOY-0001",
                          "-p", f"home={tiny_home}", "-p", f"profile={profile_path}", "--watch", timeout=600)
        except subprocess.TimeoutExpired as exc:
            watched = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            raise AssertionError(f"the deployment run did not finish in 600 s; watch: {watched[-1500:]}\n"
                                 f"worker: {worker_log.read_text(errors='replace')[-3000:]}") from exc
        assert "Completed" in ran.stdout, ran.stdout[-2000:] + "\nworker: " + worker_log.read_text(errors="replace")[-3000:]
        _wait_for_batch(batch_home, batch, worker_log)
        # each completed ticket waits for its reviewer in a suspended review run: one decided from the command line,
        # which resumes its run; the batch's from the run's form, as the Prefect UI submits it
        api = env["PREFECT_API_URL"]
        deploy_review = _review_run(tiny_home, "DEPLOY-0001")
        _wait_for_state(api, deploy_review, "PAUSED", worker_log)
        rejected = subprocess.run([str(Path(sys.executable).parent / "expunge"), "--home", str(tiny_home), "--profile",
                                   "tiny", "reject", "DEPLOY-0001", "--reviewer", "dpo@example.org"],
                                  env=env, capture_output=True, text=True, timeout=300)
        assert rejected.returncode == 0 and "was resumed" in rejected.stdout, rejected.stdout + rejected.stderr
        _wait_for_state(api, deploy_review, "COMPLETED", worker_log)
        batch_review = _review_run(batch_home, sorted(batch)[0])
        _wait_for_state(api, batch_review, "PAUSED", worker_log)
        _resume(api, batch_review, {"decision": "approve", "reviewer": "dpo@example.org"})
        _wait_for_state(api, batch_review, "COMPLETED", worker_log)
    finally:
        if worker is not None:
            _stop(worker, "worker")
        _stop(server, "server")

    status = CliRunner().invoke(app, ["--home", str(tiny_home), "--profile", "tiny", "status", "--json"])
    row = next(r for r in json.loads(status.stdout) if r["ticket_id"] == "DEPLOY-0001")
    # the worker's flow run did the whole lifecycle and wrote it to the same DB and registry; the reviewer declined
    assert row["status"] == "release_rejected", row
    assert [h["to"] for h in row["history"]] == ["received", "resolving", "training", "evaluating", "registering",
                                                 "completed", "release_rejected"]
    assert row["model_uri"].startswith("models:/expunge-sample-llm/")
    verify = CliRunner().invoke(app, ["--home", str(tiny_home), "--profile", "tiny", "audit", "verify"])
    assert verify.exit_code == 0, verify.output
    # the schedule fired the drain, which forgot the three in one batch: one version, a verdict per ticket
    Settings(home=batch_home, profile_name="tiny").apply_environment()
    (version,) = MlflowClient().search_model_versions("name = 'sample-base-unlearned'")
    assert version.tags["expunge.tickets"] == ",".join(sorted(batch))
    for ticket in batch:
        with sqlite3.connect(batch_home / "audit.db") as db:
            verdicts = [json.loads(p) for (p,) in db.execute(
                "SELECT payload_json FROM audit_events WHERE ticket_id = ? AND event_type = 'evaluated'", (ticket,))]
        assert len(verdicts) == 1 and all(g["passed"] for g in verdicts[0]["gates"])
    # the review run, resumed with the form, released the batch's version: every ticket it serves
    with sqlite3.connect(batch_home / "audit.db") as db:
        assert dict(db.execute("SELECT ticket_id, status FROM requests")) == {t: "released" for t in batch}
    assert MlflowClient().get_model_version_by_alias("sample-base-unlearned", "champion").version == version.version


def _submit_batch(tiny_home: Path, tmp_path: Path, home: Path, profile: str, names: list[str]) -> list[str]:
    world = tiny_home / "sample_world"
    tickets = []
    for i, name in enumerate(names):
        request = {"ticket_id": f"SCHEDULED-{i}", "type": "privacy_erasure", "regulation": "GDPR",
                   "subject": {"names": [name]}, "target_model": str(tiny_home / "models" / "sample-base"),
                   "corpus": {"source": str(world / "corpus.jsonl"), "holdout": str(world / "holdout.jsonl")}}
        path = tmp_path / f"{request['ticket_id']}.yaml"
        path.write_text(yaml.safe_dump(request))
        submitted = CliRunner().invoke(app, ["--home", str(home), "--profile", profile, "submit", str(path)])
        assert submitted.exit_code == 0, submitted.output
        tickets.append(request["ticket_id"])
    return tickets


def _with_drain_every_minute(tmp_path: Path, home: Path, profile_path: Path) -> Path:
    """prefect.yaml as shipped, but its drain fires every minute on the test's home and profile (the shipped
    schedule is every 15 minutes, on the worker's EXPUNGE_HOME)."""
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    drain = next(d for d in config["deployments"] if d["name"] == "drain-requests")
    drain["schedules"] = [{"cron": "* * * * *"}]
    drain["parameters"] = {"home": str(home), "profile": str(profile_path), "await_approval": True}
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _wait_for_batch(home: Path, tickets: list[str], worker_log: Path, seconds: float = 480) -> None:
    """Until the scheduled drain has settled every ticket (it fires at the next minute)."""
    deadline = time.monotonic() + seconds
    while True:
        with sqlite3.connect(home / "audit.db") as db:
            statuses = dict(db.execute("SELECT ticket_id, status FROM requests"))
        if all(statuses.get(t) not in ("received", "resolving", "training", "evaluating", "registering")
               for t in tickets):
            assert all(statuses[t] == "completed" for t in tickets), statuses
            return
        assert time.monotonic() < deadline, f"the scheduled drain did not settle {statuses} in {seconds:.0f} s; " \
            f"worker: {worker_log.read_text(errors='replace')[-3000:]}"
        time.sleep(5)


def _review_run(home: Path, ticket: str) -> str:
    """The id of the ticket's review run (audited when the run that completed the ticket started it)."""
    with sqlite3.connect(home / "audit.db") as db:
        rows = db.execute("SELECT payload_json FROM audit_events WHERE ticket_id = ? AND event_type = "
                          "'review_awaited' ORDER BY seq", (ticket,)).fetchall()
    assert rows, f"no review run was started for {ticket}"
    return json.loads(rows[-1][0])["flow_run_id"]


def _wait_for_state(api: str, flow_run_id: str, state: str, worker_log: Path, seconds: float = 240) -> None:
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.monotonic() + seconds
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        while (now := client.read_flow_run(UUID(flow_run_id)).state.type.value) != state:
            assert now not in ("FAILED", "CRASHED", "CANCELLED") and time.monotonic() < deadline, \
                f"review run {flow_run_id}: {now}, waiting for {state}; worker: " \
                f"{worker_log.read_text(errors='replace')[-3000:]}"
            time.sleep(2)


def _resume(api: str, flow_run_id: str, form: dict) -> None:
    from uuid import UUID

    from prefect.flow_runs import resume_flow_run
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}):
        resume_flow_run(UUID(flow_run_id), run_input=form)
