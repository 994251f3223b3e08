"""Schema migrations (Alembic): a new database gets the newest schema, and a database made
by an older dicebox is upgraded in place with its data kept (0005, RabbitMQ mode's
jobs.published_at, on SQLite and PostgreSQL)."""

from __future__ import annotations

import sqlite3

from sqlalchemy import inspect, text

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


def _upgrade_to(engine, revision: str) -> None:
    from alembic import command

    from dicebox.db import _alembic_config

    command.upgrade(_alembic_config(engine), revision)


def _downgrade_to(engine, revision: str) -> None:
    from alembic import command

    from dicebox.db import _alembic_config

    command.downgrade(_alembic_config(engine), revision)


def _insert_0004_job(connection, job_id: str, kind: str, status: str, priority: int, created: str) -> None:
    connection.execute(text(
        "INSERT INTO jobs (id, kind, status, priority, payload, progress, attempts, max_attempts,"
        " cancel_requested, created_at, state) VALUES (:id, :kind, :status, :priority, :payload,"
        " 0.0, :attempts, 3, :cancel, :created, NULL)"),
        {"id": job_id, "kind": kind, "status": status, "priority": priority, "payload": '{"n": 1}',
         "attempts": 0 if status == "queued" else 1, "cancel": False, "created": created})


def test_0005_adds_published_at_to_a_0004_database_with_jobs(new_engine):
    engine = new_engine()
    _upgrade_to(engine, "0004")
    assert current_revision(engine) == "0004"
    assert "published_at" not in {c["name"] for c in inspect(engine).get_columns("jobs")}
    rows = [("a" * 32, "train", "queued", 0, "2026-01-01 00:00:01"),
            ("b" * 32, "train", "queued", 5, "2026-01-01 00:00:02"),
            ("c" * 32, "evolve", "queued", 9, "2026-01-01 00:00:03"),
            ("d" * 32, "train", "succeeded", 9, "2026-01-01 00:00:04")]
    with engine.begin() as connection:
        for row in rows:
            _insert_0004_job(connection, *row)

    migrate(engine)
    assert current_revision(engine) == head_revision()
    assert "published_at" in {c["name"] for c in inspect(engine).get_columns("jobs")}
    assert "ix_jobs_unpublished" in {i["name"] for i in inspect(engine).get_indexes("jobs")}
    queue = JobQueue(new_engine())
    # Every job kept, none marked published: the queued train jobs are what a server started
    # with a broker publishes first (highest priority first).
    for job_id, kind, status, priority, _ in rows:
        job = queue.get(job_id)
        assert (job["kind"], job["status"], job["priority"]) == (kind, status, priority)
        assert job["payload"] == {"n": 1} and job["published_at"] is None
    assert [j["id"] for j in queue.unpublished()] == ["b" * 32, "a" * 32]
    assert queue.mark_published(["b" * 32]) == 1
    assert [j["id"] for j in queue.unpublished()] == ["a" * 32]
    # And the queue works on as before.
    assert queue.claim("w", 30)["id"] == "c" * 32


def test_0005_downgrade_keeps_the_jobs_and_the_other_indexes(new_engine):
    engine = new_engine()
    migrate(engine)
    queue = JobQueue(engine)
    job = queue.submit("train", {"n": 2}, priority=3)
    queue.mark_published([job["id"]])
    indexes_at_head = {i["name"] for i in inspect(engine).get_indexes("jobs")}
    _downgrade_to(engine, "0004")
    assert current_revision(engine) == "0004"
    assert "published_at" not in {c["name"] for c in inspect(engine).get_columns("jobs")}
    assert {i["name"] for i in inspect(engine).get_indexes("jobs")} == indexes_at_head - {"ix_jobs_unpublished"}
    migrate(engine)
    again = JobQueue(new_engine()).get(job["id"])
    assert again["payload"] == {"n": 2} and again["priority"] == 3 and again["published_at"] is None
