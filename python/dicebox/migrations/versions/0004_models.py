"""The model registry: one row per trained model (its files live in DICEBOX_HOME/models/<id>/).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

from dicebox.db import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("job_id", sa.String(64), nullable=True, unique=True),
        sa.Column("dataset", sa.String(255), nullable=False),
        sa.Column("dataset_version", sa.Integer, nullable=True),
        sa.Column("categories", sa.JSON, nullable=False),
        sa.Column("input_shape", sa.JSON, nullable=False),
        sa.Column("genome", sa.JSON, nullable=False),
        sa.Column("history", sa.JSON, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=True),
        sa.Column("fitness", sa.Float, nullable=True),
        sa.Column("val_accuracy", sa.Float, nullable=True),
        sa.Column("training_seconds", sa.Float, nullable=True),
        sa.Column("weights_sha256", sa.String(64), nullable=False),
        sa.Column("weights_bytes", sa.BigInteger, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_models_dataset_fitness", "models", ["dataset", "fitness", "created_at"])
    op.create_index("ix_models_created", "models", ["created_at", "id"])


def downgrade() -> None:
    op.drop_table("models")
