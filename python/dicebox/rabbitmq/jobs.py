"""Job messages over RabbitMQ: the server's :class:`JobPublisher` and the processors'
:class:`JobConsumer`.

The database stays the truth about every job; a message only says "look at job X". So a
message may be duplicated, redelivered or parked without harm, and it is acknowledged only
once the job has ended in the database (or moved on with its own message). The consumer never
holds a delivery past RabbitMQ's ``consumer_timeout``: before ``handoff_seconds`` it *hands
the delivery over*: it publishes a copy into ``dicebox.jobs.wait`` (confirmed), then acks
the original, and the job goes on running under its database lease; the copy comes back into
``dicebox.jobs`` after one lease and is parked again by whoever receives it while the owner
lives, acked once the job has ended, or taken over one lease after its owner died.

Threads (pika's rules): each publisher or consumer owns one connection, used only on its own
thread, which never blocks on anything but the socket, so heartbeats keep flowing while jobs
train on worker threads for hours. Worker threads act on a delivery (ack, requeue, reject,
park) only through ``connection.add_callback_threadsafe`` and wait for the outcome. A broken
connection is rebuilt with back-off (0.5 s doubling to 30 s); deliveries of the old
connection are then gone (the broker requeues them), and acting on them is a logged no-op.

Prefetch: the consumer opens one basic.consume per concurrent slot, each with prefetch 1, so
it never holds more than ``concurrency`` unfinished jobs, and a slot whose job was handed
over stops consuming until that job ends (otherwise the broker, seeing the ack, would send a
job for which no worker is free).

Parked messages expire only at the head of ``dicebox.jobs.wait`` (RabbitMQ's per-message
TTL), so a message parked for a short time behind one parked for a whole lease comes back
with it: at most one lease late, which only delays looking at a job that is still running.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pika
import pika.exceptions

from dicebox.rabbitmq.connection import (
    DEAD_ROUTING_KEY,
    DLX,
    JOBS,
    MAX_PRIORITY,
    WAIT,
    BrokerError,
    BrokerUnavailable,
    connect,
    declare_topology,
    describe,
    parameters,
    redact,
)

__all__ = [
    "JOB_KINDS",
    "Delivery",
    "JobConsumer",
    "JobPublisher",
    "MalformedMessage",
    "decode_job",
    "encode_job",
    "message_priority",
]

log = logging.getLogger("dicebox.rabbitmq")

# Kinds of job that travel as messages (evolve jobs are run by the server's coordinator).
JOB_KINDS = frozenset({"train"})
JOB_PRIORITY_RANGE = (-100, 100)
_JOB_ID = re.compile(r"[0-9a-f]{32}")
# Back-off between connection attempts: doubling, capped (seconds).
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0
# The connection thread looks at its timers (handoffs, stopping) this often (seconds).
TICK = 0.2
# A handoff whose parked copy was not confirmed is tried again after this long (seconds).
HANDOFF_RETRY = 5.0
# Parked messages come back no sooner than this (ms): no hot loop on a zero wait.
MIN_PARK_MS = 1000
# Errors that mean the connection or channel is gone (the caller reconnects).
_CONNECTION_ERRORS = (pika.exceptions.AMQPError, OSError, BrokerError)
_PUBLISH_REFUSED = (pika.exceptions.UnroutableError, pika.exceptions.NackError)


class MalformedMessage(ValueError):
    """A job message that no processor can act on (dead-lettered at once)."""


def message_priority(job_priority: int) -> int:
    """The AMQP priority (0..10) of a job with ``job_priority`` (-100..100)."""
    low, high = JOB_PRIORITY_RANGE
    if (
        isinstance(job_priority, bool)
        or not isinstance(job_priority, int)
        or not low <= job_priority <= high
    ):
        raise ValueError(f"priority must be an integer in {low}..{high}, got {job_priority!r}")
    return max(0, min(MAX_PRIORITY, round((job_priority + 100) / 20)))


def encode_job(job_id: str, kind: str) -> bytes:
    """The body of a job message; ValueError names a bad field."""
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise ValueError(f"job_id must be 32 lowercase hex digits, got {job_id!r}")
    if kind not in JOB_KINDS:
        raise ValueError(f"kind must be one of {sorted(JOB_KINDS)}, got {kind!r}")
    return json.dumps({"job_id": job_id, "kind": kind}).encode()


def decode_job(body: bytes) -> tuple[str, str]:
    """``(job_id, kind)`` of a job message body; :class:`MalformedMessage` says what is wrong."""
    try:
        message = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedMessage(f"body is not JSON ({exc}): {body[:80]!r}") from None
    if not isinstance(message, dict):
        raise MalformedMessage(f"body must be a JSON object, got {type(message).__name__}")
    job_id, kind = message.get("job_id"), message.get("kind")
    if job_id is None:
        raise MalformedMessage("job_id is missing")
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise MalformedMessage(f"job_id must be 32 lowercase hex digits, got {job_id!r}")
    if kind not in JOB_KINDS:
        raise MalformedMessage(f"kind must be one of {sorted(JOB_KINDS)}, got {kind!r}")
    return job_id, kind


def _job_properties(job_id: str, priority: int) -> pika.BasicProperties:
    return pika.BasicProperties(
        content_type="application/json", delivery_mode=2, message_id=job_id, priority=priority
    )


class _Call:
    """An operation a worker thread asks the connection thread to run; ``done`` is set
    when it ran (``result`` its outcome) or when its connection went away (False)."""

    def __init__(self, op: Callable[[], bool]) -> None:
        self.op = op
        self.result = False
        self.done = threading.Event()


class _Connected:
    """The connection a thread owns, and the calls other threads queued on it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.connection: pika.BlockingConnection | None = None
        self.generation = 0
        self.calls: set[_Call] = set()

    def attach(self, connection: pika.BlockingConnection) -> int:
        with self.lock:
            self.connection = connection
            self.generation += 1
            return self.generation

    def detach(self) -> None:
        """The connection is gone: every call still waiting fails."""
        with self.lock:
            self.connection = None
            self.generation += 1
            calls, self.calls = self.calls, set()
        for call in calls:
            call.done.set()

    def call(self, op: Callable[[], bool], generation: int | None = None) -> _Call | None:
        """Queue ``op`` on the connection thread (if the connection is up, and still the one
        of ``generation`` when given); None when it could not be queued."""
        request = _Call(op)
        with self.lock:
            if self.connection is None or (
                generation is not None and generation != self.generation
            ):
                return None
            connection = self.connection
            self.calls.add(request)
        try:
            connection.add_callback_threadsafe(functools.partial(self._run, request))
        except _CONNECTION_ERRORS:  # the connection is closing: detach() is near
            with self.lock:
                self.calls.discard(request)
            return None
        return request

    def _run(self, request: _Call) -> None:
        with self.lock:
            if request not in self.calls:  # failed by detach() meanwhile
                return
            self.calls.discard(request)
        try:
            request.result = bool(request.op())
        finally:
            request.done.set()

    def wake(self) -> None:
        """Make the connection thread look at its state now rather than at its next tick."""
        with self.lock:
            connection = self.connection
        if connection is not None:
            with contextlib.suppress(*_CONNECTION_ERRORS):  # closing: nothing to wake
                connection.add_callback_threadsafe(lambda: None)


# ---------------------------------------------------------------------------------------------
# the server side
# ---------------------------------------------------------------------------------------------


class _Publish:
    def __init__(self, job_id: str, body: bytes, priority: int) -> None:
        self.job_id, self.body, self.priority = job_id, body, priority
        self.ok = False
        self.abandoned = False
        self.done = threading.Event()


class JobPublisher:
    """Publishes job messages with publisher confirms, on its own connection thread.

    ``publish_job`` returns True once the broker confirmed the message (it is on disk), False
    when the broker is not connected, refused it, or did not confirm within ``timeout``; the
    caller keeps the job and publishes it again later (a message published twice is harmless).
    ``on_connect`` is called on the publisher's thread after every (re)connection, e.g. to
    wake an outbox; it must return quickly.
    """

    def __init__(
        self,
        url: str,
        heartbeat: int | None = None,
        on_connect: Callable[[], None] | None = None,
    ) -> None:
        parameters(url, heartbeat)  # a bad URL fails here, not on the thread
        self.url = url
        self.heartbeat = heartbeat
        self.on_connect = on_connect
        self._link = _Connected()
        self._requests: deque[_Publish] = deque()
        self._channel: Any = None
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._thread: threading.Thread | None = None
        self.backoff_max = BACKOFF_MAX  # longest wait between connection attempts (seconds)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("JobPublisher.start: already started")
        self._thread = threading.Thread(target=self._run, name="dicebox-publisher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._link.wake()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_connected(self, timeout: float) -> bool:
        """True once connected (within ``timeout`` seconds)."""
        return self._connected.wait(timeout)

    def publish_job(self, job_id: str, kind: str, priority: int, timeout: float = 5.0) -> bool:
        """Publish the message of job ``job_id`` (persistent, AMQP priority from the job's
        ``priority`` -100..100) and wait for the broker's confirm. ValueError for bad
        arguments; never raises for broker trouble (returns False)."""
        body = encode_job(job_id, kind)
        amqp_priority = message_priority(priority)
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        if not self.connected:
            return False
        request = _Publish(job_id, body, amqp_priority)
        with self._link.lock:
            self._requests.append(request)
        if self._link.call(self._drain) is None:
            with self._link.lock:
                if request in self._requests:
                    self._requests.remove(request)
            return False
        if not request.done.wait(timeout):
            with self._link.lock:
                request.abandoned = True
                if request in self._requests:
                    self._requests.remove(request)
            return False
        return request.ok

    def _drain(self) -> bool:
        """On the connection thread: publish every waiting request, each confirmed."""
        while True:
            with self._link.lock:
                if not self._requests:
                    return True
                request = self._requests.popleft()
                if request.abandoned:
                    continue
            try:
                self._channel.basic_publish(
                    exchange="",
                    routing_key=JOBS,
                    body=request.body,
                    properties=_job_properties(request.job_id, request.priority),
                    mandatory=True,
                )
                request.ok = True
            except _PUBLISH_REFUSED as exc:
                log.warning(
                    "job %s: the broker refused its message: %s", request.job_id, describe(exc)
                )
            finally:
                request.done.set()

    def _fail_waiting(self) -> None:
        with self._link.lock:
            requests, self._requests = list(self._requests), deque()
        for request in requests:
            request.done.set()

    def _run(self) -> None:
        delay = BACKOFF_FIRST
        while not self._stopping.is_set():
            try:
                connection = connect(self.url, self.heartbeat, name="dicebox-publisher")
            except BrokerUnavailable as exc:
                log.warning("publisher: %s; retrying in %.1f s", exc, delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, self.backoff_max)
                continue
            try:
                channel = connection.channel()
                channel.confirm_delivery()
                declare_topology(channel)
                self._channel = channel
                self._link.attach(connection)
                self._connected.set()
                delay = BACKOFF_FIRST
                log.info("publisher: connected to %s", redact(self.url))
                if self.on_connect is not None:
                    try:
                        self.on_connect()
                    except Exception:
                        log.exception("publisher: on_connect failed")
                while not self._stopping.is_set():
                    connection.process_data_events(time_limit=TICK)
                    _check_open(channel)
                    self._drain()
            except _CONNECTION_ERRORS as exc:
                log.warning(
                    "publisher: broker connection lost (%s); reconnecting in %.1f s",
                    describe(exc),
                    delay,
                )
            finally:
                self._connected.clear()
                self._link.detach()
                self._fail_waiting()
                self._channel = None
                _close_quietly(connection)
            if not self._stopping.is_set():
                self._stopping.wait(delay)
                delay = min(delay * 2, self.backoff_max)


def _check_open(channel: Any) -> None:
    """pika's BlockingConnection does not raise when the broker closes a channel (e.g. a
    delivery outlived ``consumer_timeout``): it only marks it closed. Raise then, so the
    caller reconnects."""
    if channel.is_closed:
        reason = getattr(channel, "_closing_reason", None)  # for the log only
        raise BrokerUnavailable(f"the broker closed the channel: {reason or 'no reason given'}")


def _close_quietly(connection: pika.BlockingConnection) -> None:
    with contextlib.suppress(*_CONNECTION_ERRORS):  # already broken: nothing to close cleanly
        if connection.is_open:
            connection.close()


# ---------------------------------------------------------------------------------------------
# the processor side
# ---------------------------------------------------------------------------------------------


class Delivery:
    """One job message handed to a :class:`JobConsumer`'s handler, on a worker thread.

    ``job_id``, ``kind``, ``redelivered``, ``priority`` (AMQP, 0..10), ``slot`` (which of the
    consumer's concurrent slots holds it: 0..concurrency-1, stable for the delivery's life).
    The handler ends it with exactly one of :meth:`ack`, :meth:`requeue`, :meth:`reject` or
    :meth:`park` (thread-safe; each waits until the connection thread has done it and returns
    True, or False when the delivery's connection is gone: then the broker has requeued the
    message already). ``handed_over`` is True once the consumer handed the delivery over
    (its copy parked, the original acked): then ack and requeue have nothing left to do.
    """

    def __init__(
        self,
        consumer: JobConsumer,
        slot: int,
        generation: int,
        delivery_tag: int,
        job_id: str,
        kind: str,
        redelivered: bool,
        properties: pika.BasicProperties,
        body: bytes,
    ) -> None:
        self._consumer = consumer
        self.slot = slot
        self.generation = generation
        self.delivery_tag = delivery_tag
        self.job_id = job_id
        self.kind = kind
        self.redelivered = redelivered
        self.properties = properties
        self.body = body
        self.priority = properties.priority or 0
        self.received_at = time.monotonic()
        # Connection-thread state: the original is settled on its channel (acked, nacked or
        # rejected), and whether that was a handoff.
        self._settled = False
        self.handed_over = False
        self._handoff_retry_at = 0.0
        # Set by the handler's first decision (ack/requeue/reject/park), whatever its result.
        self.decided: str | None = None

    def __repr__(self) -> str:
        return f"Delivery(job_id={self.job_id!r}, slot={self.slot}, tag={self.delivery_tag})"

    def ack(self) -> bool:
        """The job has ended (or is someone else's with its own message): remove the message."""
        return self._decide("ack", self._consumer._ack)

    def requeue(self) -> bool:
        """Give the message back to the queue (nack, requeue) for another try."""
        return self._decide("requeue", self._consumer._requeue)

    def reject(self) -> bool:
        """Dead-letter the message (reject without requeue -> ``dicebox.dead``)."""
        return self._decide("reject", self._consumer._reject)

    def park(self, seconds: float) -> bool:
        """Look at the job again in ``seconds`` (at least 1): publish a copy to
        ``dicebox.jobs.wait`` with that expiration, and once the broker confirmed it, ack the
        original. False (and the original untouched) when the copy was not confirmed."""
        if not seconds > 0:
            raise ValueError(f"park: seconds must be > 0, got {seconds!r}")
        return self._decide("park", functools.partial(self._consumer._park, seconds=seconds))

    def _decide(self, what: str, op: Callable[[Delivery], bool]) -> bool:
        if self.decided is None:
            self.decided = what
        return self._consumer._on_connection_thread(self, functools.partial(op, self))


class _Slot:
    """One of a consumer's concurrent places for a job: its basic.consume, and how many
    handler calls it has queued or running (it consumes only when none, or when its last
    delivery was settled normally)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.consumer_tag: str | None = None
        self.running = 0


class JobConsumer:
    """Consumes ``dicebox.jobs`` and calls ``handler(delivery)`` for each job message on one
    of ``concurrency`` worker threads. ``run()`` (blocking, on the thread that owns the
    connection) until :meth:`stop` (thread-safe), which stops consuming, lets the running
    handlers end and settle their deliveries, then closes the connection.

    Malformed messages (not JSON, unknown kind, missing or bad job_id) are rejected at once
    on the connection thread (dead-lettered) with a logged reason; the handler never sees
    them. A handler that returns without deciding, or raises, gets its delivery requeued.
    ``handoff_seconds``: a delivery held this long is handed over (copy parked for
    ``lease_seconds``, original acked); keep it below the broker's ``consumer_timeout``.
    """

    def __init__(
        self,
        url: str,
        handler: Callable[[Delivery], None],
        concurrency: int = 1,
        handoff_seconds: float = 1200.0,
        lease_seconds: float = 30.0,
        heartbeat: int | None = None,
        name: str = "dicebox-processor",
    ) -> None:
        parameters(url, heartbeat)
        if (
            isinstance(concurrency, bool)
            or not isinstance(concurrency, int)
            or not 1 <= concurrency <= 256
        ):
            raise ValueError(f"concurrency must be an integer in 1..256, got {concurrency!r}")
        if not handoff_seconds > 0:
            raise ValueError(f"handoff_seconds must be > 0, got {handoff_seconds!r}")
        if not lease_seconds > 0:
            raise ValueError(f"lease_seconds must be > 0, got {lease_seconds!r}")
        self.url = url
        self.handler = handler
        self.concurrency = concurrency
        self.handoff_seconds = float(handoff_seconds)
        self.lease_seconds = float(lease_seconds)
        self.heartbeat = heartbeat
        self.name = name
        self._link = _Connected()
        self._slots = [_Slot(i) for i in range(concurrency)]
        self._deliveries: set[Delivery] = set()  # unsettled, of the current connection
        self._channel: Any = None
        self._generation = 0
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._idle = threading.Condition(self._link.lock)
        self._executor = ThreadPoolExecutor(
            max_workers=concurrency, thread_name_prefix="dicebox-job"
        )
        self._started = False
        self._generation_served = False  # the last connection got as far as consuming
        self.connections = 0  # successful connections so far (1 + reconnections)
        self.backoff_max = BACKOFF_MAX  # longest wait between connection attempts (seconds)
        # A handoff whose parked copy was not confirmed is tried again after this long.
        self.handoff_retry_seconds = HANDOFF_RETRY

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def stop(self) -> None:
        """Stop taking jobs; ``run`` returns once the running handlers have ended."""
        self._stopping.set()
        self._link.wake()
        with self._idle:
            self._idle.notify_all()

    def _busy(self) -> bool:
        return any(slot.running for slot in self._slots)

    # -- the connection thread -------------------------------------------------------------

    def run(self) -> None:
        """Consume until :meth:`stop`; reconnects with back-off when the broker goes away."""
        if self._started:
            raise RuntimeError("JobConsumer.run: already ran")
        self._started = True
        delay = BACKOFF_FIRST
        try:
            while not self._stopping.is_set():
                try:
                    connection = connect(self.url, self.heartbeat, name=self.name)
                except BrokerUnavailable as exc:
                    log.warning("consumer: %s; retrying in %.1f s", exc, delay)
                    self._stopping.wait(delay)
                    delay = min(delay * 2, self.backoff_max)
                    continue
                try:
                    self._serve(connection)
                    delay = BACKOFF_FIRST
                except _CONNECTION_ERRORS as exc:
                    log.warning(
                        "consumer: broker connection lost (%s); reconnecting in %.1f s",
                        describe(exc),
                        delay,
                    )
                    if self._generation_served:
                        delay = BACKOFF_FIRST
                finally:
                    self._disconnect(connection)
                if not self._stopping.is_set():
                    self._stopping.wait(delay)
                    delay = min(delay * 2, self.backoff_max)
            # Stopping without a connection: the broker has requeued whatever we held; the
            # handlers still end their jobs with the server (their acks are no-ops).
            with self._idle:
                while self._busy():
                    self._idle.wait(1.0)
        finally:
            self._executor.shutdown(wait=True)
            log.info("consumer: stopped")

    def _serve(self, connection: pika.BlockingConnection) -> None:
        self._generation_served = False
        channel = connection.channel()
        channel.confirm_delivery()  # parked copies are confirmed before their original is acked
        declare_topology(channel, self.lease_seconds)
        channel.basic_qos(prefetch_count=1)  # per consumer: one per slot
        self._channel = channel
        self._generation = self._link.attach(connection)
        self.connections += 1
        self._connected.set()
        self._generation_served = True
        log.info("consumer: connected to %s, %d slot(s)", redact(self.url), self.concurrency)
        cancelled = False
        while True:
            if self._stopping.is_set():
                if not cancelled:
                    self._cancel_consumers()
                    cancelled = True
                with self._link.lock:
                    if not self._busy():
                        break
            else:
                self._consume_free_slots()
            # Also while stopping: a job being handed back to the server may take a while.
            self._hand_over_due()
            connection.process_data_events(time_limit=TICK)
            _check_open(channel)
        channel.close()

    def _disconnect(self, connection: pika.BlockingConnection) -> None:
        self._connected.clear()
        self._link.detach()
        with self._link.lock:
            self._deliveries.clear()
        for slot in self._slots:
            slot.consumer_tag = None
        self._channel = None
        _close_quietly(connection)

    def _consume_free_slots(self) -> None:
        for slot in self._slots:
            with self._link.lock:
                free = slot.consumer_tag is None and slot.running == 0
            if free:
                slot.consumer_tag = self._channel.basic_consume(
                    JOBS, on_message_callback=functools.partial(self._on_message, slot)
                )

    def _cancel_consumers(self) -> None:
        for slot in self._slots:
            if slot.consumer_tag is not None:
                # pika nacks (requeues) whatever arrived for it but was not dispatched yet
                self._channel.basic_cancel(slot.consumer_tag)
                slot.consumer_tag = None

    def _on_message(
        self, slot: _Slot, channel: Any, method: Any, properties: Any, body: bytes
    ) -> None:
        if self._stopping.is_set():
            channel.basic_nack(method.delivery_tag, requeue=True)
            return
        try:
            job_id, kind = decode_job(body)
        except MalformedMessage as exc:
            log.error(
                "consumer: message %s dead-lettered (rejected): %s",
                properties.message_id or "(no message_id)",
                exc,
            )
            channel.basic_reject(method.delivery_tag, requeue=False)
            return
        delivery = Delivery(
            self, slot.index, self._generation, method.delivery_tag, job_id, kind,
            bool(method.redelivered), properties, body,
        )  # fmt: skip
        with self._link.lock:
            self._deliveries.add(delivery)
            slot.running += 1
        self._executor.submit(self._handle, slot, delivery)

    def _hand_over_due(self) -> None:
        now = time.monotonic()
        with self._link.lock:
            due = [
                d
                for d in self._deliveries
                if not d._settled
                and now - d.received_at >= self.handoff_seconds
                and now >= d._handoff_retry_at
            ]
        for delivery in due:
            self._hand_over(delivery)

    def _hand_over(self, delivery: Delivery) -> None:
        """Park a copy, then ack the original; the handler's job goes on under its lease."""
        slot = self._slots[delivery.slot]
        if slot.consumer_tag is not None:
            # No new job for this slot until its handler ends (the ack below frees the
            # consumer's prefetch, but no worker is free).
            self._channel.basic_cancel(slot.consumer_tag)
            slot.consumer_tag = None
        if not self._publish_copy(delivery, WAIT, self.lease_seconds):
            delivery._handoff_retry_at = time.monotonic() + self.handoff_retry_seconds
            log.warning(
                "job %s: handoff failed (parked copy not confirmed); retrying", delivery.job_id
            )
            return
        self._channel.basic_ack(delivery.delivery_tag)
        self._settle(delivery)
        delivery.handed_over = True
        log.info(
            "job %s: delivery handed over after %.0f s (copy parked for %.0f s); the job keeps running",
            delivery.job_id, time.monotonic() - delivery.received_at, self.lease_seconds,
        )  # fmt: skip

    def _publish_copy(self, delivery: Delivery, queue_or_dlx: str, seconds: float | None) -> bool:
        """Publish a copy of ``delivery``'s message (to ``dicebox.jobs.wait`` with an
        expiration of ``seconds``, or to the dead-letter exchange); True once confirmed."""
        original = delivery.properties
        properties = pika.BasicProperties(
            content_type=original.content_type or "application/json",
            delivery_mode=2,
            message_id=original.message_id or delivery.job_id,
            priority=delivery.priority,
            headers=original.headers,
            expiration=None if seconds is None else str(max(MIN_PARK_MS, round(seconds * 1000))),
        )
        if queue_or_dlx == DLX:
            exchange, routing_key = DLX, DEAD_ROUTING_KEY
        else:
            exchange, routing_key = "", queue_or_dlx
        try:
            self._channel.basic_publish(
                exchange, routing_key, delivery.body, properties, mandatory=True
            )
            return True
        except _PUBLISH_REFUSED as exc:
            log.warning(
                "job %s: copy to %s refused by the broker: %s",
                delivery.job_id,
                queue_or_dlx,
                describe(exc),
            )
            return False

    def _settle(self, delivery: Delivery) -> None:
        delivery._settled = True
        with self._link.lock:
            self._deliveries.discard(delivery)

    # Operations run on the connection thread for Delivery's methods. Each returns True when
    # the broker now has what the handler wants.

    def _ack(self, delivery: Delivery) -> bool:
        if not delivery._settled:
            self._channel.basic_ack(delivery.delivery_tag)
            self._settle(delivery)
        return True

    def _requeue(self, delivery: Delivery) -> bool:
        if delivery.handed_over:
            # The parked copy comes back within a lease and the job (queued again) runs then.
            return True
        if not delivery._settled:
            self._channel.basic_nack(delivery.delivery_tag, requeue=True)
            self._settle(delivery)
        return True

    def _reject(self, delivery: Delivery) -> bool:
        if delivery.handed_over:
            # The original is acked: put a copy in the dead-letter queue for the record.
            return self._publish_copy(delivery, DLX, None)
        if not delivery._settled:
            self._channel.basic_reject(delivery.delivery_tag, requeue=False)
            self._settle(delivery)
        return True

    def _park(self, delivery: Delivery, seconds: float) -> bool:
        if delivery._settled:  # handed over: its copy is parked already
            return True
        if not self._publish_copy(delivery, WAIT, seconds):
            return False
        self._channel.basic_ack(delivery.delivery_tag)
        self._settle(delivery)
        return True

    # -- worker threads -----------------------------------------------------------------------

    def _on_connection_thread(self, delivery: Delivery, op: Callable[[], bool]) -> bool:
        request = self._link.call(op, generation=delivery.generation)
        if request is None:
            log.info(
                "job %s: its delivery went with a broken connection (the broker requeued it)",
                delivery.job_id,
            )
            return False
        request.done.wait()
        return request.result

    def _handle(self, slot: _Slot, delivery: Delivery) -> None:
        try:
            self.handler(delivery)
        except Exception:
            log.exception("job %s: the handler failed; requeueing its message", delivery.job_id)
        finally:
            try:
                if delivery.decided is None:
                    log.warning(
                        "job %s: the handler left its delivery open; requeueing it", delivery.job_id
                    )
                    delivery.requeue()
            finally:
                with self._link.lock:
                    slot.running -= 1
                    self._idle.notify_all()
                self._link.wake()  # a free slot consumes again at once
