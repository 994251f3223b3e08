"""Datasets of the sensory store (dicebox.sensory): shape, committed image count, categories.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

from dicebox.db import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "datasets",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("uid", sa.String(32), nullable=False),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("channels", sa.Integer, nullable=False),
        sa.Column("count", sa.BigInteger, nullable=False),
        sa.Column("categories", sa.JSON, nullable=False),
        sa.Column("category_starts", sa.JSON, nullable=False),
        sa.Column("counts", sa.JSON, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.CheckConstraint("channels IN (1, 3)", name="ck_datasets_channels"),
        sa.CheckConstraint("count >= 0", name="ck_datasets_count"),
    )


def downgrade() -> None:
    op.drop_table("datasets")
