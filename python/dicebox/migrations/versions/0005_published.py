"""RabbitMQ mode: when each job's broker message was confirmed (jobs.published_at), and a
partial index over the jobs still to publish (the outbox's query, see dicebox.outbox).

Existing jobs get published_at NULL: a database upgraded and then served with a broker
publishes its queued train jobs once (a processor answers a duplicate of a job that has
already run with "done").

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

from dicebox.db import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# The same text as dicebox.jobqueue.UNPUBLISHED (repeated here: a migration must not change
# when the code it was written against does).
UNPUBLISHED = "status = 'queued' AND kind = 'train' AND published_at IS NULL"


def upgrade() -> None:
    # A plain ADD COLUMN on both backends (nullable, no default): no table rebuild.
    op.add_column("jobs", sa.Column("published_at", UTCDateTime, nullable=True))
    op.create_index("ix_jobs_unpublished", "jobs",
                    ["status", "kind", sa.text("priority DESC"), "created_at", "id"],
                    sqlite_where=sa.text(UNPUBLISHED), postgresql_where=sa.text(UNPUBLISHED))


def downgrade() -> None:
    op.drop_index("ix_jobs_unpublished", table_name="jobs")
    # A plain DROP COLUMN (SQLite >= 3.35): a batch rebuild of the table would lose the
    # indexes SQLAlchemy cannot reflect (ix_jobs_claim's "priority DESC").
    op.drop_column("jobs", "published_at")
