"""The embedded, durable job queue: jobs live in SQL (SQLAlchemy 2), not in process memory.

A job is submitted ``queued``; a processor ``claim``\\ s it, which makes it ``running`` under a
*lease* (an owner name and an expiry time) that the processor keeps alive with ``renew``. A
processor that dies stops renewing; once the lease has expired the next ``claim`` hands the job
to someone else (attempts + 1), or, when the job has used up ``max_attempts``, ends it ``failed``
with the last error. Jobs are ordered by priority (higher first), FIFO within one priority.
Idempotency keys make submission safe to retry: the same key returns the same job.

In RabbitMQ mode the broker decides who gets which job, and the queue stays the truth:
``claim_job`` takes the one job a message names (or says why not: it runs elsewhere, has
ended, or has used up its attempts), and ``unpublished``/``mark_published`` are the outbox
through which every queued train job reaches the broker (see ``dicebox.outbox``).

Statuses: ``queued``, ``running``, ``succeeded``, ``failed``, ``canceled``.

Storage is SQLite by default (a file) or PostgreSQL (``postgresql+psycopg://...``); the same
code runs on both. The only dialect-specific part is how ``claim`` is made safe under
concurrent claimers (see ``dicebox.db.Transactions`` and ``JobQueue.claim``).

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
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
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
    text,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from dicebox.db import Base, Transactions, UTCDateTime, iso, migrate
from dicebox.db import now as _now

__all__ = ["KINDS", "STATUSES", "Job", "JobEvent", "JobQueue"]

STATUSES = ("queued", "running", "succeeded", "failed", "canceled")
FINISHED = ("succeeded", "failed", "canceled")
KINDS = frozenset({"train", "evolve"})
MIN_PRIORITY, MAX_PRIORITY = -100, 100
MAX_LIST_LIMIT = 1000


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
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    result: Mapped[Any | None] = mapped_column(JSON, nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True,
                                                           nullable=True)
    parent_id: Mapped[str | None] = mapped_column(String(32), nullable=True, index=True)
    lease_owner: Mapped[str | None] = mapped_column(String(255), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Working state its owner keeps between steps (an evolve job's generations), saved with
    # save_state so a new owner carries on where the last one stopped.
    state: Mapped[Any | None] = mapped_column(JSON, nullable=True)
    # RabbitMQ mode: when the job's message was confirmed by the broker (None = not yet, or
    # never for evolve jobs, which the server runs itself). See dicebox.outbox.
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    def to_dict(self) -> dict[str, Any]:
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
            "state": self.state,
            "published_at": iso(self.published_at),
        }


class JobEvent(Base):
    """What happened to a job, in order: status changes (written by the queue in the same
    transaction as the change) and whatever its owner reports (epochs, individuals). The
    events stream of the REST API replays these rows, so a client that connects late sees
    everything."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id", "job_id", "seq"),)

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(32))
    type: Mapped[str] = mapped_column(String(32))
    data: Mapped[Any] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "job_id": self.job_id, "type": self.type, "data": self.data,
                "created_at": iso(self.created_at)}


# The claim query filters on status and orders by priority desc, created_at: this index lets it
# read the head of the queue in index order instead of sorting every queued row.
Index("ix_jobs_claim", Job.status, Job.priority.desc(), Job.created_at)

# What the outbox publishes (RabbitMQ mode): queued train jobs whose message the broker has
# not confirmed yet. Written as literal SQL because both SQLite and PostgreSQL use a partial
# index only when the query's WHERE repeats the index's predicate with the same constants
# (a bound parameter does not match); the outbox query uses exactly this text.
UNPUBLISHED = "status = 'queued' AND kind = 'train' AND published_at IS NULL"
# A partial index: it holds only the jobs waiting to be published (normally none or a few),
# already in the order they are published, so the outbox's frequent look costs next to
# nothing however many jobs the table holds (migration 0005 creates it). status and kind are
# constant inside it, but listed as columns all the same: SQLite without ANALYZE statistics
# ranks indexes by how many leading columns the WHERE pins down, and would otherwise prefer
# ix_jobs_claim (status = ?) and walk every queued job, published or not.
Index("ix_jobs_unpublished", Job.status, Job.kind, Job.priority.desc(), Job.created_at, Job.id,
      sqlite_where=text(UNPUBLISHED), postgresql_where=text(UNPUBLISHED))


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


def _check_progress(value: Any) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not 0.0 <= value <= 1.0):
        raise ValueError(f"value (progress) must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_json(name: str, value: Any) -> Any:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be JSON-serialisable: {exc}") from None
    return value


class JobQueue:
    """The queue over one SQLAlchemy ``Engine`` (SQLite or PostgreSQL)."""

    def __init__(self, engine: Engine, brokered_kinds: Iterable[str] = ()):
        """``brokered_kinds``: the kinds of job that travel as broker messages (RabbitMQ mode:
        ``("train",)``); ``claim`` never ends those (see ``claim_job``)."""
        self.brokered_kinds = tuple(brokered_kinds)
        if not set(self.brokered_kinds) <= KINDS:
            raise ValueError(f"brokered_kinds must be a subset of {sorted(KINDS)}, got {brokered_kinds!r}")
        self.engine = engine
        self._tx = Transactions(engine)  # ValueError for a backend other than SQLite/PostgreSQL
        self.dialect = self._tx.dialect
        # Short transactions (see dicebox.db.Transactions for how SQLite's are serialised).
        self._read, self._write, self._lock = self._tx.read, self._tx.write, self._tx.lock

    def create_schema(self) -> None:
        """Create or upgrade the service's tables (Alembic migrations, see dicebox.db)."""
        migrate(self.engine)

    @staticmethod
    def _event(session: Session, job: Job, type_: str, data: dict) -> None:
        session.add(JobEvent(job_id=job.id, type=type_, data=data, created_at=_now()))

    def _status_event(self, session: Session, job: Job, **extra: Any) -> None:
        self._event(session, job, "status", {"status": job.status, "attempts": job.attempts,
                                             "progress": job.progress, "error": job.error, **extra})

    def _job(self, session: Session, job_id: Any, lock: bool = False) -> Job:
        _check_str("job_id", job_id, 64)
        stmt = select(Job).where(Job.id == job_id)
        job = session.scalars(self._lock(stmt) if lock else stmt).one_or_none()
        if job is None:
            raise KeyError(job_id)
        return job

    def _owned(self, session: Session, job_id: Any, owner: Any) -> Job | None:
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
               idempotency_key: str | None = None, parent_id: str | None = None,
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
                self._status_event(session, job)
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

    def claim(self, owner: str, lease_seconds: float,
              kinds: tuple[str, ...] | None = None) -> dict | None:
        """Take the next job (highest priority, oldest first) under a lease, or None.

        Candidates are queued jobs and running jobs whose lease has expired (their processor
        is presumed dead), of one of ``kinds`` (default: any). Expired jobs (of any kind but
        the ``brokered_kinds``) that have used all their attempts are ended here (``failed``, or
        ``canceled`` if a cancel was requested) instead of being handed out.
        """
        _check_str("owner", owner)
        lease = _check_lease(lease_seconds)
        if kinds is not None and (not kinds or not set(kinds) <= KINDS):
            raise ValueError(f"kinds must be a non-empty subset of {sorted(KINDS)}, got {kinds!r}")
        now = _now()
        expired = and_(Job.status == "running", Job.lease_expires_at < now)
        of_kind = Job.kind.in_(kinds) if kinds is not None else True
        # Brokered jobs are ended by claim_job when their message comes back, so that the
        # message is dead-lettered; a claim here (the coordinator's) must not beat it to it.
        endable = Job.kind.not_in(self.brokered_kinds) if self.brokered_kinds else True
        # A read first: most claims (idle processors polling, the coordinator looking for
        # evolve jobs) find nothing, and a read does not take SQLite's single write lock,
        # which submissions and reports need.
        with self._read() as session:
            # (Expired jobs of any kind but the brokered ones count: the write below also ends
            # the dead ones.)
            if session.scalars(select(Job.id).where(or_(and_(Job.status == "queued", of_kind),
                                                        and_(expired, endable)))
                               .limit(1)).first() is None:
                return None
        with self._write() as session:
            # 1. End the expired jobs that must not run again.
            dead = select(Job).where(expired, endable, or_(Job.attempts >= Job.max_attempts,
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
                self._status_event(session, job)
                self._cancel_children(session, job.id)

            # 2. Take the head of the queue.
            stmt = (select(Job)
                    .where(or_(Job.status == "queued", expired), of_kind)
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
            self._take(session, job, owner, now, lease)
            return job.to_dict()

    def _take(self, session: Session, job: Job, owner: str, now, lease: float) -> None:
        """``job`` becomes ``owner``'s: running, one more attempt, a fresh lease."""
        job.status = "running"
        job.attempts += 1
        job.progress = 0.0
        job.lease_owner = owner
        job.lease_expires_at = now + timedelta(seconds=lease)
        job.started_at = now
        job.finished_at = None
        self._status_event(session, job, owner=owner)

    def claim_job(self, job_id: str, owner: str, lease_seconds: float) -> tuple[str, dict]:
        """Take one given job (RabbitMQ mode: the job a broker message names) under a lease.

        Returns ``(action, job)``, the job as it is after the call:

        - ``"run"``: the job was queued, or running under a lease that has expired (its owner
          is presumed dead): it is now ``owner``'s (attempts + 1), to run from its checkpoint.
        - ``"wait"``: the job is running under a live lease (another processor, or this one on
          another delivery): leave it to its owner and look again after the lease.
        - ``"done"``: the job has ended (a duplicate delivery), or it was a cancel-requested
          job whose owner died, which is ended ``canceled`` here.
        - ``"dead"``: the job has used all its attempts; it is ended ``failed`` here with
          "attempts exhausted (last error: ...)".

        Unknown ids raise KeyError; bad arguments ValueError. The decision and the change are
        one transaction (the row locked), so two processors handed the same job at once get
        one "run" and one "wait".
        """
        _check_str("owner", owner)
        lease = _check_lease(lease_seconds)
        with self._write() as session:
            job = self._job(session, job_id, lock=True)
            now = _now()
            if job.status in FINISHED:
                return "done", job.to_dict()
            if job.status == "running" and job.lease_expires_at is not None \
                    and job.lease_expires_at >= now:
                return "wait", job.to_dict()
            # Queued, or running under an expired lease.
            if job.status == "running" and job.cancel_requested:
                job.status, job.finished_at = "canceled", now
                job.lease_owner = job.lease_expires_at = None
                self._status_event(session, job)
                self._cancel_children(session, job.id)
                return "done", job.to_dict()
            if job.attempts >= job.max_attempts:
                job.status, job.finished_at = "failed", now
                job.error = f"attempts exhausted (last error: {job.error or 'none'})"
                job.lease_owner = job.lease_expires_at = None
                self._status_event(session, job)
                self._cancel_children(session, job.id)
                return "dead", job.to_dict()
            self._take(session, job, owner, now, lease)
            return "run", job.to_dict()

    def unpublished(self, limit: int = 100) -> list[dict]:
        """Queued train jobs whose broker message is not confirmed yet (RabbitMQ mode), in
        the order they should reach the broker: highest priority first, oldest first."""
        _check_int("limit", limit, 1, MAX_LIST_LIMIT)
        with self._read() as session:
            rows = session.scalars(select(Job).where(text(UNPUBLISHED))
                                   .order_by(Job.priority.desc(), Job.created_at, Job.id)
                                   .limit(limit)).all()
            return [row.to_dict() for row in rows]

    def mark_published(self, ids: Iterable[str]) -> int:
        """Record that the broker confirmed the messages of jobs ``ids``; returns how many
        jobs were marked (ids already marked, or unknown, are skipped: marking is
        idempotent, so a publisher that repeats itself after a crash changes nothing)."""
        if isinstance(ids, str):
            raise ValueError(f"ids must be a collection of job ids, got the string {ids!r}")  # noqa: TRY004
        ids = [_check_str("job_id", job_id, 64) for job_id in ids]
        if not ids:
            return 0
        with self._write() as session:
            result = session.execute(update(Job)
                                     .where(Job.id.in_(ids), Job.published_at.is_(None))
                                     .values(published_at=_now())
                                     .execution_options(synchronize_session=False))
            return int(result.rowcount)

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
        _check_progress(value)
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
            self._status_event(session, job)
            return True

    def fail(self, job_id: str, owner: str, error: str, retry: bool = True) -> bool:
        """Record a failure; only the lease owner can (else False).

        With ``retry`` and attempts left the job goes back to ``queued``; otherwise it ends
        ``failed`` with ``error``. If a cancel was requested it ends ``canceled``.
        """
        if not isinstance(error, str):
            raise ValueError(f"error must be a string, got {type(error).__name__}")  # noqa: TRY004
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
            self._status_event(session, job)
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
            self._status_event(session, job)
            return True

    def cancel(self, job_id: str) -> dict:
        """Cancel: a queued job at once; a running one by request (its owner's next ``renew``
        returns False and it ends ``canceled`` when the owner gives it up); a finished job is
        returned unchanged."""
        with self._write() as session:
            job = self._job(session, job_id, lock=True)
            if job.status == "queued":
                job.status, job.finished_at = "canceled", _now()
                self._status_event(session, job)
            elif job.status == "running" and not job.cancel_requested:
                job.cancel_requested = True
                self._event(session, job, "cancel_requested", {})
            # Children go with their parent (an evolve job's individuals), also when no owner
            # is left to pass the cancel on.
            if job.status in ("queued", "running", "canceled"):
                self._cancel_children(session, job.id)
            return job.to_dict()

    def _cancel_children(self, session: Session, parent_id: str) -> None:
        """Cancel the unfinished children of ``parent_id``: queued ones at once, running ones
        by request (their owners stop within one epoch)."""
        children = session.scalars(self._lock(select(Job).where(
            Job.parent_id == parent_id, Job.status.in_(("queued", "running"))))).all()
        for child in children:
            if child.status == "queued":
                child.status, child.finished_at = "canceled", _now()
                self._status_event(session, child)
            elif not child.cancel_requested:
                child.cancel_requested = True
                self._event(session, child, "cancel_requested", {})

    # -- what owners report -------------------------------------------------------------------

    def report(self, job_id: str, owner: str, type: str, data: Any,
               progress: float | None = None) -> bool:
        """Append an event (``type``, JSON ``data``) from the lease owner, optionally with new
        progress in [0, 1]; False if ``owner`` no longer holds the lease."""
        _check_str("type", type, 32)
        _check_json("data", data)
        if progress is not None:
            _check_progress(progress)
        with self._write() as session:
            job = self._owned(session, job_id, owner)
            if job is None:
                return False
            if progress is not None:
                job.progress = float(progress)
            self._event(session, job, type, data if isinstance(data, dict) else {"value": data})
            return True

    def save_state(self, job_id: str, owner: str, state: Any,
                   progress: float | None = None) -> bool:
        """Store the owner's working state (JSON) and optionally progress; False if ``owner``
        no longer holds the lease."""
        _check_json("state", state)
        if progress is not None:
            _check_progress(progress)
        with self._write() as session:
            job = self._owned(session, job_id, owner)
            if job is None:
                return False
            job.state = state
            if progress is not None:
                job.progress = float(progress)
            return True

    def events(self, job_id: str, after: int = 0, limit: int = 1000) -> list[dict]:
        """The job's events with ``seq`` > ``after``, oldest first (KeyError for an unknown job)."""
        _check_int("after", after, 0, 2**62)
        _check_int("limit", limit, 1, 10_000)
        with self._read() as session:
            self._job(session, job_id)
            rows = session.scalars(select(JobEvent)
                                   .where(JobEvent.job_id == job_id, JobEvent.seq > after)
                                   .order_by(JobEvent.seq).limit(limit)).all()
            return [row.to_dict() for row in rows]

    def children(self, parent_id: str) -> list[dict]:
        """Jobs submitted with ``parent_id``, oldest first."""
        _check_str("parent_id", parent_id, 64)
        with self._read() as session:
            rows = session.scalars(select(Job).where(Job.parent_id == parent_id)
                                   .order_by(Job.created_at, Job.id)).all()
            return [row.to_dict() for row in rows]

    def counts(self) -> dict[str, int]:
        """Number of jobs per status (every status present, zero when none)."""
        with self._read() as session:
            rows = session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
        out = {status: 0 for status in STATUSES}
        out.update({status: int(count) for status, count in rows})
        return out

    # -- reading ------------------------------------------------------------------------------

    def get(self, job_id: str) -> dict:
        with self._read() as session:
            return self._job(session, job_id).to_dict()

    def find_by_key(self, idempotency_key: str) -> dict | None:
        """The job submitted with ``idempotency_key``, or None."""
        _check_str("idempotency_key", idempotency_key)
        with self._read() as session:
            job = session.scalars(select(Job).where(Job.idempotency_key == idempotency_key)).one_or_none()
            return None if job is None else job.to_dict()

    def list(self, status: str | None = None, limit: int = 50,
             cursor: str | None = None, parent_id: str | None = None) -> dict:
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
        if parent_id is not None:
            stmt = stmt.where(Job.parent_id == _check_str("parent_id", parent_id, 64))
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
