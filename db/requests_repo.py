"""Request lifecycle persistence.

Every status change is written three ways in ONE transaction: the Request row,
a StatusChange history row, and an audit event. Audit payloads must contain
only hashed / non-identifying data; spec_json (which holds subject
identifiers) never goes into the audit log, since the log can never be erased.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, func, or_, select, text, update
from sqlalchemy.orm import Session, aliased

from db.audit import append_event, canonical_json
from db.models import (
    IN_PROGRESS, AuditEvent, CallbackDelivery, Request, RequestStatus, StatusChange, check_transition, utcnow,
)

# Statuses under which a newly created request is logged as rejected.
_REJECTED_ON_INTAKE = frozenset({RequestStatus.rejected.value, RequestStatus.needs_review.value})


def _status_value(status: str | RequestStatus) -> str:
    """Validate and normalise to the plain string stored in the DB."""
    try:
        return RequestStatus(status).value
    except ValueError:
        raise ValueError(
            f"unknown request status {status!r}; expected one of "
            f"{[s.value for s in RequestStatus]}"
        ) from None


def create_request(
    session: Session,
    *,
    ticket_id: str,
    request_type: str,
    regulation: str,
    spec: dict[str, Any],
    target_model_uri: str,
    received_at: datetime,
    due_at: datetime,
    status: str | RequestStatus = RequestStatus.received,
    reason_code: str | None = None,
    reason_detail: str | None = None,
    audit_payload: dict[str, Any],
    spec_hash: str | None = None,
    callback_url: str | None = None,
) -> Request:
    """Insert a request with its initial history row and intake audit event.

    A duplicate ``ticket_id`` raises ``sqlalchemy.exc.IntegrityError`` at the
    flush below (before any audit event is written). ``spec_hash`` lets the caller
    store a keyed hash instead of the default plain sha256 of the spec.
    """
    status_v = _status_value(status)
    check_transition(None, status_v)
    spec_json = canonical_json(spec)
    now = utcnow()
    req = Request(
        ticket_id=ticket_id,
        request_type=request_type,
        regulation=regulation,
        status=status_v,
        reason_code=reason_code,
        reason_detail=reason_detail,
        spec_json=spec_json,
        spec_hash=spec_hash or hashlib.sha256(spec_json.encode("utf-8")).hexdigest(),
        target_model_uri=target_model_uri,
        received_at=received_at,
        due_at=due_at,
        updated_at=now,
        callback_url=callback_url,
    )
    req.status_history.append(
        StatusChange(
            from_status=None,
            to_status=status_v,
            reason_code=reason_code,
            detail=reason_detail,
            at=now,
        )
    )
    session.add(req)
    session.flush()

    event_type = "request_rejected" if status_v in _REJECTED_ON_INTAKE else "request_received"
    append_event(session, event_type, dict(audit_payload), ticket_id=ticket_id)
    enqueue_callback(session, req, now)
    return req


# A ticket whose request was never processed, and so can be corrected under its own id; or whose erasure a rollback
# undid, re-filed under its own id (the row no longer names the subject).
REVISABLE = frozenset({RequestStatus.rejected.value, RequestStatus.needs_review.value, RequestStatus.reopened.value})


def revise_request(
    session: Session, request: Request, *, request_type: str, regulation: str, spec: dict[str, Any],
    target_model_uri: str, spec_hash: str, status: str, reason_code: str | None, reason_detail: str | None,
    callback_url: str | None, audit_payload: dict[str, Any],
) -> Request:
    """Replace a rejected (or never processed needs_review) ticket's request by its corrected revision: the
    status change and a `request_revised` event are audited, the due date stays the first receipt's."""
    if request.status not in REVISABLE:
        raise IllegalRevision(f"ticket {request.ticket_id} is {request.status}: only a rejected, needs_review or "
                              "reopened ticket can be revised")
    request.request_type, request.regulation = request_type, regulation
    request.spec_json, request.spec_hash = canonical_json(spec), spec_hash
    request.target_model_uri, request.callback_url = target_model_uri, callback_url
    request.revision += 1
    append_event(session, "request_revised", {**audit_payload, "revision": request.revision}, ticket_id=request.ticket_id)
    set_status(session, request, status, reason_code=reason_code, detail=reason_detail)
    return request


class IllegalRevision(ValueError):
    """A revision of a ticket that was processed (or is being processed): its request stays as it was."""


def callback_payload(request: Request, at: datetime) -> dict[str, Any]:
    """What a request's callback receives on a status change: ids, status, dates and model URI, no subject text."""
    return {"ticket_id": request.ticket_id, "revision": request.revision, "status": request.status,
            "reason_code": request.reason_code, "due_at": request.due_at.isoformat(),
            "model_uri": request.result_model_uri, "at": at.isoformat()}


def enqueue_callback(session: Session, request: Request, at: datetime) -> None:
    """Write the status change's callback in the same transaction as the change (delivered by `expunge.callbacks`)."""
    if request.callback_url:
        session.add(CallbackDelivery(ticket_id=request.ticket_id, payload_json=canonical_json(
            callback_payload(request, at)), attempts=0, next_attempt_at=at))


def get_request(session: Session, ticket_id: str) -> Request | None:
    return session.scalar(select(Request).where(Request.ticket_id == ticket_id))


def get_request_any_case(session: Session, ticket_id: str) -> Request | None:
    """The request whose ticket id equals ``ticket_id`` ignoring case: `I-1` and `i-1` are one ticket."""
    return session.scalars(
        select(Request).where(func.lower(Request.ticket_id) == ticket_id.lower()).limit(1)).first()


def list_requests(session: Session) -> list[Request]:
    """All requests, oldest first."""
    return list(session.scalars(select(Request).order_by(Request.received_at, Request.id)))


def request_row(request: Request) -> dict[str, Any]:
    """A request as plain JSON-ready data: status, reason, dates, model URI, key metrics and status history.
    The spec (which names the subject) is left out."""
    return {
        "ticket_id": request.ticket_id, "type": request.request_type, "regulation": request.regulation,
        "status": request.status, "reason_code": request.reason_code, "reason": request.reason_detail,
        "received_at": request.received_at.isoformat(), "due_at": request.due_at.isoformat(),
        "completed_at": request.completed_at.isoformat() if request.completed_at else None,
        "target_model": request.target_model_uri, "model_uri": request.result_model_uri,
        "metrics": json.loads(request.metrics_json) if request.metrics_json else None,
        "history": [
            {"at": h.at.isoformat(), "from": h.from_status, "to": h.to_status, "reason_code": h.reason_code}
            for h in request.status_history
        ],
    }


def set_status(
    session: Session,
    request: Request,
    new_status: str | RequestStatus,
    *,
    reason_code: str | None = None,
    detail: str | None = None,
    audit_payload: dict[str, Any] | None = None,
    runner: str | None = None,
) -> None:
    """Move ``request`` to ``new_status``, recording history and an audit event. With ``runner``, only while
    that runner still holds the ticket's claim (`claim`): a runner whose lease ran out cannot write over the run
    that took the ticket up.

    ``reason_code``/``detail`` overwrite the request's current reason fields
    (None clears them), so they always describe the latest transition.
    """
    new_v = _status_value(new_status)
    old_v = request.status
    if runner is not None and request.claimed_by != runner:
        raise LeaseLost(f"ticket {request.ticket_id} is no longer held by this runner (its lease ran out and "
                        "another run took it up)")
    check_transition(old_v, new_v)
    now = utcnow()
    if new_v not in IN_PROGRESS and new_v != RequestStatus.received.value:  # settled: nobody works on it now
        request.claimed_by, request.lease_expires_at = None, None

    request.status = new_v
    request.reason_code = reason_code
    request.reason_detail = detail
    request.updated_at = now
    if new_v == RequestStatus.completed.value:
        request.completed_at = now
    request.status_history.append(
        StatusChange(
            from_status=old_v,
            to_status=new_v,
            reason_code=reason_code,
            detail=detail,
            at=now,
        )
    )
    session.flush()

    # the transition's own keys last: a caller's payload cannot make the log tell another transition
    payload: dict[str, Any] = {**(audit_payload or {}), "from": old_v, "to": new_v, "reason_code": reason_code}
    append_event(session, "status_changed", payload, ticket_id=request.ticket_id)
    enqueue_callback(session, request, now)


class LeaseLost(RuntimeError):
    """The runner's claim on a ticket is gone: its lease ran out and another run took the ticket up."""


def claim(session: Session, ticket_id: str, runner: str, lease_seconds: float) -> Request | None:
    """Take ``ticket_id`` for ``runner`` with one compare-and-set, or None when another runner holds it or it is
    not runnable. Claimable: a `received` ticket nobody holds (or whose holder's lease ran out), and an
    in-progress one whose lease ran out: that one goes back to `received` (reason `lease_expired`, audited with
    the step it was in) and starts again. Two runners racing for one ticket: exactly one gets it."""
    now = utcnow()
    if session.get_bind().dialect.name == "postgresql":  # claims on one target are serialised, as SQLite's writes are
        target = session.scalar(select(Request.target_model_uri).where(Request.ticket_id == ticket_id))
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:target))"), {"target": target or ""})
    taken = session.execute(
        update(Request)
        .where(Request.ticket_id == ticket_id, _claimable(now, runner))
        .values(claimed_by=runner, lease_expires_at=now + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    ).rowcount
    if taken != 1:
        return None
    request = get_request(session, ticket_id)
    session.refresh(request)
    if request.status != RequestStatus.received.value:
        set_status(session, request, RequestStatus.received, reason_code="lease_expired",
                   detail=f"the runner's lease ran out during {request.status}; taken up again",
                   audit_payload={"interrupted_step": request.status})
    return request


def renew_lease(session: Session, ticket_id: str, runner: str, lease_seconds: float) -> bool:
    """Extend ``runner``'s lease on ``ticket_id``; False when it no longer holds the ticket."""
    return session.execute(
        update(Request)
        .where(Request.ticket_id == ticket_id, Request.claimed_by == runner)
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    ).rowcount == 1


def release_claim(session: Session, request: Request, runner: str) -> None:
    """The runner lets go of a `received` ticket it holds (a batch split it out): any runner may take it now."""
    if request.claimed_by != runner:
        raise LeaseLost(f"ticket {request.ticket_id} is no longer held by this runner")
    request.claimed_by, request.lease_expires_at = None, None
    session.flush()


def end_lease(session: Session, ticket_id: str) -> bool:
    """Let the ticket's lease run out now (its run crashed or was cancelled): the next run may take it up at once."""
    return session.execute(
        update(Request)
        .where(Request.ticket_id == ticket_id, Request.claimed_by.is_not(None))
        .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        .execution_options(synchronize_session=False)
    ).rowcount == 1


def _claimable(now: datetime, runner: str | None = None):
    """The condition `claim` sets its compare on: a `received` ticket nobody holds (or whose holder's lease ran
    out), or an in-progress one whose lease ran out; and no other ticket on the same target model held now by
    another runner, so two erasures never train against one champion at once (the second would be built on a
    stale base). `runner` may hold several on one target: a batch trains them together."""
    expired = and_(Request.lease_expires_at.is_not(None), Request.lease_expires_at < now)
    return and_(or_(and_(Request.status == RequestStatus.received.value, or_(Request.claimed_by.is_(None), expired)),
                    and_(Request.status.in_(IN_PROGRESS), expired)),
                ~_another_held_on(Request.target_model_uri, Request.id, now, runner))


def _another_held_on(target, request_id, now: datetime, runner: str | None = None):
    """EXISTS a ticket other than `request_id` on `target` that a runner (other than `runner`) holds now
    (columns, or plain values)."""
    other = aliased(Request)
    held = [other.target_model_uri == target, other.id != request_id, other.claimed_by.is_not(None),
            other.lease_expires_at >= now]
    if runner is not None:
        held.append(other.claimed_by != runner)
    return exists().where(*held)


def target_busy(session: Session, ticket_id: str) -> bool:
    """Whether another ticket on this ticket's target model is held by a runner now."""
    request = get_request(session, ticket_id)
    return request is not None and bool(session.scalar(
        select(_another_held_on(request.target_model_uri, request.id, utcnow()))))


def runnable_requests(session: Session) -> list[Request]:
    """Tickets a run may claim now, earliest due first."""
    return list(session.scalars(select(Request).where(_claimable(utcnow())).order_by(Request.due_at, Request.id)))


def completed_on_model(session: Session, model_uri: str, leave_out: str | None = None) -> list[str]:
    """Tickets `completed` with `model_uri` as their result (a batch's tickets share one version)."""
    query = select(Request.ticket_id).where(Request.status == RequestStatus.completed.value,
                                            Request.result_model_uri == model_uri)
    if leave_out is not None:
        query = query.where(Request.ticket_id != leave_out)
    return list(session.scalars(query.order_by(Request.ticket_id)))


def runnable(session: Session) -> list[str]:
    """The ids of `runnable_requests`."""
    return [request.ticket_id for request in runnable_requests(session)]


def is_runnable(session: Session, ticket_id: str) -> bool:
    """Whether a run may claim ``ticket_id`` now."""
    return session.scalar(select(Request.id).where(Request.ticket_id == ticket_id, _claimable(utcnow()))) is not None


def latest_event(session: Session, ticket_id: str, event_type: str) -> dict[str, Any] | None:
    """The payload of the ticket's newest audit event of ``event_type``, or None."""
    found = latest_event_with_seq(session, ticket_id, event_type)
    return found[1] if found else None


def latest_event_with_seq(session: Session, ticket_id: str, event_type: str) -> tuple[int, dict[str, Any]] | None:
    """(seq, payload) of the ticket's newest audit event of ``event_type``, or None."""
    row = session.execute(
        select(AuditEvent.seq, AuditEvent.payload_json)
        .where(AuditEvent.ticket_id == ticket_id, AuditEvent.event_type == event_type)
        .order_by(AuditEvent.seq.desc()).limit(1)).first()
    return (row.seq, json.loads(row.payload_json)) if row is not None else None


def events_of(session: Session, ticket_id: str, event_type: str) -> list[dict[str, Any]]:
    """Every payload of one event type for a ticket, oldest first."""
    rows = session.scalars(select(AuditEvent).where(
        AuditEvent.ticket_id == ticket_id, AuditEvent.event_type == event_type).order_by(AuditEvent.seq))
    return [json.loads(row.payload_json) for row in rows]


def record_event(
    session: Session, ticket_id: str | None, event_type: str, payload: dict[str, Any]
) -> AuditEvent:
    """Audit a non-status event (e.g. "forget_set_resolved", "model_registered")."""
    return append_event(session, event_type, payload, ticket_id=ticket_id)
