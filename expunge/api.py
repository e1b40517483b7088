"""`expunge serve`: the HTTP intake a ticketing system or privacy platform files requests through.

Every call is signed (`expunge.webhooks`: HMAC-SHA256 of `<timestamp>.<body>`, the body of a GET being its path)
and a signed message is accepted once. A POST is idempotent on the ticket id: the same request again gets the
same ticket back, a different one under that id is a 409. A rejected ticket is corrected with a PUT (a new
revision). Answers carry ids, status, dates, the model URI and gate verdicts, never the subject; errors are JSON
with a reason code. The schema is served at /openapi.json.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from datetime import datetime, timedelta, timezone
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from starlette.exceptions import HTTPException as StarletteHTTPException

from db import requests_repo
from db.models import WebhookReceipt
from expunge import service
from expunge.requests import MAX_REQUEST_BYTES
from expunge.settings import Settings
from expunge.webhooks import TOLERANCE_SECONDS, SignatureError, verify


class Gate(BaseModel):
    gate: str
    passed: bool | None
    value: float | None = None
    threshold: float | None = None


class Ticket(BaseModel):
    ticket_id: str
    revision: int
    type: str
    regulation: str
    status: str
    reason_code: str | None
    received_at: datetime
    due_at: datetime
    completed_at: datetime | None
    model_uri: str | None
    gates: list[Gate]


class ErrorDetail(BaseModel):
    reason_code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail
    ticket: Ticket | None = None


class ApiError(Exception):
    def __init__(self, status: int, reason_code: str, message: str, ticket: Ticket | None = None):
        super().__init__(message)
        self.status, self.reason_code, self.message, self.ticket = status, reason_code, message, ticket


def ticket_view(settings: Settings, ticket_id: str) -> Ticket | None:
    with settings.db_session() as session:
        request = requests_repo.get_request_any_case(session, ticket_id)
        if request is None:
            return None
        metrics = json.loads(request.metrics_json) if request.metrics_json else {}
        gates = [Gate(gate=g["gate"], passed=g.get("passed"), value=g.get("value"), threshold=g.get("threshold"))
                 for g in metrics.get("gates", [])]
        return Ticket(ticket_id=request.ticket_id, revision=request.revision, type=request.request_type,
                      regulation=request.regulation, status=request.status, reason_code=request.reason_code,
                      received_at=request.received_at, due_at=request.due_at, completed_at=request.completed_at,
                      model_uri=request.result_model_uri, gates=gates)


def _accept_once(settings: Settings, message_key: str) -> None:
    """The replay guard: a signed call seen within the tolerance window is refused."""
    now = datetime.now(timezone.utc)
    with settings.db_session() as session:
        session.execute(delete(WebhookReceipt).where(
            WebhookReceipt.received_at < now - timedelta(seconds=2 * TOLERANCE_SECONDS)))
    try:
        with settings.db_session() as session:
            session.add(WebhookReceipt(signature_sha256=hashlib.sha256(message_key.encode()).hexdigest(),
                                       received_at=now))
    except IntegrityError:
        raise ApiError(409, "replayed", "this signed message was already received; sign each send anew") from None


async def _signed_body(request: Request, settings: Settings, replay_guard: bool) -> bytes:
    body = await request.body()
    if len(body) > MAX_REQUEST_BYTES:
        raise ApiError(413, "request_too_large", f"the body is {len(body)} bytes; at most {MAX_REQUEST_BYTES}")
    signed = body if request.method in ("POST", "PUT") else request.url.path.encode()
    try:
        signature = verify(settings.webhook_secret(), request.headers, signed)
    except SignatureError as exc:
        raise ApiError(401, exc.reason_code, str(exc)) from None
    if replay_guard:  # keyed by the call too: the same body sent to another path is another message
        _accept_once(settings, f"{request.method} {request.url.path} {signature}")
    return body


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "malformed_json", "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "malformed_json", "the body must be a JSON object of request fields")
    return data


def _answer(settings: Settings, result: service.SubmitResult, created_status: int) -> JSONResponse:
    """A submission's outcome as HTTP: stored tickets are returned, refusals are errors with a reason code."""
    ticket = ticket_view(settings, result.ticket_id) if result.ticket_id else None
    if result.reason_code == "duplicate_ticket":
        if result.details.get("same_content") and ticket is not None:
            return JSONResponse(ticket.model_dump(mode="json"), 200, headers={"Idempotent-Replayed": "true"})
        raise ApiError(409, "duplicate_ticket", result.message)
    if result.reason_code in ("not_revisable", "unknown_ticket"):
        raise ApiError(409 if result.reason_code == "not_revisable" else 404, result.reason_code, result.message)
    if result.status in ("received", "needs_review"):
        return JSONResponse(ticket.model_dump(mode="json"), created_status)
    stored = ticket if result.status == "rejected" else None
    raise ApiError(422, result.reason_code or "rejected", result.message, stored)


def _error_response(exc: ApiError) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(reason_code=exc.reason_code, message=exc.message), ticket=exc.ticket)
    return JSONResponse(body.model_dump(mode="json", exclude_none=True), exc.status)


ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 409, 413, 422)}


def create_app(settings: Settings, deliver_every: float | None = 5.0) -> FastAPI:
    """The intake app. With `deliver_every`, a background thread sends the due status callbacks that often."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        stop = threading.Event()
        worker = None
        if deliver_every:
            from expunge.callbacks import deliver_due

            def deliver_loop() -> None:
                while not stop.wait(deliver_every):
                    with contextlib.suppress(Exception):  # a database hiccup: the rows stay due, next round
                        deliver_due(settings)

            worker = threading.Thread(target=deliver_loop, name="expunge-callbacks", daemon=True)
            worker.start()
        yield
        stop.set()
        if worker is not None:
            worker.join(timeout=deliver_every + 15)

    app = FastAPI(title="expunge intake", version="1", lifespan=lifespan,
                  description="Erasure and takedown requests from a ticketing system, signed with a shared secret.")

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error_response(ApiError(exc.status_code, code, str(exc.detail)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(ApiError(400, "invalid_call", "the call's path or parameters are invalid"))

    @app.post("/v1/requests", status_code=201, response_model=Ticket, responses=ERRORS)
    async def file_request(request: Request) -> JSONResponse:
        """File a request (the request YAML's fields as JSON). 201: stored; 200: the same request again."""
        body = await _signed_body(request, settings, replay_guard=True)
        _json_object(body)
        return _answer(settings, await _in_thread(service.submit_bytes, settings, body), 201)

    @app.put("/v1/requests/{ticket_id}", response_model=Ticket, responses=ERRORS)
    async def revise_request(ticket_id: str, request: Request) -> JSONResponse:
        """Correct a rejected (or never processed needs_review) ticket: a new revision, audited."""
        body = await _signed_body(request, settings, replay_guard=True)
        given = str(_json_object(body).get("ticket_id", ""))
        if given.lower() != ticket_id.lower():
            raise ApiError(400, "ticket_mismatch", "the body's ticket_id must be the ticket in the path")
        return _answer(settings, await _in_thread(service.submit_bytes, settings, body, True), 200)

    @app.get("/v1/requests/{ticket_id}", response_model=Ticket, responses=ERRORS)
    async def get_request(ticket_id: str, request: Request) -> Ticket:
        """Status, reason code, due date, model URI and gate verdicts of a ticket."""
        await _signed_body(request, settings, replay_guard=False)
        ticket = await _in_thread(ticket_view, settings, ticket_id)
        if ticket is None:
            raise ApiError(404, "unknown_ticket", f"no request with ticket id {ticket_id!r}")
        return ticket

    return app


async def _in_thread(function, *args):
    """Intake validation reads the corpus: off the event loop, so other calls are answered meanwhile."""
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(function, *args)
