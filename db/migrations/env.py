"""Alembic environment for expunge.

Used both programmatically (db.session.upgrade_database, which passes a live
connection via ``config.attributes["connection"]``) and from the CLI
(``alembic -c db/alembic.ini upgrade head``).
"""

from __future__ import annotations

from logging.config import fileConfig
from typing import Any

from alembic import context
from sqlalchemy import Connection, create_engine, pool

from db.models import Base

config = context.config
target_metadata = Base.metadata

# Only configure logging when run from an ini file (CLI). Programmatic
# upgrades must not reconfigure the host application's logging or spam stdout.
if config.config_file_name is not None and config.attributes.get("connection") is None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _configure_kwargs() -> dict[str, Any]:
    return {
        "target_metadata": target_metadata,
        # SQLite cannot ALTER most things; batch mode recreates the table.
        "render_as_batch": True,
        "compare_type": True,
    }


def _url() -> str | None:
    # CLI convenience: `-x url=...` overrides sqlalchemy.url from the ini.
    return context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )


def run_migrations_offline() -> None:
    """Emit SQL to stdout instead of executing it (alembic upgrade --sql)."""
    context.configure(
        url=_url(),
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **_configure_kwargs(),
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_with_connection(connection: Connection) -> None:
    context.configure(connection=connection, **_configure_kwargs())
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_with_connection(connection)
        return
    url = _url()
    if not url:
        raise RuntimeError("sqlalchemy.url is not set in the Alembic config")
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as connection:
        _run_with_connection(connection)
        connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
