"""Events say how many restarts they spent; jobs keep how far their files were copied.

A job's restarts were counted by matching the reasons of its events (``attempt N failed
…; restarting …``): each such event becomes one spent restart here, so a job in flight
keeps the budget it had. The copy offsets were a file per job, written after the lines
were committed; they start at 0, as a job submitted after the upgrade does.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("events") as events:
        events.add_column(sa.Column("restarts", sa.Integer, nullable=False, server_default="0"))
    with op.batch_alter_table("jobs") as jobs:
        for name in ("log_offset", "metrics_offset"):
            jobs.add_column(sa.Column(name, sa.BigInteger, nullable=False, server_default="0"))
    # the reason the runner wrote for a restart after the job's own failure
    op.execute(
        "UPDATE events SET restarts = 1 WHERE state = 'restarting' AND reason LIKE 'attempt %'"
    )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.drop_column("metrics_offset")
        jobs.drop_column("log_offset")
    with op.batch_alter_table("events") as events:
        events.drop_column("restarts")
