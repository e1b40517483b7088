"""The audit log's head, kept outside the database: after every commit that appended events, the newest event's
sequence number and hash are written to an anchor file. `audit verify` checks the log against it, so a truncated
tail or a log rewritten and re-chained end to end (which is consistent in itself) is caught.

Where: `EXPUNGE_AUDIT_ANCHOR`, else beside a SQLite database (`audit.db.head`). Point it at storage the
database's writers cannot rewrite (another host's mount, write-once storage) for the guarantee to hold against
them; beside the database it catches everything but a forger who edits both.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from sqlalchemy.engine import make_url

ANCHOR_ENV = "EXPUNGE_AUDIT_ANCHOR"


def anchor_path(db_url: str) -> Path | None:
    if os.environ.get(ANCHOR_ENV):
        return Path(os.environ[ANCHOR_ENV])
    url = make_url(db_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        return Path(url.database).with_name(Path(url.database).name + ".head")
    return None


def read_anchor(db_url: str) -> tuple[int, str] | None:
    """(seq, hash) of the newest event anchored, or None where there is no anchor (yet)."""
    path = anchor_path(db_url)
    if path is None or not path.exists():
        return None
    seq, digest = path.read_text().split()
    return int(seq), digest


def record_head(db_url: str, seq: int, digest: str) -> None:
    """Anchor (seq, digest) unless a newer event is anchored already (two processes may commit in either order)."""
    path = anchor_path(db_url)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = read_anchor(db_url)
        if current is not None and current[0] >= seq:
            return
        staged = path.with_name(path.name + ".tmp")
        staged.write_text(f"{seq} {digest}\n")
        os.replace(staged, path)
