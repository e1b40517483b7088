"""prefect.yaml for real: a Prefect server, `prefect deploy --all`, a process worker, a deployment run.

The CLI's local mode is covered by test_pipeline_e2e; this runs the other documented way to operate
expunge (prefect.yaml's header): server + work pool + worker, a request processed by the
`process-request` deployment on the tiny home the test session already bootstrapped.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml
from typer.testing import CliRunner

from expunge.cli import app

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

    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    worker = None
    try:
        _wait_until_healthy(port, server)
        prefect("work-pool", "create", "expunge", "--type", "process")
        deployed = prefect("--no-prompt", "deploy", "--all")
        assert "process_request/process-request" in deployed.stdout
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
    finally:
        if worker is not None:
            _stop(worker, "worker")
        _stop(server, "server")

    status = CliRunner().invoke(app, ["--home", str(tiny_home), "--profile", "tiny", "status", "--json"])
    row = next(r for r in json.loads(status.stdout) if r["ticket_id"] == "DEPLOY-0001")
    # the worker's flow run did the whole lifecycle and wrote it to the same DB and registry
    assert row["status"] == "completed", row
    assert [h["to"] for h in row["history"]] == ["received", "resolving", "training", "evaluating", "registering",
                                                 "completed"]
    assert row["model_uri"].startswith("models:/expunge-sample-llm/")
    verify = CliRunner().invoke(app, ["--home", str(tiny_home), "--profile", "tiny", "audit", "verify"])
    assert verify.exit_code == 0, verify.output
