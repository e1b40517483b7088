"""The HTTP intake: request revisions, status callbacks (an outbox) and the webhook replay guard.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 00:00:00

A callback is written in the same transaction as the status change it reports, so none is lost when the sender
is down; `expunge callbacks` (and `expunge serve`) deliver them with retries. A signed intake body is accepted
once: its signature's hash is kept for the timestamp tolerance window.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.add_column(sa.Column("revision", sa.Integer(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("callback_url", sa.Text(), nullable=True))
    op.create_table(
        "callback_deliveries",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("ticket_id", sa.String(length=128), nullable=False),
        sa.Column("payload_json", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("given_up_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_callback_deliveries"),
    )
    op.create_index("ix_callback_deliveries_ticket_id", "callback_deliveries", ["ticket_id"], unique=False)
    op.create_table(
        "webhook_receipts",
        sa.Column("signature_sha256", sa.String(length=64), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("signature_sha256", name="pk_webhook_receipts"),
    )


def downgrade() -> None:
    op.drop_table("webhook_receipts")
    op.drop_index("ix_callback_deliveries_ticket_id", table_name="callback_deliveries")
    op.drop_table("callback_deliveries")
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("callback_url")
        batch.drop_column("revision")
