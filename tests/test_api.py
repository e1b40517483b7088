"""The HTTP intake (`expunge serve`), driven through the real FastAPI app: signatures, replays, idempotency,
revisions and status callbacks, each with the stored status and the audit event checked."""
from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import yaml
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

from db import session_scope
from db.models import AuditEvent, CallbackDelivery
from expunge.api import create_app
from expunge.callbacks import deliver_due, retry_delay
from expunge.cli import app as cli_app
from expunge.settings import Settings
from expunge.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, signed_headers, verify

SECRET = "intake-test-secret"


@pytest.fixture()
def intake(tiny_home, monkeypatch):
    monkeypatch.setenv("EXPUNGE_WEBHOOK_SECRET", SECRET)
    settings = Settings(home=tiny_home, profile_name="tiny")
    with TestClient(create_app(settings, deliver_every=None)) as client:
        yield client, settings
    Settings(home=tiny_home, profile_name="tiny").apply_environment()


def _request(tiny_home, ticket: str, **changes) -> dict:
    sample = yaml.safe_load((tiny_home / "sample_world" / "sample_request.yaml").read_text())
    return {**sample, "ticket_id": ticket, **changes}


def _send(client, method: str, path: str, payload=None, raw: bytes | None = None, now: float | None = None,
          headers: dict | None = None):
    body = raw if raw is not None else (json.dumps(payload).encode() if payload is not None else b"")
    signed = body if method in ("POST", "PUT") else path.encode()
    sent = headers if headers is not None else signed_headers(SECRET.encode(), signed, now)
    return client.request(method, path, content=body, headers={"Content-Type": "application/json", **sent})


def _events(settings, ticket: str) -> list[tuple[str, dict]]:
    with session_scope(settings.db_url) as session:
        rows = session.scalars(select(AuditEvent).where(AuditEvent.ticket_id == ticket).order_by(AuditEvent.seq))
        return [(row.event_type, json.loads(row.payload_json)) for row in rows]


def test_a_signed_request_is_stored_once_and_read_back_without_the_subject(intake, tiny_home):
    client, settings = intake
    request = _request(tiny_home, "API-1")
    answer = _send(client, "POST", "/v1/requests", request)
    assert answer.status_code == 201, answer.text
    ticket = answer.json()
    assert (ticket["ticket_id"], ticket["status"], ticket["revision"]) == ("API-1", "received", 1)
    assert [e for e, _ in _events(settings, "API-1")] == ["request_received"]

    again = _send(client, "POST", "/v1/requests", request, now=time.time() + 1)  # a new send of the same request
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == ticket
    other = _send(client, "POST", "/v1/requests", {**request, "notes": "changed"}, now=time.time() + 2)
    assert (other.status_code, other.json()["error"]["reason_code"]) == (409, "duplicate_ticket")
    assert [e for e, _ in _events(settings, "API-1")] == ["request_received"]  # neither was stored again

    read = _send(client, "GET", "/v1/requests/api-1")  # ticket ids are compared without case
    assert read.status_code == 200 and read.json()["status"] == "received"
    for term in request["subject"]["names"] + request["subject"]["identifiers"]:
        assert term not in read.text and term not in answer.text
    assert _send(client, "GET", "/v1/requests/NOPE-1").json()["error"]["reason_code"] == "unknown_ticket"
    assert "/v1/requests" in client.get("/openapi.json").json()["paths"]


def test_bad_signatures_stale_messages_replays_and_malformed_bodies_are_refused(intake, tiny_home):
    client, settings = intake
    body = json.dumps(_request(tiny_home, "API-2")).encode()
    forged = {TIMESTAMP_HEADER: str(int(time.time())), SIGNATURE_HEADER: "sha256=" + "0" * 64}
    cases = [
        (_send(client, "POST", "/v1/requests", raw=body, headers=forged), 401, "bad_signature"),
        (_send(client, "POST", "/v1/requests", raw=body, headers={}), 401, "unsigned"),
        (_send(client, "POST", "/v1/requests", raw=body, now=time.time() - 3600), 401, "stale_timestamp"),
        (_send(client, "POST", "/v1/requests", raw=b"{not json"), 400, "malformed_json"),
        (_send(client, "POST", "/v1/requests", raw=b"[1, 2]"), 400, "malformed_json"),
        (_send(client, "GET", "/v1/requests/API-2", headers={}), 401, "unsigned"),
    ]
    for answer, status, code in cases:
        assert (answer.status_code, answer.json()["error"]["reason_code"]) == (status, code), answer.text
    assert _events(settings, "API-2") == []  # nothing was stored

    headers = signed_headers(SECRET.encode(), body)
    assert _send(client, "POST", "/v1/requests", raw=body, headers=headers).status_code == 201
    replayed = _send(client, "POST", "/v1/requests", raw=body, headers=headers)
    assert (replayed.status_code, replayed.json()["error"]["reason_code"]) == (409, "replayed")
    assert [e for e, _ in _events(settings, "API-2")] == ["request_received"]


def test_a_rejected_ticket_is_corrected_by_a_revision_and_a_processed_one_is_not(intake, tiny_home, tmp_path):
    client, settings = intake
    wrong = _request(tiny_home, "API-3", target_model="models:/no-such-model@champion")
    rejected = _send(client, "POST", "/v1/requests", wrong)
    assert rejected.status_code == 422
    assert rejected.json()["error"]["reason_code"] == "unknown_model"
    assert rejected.json()["ticket"]["status"] == "rejected"
    due = rejected.json()["ticket"]["due_at"]

    corrected = _request(tiny_home, "API-3")
    mismatch = _send(client, "PUT", "/v1/requests/API-4", corrected)
    assert mismatch.json()["error"]["reason_code"] == "ticket_mismatch"
    revised = _send(client, "PUT", "/v1/requests/API-3", corrected)
    assert revised.status_code == 200, revised.text
    assert (revised.json()["status"], revised.json()["revision"], revised.json()["due_at"]) == ("received", 2, due)
    events = _events(settings, "API-3")
    assert [e for e, _ in events] == ["request_rejected", "request_revised", "status_changed"]
    assert events[1][1]["revision"] == 2 and (events[2][1]["from"], events[2][1]["to"]) == ("rejected", "received")

    again = _send(client, "PUT", "/v1/requests/API-3", {**corrected, "notes": "again"}, now=time.time() + 1)
    assert (again.status_code, again.json()["error"]["reason_code"]) == (409, "not_revisable")
    unknown = _send(client, "PUT", "/v1/requests/API-9", _request(tiny_home, "API-9"))
    assert (unknown.status_code, unknown.json()["error"]["reason_code"]) == (404, "unknown_ticket")

    # the CLI's equivalent
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_request(tiny_home, "API-5", target_model="models:/nope@champion")))
    cli = CliRunner()
    assert cli.invoke(cli_app, ["--home", str(tiny_home), "--profile", "tiny", "submit", str(path)]).exit_code == 2
    path.write_text(yaml.safe_dump(_request(tiny_home, "API-5")))
    result = cli.invoke(cli_app, ["--home", str(tiny_home), "--profile", "tiny", "submit", "--revise", str(path)])
    assert result.exit_code == 0 and "received (revised)" in result.output


class _Receiver(BaseHTTPRequestHandler):
    """A ticketing system's callback endpoint that fails its first call."""

    calls: list = []

    def do_POST(self):  # noqa: N802 - the http.server API
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Receiver.calls.append((dict(self.headers), body))
        self.send_response(500 if len(_Receiver.calls) == 1 else 204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_status_changes_reach_the_callback_signed_and_in_order_with_retries(intake, tiny_home):
    client, settings = intake
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/expunge"
        wrong = _request(tiny_home, "API-6", target_model="models:/no-such-model@champion", callback_url=url)
        assert _send(client, "POST", "/v1/requests", wrong).status_code == 422
        assert _send(client, "PUT", "/v1/requests/API-6", {**wrong, "target_model": _request(
            tiny_home, "x")["target_model"]}).status_code == 200

        now = datetime.now(timezone.utc)
        first = deliver_due(settings, now)
        assert first["failed"] == 1 and first["delivered"] == 0  # the receiver failed; the second change waits
        assert deliver_due(settings, now)["failed"] == 0  # not due before its backoff
        later = deliver_due(settings, now + retry_delay(1) + timedelta(seconds=1))
        assert later == {"delivered": 2, "failed": 0, "given_up": 0}
    finally:
        server.shutdown()

    statuses = []
    for headers, body in _Receiver.calls[1:]:
        verify(SECRET.encode(), headers, body)  # signed with the shared secret
        statuses.append(json.loads(body)["status"])
    assert statuses == ["rejected", "received"]
    assert "Ulverde" not in b"".join(body for _, body in _Receiver.calls).decode()
    attempts = [p for e, p in _events(settings, "API-6") if e == "callback_attempt"]
    assert [(a["outcome"], a["http_status"], a["attempt"]) for a in attempts] == [
        ("failed", 500, 1), ("delivered", 204, 2), ("delivered", 204, 1)]
    assert all(url not in json.dumps(a) for a in attempts)
    with session_scope(settings.db_url) as session:
        rows = session.scalars(select(CallbackDelivery).where(CallbackDelivery.ticket_id == "API-6")).all()
        assert all(r.delivered_at is not None for r in rows)


def test_with_no_callback_waiting_nothing_is_created_or_sent(tmp_path, monkeypatch):
    monkeypatch.delenv("EXPUNGE_WEBHOOK_SECRET", raising=False)
    settings = Settings(home=tmp_path, profile_name="tiny")
    assert deliver_due(settings) == {"delivered": 0, "failed": 0, "given_up": 0}
    assert not (tmp_path / "webhook.key").exists()  # `expunge run` asks every time: no secret made for nothing
