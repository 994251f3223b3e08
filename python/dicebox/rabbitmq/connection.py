"""Connecting to RabbitMQ and declaring dicebox's topology.

Everything dicebox puts on a broker, declared idempotently by every publisher and consumer
when it connects (so no broker needs setting up by hand):

- ``dicebox.jobs`` (durable, ``x-max-priority`` 10): one persistent message per train job,
  ``{"job_id": ..., "kind": "train"}``; rejected messages are dead-lettered through
  ``dicebox.dlx`` into ``dicebox.dead``.
- ``dicebox.jobs.wait`` (durable): parked job messages, each with its own ``expiration``;
  an expired message is dead-lettered back into ``dicebox.jobs`` (default exchange, routing
  key ``dicebox.jobs``). This is how a job whose owner is alive is looked at again later
  without a consumer holding its message (see :mod:`dicebox.rabbitmq.jobs`).
- ``dicebox.dlx`` (direct exchange) -> ``dicebox.dead`` (routing key ``dead``): the
  dead-letter queue, where malformed messages and jobs that used up their attempts end.
- ``dicebox.sensory`` (durable): images to ingest.

pika's errors stop here: a broker that cannot be reached raises :class:`BrokerUnavailable`,
a queue declared elsewhere with other arguments :class:`TopologyConflict`.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit, urlunsplit

import pika
import pika.adapters.blocking_connection
import pika.exceptions

__all__ = [
    "DEAD",
    "DEAD_ROUTING_KEY",
    "DLX",
    "JOBS",
    "MAX_PRIORITY",
    "SENSORY",
    "WAIT",
    "BrokerError",
    "BrokerUnavailable",
    "TopologyConflict",
    "connect",
    "declare_topology",
    "redact",
]

JOBS = "dicebox.jobs"
WAIT = "dicebox.jobs.wait"
DEAD = "dicebox.dead"
DLX = "dicebox.dlx"
SENSORY = "dicebox.sensory"
DEAD_ROUTING_KEY = "dead"
MAX_PRIORITY = 10

# What a connection attempt waits for before it counts as failed (seconds): short, since
# callers retry with back-off anyway, and a server answering 202 must not hang on a broker.
CONNECT_TIMEOUT = 5.0


class BrokerError(Exception):
    """Something went wrong talking to RabbitMQ."""


class BrokerUnavailable(BrokerError):
    """The broker cannot be reached, or the connection to it broke: worth retrying later."""


class TopologyConflict(BrokerError):
    """A dicebox queue or exchange exists on the broker with other arguments."""


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for logs and error messages)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
    except ValueError:
        return "<unparsable URL>"


def parameters(url: str, heartbeat: int | None = None) -> pika.URLParameters:
    """pika's connection parameters for an ``amqp://`` or ``amqps://`` URL (its query may
    set ``heartbeat``, ``connection_attempts``, ...); ``heartbeat`` (seconds) overrides it."""
    if not isinstance(url, str) or not url.startswith(("amqp://", "amqps://")):
        raise ValueError(
            f"broker url: expected an amqp:// or amqps:// URL, got {redact(str(url))!r}"
        )
    try:
        params = pika.URLParameters(url)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"broker url {redact(url)!r}: {exc}") from None
    if heartbeat is not None:
        if isinstance(heartbeat, bool) or not isinstance(heartbeat, int) or heartbeat < 0:
            raise ValueError(f"heartbeat: expected seconds >= 0, got {heartbeat!r}")
        params.heartbeat = heartbeat
    if "socket_timeout" not in url:
        params.socket_timeout = CONNECT_TIMEOUT
    if "blocked_connection_timeout" not in url:
        # A broker blocking publishers (disk or memory alarm) must not hang a caller forever.
        params.blocked_connection_timeout = 60.0
    return params


def connect(
    url: str, heartbeat: int | None = None, name: str = "dicebox"
) -> pika.BlockingConnection:
    """A blocking connection to the broker at ``url``. Use it from one thread only (other
    threads go through ``connection.add_callback_threadsafe``). Raises
    :class:`BrokerUnavailable` when the broker cannot be reached, ValueError for a bad URL."""
    params = parameters(url, heartbeat)
    params.client_properties = {"connection_name": f"{name}@{socket.gethostname()}"}
    try:
        return pika.BlockingConnection(params)
    except (pika.exceptions.AMQPError, OSError) as exc:
        raise BrokerUnavailable(f"cannot connect to {redact(url)}: {describe(exc)}") from None


def describe(exc: BaseException) -> str:
    """A one-line account of a pika error (some have empty messages)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def declare_topology(
    channel: pika.adapters.blocking_connection.BlockingChannel, lease_seconds: float | None = None
) -> None:
    """Declare dicebox's exchanges and queues (idempotent: an existing one with the same
    arguments is left as it is).

    ``lease_seconds`` is checked but deliberately not part of any queue's arguments: parked
    messages carry their own ``expiration``, so servers and processors configured with
    different leases share one broker (queue arguments must match on every declaration).

    Raises :class:`TopologyConflict` when a queue exists with other arguments (the channel
    is closed by the broker then), :class:`BrokerUnavailable` when the connection breaks.
    """
    if lease_seconds is not None and not lease_seconds > 0:
        raise ValueError(f"lease_seconds must be > 0, got {lease_seconds!r}")
    try:
        channel.exchange_declare(DLX, exchange_type="direct", durable=True)
        channel.queue_declare(DEAD, durable=True)
        channel.queue_bind(DEAD, DLX, routing_key=DEAD_ROUTING_KEY)
        channel.queue_declare(
            JOBS,
            durable=True,
            arguments={
                "x-max-priority": MAX_PRIORITY,
                "x-dead-letter-exchange": DLX,
                "x-dead-letter-routing-key": DEAD_ROUTING_KEY,
            },
        )
        channel.queue_declare(
            WAIT,
            durable=True,
            arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": JOBS},
        )
        channel.queue_declare(SENSORY, durable=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 406:  # PRECONDITION_FAILED: declared before with other arguments
            raise TopologyConflict(
                f"the broker holds a dicebox queue declared with other arguments: {exc.reply_text}"
            ) from None
        raise BrokerUnavailable(f"topology declaration refused: {describe(exc)}") from None
    except (pika.exceptions.AMQPError, OSError) as exc:
        raise BrokerUnavailable(
            f"connection lost while declaring the topology: {describe(exc)}"
        ) from None
