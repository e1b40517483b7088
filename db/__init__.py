"""Persistence for expunge: SQL schema, Alembic migrations, hash-chained audit log.

Typical use::

    from db import session_scope, requests_repo, verify_chain

    with session_scope(url) as s:
        req = requests_repo.create_request(s, ..., audit_payload={...})
        requests_repo.set_status(s, req, RequestStatus.resolving)
"""

from db import requests_repo
from db.audit import (
    GENESIS_HASH,
    ChainVerification,
    append_event,
    canonical_json,
    head_hash,
    verify_chain,
)
from db.models import (
    AuditEvent,
    AuditLogImmutableError,
    Base,
    Request,
    RequestStatus,
    StatusChange,
)
from db.session import make_engine, session_scope, upgrade_database

__all__ = [
    "GENESIS_HASH",
    "AuditEvent",
    "AuditLogImmutableError",
    "Base",
    "ChainVerification",
    "Request",
    "RequestStatus",
    "StatusChange",
    "append_event",
    "canonical_json",
    "head_hash",
    "make_engine",
    "requests_repo",
    "session_scope",
    "upgrade_database",
    "verify_chain",
]
