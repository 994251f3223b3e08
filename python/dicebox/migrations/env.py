"""Alembic environment for dicebox: runs on the engine dicebox.db.migrate passes in."""

from alembic import context

from dicebox.db import Base

target_metadata = Base.metadata
engine = context.config.attributes["engine"]

with engine.begin() as connection:
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    context.run_migrations()
