"""What the CLI (and any other front door) does: submit, run, report status, verify the audit log.

Functions here return plain results and raise `RequestError` for user errors; presentation is the CLI's.
"""
from __future__ import annotations

import contextlib
import hmac
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError

from db import requests_repo, verify_chain
from db.audit import canonical_json
from expunge.requests import MAX_REQUEST_BYTES, RequestError, RequestSpec, decode_request, due_date, parse_request
from expunge.settings import Settings

def supported_methods() -> tuple[str, ...]:
    from expunge_ml.methods.registry import METHODS

    return tuple(METHODS)

# Exit codes, stable for scripts.
EXIT_OK, EXIT_INTERNAL, EXIT_INVALID, EXIT_DUPLICATE, EXIT_NEEDS_REVIEW, EXIT_RUN_FAILED = 0, 1, 2, 3, 4, 5


@dataclass
class SubmitResult:
    ticket_id: str | None
    status: str
    reason_code: str | None
    message: str
    exit_code: int
    details: dict[str, Any] = field(default_factory=dict)


def _spec_hmac(settings: Settings, spec_json: str) -> str:
    return hmac.new(settings.hmac_key(), spec_json.encode(), "sha256").hexdigest()


def _configure_registry(settings: Settings) -> None:
    from models_registry.registry import configure

    settings.apply_environment()
    configure(settings.mlflow_uri, settings.artifact_root, settings.adapter_seal_key())


def submit(settings: Settings, path: Path, revise: bool = False) -> SubmitResult:
    """Validate and store a request file. Invalid → `rejected`; no matching records → `needs_review`."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_REQUEST_BYTES + 1)
    except OSError as exc:
        return SubmitResult(None, "not_stored", "unreadable_file", f"cannot read {path}: {exc.strerror}", EXIT_INVALID)
    return submit_bytes(settings, raw, revise)


def submit_bytes(settings: Settings, raw: bytes, revise: bool = False) -> SubmitResult:
    """Validate and store a request (YAML or JSON). With `revise`, it corrects a rejected or needs_review ticket of
    the same id (a new revision, audited; the due date stays the first receipt's); a processed ticket stays as it
    was. The same request twice is a duplicate, never queued again."""
    received_at = datetime.now(timezone.utc)
    try:
        spec = parse_request(decode_request(raw))
    except RequestError as exc:
        if revise:  # the ticket keeps its last revision
            return SubmitResult(exc.ticket_id, "not_stored", exc.reason_code, f"revision rejected: {exc}", EXIT_INVALID)
        return _reject_unparsed(settings, exc, received_at)
    spec_json = canonical_json(spec.model_dump(mode="json"))
    with settings.db_session() as session:
        existing = requests_repo.get_request_any_case(session, spec.ticket_id)
        refusal = _refuse_existing(settings, spec, spec_json, existing, revise)
        if refusal is not None:
            return refusal
        due = existing.due_at if revise else due_date(spec.regulation, received_at)
    status, reason_code, message, details = _validate(settings, spec)
    audit_payload = {
        "ticket_id": spec.ticket_id,
        "type": spec.type,
        "regulation": spec.regulation,
        "target_model": spec.target_model,
        "method": spec.method,
        "status": status,
        "reason_code": reason_code,
        "spec_hmac": _spec_hmac(settings, spec_json),
        "subject_hmacs": _subject_fingerprints(settings, spec),
        **({"forget_count": details["forget_count"]} if details else {}),
    }
    try:
        _store(settings, spec, spec_json, received_at, due, status, reason_code, message, audit_payload, revise)
    except IntegrityError:  # submitted at the same moment by another process: the first one is stored
        return SubmitResult(spec.ticket_id, "not_stored", "duplicate_ticket",
                            f"ticket {spec.ticket_id} was submitted concurrently; not queued again", EXIT_DUPLICATE)
    except requests_repo.IllegalRevision as exc:  # processed by another runner between the check and the write
        return SubmitResult(spec.ticket_id, "not_stored", "not_revisable", str(exc), EXIT_DUPLICATE)
    revised = " (revised)" if revise else ""
    if status == "received":
        message = (f"ticket {spec.ticket_id} received{revised}: {details['forget_count']} matching records, "
                   f"due {due:%Y-%m-%d}")
        return SubmitResult(spec.ticket_id, status, None, message, EXIT_OK, details)
    code = EXIT_NEEDS_REVIEW if status == "needs_review" else EXIT_INVALID
    return SubmitResult(spec.ticket_id, status, reason_code, f"ticket {spec.ticket_id} {status}{revised}: {message}",
                        code, details)


def _refuse_existing(settings: Settings, spec: RequestSpec, spec_json: str, existing, revise: bool) -> SubmitResult | None:
    """Why this request cannot be stored given the ticket already there (None: it can)."""
    same = existing is not None and hmac.compare_digest(existing.spec_hash, _spec_hmac(settings, spec_json))
    if revise:
        if existing is None:
            return SubmitResult(spec.ticket_id, "not_stored", "unknown_ticket",
                                f"no ticket {spec.ticket_id} to revise; submit it without --revise", EXIT_INVALID)
        if existing.status not in requests_repo.REVISABLE:
            return SubmitResult(existing.ticket_id, existing.status, "not_revisable",
                                f"ticket {existing.ticket_id} is {existing.status}: only a rejected, needs_review or "
                                "reopened ticket can be revised; file a new ticket", EXIT_DUPLICATE)
        if not same or existing.status == "reopened":  # a reopened erasure is filed again as it was
            return None
    if existing is None:
        return None
    message = (
        f"ticket {existing.ticket_id} was already submitted (status {existing.status}); not queued again"
        if same else
        f"ticket {existing.ticket_id} already exists with different content (ticket ids are compared "
        "without case); use a new ticket id, or --revise a rejected one"
    )
    return SubmitResult(spec.ticket_id, existing.status, "duplicate_ticket", message, EXIT_DUPLICATE,
                        {"same_content": same})


def _subject_fingerprints(settings: Settings, spec: RequestSpec) -> dict[str, list[str]]:
    from expunge.intake import subject_fingerprints

    return subject_fingerprints(settings.hmac_key(), spec)


def _validate(settings: Settings, spec: RequestSpec) -> tuple[str, str | None, str, dict]:
    """(status, reason code, message, details) of a parsed request: its method, model, corpus and subject.
    The registry and the corpus reader load here, not with the module: `expunge status` needs neither."""
    from expunge.intake import corpus_spec_for, load_records, match_subject, target_for

    try:
        if spec.method not in supported_methods():
            raise RequestError("unknown_method", f"unknown method {spec.method!r} (supported: {', '.join(supported_methods())})")
        _configure_registry(settings)
        target = target_for(spec)
        records, _ = load_records(corpus_spec_for(spec, target), spec.ticket_id)
        match = match_subject(spec, records)
    except RequestError as exc:
        return "rejected", exc.reason_code, str(exc), {}
    details = {"forget_count": len(match.forget_ids), "matched_by": match.matched_by}
    if not match.forget_ids:
        return ("needs_review", "subject_not_found",
                "the subject matches no training record (check names/aliases/identifiers)", details)
    return "received", None, "", details


def _store(settings: Settings, spec: RequestSpec, spec_json: str, received_at: datetime, due: datetime, status: str,
           reason_code: str | None, message: str, audit_payload: dict, revise: bool = False) -> None:
    fields = dict(request_type=spec.type, regulation=spec.regulation, spec=json.loads(spec_json),
                  target_model_uri=spec.target_model, spec_hash=_spec_hmac(settings, spec_json), status=status,
                  reason_code=reason_code, reason_detail=message or None, callback_url=spec.callback_url,
                  audit_payload=audit_payload)
    with settings.db_session() as session:
        if revise:
            existing = requests_repo.get_request_any_case(session, spec.ticket_id)
            requests_repo.revise_request(session, existing, **fields)
        else:
            requests_repo.create_request(session, ticket_id=spec.ticket_id, received_at=received_at, due_at=due,
                                         **fields)


def _reject_unparsed(settings: Settings, exc: RequestError, received_at: datetime) -> SubmitResult:
    """A request we cannot parse is still recorded as rejected when its ticket id is readable and new."""
    ticket = exc.ticket_id
    if ticket:
        with contextlib.suppress(IntegrityError), settings.db_session() as session:
            if requests_repo.get_request_any_case(session, ticket) is None:
                requests_repo.create_request(
                    session, ticket_id=ticket, request_type="unknown", regulation="unknown", spec={},
                    target_model_uri="", received_at=received_at, due_at=received_at, status="rejected",
                    reason_code=exc.reason_code, reason_detail=str(exc),
                    audit_payload={"ticket_id": ticket, "status": "rejected", "reason_code": exc.reason_code},
                )
    prefix = f"ticket {ticket} rejected: " if ticket else "request rejected: "
    return SubmitResult(ticket, "rejected" if ticket else "not_stored", exc.reason_code, prefix + str(exc), EXIT_INVALID)


def pending_tickets(settings: Settings) -> list[str]:
    """Received tickets nobody holds, and any whose runner's lease ran out, earliest due date first."""
    with settings.db_session() as session:
        return requests_repo.runnable(session)


def run_request(settings: Settings, ticket_id: str) -> dict:
    """Run the `process_request` flow for one received request (locally, Prefect ephemeral mode), or take up one
    whose runner's lease ran out. The flow claims it first: status `skipped` when another runner got there."""
    from db.models import IN_PROGRESS

    with settings.db_session() as session:
        request = requests_repo.get_request(session, ticket_id)
        if request is None:
            raise RequestError("unknown_ticket", f"no request with ticket id {ticket_id!r}")
        if request.status in IN_PROGRESS and not requests_repo.is_runnable(session, ticket_id):
            raise RequestError("held", f"ticket {ticket_id} is {request.status}, held by runner "
                               f"{request.claimed_by} until {request.lease_expires_at:%Y-%m-%d %H:%M:%S} UTC")
        if request.status == "received" and requests_repo.target_busy(session, ticket_id):
            raise RequestError("target_busy", f"another erasure on {request.target_model_uri} is running; ticket "
                               f"{ticket_id} waits for it (the next run takes it up)")
        if request.status != "received" and request.status not in IN_PROGRESS:
            hint = " (`expunge requeue` takes it up again)" if request.status in REQUEUABLE else ""
            raise RequestError("not_runnable", f"ticket {ticket_id} is {request.status}, not received; "
                               f"nothing to run{hint}")
        method = RequestSpec.model_validate_json(request.spec_json).method
    settings.apply_environment()
    from flows.process_request import process_request

    return process_request(ticket_id=ticket_id, home=str(settings.home), profile=settings.profile_name, method=method)


REQUEUABLE = ("failed", "needs_review")
# Statuses in which a ticket may rest for good: after the profile's `privacy.retention_days` without a change,
# its row stops naming the subject (a requeued ticket then matches nothing and comes back to review).
RESTING = ("rejected", "failed_gates", "needs_review", "failed", "release_rejected", "released")


def purge_resting_subjects(settings: Settings, now: datetime | None = None) -> list[str]:
    """Hash the subject terms of every ticket resting longer than the retention period; the tickets purged."""
    from datetime import timedelta

    from expunge.intake import purge_subject_row

    days = settings.retention_days
    cutoff = (now or datetime.now(timezone.utc)) - timedelta(days=days)
    purged = []
    with settings.db_session() as session:
        for request in requests_repo.list_requests(session):
            if request.status in RESTING and request.updated_at < cutoff and purge_subject_row(
                    session, request, settings.hmac_key(), f"retention_{days:g}_days"):
                purged.append(request.ticket_id)
    return purged


def requeue(settings: Settings, ticket_id: str, reason: str, operator: str) -> None:
    """An operator sends a failed or needs_review ticket back to `received` (audited: who, and the reason's keyed
    hash, since free text may name the subject)."""
    with settings.db_session() as session:
        request = requests_repo.get_request(session, ticket_id)
        if request is None:
            raise RequestError("unknown_ticket", f"no request with ticket id {ticket_id!r}")
        if request.status not in REQUEUABLE:
            raise RequestError("not_requeueable", f"ticket {ticket_id} is {request.status}: only a "
                               f"{' or '.join(REQUEUABLE)} ticket can be requeued")
        requests_repo.set_status(session, request, "received", reason_code="requeued",
                                 audit_payload={"operator": operator, "reason_hmac": _spec_hmac(settings, reason)})


def extend_due_date(settings: Settings, ticket_id: str, amount: int, reason: str, reviewer: str) -> dict[str, Any]:
    """Push an open ticket's due date back by `amount` units of its regulation's extension (GDPR: months, CCPA:
    days), within the total the regulation allows; audited with the reviewer and the reason's keyed hash."""
    from expunge.requests import EXTENSIONS

    if not reviewer.strip():
        raise RequestError("no_reviewer", "an extension needs the reviewer's name (--reviewer)")
    with settings.db_session() as session:
        request = requests_repo.get_request_any_case(session, ticket_id)
        if request is None:
            raise RequestError("unknown_ticket", f"no request with ticket id {ticket_id!r}")
        if request.status in CLOSED:
            raise RequestError("closed_ticket", f"ticket {request.ticket_id} is {request.status}: nothing is due")
        unit, allowed = EXTENSIONS.get(request.regulation.upper(), (None, 0))
        if unit is None:
            raise RequestError("no_extension", f"{request.regulation} provides no extension of the due date")
        before = sum(e["amount"] for e in requests_repo.events_of(session, request.ticket_id, "due_date_extended"))
        if amount < 1 or before + amount > allowed:
            raise RequestError("extension_exceeded", f"{request.regulation} allows {allowed} {unit} in all; "
                               f"{before} already granted, {amount} asked")
        old_due, request.due_at = request.due_at, due_date(request.regulation, request.received_at, before + amount)
        requests_repo.record_event(session, request.ticket_id, "due_date_extended", {
            "amount": amount, "unit": unit, "total": before + amount, "from": old_due.isoformat(),
            "to": request.due_at.isoformat(), "reviewer": reviewer, "reason_hmac": _spec_hmac(settings, reason)})
        return {"ticket_id": request.ticket_id, "from": old_due, "to": request.due_at, "unit": unit,
                "total": before + amount, "allowed": allowed}


def release(settings: Settings, ticket_id: str, decision: str, reviewer: str, note: str = "",
            accept_unsettled: bool = False) -> dict:
    """A reviewer's decision on a completed request: "approve" makes its version the `champion`,
    "reject" withdraws it. Raises RequestError (one line, exit 2) when the decision cannot apply, including an
    approval of gates that passed within their interval unless `accept_unsettled`."""
    settings.apply_environment()
    from flows.release import release_decision

    note_hmac = _spec_hmac(settings, note) if note else None  # the note may name the subject
    result = release_decision(ticket_id=ticket_id, home=str(settings.home), profile=settings.profile_name,
                              decision=decision, reviewer=reviewer, note_hmac=note_hmac,
                              accept_unsettled=accept_unsettled)
    if result["status"] == "refused":
        raise RequestError(result["reason_code"], result["message"], ticket_id)
    form = {"decision": decision, "reviewer": reviewer, "accept_unsettled": accept_unsettled}
    result["review_runs_resumed"] = [run for ticket in [ticket_id, *result.get("batch_mates", [])]
                                     if (run := resume_review_run(settings, ticket, form))]
    return result


def resume_review_run(settings: Settings, ticket_id: str, form: dict) -> str | None:
    """The ticket's review run waiting in Prefect (`review_awaited`), resumed with the decision just made, so it
    ends (it finds the ticket decided); its id, or None when there is none or it no longer waits."""
    with settings.db_session() as session:
        awaited = requests_repo.latest_event(session, ticket_id, "review_awaited")
    if awaited is None:
        return None
    from uuid import UUID

    from prefect.flow_runs import resume_flow_run

    try:
        resume_flow_run(UUID(awaited["flow_run_id"]), run_input=form)
    except Exception:  # noqa: BLE001 - resumed from the UI already, or another server: the decision stands
        return None
    return awaited["flow_run_id"]


def rollback(settings: Settings, model_name: str, reviewer: str, reason: str, to_version: str | None = None) -> dict:
    """Serve an earlier version of `model_name` as `champion` again; every erasure released after it is reopened.
    Raises RequestError when it cannot apply (no champion, a version that is not an ancestor)."""
    if not reviewer.strip():
        raise RequestError("no_reviewer", "a rollback needs the reviewer's name (--reviewer)")
    _configure_registry(settings)
    from flows.release import rollback_champion

    result = rollback_champion(model_name=model_name, home=str(settings.home), profile=settings.profile_name,
                               reviewer=reviewer, reason_hmac=_spec_hmac(settings, reason), to_version=to_version)
    if result["status"] == "refused":
        raise RequestError(result["reason_code"], result["message"])
    return result


# Erasures the next base trained from scratch must leave out: served ones, and those a rollback reopened.
EXCLUDED_STATUSES = ("released", "reopened")


def exclusion_rows(settings: Settings) -> list[dict[str, Any]]:
    """One row per record of every released (or reopened) erasure: ticket, record id and the record's keyed content
    hash (`forget_manifest.json`), for the team that trains the next base. A ticket whose manifest is missing is
    listed with `record_id` None, so the gap is visible."""
    with settings.db_session() as session:
        tickets = [(r.ticket_id, r.status, r.regulation, r.target_model_uri)
                   for r in requests_repo.list_requests(session) if r.status in EXCLUDED_STATUSES]
    rows = []
    for ticket, status, regulation, target in tickets:
        manifest = settings.ticket_dir(ticket) / "forget_manifest.json"
        common = {"ticket_id": ticket, "status": status, "regulation": regulation, "target_model": target}
        records = json.loads(manifest.read_text())["records"] if manifest.exists() else [None]
        rows += [{**common, "record_id": r and r["record_id"], "content_hmac": r and r["content_hmac"]}
                 for r in records]
    return rows


CLOSED = ("released", "rejected", "release_rejected")  # no obligation left open (the erasure is served, or refused)


def parse_span(text: str) -> float:
    """"7d", "36h" or "90m" → days."""
    units = {"d": 1.0, "h": 1 / 24, "m": 1 / 1440}
    if len(text) < 2 or text[-1] not in units or not text[:-1].replace(".", "", 1).isdigit():
        raise RequestError("bad_span", f"expected a span like 7d, 36h or 90m, got {text!r}")
    return float(text[:-1]) * units[text[-1]]


def due_rows(rows: list[dict[str, Any]], overdue: bool, within_days: float | None,
             now: datetime | None = None) -> list[dict[str, Any]]:
    """Open tickets past their due date (`overdue`) or due within `within_days`, most urgent first."""
    from datetime import timedelta

    now = now or datetime.now(timezone.utc)
    limit = now if overdue else now + timedelta(days=within_days or 0)
    chosen = [r for r in rows if r["status"] not in CLOSED and datetime.fromisoformat(r["due_at"]) <= limit]
    return sorted(chosen, key=lambda r: r["due_at"])


def request_rows(settings: Settings, ticket_id: str | None = None) -> list[dict[str, Any]]:
    with settings.db_session() as session:
        if ticket_id is None:
            requests = requests_repo.list_requests(session)
        else:
            requests = [r for r in (requests_repo.get_request(session, ticket_id),) if r is not None]
            if not requests:
                raise RequestError("unknown_ticket", f"no request with ticket id {ticket_id!r}")
        return [requests_repo.request_row(r) for r in requests]


def model_lineage(settings: Settings, uri: str) -> list[dict[str, Any]]:
    """A registered version and the versions it was built on, newest first (`models_registry.registry.lineage`)."""
    from models_registry.registry import ModelNotFound, lineage

    _configure_registry(settings)
    try:
        return lineage(uri)
    except ModelNotFound as exc:
        raise RequestError("unknown_model", str(exc)) from exc


def verify_audit(settings: Settings, expected_head: str | None = None):
    """The chain recomputed, every event's seal checked with the deployment key, and the head checked against the
    anchor kept outside the database (`db/anchor.py`)."""
    from db.anchor import read_anchor

    with settings.db_session() as session:
        return verify_chain(session, expected_head=expected_head, anchor=read_anchor(settings.db_url),
                            seal_key=settings.audit_seal_key())
