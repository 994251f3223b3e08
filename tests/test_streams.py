"""Data over the broker (dicebox.rabbitmq.streams, dicebox.infer) against a real RabbitMQ node.

Sensory ingestion: images published to ``dicebox.sensory`` land in the sensory store with the
right categories and pixels (datasets created on first use from size headers); every kind of
bad message is dead-lettered at once with its reason while nothing is stored, and the queue
keeps flowing. Inference: two replicas share one queue and both take work, every input gets
exactly one prediction carrying its ids and headers, equal to ``Model.classify`` of the same
images; malformed inputs are dead-lettered; inputs wait (requeued) while the output exchange
has no queue bound; ``dicebox infer`` fetches its model from a real server and stops cleanly
on SIGTERM. Waits poll the broker or the store until a condition holds (no timed assertions).
"""

from __future__ import annotations

import json
import logging
import signal
import struct
import sys
import threading
import uuid
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pika
import pika.exceptions
import pytest
from prometheus_client import CollectorRegistry, Counter
from rabbit import (  # noqa: F401 - amqp_url is a fixture
    PrivateBroker,
    amqp_url,
    purge_dicebox_queues,
    require_rabbitmq,
)
from servers import Process, Server, base_env, png_bytes, wait_for

import dicebox
from dicebox import infer
from dicebox.client import Client, ServerUnavailable
from dicebox.db import make_engine, migrate
from dicebox.errors import NotFound
from dicebox.rabbitmq.connection import DEAD, SENSORY
from dicebox.rabbitmq.streams import (
    ERROR_HEADER,
    QUEUE_HEADER,
    InferWorker,
    SensoryIngest,
    StreamError,
)
from dicebox.registry import ModelRegistry
from dicebox.sensory import SensoryStore
from dicebox.settings import Settings

SIZE = 16
MLP = {"optimizer": {"name": "adam", "learning_rate": 0.01},
       "layers": [{"type": "dense", "size": 16, "activation": "relu"}]}
WAIT = 60.0  # seconds before a wait gives up (a failure, never a measurement)


# ---------------------------------------------------------------------------------------------
# fixtures and helpers


class Amqp:
    """The test's own connection to the broker: publish with confirms, count and drain queues."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.connection = pika.BlockingConnection(pika.URLParameters(url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()

    def publish(self, routing_key: str, body: bytes, headers: dict | None = None,
                exchange: str = "", **properties) -> None:
        self.channel.basic_publish(exchange, routing_key, body,
                                   pika.BasicProperties(headers=headers, delivery_mode=2,
                                                        **properties), mandatory=True)

    def count(self, queue: str) -> int:
        """Messages ready in ``queue`` (not those delivered and unacknowledged)."""
        return self.channel.queue_declare(queue, passive=True).method.message_count

    def consumers(self, queue: str) -> int:
        return self.channel.queue_declare(queue, passive=True).method.consumer_count

    def drain(self, queue: str) -> list[tuple[pika.BasicProperties, bytes]]:
        """Every ready message of ``queue``, acknowledged (so removed)."""
        out = []
        while True:
            method, properties, body = self.channel.basic_get(queue)
            if method is None:
                return out
            self.channel.basic_ack(method.delivery_tag)
            out.append((properties, body))

    def output_queue(self, exchange: str) -> str:
        """A fresh queue bound to ``exchange`` (declared fanout, as dicebox infer would)."""
        self.channel.exchange_declare(exchange, "fanout", durable=True)
        queue = f"test.out.{uuid.uuid4().hex[:8]}"
        self.channel.queue_declare(queue, durable=True)
        self.channel.queue_bind(queue, exchange)
        return queue

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()


@pytest.fixture
def amqp(amqp_url):  # noqa: F811 - the fixture imported above
    """A clean shared broker (dicebox's queues purged) and a connection to it."""
    purge_dicebox_queues(amqp_url)
    client = Amqp(amqp_url)
    from dicebox.rabbitmq.connection import connect, declare_topology

    setup = connect(amqp_url)
    declare_topology(setup.channel())
    setup.close()
    yield client
    client.close()


# The sensory store's limits in these tests: a 16x16 die passes, a 40x40 image has too many
# pixels and a 64x64 noise image too many bytes.
MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS = 2048, 1024


@pytest.fixture
def store(tmp_path) -> SensoryStore:
    engine = make_engine(f"sqlite:///{tmp_path / 'dicebox.db'}")
    migrate(engine)
    settings = Settings(home=tmp_path, max_image_bytes=MAX_IMAGE_BYTES,
                        max_image_pixels=MAX_IMAGE_PIXELS)
    yield SensoryStore(engine, tmp_path / "datasets", settings)
    engine.dispose()


@pytest.fixture(scope="module")
def dice() -> dicebox.Dataset:
    return dicebox.datasets.make_dice(count=300, size=SIZE, seed=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, dice) -> Path:
    """A tiny classifier of 16x16 grey dice, trained for 2 epochs."""
    train, val = dice.split([0.8, 0.2], seed=0)
    model = dicebox.train(MLP, train, val=val, epochs=2, batch_size=32, seed=0, threads=1)
    return model.save(tmp_path_factory.mktemp("model") / "tiny")


def running(worker) -> threading.Thread:
    """``worker.run()`` on a thread of its own, once its consumer is registered."""
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    assert worker.wait_connected(WAIT), "the consumer did not start"
    return thread


def stop(worker, thread: threading.Thread) -> None:
    worker.stop()
    thread.join(WAIT)
    assert not thread.is_alive()


def dead_letters(amqp: Amqp, expected: int) -> list[tuple[pika.BasicProperties, bytes]]:
    wait_for(lambda: amqp.count(DEAD) >= expected, WAIT, what=f"{expected} dead letters")
    letters = amqp.drain(DEAD)
    assert len(letters) == expected, [p.headers.get(ERROR_HEADER) for p, _ in letters]
    return letters


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk declaring width x height pixels (no pixel data)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)))


# ---------------------------------------------------------------------------------------------
# sensory ingestion


def test_sensory_ingests_published_images(amqp, store, dice):
    store.create("dice", SIZE, SIZE, 1)
    registry = CollectorRegistry()
    metrics = SimpleNamespace(ingested_images=Counter("ingested", "images", registry=registry))
    images, labels, categories = dice.images[:40], dice.labels[:40], dice.categories
    # 30 into an existing dataset; 10 into "fresh", created by the first of them from its size
    # headers (integers or decimal strings, as other clients send them).
    for i in range(30):
        amqp.publish(SENSORY, png_bytes(images[i]),
                     {"dataset": "dice", "category": categories[labels[i]]}, message_id=f"d{i}")
    for i in range(30, 40):
        size = SIZE if i % 2 else str(SIZE)
        amqp.publish(SENSORY, png_bytes(images[i]),
                     {"dataset": "fresh", "category": categories[labels[i]], "width": size,
                      "height": size, "channels": 1})

    ingest = SensoryIngest(amqp.url, store, metrics, prefetch=8)
    ingest.start()
    try:
        wait_for(lambda: store.get("dice")["count"] == 30 and store.get("fresh")["count"] == 10
                 if ingest.ingested >= 40 else False, WAIT, what="40 images stored")
    finally:
        ingest.stop()
    assert ingest.ingested == 40 and ingest.dead_lettered == 0
    assert registry.get_sample_value("ingested_total") == 40
    # Everything was acknowledged: nothing ready, nothing held (the consumer is gone).
    assert amqp.count(SENSORY) == 0 and amqp.count(DEAD) == 0

    fresh = store.get("fresh")
    assert (fresh["width"], fresh["height"], fresh["channels"]) == (SIZE, SIZE, 1)
    for name, part in (("dice", slice(0, 30)), ("fresh", slice(30, 40))):
        stored = store.dataset(name)
        expected = [categories[c] for c in labels[part]]
        assert [stored.categories[c] for c in stored.labels] == expected  # arrival order kept
        assert np.array_equal(stored.images, images[part])  # lossless PNG: the same pixels
        assert store.get(name)["counts"] == {c: expected.count(c) for c in set(expected)}


def test_sensory_dead_letters_bad_messages_and_keeps_flowing(amqp, store, dice, tmp_path):
    store.create("dice", SIZE, SIZE, 1)
    good = png_bytes(dice.images[0])
    truncated = good[: len(good) // 2]
    noise = png_bytes(np.random.default_rng(0).integers(0, 256, (1, 64, 64), dtype=np.uint8))
    assert len(good) < MAX_IMAGE_BYTES < len(noise)
    bad = [  # (body, headers, what the reason must say)
        (b"GIF89a not an image", {"dataset": "dice", "category": "1"}, "not a PNG or JPEG"),
        (truncated, {"dataset": "dice", "category": "1"}, "image"),
        (b"", {"dataset": "dice", "category": "1"}, "empty body"),
        (good, {"category": "1"}, "'dataset' is missing"),
        (good, {"dataset": "dice"}, "'category' is missing"),
        (good, None, "'dataset' is missing"),
        (good, {"dataset": "unknown", "category": "1"}, "does not exist"),
        (good, {"dataset": "../evil", "category": "1"}, "dataset name"),
        (good, {"dataset": "..", "category": "1"}, "dataset name"),
        (good, {"dataset": "../evil", "category": "1", "width": SIZE, "height": SIZE},
         "dataset name"),
        (good, {"dataset": "dice", "category": "../1"}, "category"),
        (good, {"dataset": "dice", "category": ""}, "category"),
        (good, {"dataset": 7, "category": "1"}, "dataset '7' does not exist"),
        (good, {"dataset": "new", "category": "1", "width": SIZE}, "go together"),
        (good, {"dataset": "new", "category": "1", "width": "wide", "height": SIZE}, "'width'"),
        (good, {"dataset": "new", "category": "1", "width": SIZE, "height": SIZE,
                "channels": 2}, "'channels'"),
        (good, {"dataset": "huge", "category": "1", "width": 60000, "height": 60000},
         "DICEBOX_MAX_DATASET_SIDE"),
        (b"not an image", {"dataset": "broken", "category": "1", "width": SIZE,
                           "height": SIZE}, "not a PNG or JPEG"),
        (png_bytes(np.zeros((1, 40, 40), np.uint8)), {"dataset": "dice", "category": "1"},
         "DICEBOX_MAX_IMAGE_PIXELS"),
        (noise, {"dataset": "dice", "category": "1"}, "DICEBOX_MAX_IMAGE_BYTES"),
        (noise, {"dataset": "big", "category": "1", "width": SIZE, "height": SIZE},
         "DICEBOX_MAX_IMAGE_BYTES"),
        (good, {"dataset": "dice", "category": "1", "width": SIZE + 1, "height": SIZE},
         "holds 16 x 16 images"),
        (good, {"dataset": "dice", "category": "1", "channels": 3}, "channel"),
    ]
    amqp.publish(SENSORY, good, {"dataset": "dice", "category": "1"}, message_id="first")
    for index, (body, headers, _) in enumerate(bad):
        amqp.publish(SENSORY, body, headers, message_id=f"bad-{index}")
    amqp.publish(SENSORY, good, {"dataset": "dice", "category": "2"}, message_id="last")

    ingest = SensoryIngest(amqp.url, store, prefetch=50)
    ingest.start()
    try:
        letters = dead_letters(amqp, len(bad))
        wait_for(lambda: ingest.ingested == 2, WAIT, what="the two good images")
        # The queue keeps flowing after the bad messages.
        amqp.publish(SENSORY, good, {"dataset": "dice", "category": "3"}, message_id="after")
        wait_for(lambda: ingest.ingested == 3, WAIT, what="an image after the bad ones")
    finally:
        ingest.stop()

    by_id = {p.message_id: p for p, _ in letters}
    assert set(by_id) == {f"bad-{i}" for i in range(len(bad))}
    for index, (body, _, reason) in enumerate(bad):
        headers = by_id[f"bad-{index}"].headers
        assert reason in headers[ERROR_HEADER], (index, headers[ERROR_HEADER])
        assert headers[QUEUE_HEADER] == SENSORY
    assert {body for _, body in letters} >= {b"GIF89a not an image", truncated}
    assert by_id["bad-0"].delivery_mode == 2
    # Nothing else was stored or created: one dataset, three images, no folders for the bad
    # names (and nothing outside the store's root).
    assert [d["name"] for d in store.list()["items"]] == ["dice"]
    assert store.get("dice")["counts"] == {"1": 1, "2": 1, "3": 1}
    assert sorted(p.name for p in (tmp_path / "datasets").iterdir()) == ["dice"]
    assert not (tmp_path / "evil").exists()
    assert ingest.dead_lettered == len(bad)
    assert amqp.count(SENSORY) == 0


def test_sensory_keeps_messages_while_storing_fails(amqp, store, dice, tmp_path, caplog):
    """A failure that is not the message's (here the dataset's pixel file cannot be opened)
    neither loses nor dead-letters it: it is held and stored once the failure is over."""
    caplog.set_level(logging.ERROR, logger="dicebox.rabbitmq.streams")
    store.create("dice", SIZE, SIZE, 1)
    pixels = tmp_path / "datasets" / "dice" / "pixels.u8"
    pixels.unlink()
    pixels.mkdir()  # opening it for writing fails with IsADirectoryError, even as root
    amqp.publish(SENSORY, png_bytes(dice.images[0]), {"dataset": "dice", "category": "1"})
    ingest = SensoryIngest(amqp.url, store)
    ingest.start()
    try:
        wait_for(lambda: sum("retrying in" in r.getMessage() for r in caplog.records) >= 2,
                 WAIT, what="two failed attempts")
        assert store.get("dice")["count"] == 0 and ingest.dead_lettered == 0
        pixels.rmdir()
        pixels.touch()
        wait_for(lambda: ingest.ingested == 1, WAIT, what="the held image stored")
    finally:
        ingest.stop()
    assert store.get("dice")["count"] == 1
    assert np.array_equal(store.dataset("dice").images[0], dice.images[0])
    assert amqp.count(SENSORY) == 0 and amqp.count(DEAD) == 0


def test_sensory_ingest_arguments_are_checked(store):
    with pytest.raises(StreamError, match="url"):
        SensoryIngest("http://localhost", store)
    with pytest.raises(StreamError, match="prefetch"):
        SensoryIngest("amqp://localhost", store, prefetch=0)


# ---------------------------------------------------------------------------------------------
# inference


def test_two_replicas_share_one_queue(amqp, model_dir):
    queue, exchange = f"test.in.{uuid.uuid4().hex[:8]}", f"test.predictions.{uuid.uuid4().hex[:8]}"
    out = amqp.output_queue(exchange)
    workers = [InferWorker(amqp.url, model_dir, queue, exchange, prefetch=4, model_id="tiny")
               for _ in range(2)]
    threads = [running(w) for w in workers]
    try:
        wait_for(lambda: amqp.consumers(queue) == 2, WAIT, what="two consumers")
        samples = dicebox.datasets.make_dice(count=60, size=SIZE, seed=5).images
        for i, image in enumerate(samples):
            ids = {"message_id": f"m{i}"}
            if i % 2:
                ids["correlation_id"] = f"c{i}"
            amqp.publish(queue, png_bytes(image), {"n": i, "source": "camera"}, **ids)
        wait_for(lambda: amqp.count(out) >= 60, WAIT, what="60 predictions")
    finally:
        for worker, thread in zip(workers, threads):
            stop(worker, thread)
    predictions = amqp.drain(out)
    assert len(predictions) == 60  # exactly one each: none lost, none repeated
    assert all(w.classified > 0 for w in workers), [w.classified for w in workers]
    assert sum(w.classified for w in workers) == 60
    assert amqp.count(queue) == 0 and amqp.count(DEAD) == 0

    expected = dicebox.Model.load(model_dir).classify(samples)
    seen = set()
    for properties, body in predictions:
        answer = json.loads(body)
        i = properties.headers["n"]
        seen.add(i)
        correlation = f"c{i}" if i % 2 else f"m{i}"  # the message id when it had none
        assert properties.correlation_id == answer["correlation_id"] == correlation
        assert properties.message_id == answer["message_id"] == f"m{i}"
        assert properties.headers["source"] == "camera"
        assert properties.content_type == "application/json" and properties.delivery_mode == 2
        assert answer["category"] == expected[i] == answer["top"][0]["category"]
        assert answer["model"] == "tiny"
        assert len(answer["top"]) == 5
        probabilities = [t["probability"] for t in answer["top"]]
        assert probabilities == sorted(probabilities, reverse=True)
        assert answer["probability"] == probabilities[0]
    assert seen == set(range(60))


def test_infer_dead_letters_malformed_inputs(amqp, model_dir, dice):
    queue, exchange = f"test.in.{uuid.uuid4().hex[:8]}", f"test.predictions.{uuid.uuid4().hex[:8]}"
    out = amqp.output_queue(exchange)
    good = png_bytes(dice.images[0])
    bad = [  # (body, headers, what the reason must say)
        (b"definitely not an image", None, "not a PNG or JPEG"),
        (b"", None, "empty body"),
        (good[: len(good) // 2], None, "cannot classify"),
        (png_header(30000, 30000), None, "MAX_IMAGE_PIXELS"),
        (good, {"top": 0}, "'top'"),
        (good, {"top": "many"}, "'top'"),
    ]
    amqp.channel.queue_declare(queue, durable=True)
    amqp.publish(queue, good, {"top": 2}, message_id="good-0")
    for index, (body, headers, _) in enumerate(bad):
        amqp.publish(queue, body, headers, message_id=f"bad-{index}")
    amqp.publish(queue, good, None, message_id="good-1")

    worker = InferWorker(amqp.url, model_dir, queue, exchange, prefetch=16)
    thread = running(worker)
    try:
        letters = dead_letters(amqp, len(bad))
        wait_for(lambda: amqp.count(out) == 2, WAIT, what="two predictions")
        amqp.publish(queue, good, None, message_id="after")  # still flowing
        wait_for(lambda: amqp.count(out) == 3, WAIT, what="a prediction after the bad ones")
    finally:
        stop(worker, thread)
    by_id = {p.message_id: p.headers for p, _ in letters}
    for index, (_, _, reason) in enumerate(bad):
        assert reason in by_id[f"bad-{index}"][ERROR_HEADER], by_id[f"bad-{index}"]
        assert by_id[f"bad-{index}"][QUEUE_HEADER] == queue
    predictions = {p.message_id: json.loads(b) for p, b in amqp.drain(out)}
    assert set(predictions) == {"good-0", "good-1", "after"}
    assert len(predictions["good-0"]["top"]) == 2 and len(predictions["good-1"]["top"]) == 5
    assert worker.classified == 3 and worker.dead_lettered == len(bad)
    assert amqp.count(queue) == 0


def test_infer_waits_for_a_bound_output_queue(amqp, model_dir, dice):
    """With no queue bound to the output exchange, inputs are requeued rather than their
    predictions dropped; once a queue is bound, every input gets its prediction."""
    queue, exchange = f"test.in.{uuid.uuid4().hex[:8]}", f"test.predictions.{uuid.uuid4().hex[:8]}"
    worker = InferWorker(amqp.url, model_dir, queue, exchange, prefetch=8)
    thread = running(worker)
    try:
        for i in range(3):
            amqp.publish(queue, png_bytes(dice.images[i]), None, message_id=f"m{i}")
        wait_for(lambda: worker.requeued >= 3, WAIT, what="inputs requeued")
        assert worker.classified == 0
        out = f"test.out.{uuid.uuid4().hex[:8]}"
        amqp.channel.queue_declare(out, durable=True)
        amqp.channel.queue_bind(out, exchange)
        wait_for(lambda: amqp.count(out) == 3, WAIT, what="three predictions")
    finally:
        stop(worker, thread)
    assert sorted(p.message_id for p, _ in amqp.drain(out)) == ["m0", "m1", "m2"]
    assert worker.classified == 3 and amqp.count(queue) == 0 and amqp.count(DEAD) == 0


def test_infer_uses_an_existing_exchange_of_another_type(amqp, model_dir, dice):
    """A topic exchange declared beforehand is kept and predictions are routed by category;
    those no binding asked for are dropped, never requeued in a loop."""
    queue, exchange = f"test.in.{uuid.uuid4().hex[:8]}", f"test.topic.{uuid.uuid4().hex[:8]}"
    amqp.channel.exchange_declare(exchange, "topic", durable=True)
    bound = {}
    for category in ("1", "6"):
        bound[category] = f"test.out.{category}.{uuid.uuid4().hex[:8]}"
        amqp.channel.queue_declare(bound[category], durable=True)
        amqp.channel.queue_bind(bound[category], exchange, routing_key=category)
    samples = dice.images[:30]
    worker = InferWorker(amqp.url, model_dir, queue, exchange, prefetch=8)
    thread = running(worker)
    try:
        for i, image in enumerate(samples):
            amqp.publish(queue, png_bytes(image), None, message_id=f"m{i}")
        wait_for(lambda: worker.classified == len(samples), WAIT, what="every input answered")
    finally:
        stop(worker, thread)
    expected = dicebox.Model.load(model_dir).classify(samples)
    for category, out in bound.items():
        answers = {p.message_id: json.loads(b)["category"] for p, b in amqp.drain(out)}
        assert answers == {f"m{i}": c for i, c in enumerate(expected) if c == category}
    assert worker.requeued == 0 and amqp.count(queue) == 0 and amqp.count(DEAD) == 0


def test_infer_worker_arguments_are_checked(model_dir, tmp_path):
    url = "amqp://guest:guest@127.0.0.1:1/%2F"
    for kwargs, message in (
            ({"url": "http://x"}, "url"),
            ({"url": "amqp://user:secret@host:port/"}, "Port"),
            ({"input_queue": ""}, "input queue"),
            ({"output_exchange": ""}, "output exchange"),
            ({"output_exchange": "amq.fanout"}, "reserved"),
            ({"input_queue": "q" * 256}, "input queue"),
            ({"prefetch": 0}, "prefetch"),
            ({"prefetch": True}, "prefetch"),
            ({"model": tmp_path / "missing"}, "cannot load"),
            ({"model": 42}, "model must be"),
    ):
        arguments = {"url": url, "model": model_dir, "input_queue": "in",
                     "output_exchange": "out", "prefetch": 4, **kwargs}
        with pytest.raises(StreamError, match=message) as error:
            InferWorker(**arguments)
        assert "secret" not in str(error.value)


# ---------------------------------------------------------------------------------------------
# a broker that is missing, then drops every connection


def test_unreachable_broker_is_retried_until_stop(store, caplog):
    """No broker: the consumer retries with back-off (logged) and stop() still ends it."""
    from servers import free_port

    caplog.set_level(logging.WARNING, logger="dicebox.rabbitmq.streams")
    ingest = SensoryIngest(f"amqp://guest:secret@127.0.0.1:{free_port()}/%2F", store)
    ingest.start()
    try:
        wait_for(lambda: sum("retrying in" in r.getMessage() for r in caplog.records) >= 2,
                 WAIT, what="two failed connection attempts")
    finally:
        ingest.stop()
    assert not ingest._thread.is_alive() and not ingest.connected
    assert "secret" not in caplog.text  # the password is never logged
    assert store.list()["items"] == []


def test_ingest_and_infer_reconnect_when_the_broker_drops_them(tmp_path, store, model_dir, dice):
    """When the (private) broker closes every connection, both consumers reconnect by
    themselves, and no message is lost or answered twice."""
    require_rabbitmq()
    store.create("dice", SIZE, SIZE, 1)
    broker = PrivateBroker(tmp_path / "rabbitmq")
    ingest = SensoryIngest(broker.url, store, prefetch=4)
    worker = InferWorker(broker.url, model_dir, "test.in", "test.out", prefetch=4)
    amqp = None
    try:
        broker.start()
        ingest.start()
        worker.start()
        assert ingest.wait_connected(WAIT) and worker.wait_connected(WAIT)
        amqp = Amqp(broker.url)
        out = amqp.output_queue("test.out")
        for round_ in range(2):
            for i in range(5 * round_, 5 * round_ + 5):
                amqp.publish(SENSORY, png_bytes(dice.images[i]), {"dataset": "dice",
                             "category": dice.categories[dice.labels[i]]})
                amqp.publish("test.in", png_bytes(dice.images[i]), None, message_id=f"m{i}")
            wait_for(lambda n=5 * round_ + 5: ingest.ingested == n and worker.classified == n,
                     WAIT, what="the round's images stored and classified")
            if round_ == 0:
                amqp.close()
                broker.ctl("close_all_connections", "test: the broker drops every connection")
                wait_for(lambda: ingest.sessions == 2 and worker.sessions == 2
                         and ingest.connected and worker.connected, WAIT, what="reconnections")
                amqp = Amqp(broker.url)
        predictions = amqp.drain(out)
    finally:
        ingest.stop()
        worker.stop()
        if amqp is not None:
            amqp.close()
        broker.close()
    assert sorted(p.message_id for p, _ in predictions) == sorted(f"m{i}" for i in range(10))
    assert store.get("dice")["count"] == 10


# ---------------------------------------------------------------------------------------------
# the dicebox infer command


def test_fetch_model_gives_up_on_an_unreachable_server_only_when_stopped(tmp_path):
    from servers import free_port

    stop = threading.Event()
    stop.set()  # already stopping: the first failure ends the retries
    with (Client(f"http://127.0.0.1:{free_port()}", timeout=5) as client,
          pytest.raises(ServerUnavailable)):
        infer.fetch_model(client, "0" * 32, tmp_path / "cache", stop=stop)
    assert not (tmp_path / "cache" / "models" / ("0" * 32)).exists()


def test_infer_command_usage_errors(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("DICEBOX_BROKER_URL", raising=False)
    monkeypatch.setenv("DICEBOX_HOME", str(tmp_path))
    base = ["--input", "in", "--output", "out"]
    cases = [
        (["--model", "0" * 32, *base], "no broker"),
        (["--model", "nothex", *base, "--broker", "amqp://x"], "--model"),
        (["--model", "best", *base, "--broker", "amqp://x"], "--dataset"),
        (["--model", "0" * 32, *base, "--broker", "amqp://x", "--prefetch", "0"], "--prefetch"),
        (["--model", "0" * 32, *base, "--broker", "http://x"], "broker_url"),
        (["--model", "0" * 32, *base, "--broker", "amqp://x", "--server", "ftp://x"], "server_url"),
    ]
    for argv, message in cases:
        assert infer.main(argv) == 2, argv
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        infer.main(["--input", "in", "--output", "out"])  # --model is required
    assert exit_info.value.code == 2
    assert not (tmp_path / "cache").exists()  # nothing fetched


def test_infer_command_end_to_end(amqp, model_dir, dice, tmp_path):
    """``python -m dicebox.infer`` against a real server: fetches the model into its cache,
    classifies, stops on SIGTERM with exit 0; an unknown model is a usage error (2)."""
    home = tmp_path / "home"
    home.mkdir()
    engine = make_engine(f"sqlite:///{home / 'dicebox.db'}")
    migrate(engine)
    registry = ModelRegistry(engine, home / "models")
    model_id = registry.register(None, model_dir, dataset="dice")["id"]
    engine.dispose()
    server = Server(home)
    queue, exchange = f"test.in.{uuid.uuid4().hex[:8]}", f"test.predictions.{uuid.uuid4().hex[:8]}"
    out = amqp.output_queue(exchange)
    env = base_env(tmp_path / "worker-home", None)
    cache = tmp_path / "worker-home" / "cache"
    command = [sys.executable, "-m", "dicebox.infer", "--broker", amqp.url, "--server",
               server.url, "--input", queue, "--output", exchange, "--prefetch", "4"]
    worker = Process([*command, "--model", model_id], env, tmp_path / "infer.log")
    unknown = Process([*command, "--model", "f" * 32], env, tmp_path / "unknown.log")
    try:
        wait_for(lambda: amqp.channel.queue_declare(queue, durable=True).method.consumer_count
                 or not worker.alive, WAIT, what="the infer consumer")
        assert worker.alive, worker.output()
        for i in range(10):
            amqp.publish(queue, png_bytes(dice.images[i]), None, message_id=f"m{i}")
        wait_for(lambda: amqp.count(out) == 10, WAIT, what="10 predictions")
        worker.signal(signal.SIGTERM)
        assert worker.stop() == 0, worker.output()
        assert unknown.proc.wait(WAIT) == 2, unknown.output()
        assert f"model {'f' * 32!r} not found" in unknown.output()
        # "best" of a dataset resolves to its model (already in the cache: not fetched again).
        with Client(server.url) as client:
            found = infer.fetch_model(client, "best", cache, "dice")
            assert found == (model_id, cache / "models" / model_id)
            with pytest.raises(NotFound):
                infer.fetch_model(client, "best", cache, "no-such-dataset")
    finally:
        worker.stop()
        unknown.stop()
        server.stop()
    expected = dicebox.Model.load(model_dir).classify(dice.images[:10])
    answers = {p.message_id: json.loads(b) for p, b in amqp.drain(out)}
    assert {m: a["category"] for m, a in answers.items()} == {
        f"m{i}": expected[i] for i in range(10)}
    assert all(a["model"] == model_id for a in answers.values())
    assert (cache / "models" / model_id / "model.json").is_file()
    assert amqp.count(queue) == 0
