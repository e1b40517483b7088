"""SQL schema for expunge (SQLAlchemy 2 typed ORM).

Portable across SQLite (default) and PostgreSQL: only generic types are used,
JSON is stored as ``Text`` holding canonical JSON, and every constraint gets a
deterministic name (via the naming convention) so Alembic migrations can refer
to them on both backends.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    event,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    ORMExecuteState,
    Session,
    mapped_column,
    relationship,
)
from sqlalchemy.types import TypeDecorator

# Explicit constraint names: PostgreSQL needs them to drop/alter constraints and
# SQLite batch migrations need them to recreate tables faithfully.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

GENESIS_HASH = "0" * 64


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class RequestStatus(str, enum.Enum):
    """Lifecycle states of an erasure request. Persisted as their plain string value."""

    received = "received"
    resolving = "resolving"
    training = "training"
    evaluating = "evaluating"
    registering = "registering"
    completed = "completed"
    rejected = "rejected"
    needs_review = "needs_review"
    failed_gates = "failed_gates"  # evaluated, but the evidence did not clear a promotion gate
    released = "released"  # a reviewer approved it: the version is now the `champion`
    release_rejected = "release_rejected"  # a reviewer declined the release; the version stays unserved
    reopened = "reopened"  # the champion was rolled back past its erasure: the obligation is open again
    failed = "failed"

    def __str__(self) -> str:  # str(RequestStatus.x) == "x", not "RequestStatus.x"
        return self.value


_S = RequestStatus
_IN_PROGRESS = (_S.resolving, _S.training, _S.evaluating, _S.registering)
# Every transition a request may make, declared once: `set_status` refuses the rest and `audit verify` checks each
# ticket's recorded sequence against it. None is intake. An in-progress ticket may fail, or go back to `received`
# when its runner's lease expired or an operator requeues it; `failed` and `needs_review` tickets can be requeued;
# a `rejected` or `needs_review` one can be revised (the corrected request is validated again); a `released` one is
# reopened when the champion is rolled back past it, and re-filed as a revision.
ALLOWED_TRANSITIONS: dict[str | None, frozenset[str]] = {
    key.value if key else None: frozenset(s.value for s in targets) for key, targets in {
        None: (_S.received, _S.rejected, _S.needs_review),
        _S.received: (_S.resolving, _S.rejected, _S.failed),
        _S.resolving: (_S.training, _S.needs_review, _S.rejected, _S.failed, _S.received),
        _S.training: (_S.evaluating, _S.needs_review, _S.rejected, _S.failed, _S.received),
        _S.evaluating: (_S.registering, _S.failed, _S.received),
        _S.registering: (_S.completed, _S.failed_gates, _S.failed, _S.received),
        _S.completed: (_S.released, _S.release_rejected),
        _S.failed_gates: (_S.release_rejected,),
        _S.needs_review: (_S.received, _S.release_rejected, _S.rejected, _S.needs_review),
        _S.failed: (_S.received,),
        _S.rejected: (_S.received, _S.rejected, _S.needs_review),  # a revision: the corrected request
        _S.released: (_S.reopened,),
        _S.reopened: (_S.received, _S.rejected, _S.needs_review),  # re-filed (a revision: the subject was purged)
        _S.release_rejected: (),
    }.items()
}
IN_PROGRESS: frozenset[str] = frozenset(s.value for s in _IN_PROGRESS)


class IllegalTransition(ValueError):
    """A status change the lifecycle does not allow (e.g. completed → registering)."""


def check_transition(old: str | None, new: str) -> None:
    if new not in ALLOWED_TRANSITIONS.get(old, frozenset()):
        allowed = ", ".join(sorted(ALLOWED_TRANSITIONS.get(old, ()))) or "none: it is final"
        raise IllegalTransition(f"a request cannot go from {old or 'intake'} to {new} (from {old}: {allowed})")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend.

    SQLite has no timezone storage and returns naive datetimes; PostgreSQL
    returns aware ones in the session time zone. Normalising to UTC on both
    the way in and the way out gives callers the same values everywhere.
    Naive inputs are interpreted as UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        value = value.astimezone(timezone.utc)
        # SQLite stores the literal string; drop tzinfo so stored text stays uniform.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Request(Base):
    """One erasure / takedown request. Holds operational data (incl. subject
    identifiers in ``spec_json``); the audit log only ever sees hashes."""

    __tablename__ = "requests"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ticket_id: Mapped[str] = mapped_column(String(128), unique=True, index=True)
    request_type: Mapped[str] = mapped_column(String(64))
    regulation: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(32), index=True)
    reason_code: Mapped[str | None] = mapped_column(String(64))
    reason_detail: Mapped[str | None] = mapped_column(Text)
    spec_json: Mapped[str] = mapped_column(Text)
    spec_hash: Mapped[str] = mapped_column(String(64))
    target_model_uri: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    due_at: Mapped[datetime] = mapped_column(UTCDateTime())
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    result_model_uri: Mapped[str | None] = mapped_column(Text)
    metrics_json: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    # The runner working on the ticket and until when its lease runs (renewed while it works); None when idle.
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # 1, then +1 each time a rejected ticket is corrected under its own id (`expunge submit --revise`, PUT)
    revision: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    callback_url: Mapped[str | None] = mapped_column(Text)  # receives a signed POST on every status change

    # selectin: history is small and is loaded eagerly, so it stays readable
    # after the session that loaded the request has closed.
    status_history: Mapped[list[StatusChange]] = relationship(
        back_populates="request",
        order_by="StatusChange.id",
        cascade="all, delete-orphan",
        lazy="selectin",
    )

    def __repr__(self) -> str:
        return f"<Request {self.ticket_id} {self.status}>"


class StatusChange(Base):
    __tablename__ = "status_changes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[int] = mapped_column(
        ForeignKey("requests.id", ondelete="CASCADE"), index=True
    )
    from_status: Mapped[str | None] = mapped_column(String(32))
    to_status: Mapped[str] = mapped_column(String(32))
    reason_code: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    request: Mapped[Request] = relationship(back_populates="status_history")

    def __repr__(self) -> str:
        return f"<StatusChange {self.from_status} -> {self.to_status}>"


class AuditEvent(Base):
    """One link of the hash-chained, append-only audit log.

    ``seq`` is assigned by :func:`db.audit.append_event` (not autoincrement) so
    that it is contiguous; being the primary key, two appenders can never both
    commit the same ``seq``, i.e. the chain cannot fork. ``created_at`` is a
    string so the hashed bytes never depend on a backend's datetime handling.
    """

    __tablename__ = "audit_events"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    ticket_id: Mapped[str | None] = mapped_column(String(128), index=True)
    event_type: Mapped[str] = mapped_column(String(64))
    payload_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[str] = mapped_column(String(40))
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    # HMAC-SHA256(seal key, hash): only a writer holding the deployment key can add an event `audit verify` accepts.
    seal: Mapped[str | None] = mapped_column(String(64))

    def __repr__(self) -> str:
        return f"<AuditEvent #{self.seq} {self.event_type} {self.hash[:12]}>"


class CallbackDelivery(Base):
    """One status change to report to a request's `callback_url` (an outbox row, written with the change)."""

    __tablename__ = "callback_deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ticket_id: Mapped[str] = mapped_column(String(128), index=True)
    payload_json: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    given_up_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(String(200))


class WebhookReceipt(Base):
    """A signed intake body already accepted: the same signature is refused as a replay."""

    __tablename__ = "webhook_receipts"

    signature_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())


# --- ORM-level immutability guard ------------------------------------------
# Convenience only: raw SQL bypasses it. The real guarantee is verify_chain().


class AuditLogImmutableError(RuntimeError):
    """Raised when code tries to update or delete audit events through the ORM."""


def _refuse_mutation(mapper: Any, connection: Any, target: AuditEvent) -> None:
    raise AuditLogImmutableError(
        f"audit_events is append-only; refusing to modify/delete event #{target.seq}"
    )


event.listen(AuditEvent, "before_update", _refuse_mutation)
event.listen(AuditEvent, "before_delete", _refuse_mutation)


@event.listens_for(Session, "do_orm_execute")
def _refuse_bulk_mutation(state: ORMExecuteState) -> None:
    # Catches session.execute(update(AuditEvent)) / delete(AuditEvent), which
    # skip the per-object mapper events above.
    if (state.is_update or state.is_delete) and state.bind_mapper is not None:
        if state.bind_mapper.class_ is AuditEvent:
            raise AuditLogImmutableError("audit_events is append-only; bulk UPDATE/DELETE refused")
