"""nodes (drain flag, lost marker, acknowledged XID counts) and leases (leader election with a
fencing token)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("node_id", sa.String(128), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("drained", sa.Boolean(), nullable=False),
        sa.Column("drain_reason", sa.Text(), nullable=True),
        sa.Column("lost", sa.Boolean(), nullable=False),
        sa.Column("lost_at", sa.Float(), nullable=True),
        sa.Column("xid_ack", sa.JSON(), nullable=True),
        sa.Column("updated_at", sa.Float(), nullable=False),
    )
    leases = op.create_table(
        "leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(255), nullable=True),
        sa.Column("token", sa.Integer(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
    )
    # The row exists from the start, so acquiring is always an UPDATE of one locked row.
    op.bulk_insert(leases, [{"name": "leader", "holder": None, "token": 0, "expires_at": 0.0}])


def downgrade() -> None:
    op.drop_table("leases")
    op.drop_table("nodes")
