"""Engine / session management and programmatic Alembic upgrades."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from db.anchor import record_head

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# The newest migration (a test checks it against db/migrations): a database already there is used without loading
# Alembic, which would cost every short command (`expunge status`) half a second.
HEAD_REVISION = "0005"
SQLITE_BUSY_TIMEOUT_S = 30.0

_lock = threading.RLock()
_engines: dict[str, Engine] = {}
_sessionmakers: dict[str, sessionmaker[Session]] = {}
_upgraded: set[str] = set()


def _is_sqlite_memory(url: str) -> bool:
    u = make_url(url)
    return u.get_backend_name() == "sqlite" and u.database in (None, "", ":memory:")


def make_engine(url: str) -> Engine:
    """One cached Engine per URL (engines own connection pools; make them once)."""
    with _lock:
        engine = _engines.get(url)
        if engine is not None:
            return engine

        kwargs: dict[str, Any] = {}
        is_sqlite = make_url(url).get_backend_name() == "sqlite"
        if is_sqlite:
            # pysqlite's `timeout` is SQLite's busy timeout: wait for the
            # writer lock instead of failing with "database is locked".
            kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False}
            if _is_sqlite_memory(url):
                # Every new connection to :memory: is a fresh empty DB; share one.
                kwargs["poolclass"] = StaticPool
        else:
            kwargs["pool_pre_ping"] = True

        engine = create_engine(url, **kwargs)

        if is_sqlite:

            @event.listens_for(engine, "connect")
            def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
                # SQLite ignores FOREIGN KEY clauses unless enabled per connection.
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
                cur.close()

        _engines[url] = engine
        return engine


def alembic_config(url: str):
    """Alembic config pointing at db/migrations, independent of the CWD and of any ini file."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation: a literal '%' in a URL (e.g. an encoded password) must be doubled.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


class DatabaseTooNew(RuntimeError):
    """The database was migrated by a newer expunge: this one would not understand its tables."""


def upgrade_database(url: str) -> None:
    """Bring the database at `url` to the latest Alembic revision. Idempotent."""
    engine = make_engine(url)
    with engine.begin() as conn:
        if _current_revision(conn) == HEAD_REVISION:  # already there: skip Alembic altogether
            return
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    cfg = alembic_config(url)
    scripts = ScriptDirectory.from_config(cfg)
    head = scripts.get_current_head()
    with engine.begin() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
        if current == head:
            return
        if current is not None and current not in {script.revision for script in scripts.walk_revisions()}:
            raise DatabaseTooNew(f"the database is at schema revision {current}, newer than this expunge knows "
                                 f"({head}): upgrade expunge to the version that wrote it")
        # Hand our connection to env.py (it checks config.attributes) so that
        # in-memory SQLite and engine settings are shared with the app.
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def _current_revision(conn) -> str | None:
    """The database's Alembic revision, or None for a database Alembic never touched."""
    try:
        with conn.begin_nested():
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except Exception:  # no such table: a new database
        return None


def _sessionmaker(url: str) -> sessionmaker[Session]:
    with _lock:
        sm = _sessionmakers.get(url)
        if sm is None:
            # expire_on_commit=False: objects returned from a session_scope stay
            # readable after it commits and closes.
            sm = sessionmaker(bind=make_engine(url), expire_on_commit=False)
            _sessionmakers[url] = sm
        return sm


def ensure_database(url: str) -> None:
    """Upgrade `url` once per process (later calls are a set lookup)."""
    if url in _upgraded:
        return
    with _lock:
        if url not in _upgraded:
            upgrade_database(url)
            _upgraded.add(url)


@contextmanager
def session_scope(url: str, seal_key: bytes | None = None) -> Iterator[Session]:
    """Transactional scope: commit on success, roll back on any exception. `seal_key` seals the audit events
    appended in it (`db.audit.compute_seal`); the application always passes its deployment's."""
    ensure_database(url)
    session = _sessionmaker(url)()
    if seal_key:
        session.info["audit_seal_key"] = seal_key
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


@event.listens_for(Session, "after_commit")
def _anchor_audit_head(session: Session) -> None:
    head = session.info.pop("audit_head", None)
    if head is not None and session.bind is not None:
        record_head(session.bind.url.render_as_string(hide_password=False), *head)


@event.listens_for(Session, "after_rollback")
def _forget_audit_head(session: Session) -> None:
    session.info.pop("audit_head", None)


def dispose_engines() -> None:
    """Close all cached engines (tests, forked workers)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
        _sessionmakers.clear()
        _upgraded.clear()
