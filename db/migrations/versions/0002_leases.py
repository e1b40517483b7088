"""Claims and leases: which runner holds a ticket, and until when.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05 00:00:00

A runner claims a ticket with a compare-and-set on these columns and renews the lease while it works; a ticket
whose lease ran out is taken up again by the next run (db/requests_repo.py::claim).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.add_column(sa.Column("claimed_by", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("lease_expires_at")
        batch.drop_column("claimed_by")
