"""Schema migrations (Alembic): a new database gets the newest schema, and a database made
by an older dicebox is upgraded in place with its data kept."""

from __future__ import annotations

import sqlite3

from sqlalchemy import inspect

from dicebox.db import current_revision, head_revision, make_engine, migrate
from dicebox.jobqueue import JobQueue

# The jobs table as the first release created it (create_all, before migrations existed).
PRE_MIGRATION_JOBS = """
CREATE TABLE jobs (
    id VARCHAR(32) NOT NULL PRIMARY KEY, kind VARCHAR(32) NOT NULL, status VARCHAR(16) NOT NULL,
    priority INTEGER NOT NULL, payload JSON NOT NULL, progress FLOAT NOT NULL,
    attempts INTEGER NOT NULL, max_attempts INTEGER NOT NULL, error TEXT, result JSON,
    idempotency_key VARCHAR(255) UNIQUE, parent_id VARCHAR(32), lease_owner VARCHAR(255),
    lease_expires_at DATETIME, cancel_requested BOOLEAN NOT NULL, created_at DATETIME NOT NULL,
    started_at DATETIME, finished_at DATETIME,
    CONSTRAINT ck_jobs_status CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'canceled')))
"""


def test_new_database_gets_every_table_at_head(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'new.db'}")
    migrate(engine)
    assert current_revision(engine) == head_revision()
    assert {"jobs", "job_events"} <= set(inspect(engine).get_table_names())
    migrate(engine)  # a second run is a no-op
    assert current_revision(engine) == head_revision()


def test_pre_migration_database_is_adopted_and_keeps_its_jobs(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.execute(PRE_MIGRATION_JOBS)
        conn.execute("INSERT INTO jobs VALUES ('a1', 'train', 'queued', 0, '{\"n\": 1}', 0.0, 0, 3, NULL,"
                     " NULL, 'key', NULL, NULL, NULL, 0, '2026-01-01 00:00:00.000000', NULL, NULL)")
    engine = make_engine(f"sqlite:///{path}")
    migrate(engine)
    assert current_revision(engine) == head_revision()
    queue = JobQueue(engine)
    job = queue.get("a1")
    assert job["payload"] == {"n": 1} and job["state"] is None and job["idempotency_key"] == "key"
    claimed = queue.claim("w", 30)
    assert claimed["id"] == "a1"
    assert [e["data"]["status"] for e in queue.events("a1")] == ["running"]
