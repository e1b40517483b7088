"""Hash-chained, append-only audit log.

Each event's hash is ``sha256(prev_hash_hex + canonical_json(body))`` where body
is ``{"seq", "ticket_id", "event_type", "payload", "created_at"}``. Editing,
deleting or reordering any row therefore breaks the chain from that row on;
truncating the tail is only detectable against a head hash kept elsewhere
(``verify_chain(expected_head=...)``), e.g. one published or stored with the
released model.

Anyone can recompute that chain, so anyone who can write to the database could
also append a forged event with a correct hash. Each event therefore also carries
a *seal*, ``HMAC-SHA256(seal_key, hash)`` under a key derived from the deployment
secret: verifying with the key rejects any event its writer could not seal.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from db.models import ALLOWED_TRANSITIONS, GENESIS_HASH, AuditEvent

__all__ = [
    "GENESIS_HASH",
    "ChainVerification",
    "append_event",
    "canonical_json",
    "compute_hash",
    "compute_seal",
    "export_rows",
    "head_hash",
    "verify_chain",
    "verify_rows",
]


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: the exact bytes that get hashed."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def compute_hash(
    prev_hash: str,
    *,
    seq: int,
    ticket_id: str | None,
    event_type: str,
    payload: Any,
    created_at: str,
) -> str:
    body = {
        "seq": seq,
        "ticket_id": ticket_id,
        "event_type": event_type,
        "payload": payload,
        "created_at": created_at,
    }
    return hashlib.sha256((prev_hash + canonical_json(body)).encode("utf-8")).hexdigest()


def compute_seal(seal_key: bytes, event_hash: str) -> str:
    return hmac.new(seal_key, event_hash.encode("ascii"), hashlib.sha256).hexdigest()


def _lock_for_append(session: Session) -> None:
    """Serialise appenders so that 'read head, insert head+1' is atomic.

    Without this, two writers can read the same head; the PK on ``seq`` stops
    a fork, but the loser would fail with an IntegrityError instead of waiting.
    """
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        # SHARE ROW EXCLUSIVE conflicts with itself (so appenders queue up) but
        # not with plain SELECTs, so readers/verifiers are never blocked.
        # Held until the surrounding transaction ends.
        session.execute(text("LOCK TABLE audit_events IN SHARE ROW EXCLUSIVE MODE"))
    elif dialect == "sqlite":
        # pysqlite only opens a transaction at the first write, so the head
        # SELECT would otherwise run unlocked. A no-op UPDATE (matches no rows)
        # takes SQLite's RESERVED single-writer lock now. Issued on the Core
        # connection so the ORM append-only guard does not see it.
        session.connection().execute(text("UPDATE audit_events SET seq = seq WHERE 1 = 0"))
    # Other backends: rely on the seq primary key to reject a forking insert.


def append_event(
    session: Session,
    event_type: str,
    payload: dict[str, Any],
    ticket_id: str | None = None,
) -> AuditEvent:
    """Append one event to the chain. Flushes but does not commit: the event
    lands atomically with whatever state change the caller is recording."""
    _lock_for_append(session)
    last = session.execute(
        select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)
    ).first()
    seq, prev_hash = (last.seq + 1, last.hash) if last else (1, GENESIS_HASH)

    # Round-trip through canonical JSON so what we hash is exactly what a
    # verifier will get back from payload_json (e.g. datetimes -> str).
    payload_json = canonical_json(payload)
    normalized = json.loads(payload_json)
    created_at = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    event_hash = compute_hash(prev_hash, seq=seq, ticket_id=ticket_id, event_type=event_type, payload=normalized,
                              created_at=created_at)
    seal_key = session.info.get("audit_seal_key")  # set by `db.session.session_scope(url, seal_key=…)`
    ev = AuditEvent(
        seq=seq,
        ticket_id=ticket_id,
        event_type=event_type,
        payload_json=payload_json,
        created_at=created_at,
        prev_hash=prev_hash,
        hash=event_hash,
        seal=compute_seal(seal_key, event_hash) if seal_key else None,
    )
    session.add(ev)
    session.flush()
    session.info["audit_head"] = (ev.seq, ev.hash)  # anchored outside the DB once this commits (db/session.py)
    return ev


def head_hash(session: Session) -> str:
    """Hash of the newest event, or the genesis hash for an empty log."""
    h = session.scalar(select(AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1))
    return h if h is not None else GENESIS_HASH


@dataclass
class ChainVerification:
    ok: bool
    n_events: int
    head_hash: str
    problems: list[str] = field(default_factory=list)
    sealed: int | None = None  # events whose seal was checked; None: verified without the deployment key
    unsealed_before: int = 0  # events written before the log was sealed (older deployments)


def _sequence_problems(seq: int, expected_seq: int) -> list[str]:
    if seq > expected_seq:
        missing = f"event {expected_seq}" if seq == expected_seq + 1 else f"events {expected_seq}..{seq - 1}"
        return [f"{missing} missing: sequence jumps {expected_seq - 1} → {seq} (deleted)"]
    if seq < expected_seq:
        return [f"event {seq}: unexpected sequence number (expected {expected_seq})"]
    return []


def _content_problems(row) -> list[str]:
    """A stored event whose hash does not match its own content (edited in place)."""
    try:
        payload = json.loads(row.payload_json)
    except (TypeError, ValueError):
        return [f"event {row.seq}: payload_json is not valid JSON (content edited)"]
    recomputed = compute_hash(row.prev_hash, seq=row.seq, ticket_id=row.ticket_id, event_type=row.event_type,
                              payload=payload, created_at=row.created_at)
    return [f"event {row.seq}: hash mismatch (content edited)"] if recomputed != row.hash else []


def _transition_problems(row, last_status: dict[str, str]) -> list[str]:
    """A status change the lifecycle does not allow, or one that does not start where the ticket's previous
    change ended (a forged or replayed event with a valid hash still breaks the ticket's own sequence)."""
    if row.event_type != "status_changed" or row.ticket_id is None:
        return []
    try:
        payload = json.loads(row.payload_json)
        old, new = payload["from"], payload["to"]
    except (TypeError, ValueError, KeyError):
        return [f"event {row.seq}: a status change without from / to"]
    problems = []
    if row.ticket_id in last_status and old != last_status[row.ticket_id]:
        problems.append(f"event {row.seq}: ticket {row.ticket_id!r} goes from {old} but its last status was "
                        f"{last_status[row.ticket_id]}")
    if new not in ALLOWED_TRANSITIONS.get(old, frozenset()):
        problems.append(f"event {row.seq}: ticket {row.ticket_id!r} makes a transition the lifecycle does not "
                        f"allow ({old} → {new})")
    last_status[row.ticket_id] = new
    return problems


def _anchor_problems(session: Session, anchor: tuple[int, str] | None) -> list[str]:
    """The anchored event must still be there with the hash it had when it was written."""
    if anchor is None:
        return []
    seq, digest = anchor
    stored = session.scalar(select(AuditEvent.hash).where(AuditEvent.seq == seq))
    if stored is None:
        return [f"anchored event {seq} is missing (log truncated or replaced)"]
    if stored != digest:
        return [f"event {seq} differs from the anchored hash {digest[:16]}… (log rewritten)"]
    return []


EXPORT_FIELDS = ("seq", "ticket_id", "event_type", "payload_json", "created_at", "prev_hash", "hash", "seal")


def _stored_rows(session: Session):
    # Read columns (not ORM objects) in batches: the log can be large and we
    # want the raw stored values, untouched by the identity map.
    return session.execute(
        select(*(getattr(AuditEvent, name) for name in EXPORT_FIELDS))
        .order_by(AuditEvent.seq)
        .execution_options(yield_per=1000)
    )


def export_rows(session: Session):
    """The log as stored, one dict per event, for an auditor's copy (`verify_rows` checks it without the DB)."""
    for row in _stored_rows(session):
        yield {name: getattr(row, name) for name in EXPORT_FIELDS}


def verify_chain(session: Session, expected_head: str | None = None,
                 anchor: tuple[int, str] | None = None, seal_key: bytes | None = None) -> ChainVerification:
    """Recompute the whole chain from the stored rows (`verify_rows`), and check its head against the anchor
    kept outside the database."""
    result = verify_rows(_stored_rows(session), expected_head, seal_key)
    result.problems += _anchor_problems(session, anchor)
    result.ok = not result.problems
    return result


class _SealCheck:
    """Seals, in `seq` order: once the log is sealed every later event must carry a seal the key reproduces. The
    events before the first seal were written by a deployment that did not seal yet (or by a forger who rewrote
    the whole log, which the anchor catches)."""

    def __init__(self, seal_key: bytes):
        self.key, self.sealed, self.unsealed_before = seal_key, 0, 0

    def problems(self, row) -> list[str]:
        seal = getattr(row, "seal", None)
        if seal is None:
            if self.sealed:
                return [f"event {row.seq}: not sealed (written without the deployment key)"]
            self.unsealed_before += 1
            return []
        self.sealed += 1
        if not hmac.compare_digest(seal, compute_seal(self.key, row.hash)):
            return [f"event {row.seq}: seal does not match (written without the deployment key)"]
        return []


def verify_rows(rows, expected_head: str | None = None, seal_key: bytes | None = None) -> ChainVerification:
    """Recompute a chain from its rows (objects with the `EXPORT_FIELDS` attributes), in `seq` order.

    Detects: edited rows (hash mismatch), deleted rows (seq gaps), reordered or
    re-chained rows (prev_hash not equal to the predecessor's hash), transitions the
    lifecycle does not allow, with ``seal_key`` an event its writer could not seal (appended with a recomputed
    hash) and, when ``expected_head`` is given, a truncated tail or a wholesale rewrite.
    """
    seals = _SealCheck(seal_key) if seal_key else None
    problems: list[str] = []
    n = 0
    expected_seq = 1
    prev_stored_hash = GENESIS_HASH
    prev_seq: int | None = None
    last_status: dict[str, str] = {}
    for row in rows:
        n += 1
        gap = row.seq != expected_seq
        problems += _sequence_problems(row.seq, expected_seq) + _content_problems(row)
        problems += _transition_problems(row, last_status)
        if seals is not None:
            problems += seals.problems(row)
        # After a gap the predecessor is gone, so a broken link is implied by
        # the gap message; only report links between adjacent survivors.
        if not gap and row.prev_hash != prev_stored_hash:
            pred = "genesis" if prev_seq is None else f"event {prev_seq}"
            problems.append(
                f"event {row.seq}: prev_hash does not match {pred} (reordered or re-chained)"
            )

        prev_stored_hash = row.hash
        prev_seq = row.seq
        expected_seq = row.seq + 1

    if expected_head is not None and expected_head != prev_stored_hash:
        problems.append(
            f"head hash {prev_stored_hash[:16]}… does not match expected {expected_head[:16]}… "
            f"(log truncated, rewritten or replaced; {n} events present)"
        )

    return ChainVerification(
        ok=not problems, n_events=n, head_hash=prev_stored_hash, problems=problems,
        sealed=None if seals is None else seals.sealed, unsealed_before=0 if seals is None else seals.unsealed_before,
    )
