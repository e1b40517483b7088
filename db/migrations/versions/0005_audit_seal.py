"""Every audit event carries a seal: HMAC-SHA256 of its hash under a key derived from the deployment secret.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 00:00:00

The chain itself stays recomputable by anyone holding an export; the seal is what a database writer without the
deployment key cannot produce, so a forged event appended with a recomputed hash (or a re-chained log) fails
`audit verify`. Events written before this revision have no seal and are reported as such.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A plain ADD COLUMN (not a batch copy of the table), so the append-only triggers of 0003 stay in place.
    op.add_column("audit_events", sa.Column("seal", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_column("seal")
