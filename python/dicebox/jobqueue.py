"""The embedded, durable job queue: jobs live in SQL (SQLAlchemy 2), not in process memory.

A job is submitted ``queued``; a processor ``claim``\\ s it, which makes it ``running`` under a
*lease* (an owner name and an expiry time) that the processor keeps alive with ``renew``. A
processor that dies stops renewing; once the lease has expired the next ``claim`` hands the job
to someone else (attempts + 1), or, when the job has used up ``max_attempts``, ends it ``failed``
with the last error. Jobs are ordered by priority (higher first), FIFO within one priority.
Idempotency keys make submission safe to retry: the same key returns the same job.

Statuses: ``queued``, ``running``, ``succeeded``, ``failed``, ``canceled``.

Storage is SQLite by default (a file) or PostgreSQL (``postgresql+psycopg://...``); the same
code runs on both. The only dialect-specific part is how ``claim`` is made safe under
concurrent claimers (see ``JobQueue._write``/``JobQueue.claim``).

Every public method runs in its own short transaction and returns plain dicts (times as ISO 8601
strings in UTC); unknown ids raise ``KeyError``, bad arguments raise ``ValueError`` naming the
argument. Times come from the clock of the calling process, so processes sharing one database
are assumed to have reasonably synchronised clocks (leases are seconds long, not milliseconds).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any, Optional

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Engine,
    Float,
    Index,
    Integer,
    String,
    Text,
    and_,
    func,
    or_,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator

__all__ = ["KINDS", "STATUSES", "Job", "JobQueue"]

STATUSES = ("queued", "running", "succeeded", "failed", "canceled")
FINISHED = ("succeeded", "failed", "canceled")
KINDS = frozenset({"train", "evolve"})
MIN_PRIORITY, MAX_PRIORITY = -100, 100
MAX_LIST_LIMIT = 1000


def _now() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime on every backend.

    PostgreSQL has ``timestamptz``; SQLite has no datetime type at all, and SQLAlchemy stores a
    naive string there. Normalising to naive UTC on the way in and re-attaching UTC on the way
    out gives aware datetimes everywhere, and keeps SQLite's string comparisons (lease expiry,
    pagination cursors) correct because every stored value has the same format and zone.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Optional[datetime], dialect) -> Optional[datetime]:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not accepted; use timezone-aware UTC")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Optional[datetime], dialect) -> Optional[datetime]:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    pass


class Job(Base):
    """One row per job. See the module docstring for the life cycle."""

    __tablename__ = "jobs"
    __table_args__ = (
        # (ix_jobs_claim is declared below the class: it needs Job.priority.desc().)
        # Finding expired leases (status = 'running' AND lease_expires_at < now) on every claim.
        Index("ix_jobs_lease", "status", "lease_expires_at"),
        CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'canceled')",
            name="ck_jobs_status",
        ),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    priority: Mapped[int] = mapped_column(Integer, default=0)
    payload: Mapped[Any] = mapped_column(JSON)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    error: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    result: Mapped[Optional[Any]] = mapped_column(JSON, nullable=True)
    idempotency_key: Mapped[Optional[str]] = mapped_column(String(255), unique=True,
                                                           nullable=True)
    parent_id: Mapped[Optional[str]] = mapped_column(String(32), nullable=True, index=True)
    lease_owner: Mapped[Optional[str]] = mapped_column(String(255), nullable=True)
    lease_expires_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[Optional[datetime]] = mapped_column(UTCDateTime, nullable=True)

    def to_dict(self) -> dict[str, Any]:
        def iso(t: Optional[datetime]) -> Optional[str]:
            return None if t is None else t.isoformat()

        return {
            "id": self.id,
            "kind": self.kind,
            "status": self.status,
            "priority": self.priority,
            "payload": self.payload,
            "progress": self.progress,
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "error": self.error,
            "result": self.result,
            "idempotency_key": self.idempotency_key,
            "parent_id": self.parent_id,
            "cancel_requested": self.cancel_requested,
            "lease_owner": self.lease_owner,
            "lease_expires_at": iso(self.lease_expires_at),
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
        }


# The claim query filters on status and orders by priority desc, created_at: this index lets it
# read the head of the queue in index order instead of sorting every queued row.
Index("ix_jobs_claim", Job.status, Job.priority.desc(), Job.created_at)


# ---------------------------------------------------------------------------------------------
# argument checks (each names the argument it rejects)

def _check_str(name: str, value: Any, max_len: int = 255) -> str:
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise ValueError(f"{name} must be a non-empty string of at most {max_len} characters,"
                         f" got {value!r}")
    return value


def _check_int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in {lo}..{hi}, got {value!r}")
    return value


def _check_lease(lease_seconds: Any) -> float:
    if (isinstance(lease_seconds, bool) or not isinstance(lease_seconds, (int, float))
            or not math.isfinite(lease_seconds) or lease_seconds <= 0):
        raise ValueError(f"lease_seconds must be a finite number > 0, got {lease_seconds!r}")
    return float(lease_seconds)


def _check_json(name: str, value: Any) -> Any:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be JSON-serialisable: {exc}") from None
    return value


class JobQueue:
    """The queue over one SQLAlchemy ``Engine`` (SQLite or PostgreSQL)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.dialect = engine.dialect.name
        if self.dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"engine: unsupported dialect {self.dialect!r}"
                             " (sqlite or postgresql)")
        # expire_on_commit=False: the objects are turned into dicts after commit, without
        # another round trip to reload them.
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    def create_schema(self) -> None:
        """Create the ``jobs`` table and its indexes if they do not exist."""
        Base.metadata.create_all(self.engine)

    # -- transactions -------------------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._sessions() as session, session.begin():
            yield session

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """A short read-modify-write transaction.

        On SQLite the transaction starts with ``BEGIN IMMEDIATE``, which takes the database's
        single write lock up front (waiting out the busy timeout if someone else holds it). The
        default deferred ``BEGIN`` would first read under a shared lock and then try to upgrade
        it, and two transactions doing that at once either both read the same queued job or
        fail with "database is locked" instead of waiting. SQLite has no row locks, so
        serialising writers is the way to make ``claim`` (and every other check-then-update)
        atomic. On PostgreSQL a normal READ COMMITTED transaction is used; ``claim`` takes row
        locks with ``FOR UPDATE SKIP LOCKED``.
        """
        with self._sessions() as session, session.begin():
            if self.dialect == "sqlite":
                connection = session.connection()
                raw = connection.connection.driver_connection
                # The stdlib driver begins transactions lazily (before the first DML), so
                # nothing is open yet; skip if an engine-level recipe has already begun one.
                if not getattr(raw, "in_transaction", False):
                    connection.exec_driver_sql("BEGIN IMMEDIATE")
            yield session

    def _lock(self, stmt):
        # Row locks where the backend has them; SQLite is already serialised by _write.
        return stmt.with_for_update() if self.dialect == "postgresql" else stmt

    def _job(self, session: Session, job_id: Any, lock: bool = False) -> Job:
        _check_str("job_id", job_id, 64)
        stmt = select(Job).where(Job.id == job_id)
        job = session.scalars(self._lock(stmt) if lock else stmt).one_or_none()
        if job is None:
            raise KeyError(job_id)
        return job

    def _owned(self, session: Session, job_id: Any, owner: Any) -> Optional[Job]:
        """The job if ``owner`` holds its lease, else None (KeyError if it does not exist).

        A lease that has expired but has not been taken over yet still counts: nobody else has
        the job, so a late renew/complete from a slow (not dead) processor is accepted. Once
        ``claim`` hands the job to someone else or ends it, lease_owner/status say so.
        """
        _check_str("owner", owner)
        job = self._job(session, job_id, lock=True)
        if job.status != "running" or job.lease_owner != owner:
            return None
        return job

    # -- submission ---------------------------------------------------------------------------

    def submit(self, kind: str, payload: Any, priority: int = 0,
               idempotency_key: Optional[str] = None, parent_id: Optional[str] = None,
               max_attempts: int = 3) -> dict:
        """Queue a job; with an ``idempotency_key`` already used, return that job unchanged."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
        _check_json("payload", payload)
        _check_int("priority", priority, MIN_PRIORITY, MAX_PRIORITY)
        _check_int("max_attempts", max_attempts, 1, 100)
        if idempotency_key is not None:
            _check_str("idempotency_key", idempotency_key)
        if parent_id is not None:
            _check_str("parent_id", parent_id, 64)
        try:
            with self._write() as session:
                if idempotency_key is not None:
                    existing = session.scalars(
                        select(Job).where(Job.idempotency_key == idempotency_key)).one_or_none()
                    if existing is not None:
                        return existing.to_dict()
                if parent_id is not None and session.get(Job, parent_id) is None:
                    raise KeyError(f"parent_id {parent_id!r}")
                job = Job(id=uuid.uuid4().hex, kind=kind, status="queued", priority=priority,
                          payload=payload, progress=0.0, attempts=0, max_attempts=max_attempts,
                          idempotency_key=idempotency_key, parent_id=parent_id,
                          cancel_requested=False, created_at=_now())
                session.add(job)
                session.flush()
                return job.to_dict()
        except IntegrityError:
            # Lost a race: on PostgreSQL two transactions can both see "no such key" and both
            # insert; the unique index lets one win. The winner has committed by the time we
            # get the violation, so re-reading returns it.
            if idempotency_key is None:
                raise
            with self._read() as session:
                existing = session.scalars(
                    select(Job).where(Job.idempotency_key == idempotency_key)).one_or_none()
            if existing is None:
                raise
            return existing.to_dict()

    # -- processing ---------------------------------------------------------------------------

    def claim(self, owner: str, lease_seconds: float) -> Optional[dict]:
        """Take the next job (highest priority, oldest first) under a lease, or None.

        Candidates are queued jobs and running jobs whose lease has expired (their processor
        is presumed dead). Expired jobs that have used all their attempts are ended here
        (``failed``, or ``canceled`` if a cancel was requested) instead of being handed out.
        """
        _check_str("owner", owner)
        lease = _check_lease(lease_seconds)
        now = _now()
        expired = and_(Job.status == "running", Job.lease_expires_at < now)
        with self._write() as session:
            # 1. End the expired jobs that must not run again.
            dead = select(Job).where(expired, or_(Job.attempts >= Job.max_attempts,
                                                  Job.cancel_requested.is_(True)))
            if self.dialect == "postgresql":
                dead = dead.with_for_update(skip_locked=True)
            for job in session.scalars(dead):
                if job.cancel_requested:
                    job.status = "canceled"
                else:
                    job.status = "failed"
                    job.error = (f"lease expired after {job.attempts} attempts"
                                 f" (last error: {job.error or 'none'})")
                job.lease_owner = job.lease_expires_at = None
                job.finished_at = now

            # 2. Take the head of the queue.
            stmt = (select(Job)
                    .where(or_(Job.status == "queued", expired))
                    .order_by(Job.priority.desc(), Job.created_at, Job.id)
                    .limit(1))
            if self.dialect == "postgresql":
                # SKIP LOCKED: concurrent claimers each lock a *different* head row instead of
                # queueing up behind the same one (plain FOR UPDATE would make the losers wait,
                # then re-check and find it running). The row a claimer gets is locked until it
                # commits, so no two claimers can take the same job.
                stmt = stmt.with_for_update(skip_locked=True)
            job = session.scalars(stmt).one_or_none()
            if job is None:
                return None
            job.status = "running"
            job.attempts += 1
            job.progress = 0.0
            job.lease_owner = owner
            job.lease_expires_at = now + timedelta(seconds=lease)
            job.started_at = now
            job.finished_at = None
            return job.to_dict()

    def renew(self, job_id: str, owner: str, lease_seconds: float) -> bool:
        """Extend the lease. False means the job is no longer this owner's (taken over,
        finished, or cancel requested): the caller must stop working on it."""
        lease = _check_lease(lease_seconds)
        with self._write() as session:
            job = self._owned(session, job_id, owner)
            if job is None or job.cancel_requested:
                return False
            job.lease_expires_at = _now() + timedelta(seconds=lease)
            return True

    def progress(self, job_id: str, owner: str, value: float) -> bool:
        """Record progress in [0, 1]; False if ``owner`` no longer holds the lease."""
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not 0.0 <= value <= 1.0):
            raise ValueError(f"value (progress) must be a number in [0, 1], got {value!r}")
        with self._write() as session:
            job = self._owned(session, job_id, owner)
            if job is None:
                return False
            job.progress = float(value)
            return True

    def complete(self, job_id: str, owner: str, result: Any = None) -> bool:
        """Mark the job succeeded with ``result``; only the lease owner can (else False).

        A cancel requested while the job ran does not discard a result delivered anyway."""
        _check_json("result", result)
        with self._write() as session:
            job = self._owned(session, job_id, owner)
            if job is None:
                return False
            job.status = "succeeded"
            job.result = result
            job.error = None
            job.progress = 1.0
            job.finished_at = _now()
            job.lease_owner = job.lease_expires_at = None
            return True

    def fail(self, job_id: str, owner: str, error: str, retry: bool = True) -> bool:
        """Record a failure; only the lease owner can (else False).

        With ``retry`` and attempts left the job goes back to ``queued``; otherwise it ends
        ``failed`` with ``error``. If a cancel was requested it ends ``canceled``.
        """
        if not isinstance(error, str):
            raise ValueError(f"error must be a string, got {type(error).__name__}")
        with self._write() as session:
            job = self._owned(session, job_id, owner)
            if job is None:
                return False
            job.error = error
            job.lease_owner = job.lease_expires_at = None
            if job.cancel_requested:
                job.status, job.finished_at = "canceled", _now()
            elif retry and job.attempts < job.max_attempts:
                job.status, job.progress = "queued", 0.0
            else:
                job.status, job.finished_at = "failed", _now()
            return True

    def acknowledge_cancel(self, job_id: str, owner: str) -> bool:
        """The owner confirms it stopped after a cancel request: the job ends ``canceled``.
        False if ``owner`` no longer holds the lease or no cancel was requested."""
        with self._write() as session:
            job = self._owned(session, job_id, owner)
            if job is None or not job.cancel_requested:
                return False
            job.status, job.finished_at = "canceled", _now()
            job.lease_owner = job.lease_expires_at = None
            return True

    def cancel(self, job_id: str) -> dict:
        """Cancel: a queued job at once; a running one by request (its owner's next ``renew``
        returns False and it ends ``canceled`` when the owner gives it up); a finished job is
        returned unchanged."""
        with self._write() as session:
            job = self._job(session, job_id, lock=True)
            if job.status == "queued":
                job.status, job.finished_at = "canceled", _now()
            elif job.status == "running":
                job.cancel_requested = True
            return job.to_dict()

    # -- reading ------------------------------------------------------------------------------

    def get(self, job_id: str) -> dict:
        with self._read() as session:
            return self._job(session, job_id).to_dict()

    def list(self, status: Optional[str] = None, limit: int = 50,
             cursor: Optional[str] = None) -> dict:
        """Jobs newest first (created_at, then id: a stable total order), ``limit`` at a time.

        Returns ``{"items": [...], "next": cursor or None}``. The cursor is opaque (keyset
        pagination on (created_at, id)), so pages stay consistent while jobs are added.
        """
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {list(STATUSES)}, got {status!r}")
        _check_int("limit", limit, 1, MAX_LIST_LIMIT)
        stmt = select(Job).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
        if status is not None:
            stmt = stmt.where(Job.status == status)
        if cursor is not None:
            after_time, after_id = _decode_cursor(cursor)
            stmt = stmt.where(or_(Job.created_at < after_time,
                                  and_(Job.created_at == after_time, Job.id < after_id)))
        with self._read() as session:
            jobs = session.scalars(stmt).all()
        more = len(jobs) > limit
        jobs = jobs[:limit]
        return {"items": [job.to_dict() for job in jobs],
                "next": _encode_cursor(jobs[-1]) if more else None}

    def depth(self) -> dict[int, int]:
        """Number of queued jobs per priority, highest priority first."""
        with self._read() as session:
            rows = session.execute(
                select(Job.priority, func.count())
                .where(Job.status == "queued")
                .group_by(Job.priority)
                .order_by(Job.priority.desc())).all()
        return {int(priority): int(count) for priority, count in rows}


def _encode_cursor(job: Job) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode()


def _decode_cursor(cursor: Any) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor.encode()).decode()
        when, job_id = raw.split("|", 1)
        created = datetime.fromisoformat(when)
        if created.tzinfo is None or not job_id:
            raise ValueError
        return created, job_id
    except (AttributeError, ValueError, binascii.Error, UnicodeDecodeError):
        raise ValueError(f"cursor is not a cursor returned by list(): {cursor!r}") from None
