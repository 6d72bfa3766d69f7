"""Jobs may be preemptible, and may say how long they expect to run (for backfill).

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:  # batch: SQLite cannot ALTER most things
        jobs.add_column(
            sa.Column("preemptible", sa.Boolean, nullable=False, server_default=sa.false())
        )
        jobs.add_column(sa.Column("expected_runtime", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.drop_column("expected_runtime")
        jobs.drop_column("preemptible")
