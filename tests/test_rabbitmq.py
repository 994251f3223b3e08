"""dicebox.rabbitmq against a real RabbitMQ node (a private one, tests/rabbit.py): topology,
publisher confirms, the job consumer (prefetch, malformed messages, park, handoff before the
broker's consumer timeout, acks from worker threads, priorities, reconnection).

One node serves the whole module (a start costs several seconds); its ``consumer_timeout`` is
set to a few seconds so the handoff and the broker's timeout are exercised for real. Every
test starts with dicebox's queues purged; tests that stop the broker start it again.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterator

import pika
import pika.exceptions
import pytest
from rabbit import PrivateBroker, free_port, purge_dicebox_queues, require_rabbitmq
from servers import wait_for

from dicebox.rabbitmq import (
    DEAD,
    DLX,
    JOBS,
    SENSORY,
    WAIT,
    BrokerUnavailable,
    Delivery,
    JobConsumer,
    JobPublisher,
    MalformedMessage,
    TopologyConflict,
    connect,
    declare_topology,
    decode_job,
    encode_job,
    message_priority,
)

CONSUMER_TIMEOUT_MS = 5000


@pytest.fixture(scope="module")
def broker(tmp_path_factory) -> Iterator[PrivateBroker]:
    require_rabbitmq()
    node = PrivateBroker(
        tmp_path_factory.mktemp("rabbitmq"), consumer_timeout_ms=CONSUMER_TIMEOUT_MS
    )
    try:
        node.start()
        yield node
    finally:
        node.close()


@pytest.fixture
def url(broker) -> str:
    broker.start()  # a no-op unless a test left it stopped
    with contextlib.closing(connect(broker.url)) as connection:
        declare_topology(connection.channel())
    purge_dicebox_queues(broker.url)
    return broker.url


def new_id() -> str:
    return uuid.uuid4().hex


def ready(url: str, queue: str) -> int:
    """Messages ready (not held by a consumer) in ``queue``."""
    with contextlib.closing(connect(url)) as connection:
        return connection.channel().queue_declare(queue, passive=True).method.message_count


def drain(url: str, queue: str) -> list[tuple[pika.BasicProperties, bytes]]:
    """Take every ready message out of ``queue`` (acked), in delivery order."""
    out = []
    with contextlib.closing(connect(url)) as connection:
        channel = connection.channel()
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return out
            out.append((properties, body))


def delete_wait_queue(url: str) -> None:
    """Delete dicebox.jobs.wait (after the consumer declared it): parked copies are refused."""
    with contextlib.closing(connect(url)) as connection:
        connection.channel().queue_delete(WAIT)


def publish_raw(url: str, body: bytes, priority: int = 0, message_id: str | None = None) -> None:
    with contextlib.closing(connect(url)) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        properties = pika.BasicProperties(delivery_mode=2, priority=priority, message_id=message_id)
        channel.basic_publish("", JOBS, body, properties, mandatory=True)


def publish_job(url: str, job_id: str, priority: int = 0) -> None:
    publish_raw(
        url, encode_job(job_id, "train"), priority=message_priority(priority), message_id=job_id
    )


class Recorder:
    """A handler that records its deliveries and runs ``action(delivery)`` (default: ack),
    which may block on ``release``."""

    def __init__(self, action=None) -> None:
        self.deliveries: list[Delivery] = []
        self.threads: list[threading.Thread] = []
        self.results: list[bool] = []
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.action = action or (lambda d: d.ack())

    def __call__(self, delivery: Delivery) -> None:
        with self.lock:
            self.deliveries.append(delivery)
            self.threads.append(threading.current_thread())
        result = self.action(delivery)
        with self.lock:
            self.results.append(result)

    def ids(self) -> list[str]:
        with self.lock:
            return [d.job_id for d in self.deliveries]


@contextlib.contextmanager
def consuming(url: str, handler, **options) -> Iterator[JobConsumer]:
    """A JobConsumer running on its own thread; stopped (and its thread joined) at the end."""
    settings = {"concurrency": 1, "handoff_seconds": 2.0, "lease_seconds": 1.0, **options}
    consumer = JobConsumer(url, handler, **settings)
    thread = threading.Thread(target=consumer.run, name="test-consumer", daemon=True)
    thread.start()
    try:
        assert consumer.wait_connected(30), "the consumer did not connect"
        yield consumer
    finally:
        if isinstance(handler, Recorder):
            handler.release.set()
        consumer.stop()
        thread.join(60)
        assert not thread.is_alive(), "JobConsumer.run did not return after stop()"


# -- messages --------------------------------------------------------------------------------


def test_message_priority_maps_job_priorities_onto_0_to_10():
    assert [message_priority(p) for p in (-100, -60, 0, 20, 100)] == [0, 2, 5, 6, 10]
    for bad in (-101, 101, 1.5, "5", True, None):
        with pytest.raises(ValueError, match="priority"):
            message_priority(bad)


def test_job_messages_round_trip_and_bad_ones_say_what_is_wrong():
    job_id = new_id()
    assert decode_job(encode_job(job_id, "train")) == (job_id, "train")
    with pytest.raises(ValueError, match="job_id"):
        encode_job("not-hex", "train")
    with pytest.raises(ValueError, match="kind"):
        encode_job(job_id, "evolve")
    cases = {
        b"{not json": "not JSON",
        b"\xff\xfe": "not JSON",
        b"[1, 2]": "JSON object",
        json.dumps({"kind": "train"}).encode(): "job_id is missing",
        json.dumps({"job_id": 42, "kind": "train"}).encode(): "job_id must be",
        json.dumps({"job_id": "X" * 32, "kind": "train"}).encode(): "job_id must be",
        json.dumps({"job_id": job_id, "kind": "bake"}).encode(): "kind must be",
        json.dumps({"job_id": job_id}).encode(): "kind must be",
    }
    for body, reason in cases.items():
        with pytest.raises(MalformedMessage, match=reason):
            decode_job(body)


# -- connection and topology -----------------------------------------------------------------


def test_bad_urls_and_unreachable_brokers_raise_dicebox_errors():
    for bad in ("http://127.0.0.1:5672/", "", None, "amqp://guest:guest@127.0.0.1:notaport/%2F"):
        with pytest.raises(ValueError, match="url"):
            connect(bad)
    with pytest.raises(ValueError, match="heartbeat"):
        connect("amqp://127.0.0.1/", heartbeat=-1)
    with pytest.raises(BrokerUnavailable, match=r"guest:\*\*\*@"):  # the password is not shown
        connect(f"amqp://guest:secret@127.0.0.1:{free_port()}/%2F")
    with pytest.raises(ValueError):
        JobConsumer("amqp://127.0.0.1/", lambda d: None, concurrency=0)
    with pytest.raises(ValueError):
        JobConsumer("amqp://127.0.0.1/", lambda d: None, handoff_seconds=0)
    with pytest.raises(ValueError):
        JobPublisher("mqtt://127.0.0.1/")


def test_topology_is_declared_durable_with_its_arguments_and_idempotently(url, broker):
    with contextlib.closing(connect(url)) as connection:
        channel = connection.channel()
        declare_topology(channel, 30.0)
        declare_topology(channel, 5.0)  # again, with another lease: same topology, no error
        for queue in (JOBS, WAIT, DEAD, SENSORY):
            channel.queue_declare(queue, passive=True)
        channel.exchange_declare(DLX, passive=True)
    listing = broker.ctl(
        "list_queues", "name", "durable", "arguments", "--no-table-headers", "--quiet"
    )
    rows = {line.split("\t")[0]: line.split("\t")[1:] for line in listing.strip().splitlines()}
    assert rows[JOBS][0] == "true"
    assert "x-max-priority" in rows[JOBS][1] and "dicebox.dlx" in rows[JOBS][1]
    assert "x-dead-letter-routing-key" in rows[WAIT][1] and JOBS in rows[WAIT][1]
    assert all(rows[q][0] == "true" for q in (WAIT, DEAD, SENSORY))
    bindings = broker.ctl(
        "list_bindings", "source_name", "destination_name", "routing_key", "--quiet"
    )
    assert f"{DLX}\t{DEAD}\tdead" in bindings


def test_a_queue_declared_with_other_arguments_is_a_topology_conflict(url, broker):
    vhost = f"conflict-{new_id()[:8]}"
    broker.ctl("add_vhost", vhost)
    try:
        broker.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        other = url.rsplit("/", 1)[0] + "/" + vhost
        with contextlib.closing(connect(other)) as connection:
            connection.channel().queue_declare(JOBS, durable=True)  # no priorities, no DLX
            with pytest.raises(TopologyConflict, match="other arguments"):
                declare_topology(connection.channel())
        listing = broker.ctl(
            "list_queues", "-p", vhost, "name", "arguments", "--quiet", "--no-table-headers"
        )
        assert "x-max-priority" not in listing  # the existing queue is left as it was
    finally:
        broker.ctl("delete_vhost", vhost)
    with pytest.raises(ValueError, match="lease_seconds"):
        declare_topology(None, 0)


# -- the publisher ---------------------------------------------------------------------------


def test_publisher_confirms_persistent_prioritised_messages(url):
    publisher = JobPublisher(url)
    publisher.start()
    try:
        assert publisher.wait_connected(30)
        jobs = [(new_id(), p) for p in (-100, 0, 100, 40)]
        for job_id, priority in jobs:
            assert publisher.publish_job(job_id, "train", priority) is True
        for bad in ((jobs[0][0], "evolve", 0), ("nothex", "train", 0), (new_id(), "train", 500)):
            with pytest.raises(ValueError):
                publisher.publish_job(*bad)
        with pytest.raises(ValueError, match="timeout"):
            publisher.publish_job(new_id(), "train", 0, timeout=0)
    finally:
        publisher.stop()
    messages = drain(url, JOBS)
    assert len(messages) == 4  # nothing from the refused calls
    by_priority = sorted(jobs, key=lambda j: -j[1])
    assert [json.loads(body)["job_id"] for _, body in messages] == [j for j, _ in by_priority]
    for (properties, body), (job_id, priority) in zip(messages, by_priority, strict=True):
        assert json.loads(body) == {"job_id": job_id, "kind": "train"}
        assert properties.delivery_mode == 2
        assert properties.message_id == job_id
        assert properties.content_type == "application/json"
        assert properties.priority == message_priority(priority)


# -- the consumer ----------------------------------------------------------------------------


def test_consumer_holds_at_most_concurrency_deliveries(url):
    ids = [new_id() for _ in range(5)]
    for job_id in ids:
        publish_job(url, job_id)
    recorder = Recorder(lambda d: (recorder.release.wait(60), d.ack())[1])
    with consuming(url, recorder, concurrency=2, handoff_seconds=60.0):
        wait_for(lambda: len(recorder.ids()) == 2, 30, what="two deliveries")
        assert ready(url, JOBS) == 3  # the broker holds back the rest: prefetch 1 per slot
        assert len(recorder.ids()) == 2
        recorder.release.set()
        wait_for(lambda: len(recorder.ids()) == 5, 30, what="all five deliveries")
    assert sorted(recorder.ids()) == sorted(ids)
    assert recorder.results == [True] * 5
    assert {d.slot for d in recorder.deliveries} == {0, 1}
    assert ready(url, JOBS) == 0


def test_acks_happen_from_worker_threads_and_from_other_threads(url):
    ids = [new_id() for _ in range(3)]
    for job_id in ids:
        publish_job(url, job_id)
    consumer_thread: list[threading.Thread] = []

    def ack_elsewhere(delivery: Delivery) -> bool:
        results = []
        helper = threading.Thread(target=lambda: results.append(delivery.ack()))
        helper.start()
        helper.join()
        return results[0]

    recorder = Recorder(ack_elsewhere)
    with consuming(url, recorder, concurrency=2):
        wait_for(lambda: len(recorder.results) == 3, 30, what="three acks")
        consumer_thread.append(next(t for t in threading.enumerate() if t.name == "test-consumer"))
    assert recorder.results == [True, True, True]
    assert all(
        t is not consumer_thread[0] and t.name.startswith("dicebox-job") for t in recorder.threads
    )
    assert ready(url, JOBS) == 0


def test_malformed_messages_are_dead_lettered_at_once_and_the_queue_keeps_flowing(url):
    bad_bodies = [
        b"{not json",
        json.dumps({"kind": "train"}).encode(),  # no job_id
        json.dumps({"job_id": new_id(), "kind": "bake"}).encode(),  # unknown kind
        json.dumps(["a", "list"]).encode(),
        json.dumps({"job_id": "../../etc", "kind": "train"}).encode(),
    ]
    good = new_id()
    for body in bad_bodies:
        publish_raw(url, body, priority=9)  # ahead of the good one
    publish_job(url, good)
    recorder = Recorder()
    with consuming(url, recorder):
        wait_for(lambda: recorder.results == [True], 30, what="the good message")
    assert recorder.ids() == [good]  # the handler never saw a bad one
    dead = drain(url, DEAD)
    assert sorted(body for _, body in dead) == sorted(bad_bodies)
    for properties, _ in dead:
        assert properties.headers["x-death"][0]["reason"] == "rejected"
    assert ready(url, JOBS) == 0


def test_handler_errors_and_undecided_deliveries_are_requeued(url):
    job_id = new_id()
    publish_job(url, job_id)
    calls = []

    def flaky(delivery: Delivery) -> None:
        calls.append(delivery.redelivered)
        if len(calls) == 1:
            raise RuntimeError("boom")
        if len(calls) == 2:
            return  # forgot to decide
        delivery.ack()

    with consuming(url, flaky):
        wait_for(lambda: len(calls) == 3, 30, what="two requeues and an ack")
    assert calls == [False, True, True]
    assert ready(url, JOBS) == 0


def test_reject_dead_letters_and_requeue_redelivers(url):
    job_id = new_id()
    publish_job(url, job_id)

    def decide(delivery: Delivery) -> bool:
        return delivery.requeue() if not delivery.redelivered else delivery.reject()

    recorder = Recorder(decide)
    with consuming(url, recorder):
        wait_for(lambda: len(recorder.results) == 2, 30, what="requeue then reject")
    assert recorder.ids() == [job_id, job_id]
    assert recorder.results == [True, True]
    assert [json.loads(body)["job_id"] for _, body in drain(url, DEAD)] == [job_id]


def test_a_parked_message_comes_back_after_its_expiration(url):
    job_id = new_id()
    publish_job(url, job_id, priority=60)

    def park_first(delivery: Delivery) -> bool:
        if len(recorder.deliveries) == 1:
            with pytest.raises(ValueError, match="seconds"):
                delivery.park(0)
            return delivery.park(1.0)
        return delivery.ack()

    recorder = Recorder(park_first)
    with consuming(url, recorder):
        wait_for(lambda: len(recorder.results) == 2, 30, what="the parked message to come back")
    first, second = recorder.deliveries
    assert recorder.results == [True, True]
    assert second.job_id == job_id and second.priority == first.priority == message_priority(60)
    deaths = second.properties.headers["x-death"]
    assert deaths[0]["queue"] == WAIT and deaths[0]["reason"] == "expired"
    assert ready(url, JOBS) == ready(url, WAIT) == 0


def test_handoff_parks_a_copy_then_acks_and_the_slot_waits_for_its_job(url):
    long_job, next_job = new_id(), new_id()
    publish_job(url, long_job)
    held = threading.Event()

    def run(delivery: Delivery) -> bool:
        if delivery.job_id == long_job and not held.is_set():
            held.set()
            recorder.release.wait(60)  # "training" past the handoff
            return delivery.ack()
        return delivery.ack()

    recorder = Recorder(run)
    with consuming(url, recorder, handoff_seconds=0.5, lease_seconds=1.0) as consumer:
        wait_for(held.is_set, 30, what="the long job to start")
        first = recorder.deliveries[0]
        wait_for(lambda: first.handed_over, 30, what="the handoff")
        publish_job(url, next_job)
        # The copy came back from the wait queue; neither it nor the next job is taken while
        # the only slot still runs the long job.
        wait_for(lambda: ready(url, JOBS) == 2, 30, what="the parked copy back in dicebox.jobs")
        assert recorder.ids() == [long_job]
        recorder.release.set()
        wait_for(lambda: len(recorder.results) == 3, 30, what="the copy and the next job")
        assert consumer.connections == 1
    assert recorder.results == [True, True, True]  # the handed-over ack has nothing left to do
    assert sorted(recorder.ids()[1:]) == sorted([long_job, next_job])
    assert ready(url, JOBS) == ready(url, WAIT) == 0


def test_handoff_acks_the_original_only_after_the_copy_is_confirmed(url):
    job_id = new_id()
    publish_job(url, job_id)
    recorder = Recorder(lambda d: (recorder.release.wait(60), d.ack())[1])
    with consuming(url, recorder, handoff_seconds=2.0) as consumer:
        consumer.handoff_retry_seconds = 0.5
        wait_for(lambda: recorder.deliveries, 30, what="the delivery")
        delivery = recorder.deliveries[0]
        delete_wait_queue(url)  # copies to it are now unroutable: refused by the broker
        # Several handoff attempts fail meanwhile; the original stays unacked.
        wait_for(lambda: delivery._handoff_retry_at > 0, 30, what="a failed handoff")
        assert not delivery.handed_over
        with contextlib.closing(connect(url)) as connection:
            declare_topology(connection.channel())
        wait_for(lambda: delivery.handed_over, 30, what="the handoff once the copy is confirmed")
        recorder.release.set()
        # The slot takes jobs again once its handler ended: the parked copy, back from the
        # wait queue, is the only other message.
        wait_for(lambda: len(recorder.results) == 2, 30, what="the parked copy")
    assert recorder.results == [True, True]
    copy = recorder.deliveries[1]
    assert copy.job_id == job_id and copy.properties.headers["x-death"][0]["queue"] == WAIT
    assert ready(url, JOBS) == ready(url, WAIT) == 0


def test_unconfirmed_handoff_leaves_the_message_with_the_broker(url):
    job_id = new_id()
    publish_job(url, job_id)
    recorder = Recorder(lambda d: (recorder.release.wait(60), d.requeue())[1])
    with consuming(url, recorder, handoff_seconds=2.0) as consumer:
        consumer.handoff_retry_seconds = 0.2
        wait_for(lambda: recorder.deliveries, 30, what="the delivery")
        delete_wait_queue(url)
        wait_for(
            lambda: recorder.deliveries and recorder.deliveries[0]._handoff_retry_at > 0,
            30,
            what="a failed handoff",
        )
    # Stopped (the handler requeued): the original was never acked, so it is still there.
    assert not recorder.deliveries[0].handed_over
    assert [json.loads(body)["job_id"] for _, body in drain(url, JOBS)] == [job_id]


def test_handoff_keeps_a_long_job_past_the_consumer_timeout(url):
    job_id = new_id()
    publish_job(url, job_id)
    hold = CONSUMER_TIMEOUT_MS / 1000 + 3.0  # past the broker's timeout and its next tick

    def long_job(delivery: Delivery) -> bool:
        if delivery.redelivered or len(recorder.deliveries) > 1:
            return delivery.ack()
        end = time.monotonic() + hold
        while time.monotonic() < end:
            time.sleep(0.1)
        return delivery.ack()

    recorder = Recorder(long_job)
    with consuming(url, recorder, handoff_seconds=1.0, lease_seconds=30.0) as consumer:
        wait_for(lambda: recorder.results, 60, what="the long job to end")
        assert consumer.connections == 1  # the broker never closed the channel
    assert recorder.deliveries[0].handed_over
    assert recorder.results[0] is True
    assert [json.loads(body)["job_id"] for _, body in drain(url, WAIT)] == [job_id]


def test_without_handoff_the_broker_times_the_delivery_out_and_the_consumer_reconnects(url):
    job_id = new_id()
    publish_job(url, job_id)
    first_done = threading.Event()

    def handler(delivery: Delivery) -> bool:
        if len(recorder.deliveries) == 1:
            recorder.release.wait(60)
            result = delivery.ack()
            first_done.set()
            return result
        first_done.wait(60)
        return delivery.ack()

    recorder = Recorder(handler)
    with consuming(url, recorder, concurrency=2, handoff_seconds=3600.0) as consumer:
        # The broker closes the channel after consumer_timeout; the consumer reconnects and
        # the requeued message comes again (redelivered) while the first handler still runs.
        wait_for(lambda: len(recorder.deliveries) == 2, 60, what="the redelivery after the timeout")
        assert consumer.connections == 2
        assert recorder.deliveries[1].redelivered and recorder.deliveries[1].job_id == job_id
        recorder.release.set()
        wait_for(lambda: len(recorder.results) == 2, 30, what="both handlers to end")
    # The first delivery went with the old channel: its ack is a no-op that says so.
    assert sorted(recorder.results) == [False, True]
    assert ready(url, JOBS) == 0


def test_heartbeats_flow_while_a_handler_keeps_the_gil_busy(url):
    """A 1 s heartbeat (from the URL): the broker closes a connection that misses two. The
    handler computes in Python for several seconds (no I/O, holding the GIL whenever it
    can); the connection thread still answers heartbeats, so the connection survives."""
    job_id = new_id()
    publish_job(url, job_id)

    def busy(delivery: Delivery) -> bool:
        end, total = time.monotonic() + 4.0, 0
        while time.monotonic() < end:
            total += sum(i * i for i in range(1000))
        return delivery.ack()

    recorder = Recorder(busy)
    with consuming(url + "?heartbeat=1", recorder, handoff_seconds=60.0) as consumer:
        wait_for(lambda: recorder.results, 30, what="the busy handler to end")
        assert consumer.connections == 1 and consumer.connected
    assert recorder.results == [True]
    assert ready(url, JOBS) == 0


def test_priorities_are_honoured(url):
    jobs = [(new_id(), p) for p in (0, -100, 100, 20, -40, 60)]
    for job_id, priority in jobs:
        publish_job(url, job_id, priority)
    recorder = Recorder()
    with consuming(url, recorder):
        wait_for(lambda: len(recorder.results) == len(jobs), 30, what="every job")
    assert recorder.ids() == [j for j, _ in sorted(jobs, key=lambda j: -j[1])]


def test_stop_lets_running_handlers_settle_and_takes_no_new_jobs(url):
    running, waiting = new_id(), new_id()
    publish_job(url, running)
    recorder = Recorder(lambda d: (recorder.release.wait(60), d.requeue())[1])
    consumer = JobConsumer(url, recorder, concurrency=1, handoff_seconds=60.0)
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: recorder.deliveries, 30, what="the delivery")
        consumer.stop()
        publish_job(url, waiting)
        assert thread.is_alive()  # waits for the running handler
        recorder.release.set()
        thread.join(60)
        assert not thread.is_alive()
    finally:
        recorder.release.set()
        consumer.stop()
        thread.join(60)
    assert recorder.ids() == [running]
    assert recorder.results == [True]
    assert sorted(json.loads(body)["job_id"] for _, body in drain(url, JOBS)) == sorted(
        [running, waiting]
    )


def test_publisher_and_consumer_ride_out_a_broker_restart(url, broker):
    """The broker stopped mid-run: a publish returns False (never hangs), a delivery's ack is
    a no-op that says so; after the restart both reconnect by themselves, the persistent
    messages are all there, and the held one comes again (redelivered)."""
    reconnected = threading.Event()
    publisher = JobPublisher(url, on_connect=reconnected.set)
    publisher.backoff_max = 1.0
    publisher.start()
    held, queued, later = new_id(), new_id(), new_id()
    first_ack: list[bool] = []

    def handler(delivery: Delivery) -> bool:
        if delivery.job_id == held and not first_ack:
            recorder.release.wait(120)  # the broker goes away meanwhile
            first_ack.append(delivery.ack())
            return first_ack[0]
        return delivery.ack()

    recorder = Recorder(handler)
    try:
        assert publisher.wait_connected(30)
        assert publisher.publish_job(held, "train", 100)
        with consuming(url, recorder, handoff_seconds=60.0) as consumer:
            consumer.backoff_max = 1.0
            wait_for(lambda: recorder.deliveries, 30, what="the first delivery")
            assert publisher.publish_job(queued, "train", 0)  # waits behind the held one
            broker.stop()
            assert publisher.publish_job(new_id(), "train", 0, timeout=2.0) is False
            wait_for(
                lambda: not consumer.connected and not publisher.connected,
                30,
                what="both to notice the broker is gone",
            )
            assert publisher.publish_job(new_id(), "train", 0, timeout=2.0) is False
            recorder.release.set()
            wait_for(lambda: first_ack, 30, what="the first handler to end")
            assert first_ack == [False]  # its connection is gone: the broker keeps the message
            reconnected.clear()
            broker.start()
            wait_for(
                lambda: consumer.connected and reconnected.is_set(), 60, what="both to reconnect"
            )
            assert publisher.publish_job(later, "train", -100) is True
            wait_for(lambda: len(recorder.results) == 4, 60, what="every message")
            assert consumer.connections == 2
    finally:
        publisher.stop()
    assert recorder.ids() == [held, held, queued, later]  # priorities: 10, 10, 5, 0
    assert recorder.deliveries[1].redelivered
    assert recorder.results == [False, True, True, True]
    assert ready(url, JOBS) == 0


# -- end to end: dicebox serve with a broker and processors in broker mode ---------------------

KEY = "rabbit-e2e-key"
E2E_LEASE = 2  # seconds: server and processors
# About a tenth of a second per epoch on one thread (tests/test_processor.py's LIGHT).
LIGHT = {
    "optimizer": {"name": "adam", "learning_rate": 0.005},
    "layers": [
        {
            "type": "conv2d",
            "filters": 16,
            "kernel": [3, 3],
            "padding": "same",
            "activation": "relu",
        },
        {"type": "maxpool2d", "kernel": [2, 2]},
        {"type": "dense", "size": 32, "activation": "relu"},
    ],
}


@pytest.fixture(scope="module")
def service(broker, tmp_path_factory):
    """``dicebox serve`` in broker mode (a real uvicorn process) with a dice dataset."""
    from servers import Server, upload_dice

    broker.start()
    purge_dicebox_queues(broker.url)
    home = tmp_path_factory.mktemp("rabbit-e2e")
    server = Server(
        home,
        api_key=KEY,
        extra_env={"DICEBOX_BROKER_URL": broker.url, "DICEBOX_LEASE_SECONDS": str(E2E_LEASE)},
    )
    server.http = server.client()
    try:
        upload_dice(server.http, "dice", 240, seed=0)
        yield server
    finally:
        server.http.close()
        server.stop()
        print(f"--- {server.log.name}\n{server.log.read_text(errors='replace')}")


@pytest.fixture
def broker_processors(service, broker):
    """``start(name, concurrency=1)``: ``python -m dicebox.processor --broker URL --server URL``
    processes (handoff after 1 s, below the node's 5 s consumer timeout; heartbeat 1 s); all
    stopped after the test, their logs printed."""
    import sys

    from servers import Process, base_env

    started = []

    def start(name: str, concurrency: int = 1):
        env = base_env(service.home, KEY)
        env.update(
            DICEBOX_THREADS="1",
            DICEBOX_LEASE_SECONDS=str(E2E_LEASE),
            DICEBOX_BROKER_HANDOFF_SECONDS="1",
        )
        # A 1 s heartbeat: the broker drops the connection if training starved its thread.
        cmd = [
            sys.executable, "-m", "dicebox.processor", "--broker", broker.url + "?heartbeat=1", "--server", service.url,
            "--name", name, "--concurrency", str(concurrency),
        ]  # fmt: skip
        started.append(
            Process(cmd, env, service.home / f"processor-{name}-{time.monotonic_ns()}.log")
        )
        return started[-1]

    yield start
    for process in started:
        process.stop()
        print(f"--- {process.log.name}\n{process.log.read_text(errors='replace')}")


def submit(service, epochs: int, priority: int = 0) -> str:
    body = {
        "kind": "train",
        "dataset": "dice",
        "genome": LIGHT,
        "params": {"epochs": epochs, "batch_size": 16, "patience": 0, "seed": 1},
        "priority": priority,
    }
    r = service.http.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    assert r.json()["published"] is True  # on the broker before the answer
    return r.json()["id"]


def models_of(service, job_id: str) -> list[dict]:
    items = service.http.get("/v1/models", params={"dataset": "dice", "limit": 200}).json()["items"]
    return [
        m
        for m in items
        if (m.get("metadata") or {}).get("job_id") == job_id or m.get("job_id") == job_id
    ]


def wait_queues_empty(url: str) -> None:
    wait_for(
        lambda: ready(url, JOBS) == 0 and ready(url, WAIT) == 0, 60, what="the job queues to empty"
    )


def test_a_processor_in_broker_mode_runs_a_submitted_job(service, broker_processors, url):
    from servers import wait_job

    unknown = new_id()
    publish_job(url, unknown, priority=100)  # names no job: the server says 404
    processor = broker_processors("solo")
    job_id = submit(service, epochs=2)
    job = wait_job(service.http, job_id, timeout=180)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 1 and len(job["result"]["history"]) == 2
    assert len(models_of(service, job_id)) == 1
    wait_queues_empty(url)
    assert [json.loads(body)["job_id"] for _, body in drain(url, DEAD)] == [unknown]
    assert processor.stop() == 0


def test_a_job_longer_than_the_handoff_completes_once(service, broker_processors, url):
    """Epochs take longer than the handoff (1 s) in total: the delivery is handed over, the
    parked copy cycles (parked by the other slot while the job runs), and is acked once the
    job has succeeded; one model, one attempt."""
    from servers import wait_job

    processor = broker_processors("long", concurrency=2)
    job_id = submit(service, epochs=100)  # several seconds: the copy is back after 1 + 2 s
    job = wait_job(service.http, job_id, timeout=300)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 1
    assert len(models_of(service, job_id)) == 1
    wait_queues_empty(url)
    assert ready(url, DEAD) == 0
    assert processor.stop() == 0
    log = processor.log.read_text()
    assert "handed over" in log
    assert "runs elsewhere (lease alive); parking its message" in log
    assert f"job {job_id}: already succeeded; message acknowledged" in log


def test_sigterm_hands_the_job_back_and_another_processor_finishes_it(
    service, broker_processors, url
):
    from servers import wait_job

    first = broker_processors("first")
    job_id = submit(service, epochs=30)

    def running_with_epoch():
        job = service.http.get(f"/v1/jobs/{job_id}").json()
        return job["status"] == "running" and job["progress"] > 0

    wait_for(running_with_epoch, 120, 0.05, what="the job to report an epoch")
    assert first.stop() == 0  # SIGTERM: hand back, requeue, exit 0
    job = service.http.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "queued" and job["error"] == "processor stopped"
    broker_processors("second")
    job = wait_job(service.http, job_id, timeout=300)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2
    assert len(models_of(service, job_id)) == 1
    wait_queues_empty(url)


def test_poison_jobs_are_dead_lettered_and_fail_and_the_queue_keeps_flowing(
    service, broker_processors, url
):
    """Written straight into the server's database (the API refuses them at submit): a job
    whose dataset does not exist, and one whose attempts are used up (its last owner died).
    Each message is dead-lettered at once and its job ends failed with the reason; a good job
    behind them runs."""
    from servers import wait_job

    from dicebox.db import make_engine
    from dicebox.jobqueue import JobQueue

    engine = make_engine(f"sqlite:///{service.home / 'dicebox.db'}")
    try:
        queue = JobQueue(engine)
        payload = {"dataset": "no-such-dataset", "genome": LIGHT, "params": {"epochs": 1}}
        unknown_dataset = queue.submit("train", payload)["id"]
        exhausted = queue.submit("train", {**payload, "dataset": "dice"}, max_attempts=1)["id"]
        queue.claim_job(exhausted, "a-dead-processor", 0.01)  # its one attempt, long expired
    finally:
        engine.dispose()
    for job_id in (unknown_dataset, exhausted):
        publish_job(url, job_id, priority=100)  # ahead of the good job
    processor = broker_processors("poison")
    good = submit(service, epochs=1)
    assert wait_job(service.http, good, timeout=120)["status"] == "succeeded"
    failed = wait_job(service.http, unknown_dataset, timeout=60)
    assert failed["status"] == "failed" and "no-such-dataset" in failed["error"]
    dead = wait_job(service.http, exhausted, timeout=60)
    assert dead["status"] == "failed" and dead["error"].startswith("attempts exhausted")
    assert sorted(json.loads(body)["job_id"] for _, body in drain(url, DEAD)) == sorted(
        [unknown_dataset, exhausted]
    )
    wait_queues_empty(url)
    assert processor.stop() == 0
