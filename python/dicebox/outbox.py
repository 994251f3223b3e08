"""RabbitMQ mode, server side: the outbox that gets every queued train job onto the broker.

The database is the truth. ``POST /v1/jobs`` (and the evolve coordinator, for an evolve
job's individuals) only inserts the job; this thread then publishes the message of every
queued train job whose ``published_at`` is still NULL (highest priority first, oldest
first) through :class:`dicebox.rabbitmq.jobs.JobPublisher`, which waits for the broker's
publisher confirm, and records the confirm with ``JobQueue.mark_published``. So:

- an accepted job is never lost: if the broker is down, or the server dies between the
  insert and the confirm, the job stays unpublished in the database and is published as
  soon as the broker is back (or by the next server to start);
- one outbox thread publishes a server's jobs, so a job is not published twice by one
  server; a crash between a confirm and its ``mark_published`` (or two servers sharing one
  database) can publish a job twice, which is harmless: the server answers a duplicate
  delivery with ``"done"`` or ``"wait"`` (``JobQueue.claim_job``), never a second run.

The thread is woken by every ``Notifier.notify()`` (a submit, children submitted by the
coordinator) and also looks by itself every ``poll_seconds`` (jobs submitted by another
process sharing the database). While the broker does not confirm, it retries with back-off
(``RETRY_SECONDS``, doubling up to ``MAX_RETRY_SECONDS``), and at once when the publisher
has reconnected.

A submit route waits for its own job's confirm with :meth:`Outbox.expect`, so a client
hears 202 only once the message is on the broker's disk, or learns ``published: false``
(the broker is down; the job will go out later) within a few seconds.

pika is imported only when an outbox is built (``dicebox.rabbitmq.jobs``): the embedded
mode never loads it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any, Protocol

from dicebox.jobqueue import JobQueue

__all__ = ["BROKERED_KINDS", "Outbox", "Publisher", "make_publisher"]

log = logging.getLogger("dicebox.outbox")

# The kinds of job published (jobqueue.UNPUBLISHED selects these); evolve jobs are run by
# the server's coordinator.
BROKERED_KINDS = ("train",)
BATCH = 100
POLL_SECONDS = 5.0
RETRY_SECONDS = 0.25
MAX_RETRY_SECONDS = 5.0
CONFIRM_TIMEOUT = 5.0
# Ids of recently published jobs remembered, so a submit that starts waiting only after its
# job went out (published in a batch woken by an earlier submit) learns it at once.
RECENT = 4096


class Publisher(Protocol):
    """What the outbox needs of a publisher (``dicebox.rabbitmq.jobs.JobPublisher``)."""

    @property
    def connected(self) -> bool: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def wait_connected(self, timeout: float) -> bool: ...

    def publish_job(self, job_id: str, kind: str, priority: int, timeout: float = 5.0) -> bool: ...


def make_publisher(url: str, on_connect: Callable[[], None] | None = None) -> Publisher:
    """A :class:`~dicebox.rabbitmq.jobs.JobPublisher` for the broker at ``url``, calling
    ``on_connect`` after every (re)connection (imported here, so the embedded mode never
    imports pika)."""
    from dicebox.rabbitmq.jobs import JobPublisher

    return JobPublisher(url, on_connect=on_connect)


class Outbox:
    """Publishes the queue's unpublished train jobs on a thread, between ``start()`` and
    ``stop()``. ``poke()`` (thread-safe, non-blocking) makes it look at once."""

    def __init__(self, queue: JobQueue, publisher: Publisher, *, batch: int = BATCH,
                 poll_seconds: float = POLL_SECONDS, confirm_timeout: float = CONFIRM_TIMEOUT) -> None:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch!r}")
        if not poll_seconds > 0 or not confirm_timeout > 0:
            raise ValueError(f"poll_seconds and confirm_timeout must be > 0, got "
                             f"{poll_seconds!r} and {confirm_timeout!r}")
        self.queue = queue
        self.publisher = publisher
        self.batch = batch
        self.poll_seconds = poll_seconds
        self.confirm_timeout = confirm_timeout
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._waiters: dict[str, list[Future[bool]]] = {}
        self._recent: OrderedDict[str, None] = OrderedDict()
        # True while the broker is not confirming: a new waiter is answered False at once
        # instead of waiting out its timeout (the job goes out when the broker is back).
        self._failing = False
        self._thread: threading.Thread | None = None
        self.published = 0  # jobs published since start (for logs and tests)

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="dicebox-outbox", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread (after the publish in progress, if any). Waiters get False."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._resolve_all(False)

    def poke(self) -> None:
        """Look for unpublished jobs now (thread-safe, returns at once)."""
        self._wake.set()

    # -- waiting for one job -------------------------------------------------------------------

    def expect(self, job_id: str) -> Future[bool]:
        """A future that resolves True once job ``job_id``'s message is confirmed by the
        broker, or False as soon as the outbox knows it will not be soon (the broker is
        down; the job is published when it is back). Call it right after the job was
        inserted, then :meth:`poke`; :meth:`forget` it when you stop waiting."""
        future: Future[bool] = Future()
        with self._lock:
            if job_id in self._recent:
                future.set_result(True)
            elif self._failing or self._stopping.is_set():
                future.set_result(False)
            else:
                self._waiters.setdefault(job_id, []).append(future)
        return future

    def forget(self, job_id: str, future: Future[bool]) -> None:
        """Stop tracking ``future`` (a waiter that gave up)."""
        with self._lock:
            futures = self._waiters.get(job_id)
            if futures is not None and future in futures:
                futures.remove(future)
                if not futures:
                    del self._waiters[job_id]

    def _resolve(self, job_ids: list[str], value: bool) -> None:
        with self._lock:
            if value:
                for job_id in job_ids:
                    self._recent[job_id] = None
                    self._recent.move_to_end(job_id)
                while len(self._recent) > RECENT:
                    self._recent.popitem(last=False)
            futures = [f for job_id in job_ids for f in self._waiters.pop(job_id, [])]
        for future in futures:
            _set(future, value)

    def _resolve_all(self, value: bool) -> None:
        with self._lock:
            futures = [f for fs in self._waiters.values() for f in fs]
            self._waiters.clear()
        for future in futures:
            _set(future, value)

    def _set_failing(self, failing: bool) -> None:
        with self._lock:
            self._failing = failing
        if failing:
            self._resolve_all(False)

    # -- the thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        retry = RETRY_SECONDS
        busy, ok = True, True  # look once at start: jobs left unpublished by an earlier run
        while not self._stopping.is_set():
            if not ok:
                # The broker (or the database) did not answer: look again after a back-off,
                # or sooner when poked (the publisher pokes on reconnecting; a submit meanwhile
                # costs one read and, while the publisher is disconnected, no broker call).
                self._wake.wait(retry)
                retry = min(retry * 2, MAX_RETRY_SECONDS)
            elif not busy:
                self._wake.wait(self.poll_seconds)
            self._wake.clear()
            if self._stopping.is_set():
                break
            try:
                busy, ok = self._publish_batch()
            except Exception:  # the thread must outlive a database hiccup
                log.exception("outbox: publishing failed; retrying in %.1f s", retry)
                busy, ok = True, False
            if ok:
                retry = RETRY_SECONDS

    def _publish_batch(self) -> tuple[bool, bool]:
        """Publish one batch; returns (more may be waiting, every publish was confirmed)."""
        jobs = self.queue.unpublished(self.batch)
        if not jobs:
            self._set_failing(False)
            return False, True
        if not self.publisher.connected:
            # Not worth a confirm timeout per job: the publisher reconnects by itself.
            self._set_failing(True)
            return True, False
        confirmed: list[str] = []
        ok = True
        try:
            for job in jobs:
                if self._stopping.is_set():
                    break
                published = self._publish(job)
                if published:
                    confirmed.append(job["id"])
                elif published is False:
                    ok = False
                    break
        finally:
            # Record what the broker has confirmed even when a later publish failed.
            if confirmed:
                self.queue.mark_published(confirmed)
                self.published += len(confirmed)
                self._resolve(confirmed, True)
        if ok:
            self._set_failing(False)
            return len(jobs) == self.batch, True
        self._set_failing(True)
        return True, False

    def _publish(self, job: dict[str, Any]) -> bool | None:
        """True once confirmed; False when the broker did not confirm (try again later);
        None when this job cannot be published at all (logged; the others go on)."""
        try:
            confirmed = self.publisher.publish_job(job["id"], job["kind"], job["priority"],
                                                   timeout=self.confirm_timeout)
        except ValueError as exc:
            # A row no message can be made of (not possible through JobQueue.submit): it must
            # not hold up the jobs behind it.
            log.error("outbox: job %s cannot be published: %s", job["id"], exc)
            return None
        except Exception as exc:  # noqa: BLE001 - whatever the broker client raised
            log.warning("outbox: job %s not published (%s); the broker will get it when it is back",
                        job["id"], exc)
            return False
        if not confirmed:
            log.warning("outbox: the broker did not confirm job %s within %.1f s; retrying later",
                        job["id"], self.confirm_timeout)
        return bool(confirmed)


def _set(future: Future[bool], value: bool) -> None:
    # A waiter that gave up has cancelled its future, possibly just now.
    with contextlib.suppress(InvalidStateError):
        future.set_result(value)
