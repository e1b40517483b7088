"""Initial schema: requests, status_changes, audit_events.

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00

Written by hand (not imported from db.models) so the migration stays frozen
even when the models evolve. Constraint names follow Base.metadata's naming
convention.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "requests",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("ticket_id", sa.String(length=128), nullable=False),
        sa.Column("request_type", sa.String(length=64), nullable=False),
        sa.Column("regulation", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("reason_code", sa.String(length=64), nullable=True),
        sa.Column("reason_detail", sa.Text(), nullable=True),
        sa.Column("spec_json", sa.Text(), nullable=False),
        sa.Column("spec_hash", sa.String(length=64), nullable=False),
        sa.Column("target_model_uri", sa.Text(), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("result_model_uri", sa.Text(), nullable=True),
        sa.Column("metrics_json", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_requests"),
    )
    op.create_index("ix_requests_ticket_id", "requests", ["ticket_id"], unique=True)
    op.create_index("ix_requests_status", "requests", ["status"], unique=False)

    op.create_table(
        "status_changes",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("request_id", sa.Integer(), nullable=False),
        sa.Column("from_status", sa.String(length=32), nullable=True),
        sa.Column("to_status", sa.String(length=32), nullable=False),
        sa.Column("reason_code", sa.String(length=64), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["requests.id"],
            name="fk_status_changes_request_id_requests",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_status_changes"),
    )
    op.create_index(
        "ix_status_changes_request_id", "status_changes", ["request_id"], unique=False
    )

    op.create_table(
        "audit_events",
        # Assigned by the application (contiguous 1, 2, 3 …), never by the DB.
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("ticket_id", sa.String(length=128), nullable=True),
        sa.Column("event_type", sa.String(length=64), nullable=False),
        sa.Column("payload_json", sa.Text(), nullable=False),
        sa.Column("created_at", sa.String(length=40), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_audit_events"),
    )
    op.create_index("ix_audit_events_ticket_id", "audit_events", ["ticket_id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_audit_events_ticket_id", table_name="audit_events")
    op.drop_table("audit_events")
    op.drop_index("ix_status_changes_request_id", table_name="status_changes")
    op.drop_table("status_changes")
    op.drop_index("ix_requests_status", table_name="requests")
    op.drop_index("ix_requests_ticket_id", table_name="requests")
    op.drop_table("requests")
