"""Tests for the db package: migrations, request lifecycle, hash-chained audit log."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.script import ScriptDirectory
from alembic.runtime.migration import MigrationContext
from sqlalchemy import delete, inspect, select, text, update
from sqlalchemy.exc import IntegrityError

from db import requests_repo
from db.audit import (
    GENESIS_HASH,
    append_event,
    canonical_json,
    compute_hash,
    compute_seal,
    export_rows,
    head_hash,
    verify_chain,
    verify_rows,
)
from db.models import AuditEvent, AuditLogImmutableError, Base, IllegalTransition, RequestStatus, StatusChange
from db.session import (
    HEAD_REVISION,
    alembic_config,
    dispose_engines,
    make_engine,
    session_scope,
    upgrade_database,
)

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)


# Every DB test runs on SQLite (the embedded default) and on PostgreSQL (production): a throwaway
# cluster started by conftest's `postgres_url`, or EXPUNGE_TEST_POSTGRES_URL. Wiped per test.
@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/audit.db"
    else:
        PG_URL = request.getfixturevalue("postgres_url")
        with make_engine(PG_URL).begin() as conn:
            conn.execute(text(
                "DROP TABLE IF EXISTS status_changes, requests, audit_events, callback_deliveries, webhook_receipts, "
                "alembic_version"
            ))
        dispose_engines()  # forget "already upgraded"
        yield PG_URL
    dispose_engines()


def _drop_append_only_guards(url: str) -> None:
    """What a forger with admin rights on the database does first: drop the triggers that keep the audit tables
    append-only (db/migrations/versions/0003_append_only.py)."""
    with make_engine(url).begin() as conn:
        for table in ("audit_events", "status_changes"):
            if url.startswith("postgresql"):
                conn.execute(text(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}"))
                conn.execute(text(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}"))
            else:
                for action in ("update", "delete"):
                    conn.execute(text(f"DROP TRIGGER IF EXISTS {table}_no_{action}"))


def _raw(url: str, sql: str, **params: object) -> None:
    """Tamper with the DB behind the ORM's back, as an attacker with SQL admin access would."""
    _drop_append_only_guards(url)
    with make_engine(url).begin() as conn:
        conn.execute(text(sql), params)


def _append_n(url: str, n: int, ticket_id: str | None = "T-1") -> list[str]:
    with session_scope(url) as s:
        return [append_event(s, "e", {"i": i}, ticket_id=ticket_id).hash for i in range(n)]


def _new_request(s, ticket_id: str = "T-1", **kw):
    args = dict(
        ticket_id=ticket_id,
        request_type="erasure",
        regulation="GDPR-Art17",
        spec={"subject": {"email": "jane@example.com"}, "scope": "all"},
        target_model_uri="hf://org/model@abc",
        received_at=T0,
        due_at=T0 + timedelta(days=30),
        audit_payload={"subject_hash": "ab" * 32},
    )
    args.update(kw)
    return requests_repo.create_request(s, **args)


# --- migrations --------------------------------------------------------------


def test_migrations_create_tables_and_second_upgrade_is_noop(url: str) -> None:
    upgrade_database(url)
    engine = make_engine(url)
    insp = inspect(engine)
    assert {"requests", "status_changes", "audit_events", "alembic_version"} <= set(
        insp.get_table_names()
    )
    assert {c["name"] for c in insp.get_columns("audit_events")} == {
        "seq", "ticket_id", "event_type", "payload_json", "created_at", "prev_hash", "hash", "seal",
    }
    ticket_ix = [ix for ix in insp.get_indexes("requests") if ix["column_names"] == ["ticket_id"]]
    assert ticket_ix and ticket_ix[0]["unique"]

    _append_n(url, 2)  # data must survive a second upgrade
    upgrade_database(url)
    with engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == HEAD_REVISION
        assert conn.scalar(text("SELECT count(*) FROM audit_events")) == 2
    # the fast path that skips Alembic trusts this constant: it must name the newest migration
    assert HEAD_REVISION == ScriptDirectory.from_config(alembic_config(url)).get_current_head()


def test_migration_matches_models(url: str) -> None:
    """The hand-written migration and the ORM models must describe the same schema."""
    upgrade_database(url)
    with make_engine(url).connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == []


def test_migration_renders_for_postgresql() -> None:
    """Offline mode: the same migration produces valid-looking PostgreSQL DDL."""
    buf = io.StringIO()
    cfg = alembic_config("postgresql://user@localhost/expunge")
    cfg.stdout = buf
    cfg.output_buffer = buf
    command.upgrade(cfg, "head", sql=True)
    sql = buf.getvalue()
    assert "CREATE TABLE audit_events" in sql
    assert "TIMESTAMP WITH TIME ZONE" in sql
    assert "CREATE UNIQUE INDEX ix_requests_ticket_id" in sql
    assert "AUTOINCREMENT" not in sql.upper().replace("SERIAL", "")


# --- audit chain -------------------------------------------------------------


def test_canonical_json_is_deterministic() -> None:
    assert canonical_json({"b": 1, "a": [1, "é"]}) == '{"a":[1,"é"],"b":1}'
    assert canonical_json({"t": T0}) == '{"t":"2025-03-01 12:00:00+00:00"}'


def test_empty_chain_verifies(url: str) -> None:
    with session_scope(url) as s:
        v = verify_chain(s, expected_head=GENESIS_HASH)
        assert head_hash(s) == GENESIS_HASH
    assert v.ok and v.n_events == 0 and v.head_hash == GENESIS_HASH and v.problems == []


def test_append_and_verify(url: str) -> None:
    hashes = _append_n(url, 3)
    with session_scope(url) as s:
        # Non-JSON-native payload values are stringified and still verify.
        ev = append_event(s, "model_registered", {"at": T0, "n": 1.5}, ticket_id=None)
        hashes.append(ev.hash)

    with session_scope(url) as s:
        events = list(s.scalars(select(AuditEvent).order_by(AuditEvent.seq)))
        v = verify_chain(s, expected_head=hashes[-1])
        assert head_hash(s) == hashes[-1]

    assert [e.seq for e in events] == [1, 2, 3, 4]
    assert events[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in zip(events, events[1:], strict=False))
    assert [e.hash for e in events] == hashes
    assert len(set(hashes)) == 4 and all(len(h) == 64 for h in hashes)
    # created_at is an ISO-8601 UTC string with microseconds.
    assert datetime.fromisoformat(events[0].created_at).utcoffset() == timedelta(0)
    assert len(events[0].created_at.split(".")[1]) == len("123456+00:00")
    assert v.ok, v.problems
    assert v.n_events == 4 and v.head_hash == hashes[-1]


def test_hash_formula_is_as_documented(url: str) -> None:
    with session_scope(url) as s:
        ev = append_event(s, "x", {"k": "v"}, ticket_id="T-9")
    import hashlib

    body = canonical_json(
        {"seq": 1, "ticket_id": "T-9", "event_type": "x", "payload": {"k": "v"},
         "created_at": ev.created_at}
    )
    assert ev.hash == hashlib.sha256((GENESIS_HASH + body).encode()).hexdigest()


def test_tamper_edit_payload_is_detected(url: str) -> None:
    _append_n(url, 5)
    _raw(url, "UPDATE audit_events SET payload_json = :p WHERE seq = 3", p='{"i":99}')
    with session_scope(url) as s:
        v = verify_chain(s)
    assert not v.ok
    assert v.problems == ["event 3: hash mismatch (content edited)"]


def test_tamper_edit_metadata_is_detected(url: str) -> None:
    _append_n(url, 3)
    _raw(url, "UPDATE audit_events SET ticket_id = 'T-other' WHERE seq = 2")
    with session_scope(url) as s:
        v = verify_chain(s)
    assert not v.ok and any(p.startswith("event 2: hash mismatch") for p in v.problems)


def test_tamper_delete_middle_row_is_detected(url: str) -> None:
    _append_n(url, 5)
    _raw(url, "DELETE FROM audit_events WHERE seq = 3")
    with session_scope(url) as s:
        v = verify_chain(s)
    assert not v.ok
    assert v.n_events == 4
    assert v.problems == ["event 3 missing: sequence jumps 2 → 4 (deleted)"]


def test_tamper_swap_rows_is_detected(url: str) -> None:
    """Swap the full contents (everything but seq) of events 2 and 3."""
    _append_n(url, 4)
    cols = "ticket_id, event_type, payload_json, created_at, prev_hash, hash"
    _drop_append_only_guards(url)
    with make_engine(url).begin() as conn:
        r2 = conn.execute(text(f"SELECT {cols} FROM audit_events WHERE seq = 2")).one()
        r3 = conn.execute(text(f"SELECT {cols} FROM audit_events WHERE seq = 3")).one()
        sets = ", ".join(f"{c} = :{c}" for c in cols.split(", "))
        conn.execute(text(f"UPDATE audit_events SET {sets} WHERE seq = 2"), r3._asdict())
        conn.execute(text(f"UPDATE audit_events SET {sets} WHERE seq = 3"), r2._asdict())
    with session_scope(url) as s:
        v = verify_chain(s)
    assert not v.ok
    assert "event 2: prev_hash does not match event 1 (reordered or re-chained)" in v.problems
    assert "event 2: hash mismatch (content edited)" in v.problems
    assert any(p.startswith("event 4: prev_hash does not match event 3") for p in v.problems)


def test_tamper_truncate_tail_needs_expected_head(url: str) -> None:
    hashes = _append_n(url, 4)
    _raw(url, "DELETE FROM audit_events WHERE seq = 4")
    with session_scope(url) as s:
        unanchored = verify_chain(s)
        anchored = verify_chain(s, expected_head=hashes[-1])
    # A truncated chain is internally consistent: only the external head reveals it.
    assert unanchored.ok and unanchored.n_events == 3
    assert not anchored.ok
    assert len(anchored.problems) == 1 and "does not match expected" in anchored.problems[0]
    assert anchored.head_hash == hashes[2]


def test_rechained_rewrite_is_caught_by_expected_head(url: str) -> None:
    """An attacker who edits a row AND recomputes every later hash passes the
    internal checks; the externally kept head hash still exposes it."""
    hashes = _append_n(url, 4)
    _drop_append_only_guards(url)
    with make_engine(url).begin() as conn:
        rows = conn.execute(text("SELECT * FROM audit_events ORDER BY seq")).mappings().all()
        prev = rows[1]["hash"]
        for row in rows[2:]:
            payload = {"i": 1000} if row["seq"] == 3 else {"i": row["seq"] - 1}
            h = compute_hash(prev, seq=row["seq"], ticket_id=row["ticket_id"],
                             event_type=row["event_type"], payload=payload,
                             created_at=row["created_at"])
            conn.execute(
                text(
                    "UPDATE audit_events SET payload_json=:p, prev_hash=:ph, hash=:h"
                    " WHERE seq=:s"
                ),
                {"p": canonical_json(payload), "ph": prev, "h": h, "s": row["seq"]},
            )
            prev = h
    with session_scope(url) as s:
        assert verify_chain(s).ok
        assert not verify_chain(s, expected_head=hashes[-1]).ok


SEAL_KEY = b"k" * 32


def test_a_forged_event_with_a_recomputed_hash_fails_its_seal(url: str) -> None:
    """A writer with SQL access but not the deployment key appends an event whose hash is right: the chain alone
    accepts it, its seal does not."""
    with session_scope(url, seal_key=SEAL_KEY) as s:
        for i in range(3):
            append_event(s, "e", {"i": i}, ticket_id="T-1")
    with session_scope(url) as s:  # no key: the event is appended unsealed, as a forger's would be
        append_event(s, "request_released", {"version": "7"}, ticket_id="T-1")
    with make_engine(url).begin() as conn:  # and one with a seal made up without the key
        last = conn.execute(text("SELECT hash FROM audit_events WHERE seq = 4")).scalar_one()
        created_at = "2026-01-01T00:00:00.000000+00:00"
        forged = compute_hash(last, seq=5, ticket_id="T-1", event_type="e", payload={}, created_at=created_at)
        conn.execute(text("INSERT INTO audit_events (seq, ticket_id, event_type, payload_json, created_at, prev_hash, "
                          "hash, seal) VALUES (5, 'T-1', 'e', '{}', :c, :p, :h, :seal)"),
                     {"c": created_at, "p": last, "h": forged, "seal": compute_seal(b"guess" * 8, forged)})
    with session_scope(url) as s:
        assert verify_chain(s).ok  # the chain is consistent in itself
        checked = verify_chain(s, seal_key=SEAL_KEY)
    assert checked.problems == ["event 4: not sealed (written without the deployment key)",
                                "event 5: seal does not match (written without the deployment key)"]
    assert checked.sealed == 4 and checked.unsealed_before == 0


def test_events_written_before_sealing_are_counted_not_failed(url: str) -> None:
    _append_n(url, 2)  # an older deployment's events, without seals
    with session_scope(url, seal_key=SEAL_KEY) as s:
        append_event(s, "e", {}, ticket_id="T-1")
    with session_scope(url) as s:
        result = verify_chain(s, seal_key=SEAL_KEY)
        exported = list(export_rows(s))
    assert result.ok and (result.sealed, result.unsealed_before) == (1, 2)
    assert [row["seal"] is None for row in exported] == [True, True, False]
    assert verify_rows([SimpleNamespace(**row) for row in exported], seal_key=SEAL_KEY).ok
    assert not verify_rows([SimpleNamespace(**row) for row in exported], seal_key=b"another" * 5).ok


def test_the_database_refuses_to_update_or_delete_audit_rows(url: str) -> None:
    """Raw SQL past the ORM, as any client with write access to the tables: the triggers abort it."""
    from sqlalchemy.exc import DatabaseError

    _append_n(url, 2)
    with session_scope(url) as s:
        _new_request(s, "T-9")
    for sql in ("UPDATE audit_events SET payload_json = '{}' WHERE seq = 1", "DELETE FROM audit_events WHERE seq = 2",
                "UPDATE status_changes SET to_status = 'completed'", "DELETE FROM status_changes"):
        with pytest.raises(DatabaseError, match="append-only"):
            with make_engine(url).begin() as conn:
                conn.execute(text(sql))
    if url.startswith("postgresql"):
        with pytest.raises(DatabaseError, match="append-only"):
            with make_engine(url).begin() as conn:
                conn.execute(text("TRUNCATE audit_events"))
    with session_scope(url) as s:
        assert verify_chain(s).ok and verify_chain(s).n_events == 3


def test_orm_refuses_to_modify_audit_events(url: str) -> None:
    _append_n(url, 2)
    with pytest.raises(AuditLogImmutableError):
        with session_scope(url) as s:
            s.get(AuditEvent, 1).payload_json = '{"i":42}'
    with pytest.raises(AuditLogImmutableError):
        with session_scope(url) as s:
            s.delete(s.get(AuditEvent, 2))
    with pytest.raises(AuditLogImmutableError):
        with session_scope(url) as s:
            s.execute(update(AuditEvent).values(event_type="x"))
    with pytest.raises(AuditLogImmutableError):
        with session_scope(url) as s:
            s.execute(delete(AuditEvent))
    with session_scope(url) as s:
        v = verify_chain(s)
    assert v.ok and v.n_events == 2


def test_concurrent_appenders_do_not_fork(url: str) -> None:
    upgrade_database(url)
    n_threads, per_thread = 4, 10
    errors: list[BaseException] = []
    start = threading.Barrier(n_threads)

    def worker(k: int) -> None:
        try:
            start.wait()
            for i in range(per_thread):
                with session_scope(url) as s:  # one transaction per event
                    append_event(s, "e", {"worker": k, "i": i})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with session_scope(url) as s:
        v = verify_chain(s)
    assert v.ok, v.problems
    assert v.n_events == n_threads * per_thread


# --- request lifecycle -------------------------------------------------------


def test_create_request_writes_row_history_and_audit(url: str) -> None:
    with session_scope(url) as s:
        req = _new_request(s)
    assert req.status == "received"
    assert len(req.spec_hash) == 64 and "jane@example.com" in req.spec_json

    with session_scope(url) as s:
        got = requests_repo.get_request(s, "T-1")
        assert got is not None
        assert got.received_at == T0 and got.received_at.tzinfo is not None
        assert [(h.from_status, h.to_status) for h in got.status_history] == [(None, "received")]
        [ev] = s.scalars(select(AuditEvent)).all()
        assert requests_repo.get_request(s, "nope") is None
    assert (ev.event_type, ev.ticket_id) == ("request_received", "T-1")
    assert ev.payload_json == canonical_json({"subject_hash": "ab" * 32})
    # Subject identifiers never reach the (unerasable) audit log.
    assert "jane" not in ev.payload_json


def test_create_rejected_request_logs_request_rejected(url: str) -> None:
    with session_scope(url) as s:
        _new_request(s, "T-R", status=RequestStatus.rejected, reason_code="no_legal_basis")
        _new_request(s, "T-N", status="needs_review", reason_code="ambiguous_subject")
        _new_request(s, "T-OK")
    with session_scope(url) as s:
        evs = {e.ticket_id: e.event_type for e in s.scalars(select(AuditEvent))}
        reqs = requests_repo.list_requests(s)
    assert evs == {"T-R": "request_rejected", "T-N": "request_rejected", "T-OK": "request_received"}
    assert [r.ticket_id for r in reqs] == ["T-R", "T-N", "T-OK"]
    assert reqs[0].status == "rejected" and reqs[0].reason_code == "no_legal_basis"


def test_set_status_writes_history_and_audit_event(url: str) -> None:
    with session_scope(url) as s:
        req = _new_request(s)
        before = req.updated_at
    with session_scope(url) as s:
        req = requests_repo.get_request(s, "T-1")
        requests_repo.set_status(s, req, RequestStatus.resolving)
        requests_repo.set_status(
            s, req, "failed", reason_code="forget_set_empty", detail="no matching docs",
            audit_payload={"n_docs": 0},
        )
        requests_repo.set_status(s, req, RequestStatus.received, reason_code="requeued")

    with session_scope(url) as s:
        req = requests_repo.get_request(s, "T-1")
        history = [(h.from_status, h.to_status, h.reason_code) for h in req.status_history]
        events = list(s.scalars(select(AuditEvent).order_by(AuditEvent.seq)))
        n_changes = s.scalar(select(StatusChange.id).order_by(StatusChange.id.desc()).limit(1))
        v = verify_chain(s)

    assert history == [
        (None, "received", None),
        ("received", "resolving", None),
        ("resolving", "failed", "forget_set_empty"),
        ("failed", "received", "requeued"),
    ]
    assert n_changes == 4
    assert req.status == "received"
    assert req.updated_at > before
    assert [e.event_type for e in events] == ["request_received"] + ["status_changed"] * 3
    assert events[2].payload_json == canonical_json(
        {"from": "resolving", "to": "failed", "reason_code": "forget_set_empty", "n_docs": 0}
    )
    assert all(e.ticket_id == "T-1" for e in events)
    assert v.ok and v.n_events == 4


def test_the_lifecycle_refuses_a_transition_it_does_not_declare(url: str) -> None:
    with session_scope(url) as s:
        req = _new_request(s)
        requests_repo.set_status(s, req, RequestStatus.resolving)
    for illegal in ("completed", "released", "failed_gates"):
        with pytest.raises(IllegalTransition, match=f"from resolving to {illegal}"):
            with session_scope(url) as s:
                requests_repo.set_status(s, requests_repo.get_request(s, "T-1"), illegal)
    with session_scope(url) as s:  # nothing of the refused changes was written
        assert requests_repo.get_request(s, "T-1").status == "resolving"
        assert verify_chain(s).ok and verify_chain(s).n_events == 2


def test_audit_verify_checks_each_tickets_sequence_of_transitions(url: str) -> None:
    """Events appended with valid hashes (as a writer with DB access could) but a status sequence the lifecycle
    never produces: a jump it does not allow, and a change that does not start where the last one ended."""
    with session_scope(url) as s:
        req = _new_request(s)
        requests_repo.set_status(s, req, RequestStatus.resolving)
        append_event(s, "status_changed", {"from": "resolving", "to": "completed", "reason_code": None},
                     ticket_id="T-1")
        append_event(s, "status_changed", {"from": "failed_gates", "to": "release_rejected", "reason_code": None},
                     ticket_id="T-1")
    with session_scope(url) as s:
        v = verify_chain(s)
    assert not v.ok
    assert any("does not allow (resolving → completed)" in p for p in v.problems)
    assert any("goes from failed_gates but its last status was completed" in p for p in v.problems)


def test_set_status_rejects_unknown_status(url: str) -> None:
    with session_scope(url) as s:
        req = _new_request(s)
        with pytest.raises(ValueError, match="unknown request status"):
            requests_repo.set_status(s, req, "done-ish")


def test_record_event(url: str) -> None:
    with session_scope(url) as s:
        _new_request(s)
        ev = requests_repo.record_event(s, "T-1", "forget_set_resolved", {"n_docs": 12})
    assert (ev.seq, ev.event_type, ev.ticket_id) == (2, "forget_set_resolved", "T-1")


def test_duplicate_ticket_id_raises_and_rolls_back(url: str) -> None:
    with session_scope(url) as s:
        _new_request(s, "T-DUP")
    with pytest.raises(IntegrityError):
        with session_scope(url) as s:
            _new_request(s, "T-DUP")
    with session_scope(url) as s:
        assert len(requests_repo.list_requests(s)) == 1
        v = verify_chain(s)
    assert v.ok and v.n_events == 1  # the failed intake left no audit trace


def test_session_scope_rolls_back_on_error(url: str) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with session_scope(url) as s:
            req = _new_request(s)
            requests_repo.set_status(s, req, RequestStatus.resolving)
            raise RuntimeError("boom")
    with session_scope(url) as s:
        assert requests_repo.list_requests(s) == []
        assert s.scalar(select(AuditEvent.seq).limit(1)) is None


def test_datetimes_are_normalised_to_utc(url: str) -> None:
    cet = timezone(timedelta(hours=1))
    with session_scope(url) as s:
        _new_request(s, received_at=datetime(2025, 3, 1, 13, 0, tzinfo=cet))
    with session_scope(url) as s:
        got = requests_repo.get_request(s, "T-1")
    assert got.received_at == T0
    assert got.received_at.utcoffset() == timedelta(0)


# --- claims and leases ---------------------------------------------------------


def test_one_claim_wins_and_a_lost_lease_is_taken_up_again(url: str) -> None:
    with session_scope(url) as s:
        _new_request(s, "T-1", due_at=T0 + timedelta(days=30))
        _new_request(s, "T-2", due_at=T0 + timedelta(days=3), target_model_uri="hf://org/other")  # more urgent
    with session_scope(url) as s:
        assert requests_repo.runnable(s) == ["T-2", "T-1"]
        assert requests_repo.claim(s, "T-1", "runner-a", lease_seconds=60) is not None
    with session_scope(url) as s:
        assert requests_repo.claim(s, "T-1", "runner-b", lease_seconds=60) is None  # held: the second one loses
        assert requests_repo.runnable(s) == ["T-2"]
        requests_repo.set_status(s, requests_repo.get_request(s, "T-1"), "resolving", runner="runner-a")
        requests_repo.set_status(s, requests_repo.get_request(s, "T-1"), "training", runner="runner-a")
    # runner-a crashes; its lease runs out (moved into the past here instead of waiting)
    _raw(url, "UPDATE requests SET lease_expires_at = :t WHERE ticket_id = 'T-1'", t=datetime(2020, 1, 1))
    with session_scope(url) as s:
        assert requests_repo.runnable(s) == ["T-2", "T-1"]
        taken = requests_repo.claim(s, "T-1", "runner-b", lease_seconds=60)
        assert taken is not None and taken.status == "received" and taken.claimed_by == "runner-b"
        assert taken.reason_code == "lease_expired"
    with session_scope(url) as s:
        request = requests_repo.get_request(s, "T-1")
        with pytest.raises(requests_repo.LeaseLost):  # runner-a wakes up: it can no longer write
            requests_repo.set_status(s, request, "evaluating", runner="runner-a")
    with session_scope(url) as s:
        assert not requests_repo.renew_lease(s, "T-1", "runner-a", 60)
        assert requests_repo.renew_lease(s, "T-1", "runner-b", 60)
        request = requests_repo.get_request(s, "T-1")
        requests_repo.set_status(s, request, "resolving", runner="runner-b")
        requests_repo.set_status(s, request, "failed", reason_code="internal_error", runner="runner-b")
        assert request.claimed_by is None and request.lease_expires_at is None  # settled: nobody holds it
        v = verify_chain(s)
        events = [json.loads(p) for p in s.scalars(select(AuditEvent.payload_json).where(AuditEvent.ticket_id == "T-1"))]
    assert v.ok
    assert {"from": "training", "to": "received", "reason_code": "lease_expired", "interrupted_step": "training"} in events


def test_concurrent_claims_give_each_ticket_to_exactly_one_runner(url: str) -> None:
    with session_scope(url) as s:
        for i in range(6):
            _new_request(s, f"T-{i}", target_model_uri=f"hf://org/model-{i}")
    won: dict[str, list[str]] = {}
    barrier = threading.Barrier(3)

    def runner(name: str) -> None:
        barrier.wait()
        for i in range(6):
            with session_scope(url) as s:
                if requests_repo.claim(s, f"T-{i}", name, lease_seconds=60) is not None:
                    won.setdefault(f"T-{i}", []).append(name)

    threads = [threading.Thread(target=runner, args=(f"r{k}",)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won) == [f"T-{i}" for i in range(6)] and all(len(v) == 1 for v in won.values())


def test_two_erasures_never_train_against_one_target_at_once(url: str) -> None:
    """Racing runners: each target's tickets go to one runner (which may hold several: a batch), never two; the
    others wait until its leases end."""
    with session_scope(url) as s:
        for i in range(4):
            _new_request(s, f"T-{i}", target_model_uri="models:/m@champion")
        _new_request(s, "OTHER", target_model_uri="models:/n@champion")
    won: dict[str, str] = {}
    barrier = threading.Barrier(3)

    def runner(name: str) -> None:
        barrier.wait()
        for ticket in ("T-0", "T-1", "T-2", "T-3", "OTHER"):
            with session_scope(url) as s:
                if requests_repo.claim(s, ticket, name, lease_seconds=60) is not None:
                    won[ticket] = name

    threads = [threading.Thread(target=runner, args=(f"r{k}",)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(won) == {"T-0", "T-1", "T-2", "T-3", "OTHER"}  # each ticket claimed once ...
    assert len({won[f"T-{i}"] for i in range(4)}) == 1  # ... and one target's tickets by one runner
    holder = won["T-0"]
    with session_scope(url) as s:
        assert requests_repo.runnable(s) == []
        assert requests_repo.target_busy(s, "T-3")
        request = requests_repo.get_request(s, "T-1")
        requests_repo.set_status(s, request, "resolving", runner=holder)
        with pytest.raises(requests_repo.LeaseLost):  # another runner cannot write under the holder's claim
            requests_repo.set_status(s, requests_repo.get_request(s, "T-2"), "resolving", runner="intruder")
    with session_scope(url) as s:
        for i in range(4):
            requests_repo.end_lease(s, f"T-{i}")
    with session_scope(url) as s:
        assert len(requests_repo.runnable(s)) == 4  # the target is free: any of its tickets may be taken


def test_the_head_is_anchored_outside_the_database_and_verify_checks_it(url: str, tmp_path, monkeypatch) -> None:
    """A truncated tail and a log rewritten and re-chained end to end are each consistent in themselves; the
    anchor written after every commit exposes both."""
    from db.anchor import ANCHOR_ENV, read_anchor

    monkeypatch.setenv(ANCHOR_ENV, str(tmp_path / "anchor" / "audit.head"))
    hashes = _append_n(url, 4)
    assert read_anchor(url) == (4, hashes[-1])
    with session_scope(url) as s:
        assert verify_chain(s, anchor=read_anchor(url)).ok
    _raw(url, "DELETE FROM audit_events WHERE seq = 4")
    with session_scope(url) as s:
        truncated = verify_chain(s, anchor=read_anchor(url))
    assert not truncated.ok and truncated.problems == ["anchored event 4 is missing (log truncated or replaced)"]
    _raw(url, "UPDATE audit_events SET hash = :h WHERE seq = 3", h="f" * 64)
    _append_n(url, 1)  # a later commit moves the anchor forward; an older one never moves it back
    assert read_anchor(url)[0] == 4
