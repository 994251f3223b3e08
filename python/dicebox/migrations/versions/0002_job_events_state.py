"""Job events (the SSE stream's source) and the owner's working state of a job.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

from dicebox.db import UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("state", sa.JSON, nullable=True))
    op.create_table(
        "job_events",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("data", sa.JSON, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_job_events_job_id", "job_events", ["job_id", "seq"])


def downgrade() -> None:
    op.drop_table("job_events")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("state")
