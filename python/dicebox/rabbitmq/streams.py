"""Data over the broker: images ingested from a queue, and classifiers that answer on one.

:class:`SensoryIngest` (run by the server in broker mode) consumes ``dicebox.sensory``: each
message's body is one encoded image (PNG/JPEG), its headers name the dataset and category::

    headers: {"dataset": "dice", "category": "6",
              "width": 28, "height": 28, "channels": 1}   # the last three optional

and it is stored exactly like an upload (:meth:`dicebox.sensory.SensoryStore.add_encoded`: the
same checks, decoding and limits). ``width``/``height`` (and ``channels``, default 1 = grey)
create the dataset on first use, as the original dicebox's sensory store did; a message for a
dataset that does not exist and carries no size is refused, as is one whose size disagrees
with its existing dataset. Header values may be AMQP integers or decimal strings. What has
arrived (up to ``prefetch`` messages) is appended in one transaction per dataset, and each
message is acknowledged only after the append holding it has been committed.

:class:`InferWorker` (``dicebox infer``) consumes encoded images from a queue, classifies what
has arrived in one batch (up to ``prefetch`` images; ``dicebox.Model.predict`` runs on an
inference thread with the GIL released, so the connection thread keeps heartbeats flowing),
and publishes one prediction per image to the output exchange::

    {"category": "6", "probability": 0.97, "top": [{"category", "probability"}, ...],
     "message_id": <input message_id>, "correlation_id": <input correlation_id or message_id>,
     "model": <model id>}

with the input's ``message_id``, ``correlation_id`` (its ``message_id`` when it has none) and
headers on the prediction's properties, ``content_type`` application/json, persistent. An
optional ``top`` header (1..100, default 5) sets how many categories ``top`` lists. The output
exchange is declared **fanout** (durable) when it does not exist, so every queue bound to it
gets every prediction without knowing a routing key; an exchange that already exists with
another type is used as it is, and the routing key is the predicted category, so a topic or
direct exchange routes predictions by category (a prediction that no binding matches is then
dropped by the broker: nobody asked for it). Predictions are published with publisher
confirms: an input is acknowledged only after its prediction is confirmed. On the fanout
exchange they are also ``mandatory``: while no queue is bound to it, the inputs are requeued
(with back-off) instead of their predictions being lost. Several replicas consume one queue;
the broker spreads the messages over them (each holds at most ``prefetch`` unacknowledged).

Bad messages never loop: a message that cannot be stored or classified (not an image, missing
or bad headers, unknown dataset, a name with ``../``, over a limit) is dead-lettered at once:
republished, persistent and with publisher confirm, to ``dicebox.dlx`` -> ``dicebox.dead``
with the reason in the ``x-dicebox-error`` header and its queue in ``x-dicebox-queue``, then
acknowledged; the reason is logged. (Republished rather than rejected: ``dicebox.sensory`` and
a user's input queue carry no dead-letter arguments, and the copy can say why.) Failures that
are not the message's fault (the database, the disk, the model raising) keep the messages and
retry with back-off.

Both run ``run()`` on one thread with one connection until ``stop()`` (thread-safe), and
reconnect with back-off (0.5 s doubling to 30 s) whenever the broker goes away. The sensory
consumer stores on its connection thread (a batch takes milliseconds, far below the heartbeat
timeout); the infer worker classifies on its own thread. Unacknowledged messages are
redelivered by the broker, so nothing is lost; delivery is at least once: an image whose
append committed just before the connection broke (its ack lost with it) is stored again, and
an input whose prediction was confirmed just before is answered again.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pika
import pika.exceptions
from PIL import Image

from dicebox.errors import Conflict, InvalidInput, NotFound, ServiceError, TooLarge
from dicebox.rabbitmq.connection import (
    DEAD_ROUTING_KEY,
    DLX,
    SENSORY,
    BrokerError,
    connect,
    declare_topology,
    describe,
    parameters,
    redact,
)

__all__ = ["DEFAULT_PREFETCH", "ERROR_HEADER", "QUEUE_HEADER", "InferWorker", "SensoryIngest"]

log = logging.getLogger("dicebox.rabbitmq.streams")

# Headers a dead-lettered message gets: why it was refused, and the queue it came from.
ERROR_HEADER = "x-dicebox-error"
QUEUE_HEADER = "x-dicebox-queue"
DEFAULT_PREFETCH = 32
MAX_PREFETCH = 65535
DEFAULT_TOP = 5
MAX_TOP = 100
# Back-off between attempts when the broker (or the database, or the model) fails: doubling.
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0
# How long the connection thread waits for broker events before it looks at stop() again.
POLL_SECONDS = 0.25
# AMQP short strings (queue and exchange names) are at most 255 bytes.
MAX_NAME_BYTES = 255
# Reasons longer than this are cut in the dead-letter header (the log has the whole text).
MAX_REASON_CHARS = 1000


class StreamError(Exception):
    """A stream was configured wrongly (a bad queue or exchange name, prefetch, model)."""


# ---------------------------------------------------------------------------------------------
# messages


@dataclass
class _Message:
    """One delivery as the consumer callback received it."""

    tag: int
    properties: pika.BasicProperties
    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """How to name the message in logs and errors."""
        return self.properties.message_id or f"delivery {self.tag}"


def _text(value: Any) -> Any:
    """Header values as Python strings: pika gives AMQP long strings that are not UTF-8 as
    bytes."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(value)
    return value


def _header_int(headers: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    """Header ``name`` as an int in lo..hi (an AMQP integer or a decimal string), None when it
    is absent; InvalidInput naming the header otherwise."""
    value = headers.get(name)
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidInput(f"header {name!r} must be an integer in {lo}..{hi}, got {value!r:.80}",
                           {"header": name})
    return value


def _header_text(headers: dict[str, Any], name: str) -> str:
    value = headers.get(name)
    if value is None:
        raise InvalidInput(f"header {name!r} is missing", {"header": name})
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)  # a category sent as a number, as the original API allowed
    if not isinstance(value, str):
        raise InvalidInput(f"header {name!r} must be a string, got {value!r:.80}",
                           {"header": name})
    return value


def _copy_properties(properties: pika.BasicProperties, headers: dict[str, Any],
                     **changes: Any) -> pika.BasicProperties:
    """The message's properties with other ``headers``, persistent, without ``expiration``
    (a copy must not expire) and ``user_id`` (the broker checks it against our login)."""
    fields = {
        "content_type": properties.content_type, "content_encoding": properties.content_encoding,
        "headers": headers, "delivery_mode": 2, "priority": properties.priority,
        "correlation_id": properties.correlation_id, "reply_to": properties.reply_to,
        "message_id": properties.message_id, "timestamp": properties.timestamp,
        "type": properties.type, "app_id": properties.app_id,
    }
    fields.update(changes)
    return pika.BasicProperties(**fields)


def _check_name(what: str, name: Any, allow_amq: bool = True) -> str:
    if not isinstance(name, str) or not name or len(name.encode()) > MAX_NAME_BYTES:
        raise StreamError(f"{what} must be a name of 1-{MAX_NAME_BYTES} bytes, got {name!r}")
    if not allow_amq and name.startswith("amq."):
        raise StreamError(f"{what} {name!r}: names starting with 'amq.' are reserved by RabbitMQ")
    return name


def _check_prefetch(prefetch: Any) -> int:
    if (isinstance(prefetch, bool) or not isinstance(prefetch, int)
            or not 1 <= prefetch <= MAX_PREFETCH):
        raise StreamError(f"prefetch must be an integer in 1..{MAX_PREFETCH}, got {prefetch!r}")
    return prefetch


# ---------------------------------------------------------------------------------------------
# the connection loop shared by both consumers


class _BrokerLoop:
    """``run()`` keeps one connection (this thread's own) serving until ``stop()``, and builds
    it again with back-off whenever the broker fails. Subclasses fill in ``_serve``."""

    kind = "stream"

    def __init__(self, url: str, heartbeat: int | None = None) -> None:
        try:
            parameters(url, heartbeat)  # a bad URL fails here, not in every reconnection
        except ValueError as exc:
            raise StreamError(str(exc)) from None
        self.url = url
        self.heartbeat = heartbeat
        self._stop = threading.Event()
        self._consuming = threading.Event()
        self._thread: threading.Thread | None = None
        self.dead_lettered = 0  # messages refused so far
        self.sessions = 0  # times the consumer was registered: 1 + reconnections

    @property
    def connected(self) -> bool:
        """True while consuming (connected, topology declared, consumer registered)."""
        return self._consuming.is_set()

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Block until the consumer is registered (or ``timeout``); True once it is."""
        return self._consuming.wait(timeout)

    def start(self) -> None:
        """``run()`` on a daemon thread of its own."""
        if self._thread is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        self._thread = threading.Thread(target=self.run, name=f"dicebox-{self.kind}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop consuming and close the connection (thread-safe). When ``start()`` ran it,
        waits up to ``timeout`` for the thread to end; work in progress is finished first."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        """Consume until ``stop()``: connect, serve, and on any broker failure reconnect after
        a back-off that doubles from 0.5 s to 30 s (reset once consuming again)."""
        delay = BACKOFF_FIRST
        while not self._stop.is_set():
            connection = None
            try:
                connection = connect(self.url, heartbeat=self.heartbeat,
                                     name=f"dicebox-{self.kind}")
                self._serve(connection)
            except (BrokerError, pika.exceptions.AMQPError, OSError) as exc:
                if self._stop.is_set():
                    break
                log.warning("%s: broker %s: %s; retrying in %.1f s", self.kind,
                            redact(self.url), describe(exc), delay)
            except Exception:  # a bug must not end the consumer for good
                log.exception("%s: unexpected error; reconnecting in %.1f s", self.kind, delay)
            finally:
                if self._consuming.is_set():
                    delay = BACKOFF_FIRST  # it worked for a while: start the back-off over
                self._consuming.clear()
                if connection is not None and connection.is_open:
                    try:
                        connection.close()
                    except (pika.exceptions.AMQPError, OSError) as exc:  # already broken
                        log.debug("%s: closing the connection: %s", self.kind, describe(exc))
            if self._stop.wait(delay):
                break
            delay = min(delay * 2, BACKOFF_MAX)
        log.info("%s: stopped", self.kind)

    def _serve(self, connection: pika.BlockingConnection) -> None:
        """Consume on ``connection`` until ``stop()``; calls ``_consumer_registered`` once
        consuming. Broker errors propagate (``run`` reconnects)."""
        raise NotImplementedError

    def _consumer_registered(self) -> None:
        self.sessions += 1
        self._consuming.set()

    def _dead_letter(self, channel: Any, queue: str, message: _Message, reason: str) -> None:
        """Republish ``message`` to the dead-letter queue with ``reason`` (confirmed), then
        acknowledge it: refused at once, never redelivered."""
        log.warning("%s: dead-lettering %s from %r: %s", self.kind, message.label, queue, reason)
        headers = dict(message.properties.headers or {})
        headers[ERROR_HEADER] = reason[:MAX_REASON_CHARS]
        headers[QUEUE_HEADER] = queue
        channel.basic_publish(DLX, DEAD_ROUTING_KEY, message.body,
                              _copy_properties(message.properties, headers), mandatory=True)
        channel.basic_ack(message.tag)
        self.dead_lettered += 1


def _open_channel(connection: pika.BlockingConnection) -> Any:
    """A channel with publisher confirms, after (idempotently) declaring dicebox's topology."""
    channel = connection.channel()
    channel.confirm_delivery()
    declare_topology(channel)
    return channel


# ---------------------------------------------------------------------------------------------
# sensory ingestion


@dataclass
class _Image:
    """A sensory message whose headers passed their checks."""

    message: _Message
    dataset: str
    category: str
    width: int | None
    height: int | None
    channels: int | None


class SensoryIngest(_BrokerLoop):
    """Stores the images published to ``dicebox.sensory`` in ``sensory_store`` (a
    :class:`dicebox.sensory.SensoryStore`); see the module docstring for the message format.

    ``metrics`` (the server's :class:`dicebox.server.metrics.Metrics`, optional) counts the
    stored images in ``ingested_images``. ``prefetch`` bounds the messages held at once (and
    so the images appended in one transaction). ``start()`` runs it on a thread of its own,
    ``stop()`` ends it; ``ingested`` and ``dead_lettered`` count messages so far.
    """

    kind = "sensory"

    def __init__(self, url: str, sensory_store: Any, metrics: Any = None, *,
                 prefetch: int = DEFAULT_PREFETCH, heartbeat: int | None = None) -> None:
        super().__init__(url, heartbeat)
        self.store = sensory_store
        self.metrics = metrics
        self.prefetch = _check_prefetch(prefetch)
        self.ingested = 0
        self._pending: list[_Message] = []
        self._settled: set[int] = set()  # delivery tags of the current batch acked so far
        self._retry_at = 0.0  # after a failure that was not the messages' fault
        self._retry_delay = BACKOFF_FIRST

    def _serve(self, connection: pika.BlockingConnection) -> None:
        channel = _open_channel(connection)
        channel.basic_qos(prefetch_count=self.prefetch)
        # Whatever the last connection delivered is gone with it (the broker redelivers).
        self._pending = []

        def on_message(_ch: Any, method: Any, properties: Any, body: bytes) -> None:
            headers = {str(_text(k)): _text(v) for k, v in (properties.headers or {}).items()}
            self._pending.append(_Message(method.delivery_tag, properties, body, headers))

        channel.basic_consume(SENSORY, on_message)
        self._consumer_registered()
        log.info("sensory: consuming %r", SENSORY)
        while not self._stop.is_set():
            connection.process_data_events(time_limit=POLL_SECONDS)
            if self._pending and time.monotonic() >= self._retry_at:
                batch, self._pending = self._pending, []
                self._ingest(channel, batch)
        # Messages delivered but not stored are requeued when the connection closes.

    def _ingest(self, channel: Any, batch: list[_Message]) -> None:
        """Store a batch: refuse the bad messages, append the others one transaction per
        dataset. When storing fails for a reason that is not the messages' (the database, the
        disk), the unsettled messages stay held (unacknowledged) and are tried again later."""
        self._settled = set()
        groups: dict[str, list[_Image]] = {}
        for message in batch:
            try:
                image = self._parse(message)
            except ServiceError as exc:
                self._refuse(channel, message, str(exc))
                continue
            groups.setdefault(image.dataset, []).append(image)
        for name, images in groups.items():
            try:
                self._ingest_dataset(channel, name, images)
            except pika.exceptions.AMQPError:
                raise
            except Exception:  # the database or disk, not the messages
                log.exception("sensory: storing %d image(s) in dataset %r failed; retrying in "
                              "%.1f s", len(images), name, self._retry_delay)
                # Back in front of what arrived since, in delivery order.
                self._pending[:0] = [m for m in batch if m.tag not in self._settled]
                self._retry_at = time.monotonic() + self._retry_delay
                self._retry_delay = min(self._retry_delay * 2, BACKOFF_MAX)
                return
        self._retry_delay = BACKOFF_FIRST

    @staticmethod
    def _parse(message: _Message) -> _Image:
        """The checks that need only the message itself."""
        from dicebox.sensory import check_category, check_dataset_name

        headers = message.headers
        dataset = check_dataset_name(_header_text(headers, "dataset"))
        category = check_category(_header_text(headers, "category"))
        side = 1 << 16
        width = _header_int(headers, "width", 1, side)
        height = _header_int(headers, "height", 1, side)
        channels = _header_int(headers, "channels", 1, 3)
        if channels not in (None, 1, 3):
            raise InvalidInput(f"header 'channels' must be 1 (grey) or 3 (RGB), got {channels}",
                               {"header": "channels"})
        if (width is None) != (height is None):
            raise InvalidInput("headers 'width' and 'height' go together: give both or neither",
                               {"header": "width" if width is None else "height"})
        if not message.body:
            raise InvalidInput(f"message {message.label}: empty body (expected a PNG or JPEG)")
        return _Image(message, dataset, category, width, height, channels)

    def _ingest_dataset(self, channel: Any, name: str, images: list[_Image]) -> None:
        """Store ``images`` (all for dataset ``name``), acknowledging each once committed."""
        store = self.store
        try:
            dataset: dict | None = store.get(name)
        except NotFound:
            dataset = None
        if dataset is None:
            dataset, images = self._create(channel, name, images)
            if dataset is None:
                return
        good = []
        for image in images:
            mismatch = self._mismatch(dataset, image)
            if mismatch:
                self._refuse(channel, image.message, mismatch)
            else:
                good.append(image)
        limit = store.settings.max_images_per_request
        for start in range(0, len(good), limit):
            chunk = good[start:start + limit]
            try:
                self._append(channel, name, chunk)
            except (InvalidInput, TooLarge, Conflict, NotFound):
                # One of them is bad (add_encoded stores all or none): store them one by one,
                # so only the bad ones are refused.
                for image in chunk:
                    try:
                        self._append(channel, name, [image])
                    except ServiceError as exc:
                        self._refuse(channel, image.message, str(exc))

    def _refuse(self, channel: Any, message: _Message, reason: str) -> None:
        self._dead_letter(channel, SENSORY, message, reason)
        self._settled.add(message.tag)

    def _append(self, channel: Any, name: str, images: list[_Image]) -> None:
        items = [(i.category, i.message.body, i.message.label) for i in images]
        result = self.store.add_encoded(name, items)
        # add_encoded returned: the images are committed. Only now acknowledge them.
        for image in images:
            channel.basic_ack(image.message.tag)
            self._settled.add(image.message.tag)
        self.ingested += result["added"]
        if self.metrics is not None:
            self.metrics.ingested_images.inc(result["added"])

    @staticmethod
    def _mismatch(dataset: dict, image: _Image) -> str | None:
        """Why ``image``'s size headers disagree with its existing dataset (None if they
        agree or are absent)."""
        size = (dataset["width"], dataset["height"])
        if image.width is not None and size != (image.width, image.height):
            return (f"dataset {dataset['name']!r} holds {dataset['width']} x {dataset['height']} "
                    f"images, not {image.width} x {image.height} (headers width/height)")
        if image.channels is not None and dataset["channels"] != image.channels:
            return (f"dataset {dataset['name']!r} holds images with {dataset['channels']} "
                    f"channel(s), not {image.channels} (header channels)")
        return None

    def _create(self, channel: Any, name: str,
                images: list[_Image]) -> tuple[dict | None, list[_Image]]:
        """Create dataset ``name`` from the first message that gives its size and holds a good
        image (so a bad image creates nothing); refuse the messages before it. Returns the
        dataset (None when no message could create it) and the messages still to store."""
        from dicebox.imagefolder import decode_image

        store = self.store
        for index, image in enumerate(images):
            if image.width is None:
                self._refuse(channel, image.message, (
                    f"dataset {name!r} does not exist; send headers 'width' and 'height' (and "
                    "'channels', default 1) to create it, or create it with POST /v1/datasets"))
                continue
            channels = image.channels or 1
            try:
                side = store.settings.max_dataset_side
                if image.width > side or image.height > side:
                    raise InvalidInput(
                        f"headers width/height: {image.width} x {image.height} is larger than "
                        f"the limit of {side} (DICEBOX_MAX_DATASET_SIDE)")
                store.check_image_bytes(len(image.message.body), image.message.label)
                store.check_image_header(image.message.body, image.message.label)
                try:
                    decode_image(image.message.body, (image.width, image.height), channels,
                                 image.message.label)
                except ValueError as exc:
                    raise InvalidInput(str(exc)) from None
                dataset, created = store.create(name, image.width, image.height, channels)
            except ServiceError as exc:
                self._refuse(channel, image.message, str(exc))
                continue
            if created:
                log.info("sensory: created dataset %r (%d x %d, %d channel(s)) from %s", name,
                         image.width, image.height, channels, image.message.label)
            return dataset, images[index:]
        return None, []


# ---------------------------------------------------------------------------------------------
# inference


@dataclass
class _Outcome:
    """What the inference thread made of one input: a prediction or a reason to refuse it."""

    message: _Message
    prediction: dict[str, Any] | None = None
    reason: str | None = None  # refuse it (dead-letter) for this reason
    retry: bool = False  # the model failed, not the input: requeue it


class _Unroutable(Exception):
    """The output exchange has no queue bound for a prediction."""


class InferWorker(_BrokerLoop):
    """Classifies the images of ``input_queue`` and publishes predictions to
    ``output_exchange`` (see the module docstring).

    ``model`` is a :class:`dicebox.Model` or the directory of a saved one (``Model.load``);
    ``model_id`` names it in predictions (default: the directory's name). ``prefetch`` is the
    most images held unacknowledged, and so the largest batch. ``settings`` (a
    :class:`dicebox.settings.Settings`) gives the image limits (max_image_bytes,
    max_image_pixels); the defaults apply without it. ``run()`` blocks until ``stop()``;
    ``classified``, ``dead_lettered`` and ``requeued`` count inputs so far.
    """

    kind = "infer"

    def __init__(self, url: str, model: Any, input_queue: str, output_exchange: str,
                 prefetch: int = DEFAULT_PREFETCH, *, model_id: str | None = None,
                 settings: Any = None, heartbeat: int | None = None) -> None:
        from dicebox.model import Model
        from dicebox.settings import Settings

        super().__init__(url, heartbeat)
        self.input_queue = _check_name("input queue", input_queue)
        self.output_exchange = _check_name("output exchange", output_exchange, allow_amq=False)
        self.prefetch = _check_prefetch(prefetch)
        if isinstance(model, Model):
            self.model = model
            self.model_id = model_id or "model"
        elif isinstance(model, (str, os.PathLike)):
            try:
                self.model = Model.load(model)
            except (OSError, ValueError, RuntimeError) as exc:
                raise StreamError(f"model: cannot load {os.fspath(model)!r}: {exc}") from None
            self.model_id = model_id or os.path.basename(os.path.normpath(os.fspath(model)))
        else:
            raise StreamError(f"model must be a dicebox.Model or a model directory, got "
                              f"{type(model).__name__}")
        if settings is not None:
            self.max_image_bytes = settings.max_image_bytes
            self.max_image_pixels = settings.max_image_pixels
        else:
            self.max_image_bytes = Settings.model_fields["max_image_bytes"].default
            self.max_image_pixels = Settings.model_fields["max_image_pixels"].default
        channels, height, width = self.model.input_shape
        self._shape = (int(channels), int(height), int(width))
        self._categories = tuple(self.model.categories)
        self.classified = 0
        self.requeued = 0  # inputs handed back to the queue (model failure, nobody bound)
        # One inference thread: batches are classified one after the other while the
        # connection thread goes on receiving the next one.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dicebox-infer")
        self._pause_until = 0.0
        self._retry_delay = BACKOFF_FIRST
        # Publish with ``mandatory`` (and requeue the inputs when nobody is bound) only to a
        # fanout exchange of our own declaration: on another type, a prediction no binding
        # matches is one nobody asked for.
        self._mandatory = True

    def run(self) -> None:
        try:
            super().run()
        finally:
            self._pool.shutdown(wait=True)

    # -- the connection thread ----------------------------------------------------------------

    def _declare(self, connection: pika.BlockingConnection) -> Any:
        """A channel after declaring the input queue (durable) and the output exchange
        (fanout, durable); either one that exists already with other settings is used as it
        is (the broker refuses the redeclaration with 406 and closes the channel, so check it
        passively on a new one)."""
        channel = _open_channel(connection)
        self._mandatory = True
        for declare, what in (
                (lambda ch, passive: ch.queue_declare(self.input_queue, passive=passive,
                                                      durable=True), "queue"),
                (lambda ch, passive: ch.exchange_declare(self.output_exchange, "fanout",
                                                         passive=passive, durable=True),
                 "exchange")):
            try:
                declare(channel, False)
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != 406:
                    raise
                log.info("infer: %s exists with other settings; using it as it is (%s)",
                         what, exc.reply_text)
                channel = connection.channel()
                channel.confirm_delivery()
                declare(channel, True)
                if what == "exchange":
                    self._mandatory = False
        return channel

    def _serve(self, connection: pika.BlockingConnection) -> None:
        channel = self._declare(connection)
        channel.basic_qos(prefetch_count=self.prefetch)
        pending: list[_Message] = []

        def on_message(_ch: Any, method: Any, properties: Any, body: bytes) -> None:
            headers = {str(_text(k)): _text(v) for k, v in (properties.headers or {}).items()}
            pending.append(_Message(method.delivery_tag, properties, body, headers))

        consumer = channel.basic_consume(self.input_queue, on_message)
        self._consumer_registered()
        log.info("infer: consuming %r with prefetch %d, publishing to %r", self.input_queue,
                 self.prefetch, self.output_exchange)
        inflight: Future | None = None
        inflight_batch: list[_Message] = []

        def wake(_future: Future) -> None:
            # From the inference thread: only add_callback_threadsafe may touch the connection.
            try:
                connection.add_callback_threadsafe(lambda: None)
            except (pika.exceptions.AMQPError, OSError) as exc:  # the connection is gone
                log.debug("infer: no connection to wake: %s", describe(exc))

        while True:
            stopping = self._stop.is_set()
            if stopping and consumer is not None:
                channel.basic_cancel(consumer)
                consumer = None
                for message in pending:  # delivered but never started: back to the queue
                    channel.basic_nack(message.tag, requeue=True)
                pending.clear()
            if inflight is not None and inflight.done():
                try:
                    outcomes = inflight.result()
                except Exception:  # a bug in classifying: keep the inputs
                    log.exception("infer: classifying a batch failed; requeueing it")
                    outcomes = [_Outcome(m, retry=True) for m in inflight_batch]
                inflight = None
                self._settle(channel, outcomes)
            if stopping and inflight is None:
                return
            ready = time.monotonic() >= self._pause_until
            if pending and inflight is None and not stopping and ready:
                inflight_batch = pending[:]
                pending.clear()
                inflight = self._pool.submit(self._classify, inflight_batch)
                inflight.add_done_callback(wake)
                continue
            connection.process_data_events(time_limit=POLL_SECONDS)

    def _settle(self, channel: Any, outcomes: list[_Outcome]) -> None:
        """Publish the predictions (each confirmed) and acknowledge their inputs; refuse the
        bad inputs. Inputs the model failed on, and all that are left when no queue is bound
        to the output exchange, are requeued, and new batches pause (back-off)."""
        failed = False
        for index, outcome in enumerate(outcomes):
            message = outcome.message
            if outcome.retry:
                channel.basic_nack(message.tag, requeue=True)
                self.requeued += 1
                failed = True
                continue
            if outcome.reason is not None:
                self._dead_letter(channel, self.input_queue, message, outcome.reason)
                continue
            try:
                self._publish(channel, message, outcome.prediction)
            except _Unroutable:
                log.warning("infer: no queue is bound to exchange %r: %d input(s) requeued, "
                            "retrying in %.1f s", self.output_exchange, len(outcomes) - index,
                            self._retry_delay)
                for rest in outcomes[index:]:
                    if rest.reason is None:
                        channel.basic_nack(rest.message.tag, requeue=True)
                        self.requeued += 1
                    else:
                        self._dead_letter(channel, self.input_queue, rest.message, rest.reason)
                self._pause()
                return
            channel.basic_ack(message.tag)
            self.classified += 1
        if failed:
            self._pause()
        else:
            self._retry_delay = BACKOFF_FIRST

    def _pause(self) -> None:
        self._pause_until = time.monotonic() + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, BACKOFF_MAX)

    def _publish(self, channel: Any, message: _Message, prediction: dict[str, Any]) -> None:
        properties = message.properties
        correlation_id = properties.correlation_id or properties.message_id
        body = {**prediction, "message_id": properties.message_id,
                "correlation_id": correlation_id, "model": self.model_id}
        headers = dict(properties.headers or {})
        out = pika.BasicProperties(
            content_type="application/json", delivery_mode=2, headers=headers,
            message_id=properties.message_id, correlation_id=correlation_id,
            timestamp=int(time.time()), app_id="dicebox-infer", type="prediction")
        try:
            channel.basic_publish(self.output_exchange, prediction["category"],
                                  json.dumps(body).encode(), out, mandatory=self._mandatory)
        except pika.exceptions.UnroutableError:
            raise _Unroutable from None

    # -- the inference thread -----------------------------------------------------------------

    def _check(self, message: _Message) -> int:
        """The checks before decoding; returns the message's ``top``."""
        from dicebox.classifier import declared_size

        top = _header_int(message.headers, "top", 1, MAX_TOP)
        data = message.body
        if not data:
            raise InvalidInput("empty body (expected a PNG or JPEG image)")
        if len(data) > self.max_image_bytes:
            raise TooLarge(f"{len(data)} bytes exceed the limit of {self.max_image_bytes} "
                           "(DICEBOX_MAX_IMAGE_BYTES)")
        try:
            size = declared_size(data)
        except Image.DecompressionBombError:
            size = None
            pixels = self.max_image_pixels + 1
        else:
            pixels = size[0] * size[1] if size is not None else 0
        if pixels > self.max_image_pixels:
            raise TooLarge(f"{pixels} pixels exceed the limit of {self.max_image_pixels} "
                           "(DICEBOX_MAX_IMAGE_PIXELS)")
        return top if top is not None else DEFAULT_TOP

    def _classify(self, batch: list[_Message]) -> list[_Outcome]:
        """Decode every input, predict the good ones in one call, rank the categories."""
        from dicebox.imagefolder import decode_image

        channels, height, width = self._shape
        outcomes = [_Outcome(message) for message in batch]
        good: list[tuple[_Outcome, int]] = []
        images = np.empty((len(batch), channels, height, width), dtype=np.uint8)
        for outcome in outcomes:
            message = outcome.message
            try:
                top = self._check(message)
                images[len(good)] = decode_image(message.body, (width, height), channels,
                                                 name=message.label)
            except (ServiceError, ValueError) as exc:
                outcome.reason = f"cannot classify {message.label}: {exc}"
                continue
            good.append((outcome, top))
        if not good:
            return outcomes
        try:
            probabilities = self.model.predict(images[:len(good)])
        except Exception:  # the model, not the inputs: requeue and retry later
            log.exception("infer: the model failed on a batch of %d image(s); requeueing them",
                          len(good))
            for outcome, _ in good:
                outcome.retry = True
            return outcomes
        # Stable sort on the negated probabilities: equal ones keep category order (as the
        # server's classify answers).
        order = np.argsort(-probabilities, axis=1, kind="stable")
        for row, (outcome, top) in enumerate(good):
            k = min(top, len(self._categories))
            ranked = [{"category": self._categories[i], "probability": float(probabilities[row, i])}
                      for i in order[row, :k].tolist()]
            outcome.prediction = {"category": ranked[0]["category"],
                                  "probability": ranked[0]["probability"], "top": ranked}
        return outcomes
