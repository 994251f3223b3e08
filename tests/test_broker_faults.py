"""RabbitMQ mode under faults (issue 6, item 7): a real ``dicebox serve`` in broker mode, real
processor processes (``python -m dicebox.processor`` with ``DICEBOX_BROKER_URL``) and a
private RabbitMQ node (tests/rabbit.py) that the tests stop, restart and reconfigure.

Scenarios: three processors share the work; kill -9 of processors at random moments (seeded)
during ten jobs; the broker stopped and started mid-run; heartbeats every 2 s through 30 s
epochs; a job longer than the broker's one-minute ``consumer_timeout``; poison messages;
priorities.

The server runs with a 5 s lease (``DICEBOX_LEASE_SECONDS``) so a dead processor's job is
taken over quickly. The two LONG tests (``test_long_*``, about 75 s and 115 s; the whole
file takes about 5 minutes on 2 cores) train a conv network on a dataset sized on the machine
running them (``big_images``), so that an epoch takes about 30 s on one thread. No assertion is about how long anything took, except
where a test checks its own premise (that the job really outlived the broker's timeout).
In CI (CI=true) nothing here skips: a missing rabbitmq-server fails.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pika
import pytest
from rabbit import PrivateBroker, purge_dicebox_queues, require_rabbitmq
from servers import Processor, Server, read_sse, wait_for, wait_job

import dicebox
from dicebox.db import make_engine
from dicebox.jobqueue import JobQueue
from dicebox.server.services import Services
from dicebox.settings import Settings

KEY = "faults-key-0123456789"
LEASE = 5  # seconds: DICEBOX_LEASE_SECONDS of the servers and processors here
JOBS, WAIT, DEAD = "dicebox.jobs", "dicebox.jobs.wait", "dicebox.dead"
SMALL_SIZE = 24
# A few tenths of a second per epoch on 480 images of 24x24 with one thread.
SMALL = {
    "optimizer": {"name": "adam", "learning_rate": 0.003},
    "layers": [
        {
            "type": "conv2d",
            "filters": 16,
            "kernel": [3, 3],
            "padding": "same",
            "activation": "relu",
        },
        {
            "type": "conv2d",
            "filters": 32,
            "kernel": [3, 3],
            "padding": "same",
            "activation": "relu",
        },
        {"type": "maxpool2d", "kernel": [2, 2]},
        {"type": "dense", "size": 32, "activation": "relu"},
    ],
}
# About 100 samples/s on one thread of this machine for 32x32 images (sized by big_images).
BIG_SIZE = 32
BIG = {
    "optimizer": {"name": "adam", "learning_rate": 0.001},
    "layers": [
        {
            "type": "conv2d",
            "filters": 64,
            "kernel": [3, 3],
            "padding": "same",
            "activation": "relu",
        },
        {
            "type": "conv2d",
            "filters": 128,
            "kernel": [3, 3],
            "padding": "same",
            "activation": "relu",
        },
        {"type": "maxpool2d", "kernel": [2, 2]},
        {
            "type": "conv2d",
            "filters": 128,
            "kernel": [3, 3],
            "padding": "same",
            "activation": "relu",
        },
        {"type": "maxpool2d", "kernel": [4, 4]},
        {"type": "dense", "size": 32, "activation": "relu"},
    ],
}
BIG_EPOCH_SECONDS = 32.0
HEARTBEAT = 2
CONSUMER_TIMEOUT_MS = 60_000
HANDOFF_SECONDS = 30


# -- the broker, the server, the processors -------------------------------------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory) -> Iterator[PrivateBroker]:
    """One private node for the module (a start costs several seconds); a test that stops
    it starts it again, and every test begins with dicebox's queues empty."""
    require_rabbitmq()
    node = PrivateBroker(tmp_path_factory.mktemp("rabbitmq"))
    try:
        node.start()
        yield node
    finally:
        node.close()


@pytest.fixture
def url(broker: PrivateBroker) -> str:
    broker.start()  # a no-op unless an earlier test failed with the broker stopped
    purge_dicebox_queues(broker.url)
    return broker.url


def seed_dataset(home: Path, name: str, count: int, size: int, seed: int = 0) -> None:
    """Dataset ``name`` of ``count`` die faces, written into the server's home before it
    starts (uploads have their own tests; here they would only cost time)."""
    services = Services.from_settings(Settings(home=home))
    try:
        dice = dicebox.datasets.make_dice(count=count, size=size, seed=seed)
        services.sensory.create(name, size, size, 1)
        services.sensory.add_arrays(name, dice.images, [dice.categories[i] for i in dice.labels])
    finally:
        services.engine.dispose()


class Cluster:
    """``dicebox serve`` in broker mode on ``home`` plus the processors a test starts."""

    def __init__(self, home: Path, broker_url: str) -> None:
        self.home, self.broker_url = home, broker_url
        self.server = Server(
            home,
            api_key=KEY,
            extra_env={"DICEBOX_BROKER_URL": broker_url, "DICEBOX_LEASE_SECONDS": str(LEASE)},
        )
        self.client = self.server.client()
        self.processors: list[Processor] = []

    def processor(self, name: str, broker_url: str | None = None, **env: str) -> Processor:
        extra = {
            "DICEBOX_BROKER_URL": broker_url or self.broker_url,
            "DICEBOX_LEASE_SECONDS": str(LEASE),
            **env,
        }
        process = Processor(self.server, name, threads=1, extra_env=extra)
        self.processors.append(process)
        return process

    def close(self) -> None:
        for process in self.processors:
            process.stop()
        self.client.close()
        self.server.stop()

    def logs(self) -> str:
        parts = [f"--- server ---\n{self.server.output()[-6000:]}"]
        parts += [
            f"--- processor {' '.join(p.cmd[-2:])} ---\n{p.output()[-6000:]}"
            for p in self.processors
        ]
        return "\n".join(parts)


@contextlib.contextmanager
def cluster(home: Path, broker_url: str) -> Iterator[Cluster]:
    """A :class:`Cluster`, stopped at the end; its logs are printed when the test fails."""
    c = Cluster(home, broker_url)
    try:
        yield c
    except BaseException:
        print(c.logs())
        raise
    finally:
        c.close()


# -- reading the broker and the server --------------------------------------------------------------


def queue_info(url: str, queue: str = JOBS) -> tuple[int, int]:
    """(ready messages, consumers) of ``queue``."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        method = connection.channel().queue_declare(queue, passive=True).method
        return method.message_count, method.consumer_count
    finally:
        connection.close()


def wait_consumers(url: str, count: int) -> None:
    wait_for(lambda: queue_info(url)[1] == count, 120, 0.1, f"{count} consumer(s) on {JOBS}")


def queue_messages(broker: PrivateBroker) -> dict[str, int]:
    """Messages (ready + unacknowledged) in each dicebox queue, from ``rabbitmqctl``."""
    out = broker.ctl("-q", "list_queues", "name", "messages")
    counts = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0].startswith("dicebox.") and fields[1].isdigit():
            counts[fields[0]] = int(fields[1])
    return counts


def wait_queues_empty(broker: PrivateBroker) -> None:
    """Every job message acknowledged: parked copies come back within a lease and are acked
    once their job has ended."""
    wanted = {JOBS: 0, WAIT: 0, DEAD: 0}

    def empty() -> bool:
        counts = queue_messages(broker)
        return {q: counts.get(q) for q in wanted} == wanted

    wait_for(empty, 60, 1.0, "dicebox's queues to be empty")


def drain(url: str, queue: str) -> list[tuple[pika.BasicProperties, bytes]]:
    """Every ready message of ``queue``, taken out (acked) in delivery order."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        out = []
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return out
            out.append((properties, body))
    finally:
        connection.close()


def publish_raw(url: str, body: bytes, message_id: str, priority: int = 5) -> None:
    """A message on ``dicebox.jobs`` as any client could publish it (persistent, confirmed)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            "",
            JOBS,
            body,
            pika.BasicProperties(
                delivery_mode=2,
                content_type="application/json",
                message_id=message_id,
                priority=priority,
            ),
            mandatory=True,
        )
    finally:
        connection.close()


def train_body(dataset: str, genome: dict, epochs: int, priority: int = 0, **params) -> dict:
    return {
        "kind": "train",
        "dataset": dataset,
        "genome": genome,
        "priority": priority,
        "params": {"epochs": epochs, "patience": 0, **params},
    }


def submit(client: httpx.Client, body: dict, published: bool = True) -> str:
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "queued" and r.json()["published"] is published, r.json()
    return r.json()["id"]


def wait_all(client: httpx.Client, ids: list[str], timeout: float = 300.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    return [
        wait_job(client, job_id, timeout=max(1.0, deadline - time.monotonic())) for job_id in ids
    ]


def models_per_job(client: httpx.Client) -> Counter:
    items = client.get("/v1/models", params={"limit": 1000}).json()["items"]
    return Counter(m["job_id"] for m in items)


def story(client: httpx.Client, job_id: str) -> dict:
    """A finished job's record from its events: the owner of each attempt, in order, and
    the (attempt, epoch) of every epoch reported."""
    events = read_sse(client, f"/v1/jobs/{job_id}/events", timeout=60)
    owners = [
        e["data"]["owner"]
        for e in events
        if e.get("event") == "status" and e["data"]["status"] == "running"
    ]
    epochs = [
        (e["data"]["attempt"], e["data"]["epoch"]) for e in events if e.get("event") == "epoch"
    ]
    return {"owners": owners, "epochs": epochs}


def check_succeeded_once(client: httpx.Client, jobs: list[dict], epochs: int) -> None:
    """Every job succeeded, with exactly one model, every epoch once in its result, and as
    many attempts as it was started."""
    assert [j["status"] for j in jobs] == ["succeeded"] * len(jobs), [
        (j["id"], j["error"]) for j in jobs
    ]
    models = models_per_job(client)
    for job in jobs:
        assert models[job["id"]] == 1, f"job {job['id']}: {models[job['id']]} models"
        assert job["result"]["model_id"]
        assert [e["epoch"] for e in job["result"]["history"]] == list(range(1, epochs + 1))
        assert len(story(client, job["id"])["owners"]) == job["attempts"] >= 1


# -- sizing the long jobs -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_images() -> int:
    """How many 32x32 images make a ``BIG`` epoch take about 30 s on one thread here
    (validation 0.1, no test part): measured on a few hundred images, then scaled."""
    dice = dicebox.datasets.make_dice(count=300, size=BIG_SIZE, seed=1)
    train, val = dice.split([0.9, 0.1], seed=0)
    model = dicebox.train(BIG, train, val=val, epochs=2, threads=1, patience=0)
    # The faster of the two epochs: a quiet machine's rate, so the real epochs are not shorter.
    rate = max(e["samples_per_second"] for e in model.history)
    return max(600, min(20_000, math.ceil(BIG_EPOCH_SECONDS * rate / 0.9)))


def running_jobs(client: httpx.Client) -> list[dict]:
    return client.get("/v1/jobs", params={"status": "running", "limit": 100}).json()["items"]


def heartbeat_of(broker: PrivateBroker, connection_name: str) -> int:
    """The heartbeat (seconds) the broker negotiated with the connection whose client
    called itself ``connection_name`` (``rabbitmqctl list_connections``)."""
    out = broker.ctl("-q", "list_connections", "client_properties", "timeout")
    for line in out.splitlines():
        if f'"connection_name","{connection_name}' in line:
            return int(line.rsplit("\t", 1)[1])
    raise AssertionError(f"no connection named {connection_name!r} on the broker:\n{out}")


# -- (a) sharing -------------------------------------------------------------------------------------


def test_three_processors_share_the_work(tmp_path, broker, url):
    """Ten jobs over three processors: each processor runs at least one, each job runs once
    and leaves exactly one model, and every message is acknowledged."""
    seed_dataset(tmp_path, "dice", 600, SMALL_SIZE)
    with cluster(tmp_path, url) as c:
        for name in ("a", "b", "c"):
            c.processor(name)
        wait_consumers(url, 3)  # prefetch 1 each: the broker spreads the jobs over all three
        ids = [submit(c.client, train_body("dice", SMALL, epochs=4)) for _ in range(10)]
        jobs = wait_all(c.client, ids)
        check_succeeded_once(c.client, jobs, epochs=4)
        assert all(j["attempts"] == 1 for j in jobs)
        ran = Counter(story(c.client, job_id)["owners"][0].split(":")[0] for job_id in ids)
        assert set(ran) == {"a", "b", "c"} and sum(ran.values()) == 10, ran
        wait_queues_empty(broker)


def test_an_evolve_job_fans_out_over_every_processor(tmp_path, broker, url):
    """Issue 6, item 4: the coordinator's children travel as messages; both processors train
    individuals, and every generation completes whoever trained what."""
    seed_dataset(tmp_path, "dice", 480, SMALL_SIZE)
    with cluster(tmp_path, url) as c:
        for name in ("a", "b"):
            c.processor(name)
        wait_consumers(url, 2)
        job_id = submit(c.client, {"kind": "evolve", "dataset": "dice",
                                   "evolution": {"population": 6, "generations": 2,
                                                 "space": {"max_layers": 2, "max_size": 32}},
                                   "params": {"epochs": 1, "seed": 5}},
                        published=False)  # the evolve job itself is the coordinator's, never a message
        job = wait_job(c.client, job_id, timeout=600)
        assert job["status"] == "succeeded", job["error"]
        result = job["result"]
        assert len(result["generations"]) == 2 and result["model_id"]
        children = c.client.get("/v1/jobs", params={"parent_id": job_id, "limit": 100}).json()["items"]
        assert children and all(ch["status"] == "succeeded" for ch in children)
        ran = Counter(story(c.client, ch["id"])["owners"][0].split(":")[0] for ch in children)
        assert set(ran) == {"a", "b"}, ran
        wait_queues_empty(broker)


# -- (b) kill -9 -----------------------------------------------------------------------------------------

KILL_SEED = 20240606
KILLS = 4
KILL_EPOCHS = 10


def test_kill_9_at_random_moments_loses_nothing(tmp_path, broker, url):
    """Two processors work through ten jobs; four times, at a random moment (seeded), one of
    them that is running a job is killed with SIGKILL and a new one started. The broker
    requeues the dead one's message at once; whoever receives it is told to wait for the
    lease, parks it, and takes the job over from its last checkpoint one lease later. All
    ten succeed with one model each; the killed attempts are on record. (About 60 s.)"""
    rng = random.Random(KILL_SEED)
    seed_dataset(tmp_path, "dice", 600, SMALL_SIZE)
    with cluster(tmp_path, url) as c:
        serial = iter(range(1000))
        names: dict[Processor, str] = {}

        def start() -> Processor:
            name = f"k{next(serial)}"
            process = c.processor(name)
            names[process] = name
            return process

        live = [start(), start()]
        wait_consumers(url, 2)
        ids = [submit(c.client, train_body("dice", SMALL, epochs=KILL_EPOCHS)) for _ in range(10)]
        interrupted: set[str] = set()  # jobs whose running attempt a kill ended
        kills, deadline = 0, time.monotonic() + 240
        while kills < KILLS and time.monotonic() < deadline:
            time.sleep(rng.uniform(0.1, 1.5))
            states = [c.client.get(f"/v1/jobs/{j}").json()["status"] for j in ids]
            if all(s in ("succeeded", "failed", "canceled") for s in states):
                break
            victim = rng.choice(live)
            running = [
                j
                for j in running_jobs(c.client)
                if (j["worker"] or "").startswith(names[victim] + ":")
            ]
            # Kill busy processors only, and never during a job's last attempt (with three
            # attempts, a job killed three times is failed for good, as it should be).
            if not running or running[0]["attempts"] >= running[0]["max_attempts"]:
                continue
            job = running[0]
            victim.kill()
            kills += 1
            after = c.client.get(f"/v1/jobs/{job['id']}").json()
            if after["status"] == "running" and after["worker"] == job["worker"]:
                interrupted.add(job["id"])
            live.remove(victim)
            live.append(start())

        jobs = wait_all(c.client, ids)
        check_succeeded_once(c.client, jobs, epochs=KILL_EPOCHS)
        assert kills == KILLS and interrupted, (kills, interrupted)
        models = models_per_job(c.client)
        assert sum(models.values()) == 10 and set(models) == set(ids)
        for job in jobs:
            owners = story(c.client, job["id"])["owners"]
            if job["id"] in interrupted:
                # Taken over by another processor after the kill, which is on record.
                assert job["attempts"] >= 2 and len(set(owners)) >= 2, (job, owners)
        wait_queues_empty(broker)


# -- (c) the broker stopped and started --------------------------------------------------------------


def test_broker_stopped_and_started_mid_run_loses_nothing(tmp_path, broker, url):
    """The broker goes down (clean stop) while two jobs train and four wait in its queue; a
    job submitted meanwhile is kept by the server (202, ``published: false``). Once it is
    back, the server publishes the kept job and the processors reconnect by themselves; every
    job succeeds once, with every epoch on record exactly once."""
    epochs = 8
    seed_dataset(tmp_path, "dice", 600, SMALL_SIZE)
    with cluster(tmp_path, url) as c:
        processors = [c.processor(f"r{i}") for i in range(2)]
        wait_consumers(url, 2)
        body = train_body("dice", SMALL, epochs=epochs)
        ids = [submit(c.client, body) for _ in range(6)]
        wait_for(
            lambda: any(c.client.get(f"/v1/jobs/{j}").json()["history"] for j in ids),
            120,
            0.05,
            "a first epoch",
        )
        statuses = Counter(c.client.get(f"/v1/jobs/{j}").json()["status"] for j in ids)
        assert statuses["running"] >= 1 and statuses["queued"] >= 1, statuses  # mid-run

        broker.stop()
        kept = submit(c.client, body, published=False)
        assert c.client.get(f"/v1/jobs/{kept}").json()["status"] == "queued"
        broker.start()

        jobs = wait_all(c.client, [*ids, kept])
        # The server's publisher is connected again: a new job is confirmed before the 202.
        after = submit(c.client, body, published=True)
        jobs.append(wait_job(c.client, after, timeout=120))
        check_succeeded_once(c.client, jobs, epochs=epochs)
        for job in jobs:
            assert job["attempts"] == 1, job
            assert sorted(story(c.client, job["id"])["epochs"]) == [
                (1, e) for e in range(1, epochs + 1)
            ]
        for process in processors:
            log = process.output()
            assert "broker connection lost" in log and log.count("consumer: connected") >= 2, log
        wait_queues_empty(broker)


# -- (d) heartbeats ----------------------------------------------------------------------------------


def test_long_heartbeats_every_2_s_keep_the_connection_through_30_s_epochs(
    tmp_path, broker, url, big_images
):
    """LONG (about 75 s). The processor's URL asks for a 2 s heartbeat; its job trains two
    epochs of about 30 s each on one thread. The connection thread keeps heartbeats flowing
    while the training thread works, so the broker never drops the connection: no reconnect,
    one attempt."""
    seed_dataset(tmp_path, "big", big_images, BIG_SIZE)
    with cluster(tmp_path, url) as c:
        process = c.processor("hb", broker_url=f"{url}?heartbeat={HEARTBEAT}")
        wait_consumers(url, 1)
        job_id = submit(c.client, train_body("big", BIG, epochs=2, validation=0.1, test=0.0))
        wait_for(
            lambda: c.client.get(f"/v1/jobs/{job_id}").json()["status"] != "queued",
            60,
            0.1,
            "the job to start",
        )
        assert heartbeat_of(broker, "dicebox-processor hb") == HEARTBEAT
        job = wait_job(c.client, job_id, timeout=600)
        check_succeeded_once(c.client, [job], epochs=2)
        assert job["attempts"] == 1
        # The premise: every epoch lasted many heartbeat intervals.
        assert all(e["seconds"] > 5 * HEARTBEAT for e in job["result"]["history"]), job["result"][
            "history"
        ]
        log = process.output()
        assert log.count("consumer: connected") == 1 and "connection lost" not in log, log
        wait_queues_empty(broker)


# -- (e) the consumer timeout ------------------------------------------------------------------------


def test_long_a_job_longer_than_the_consumer_timeout_completes_once(tmp_path, big_images):
    """LONG (about 115 s). A broker whose ``consumer_timeout`` is one minute (checked every
    second) and a job of three 30 s epochs. At 30 s the processor hands its delivery over
    (a copy parked in ``dicebox.jobs.wait``, the original acked) and trains on under its
    lease; the copy comes back into ``dicebox.jobs`` and waits there (the processor's only
    slot stops consuming after a handoff) until the job has ended, when it is acked. The
    broker never times a delivery out, the job runs once, and no message is left over."""
    require_rabbitmq()
    node = PrivateBroker(tmp_path / "rabbitmq", consumer_timeout_ms=CONSUMER_TIMEOUT_MS)
    try:
        node.start()
        timeout = node.ctl("eval", "application:get_env(rabbit, consumer_timeout).").strip()
        assert timeout == f"{{ok,{CONSUMER_TIMEOUT_MS}}}", timeout
        home = tmp_path / "home"
        seed_dataset(home, "big", big_images, BIG_SIZE)
        with cluster(home, node.url) as c:
            process = c.processor("long", DICEBOX_BROKER_HANDOFF_SECONDS=str(HANDOFF_SECONDS))
            wait_consumers(node.url, 1)
            job_id = submit(c.client, train_body("big", BIG, epochs=3, validation=0.1, test=0.0))
            job = wait_job(c.client, job_id, timeout=900)
            check_succeeded_once(c.client, [job], epochs=3)
            assert job["attempts"] == 1
            # The premise: the job ran (and its work was in the broker's hands) longer than
            # the broker's timeout.
            ran = (
                datetime.fromisoformat(job["finished_at"])
                - datetime.fromisoformat(job["started_at"])
            ).total_seconds()
            assert ran > CONSUMER_TIMEOUT_MS / 1000, (
                f"the job took {ran:.0f} s: make its epochs longer"
            )
            # Its message is acked once the end is stored: the parked copy, received by the
            # freed slot, is answered "done".
            wait_for(
                lambda: (
                    f"job {job_id}: already succeeded; message acknowledged" in process.output()
                ),
                60,
                0.5,
                "the parked copy to be acknowledged",
            )
            counts = queue_messages(node)
            assert {q: counts.get(q) for q in (JOBS, WAIT, DEAD)} == {JOBS: 0, WAIT: 0, DEAD: 0}, (
                counts
            )
            log = process.output()
            assert log.count("handed over") == 1, log
            assert log.count("consumer: connected") == 1 and "connection lost" not in log, log
            assert "timed out waiting for delivery acknowledgement" not in node.log_tail(1_000_000)
    finally:
        node.close()


# -- (f) poison messages -----------------------------------------------------------------------------


def test_poison_messages_are_dead_lettered_once_and_the_queue_keeps_flowing(tmp_path, broker, url):
    """Messages no processor can act on go to ``dicebox.dead`` at once, each with a logged
    reason, and are never redelivered: bad JSON, an unknown kind, no job id, a job id the
    server does not know; a job whose dataset does not exist (written straight into the
    database, as an older server sharing it could have: submit refuses unknown datasets) is
    failed with the reason; a job that used up its attempts (its last processor died) is
    failed "attempts exhausted". A good job submitted after them all succeeds."""
    seed_dataset(tmp_path, "dice", 600, SMALL_SIZE)
    with cluster(tmp_path, url) as c:
        process = c.processor("p")
        wait_consumers(url, 1)
        engine = make_engine(Settings(home=tmp_path).database_url)
        queue = JobQueue(engine)
        try:
            # A job the processor cannot run: its dataset does not exist. The server's
            # outbox publishes it (it polls the database for jobs written by others).
            nosuch = queue.submit(
                "train",
                {"dataset": "nosuch", "version": 600, "genome": SMALL, "params": {"epochs": 1}},
            )["id"]
            # A job whose only attempt's processor died: the next delivery finds it exhausted.
            exhausted = queue.submit(
                "train",
                {"dataset": "dice", "version": 600, "genome": SMALL, "params": {"epochs": 1}},
                max_attempts=1,
            )["id"]
            queue.mark_published([exhausted])
            assert queue.claim_job(exhausted, "gone:0", 0.05)[0] == "run"
            time.sleep(0.1)  # let that lease run out
        finally:
            engine.dispose()
        unknown = uuid.uuid4().hex
        raw = {
            "bad-json": b'{"job_id": ',
            "unknown-kind": json.dumps({"job_id": uuid.uuid4().hex, "kind": "paint"}).encode(),
            "no-job-id": json.dumps({"kind": "train"}).encode(),
            "unknown-job": json.dumps({"job_id": unknown, "kind": "train"}).encode(),
            "exhausted": json.dumps({"job_id": exhausted, "kind": "train"}).encode(),
        }
        for message_id, body in raw.items():
            publish_raw(url, body, message_id)

        failed = {j: wait_job(c.client, j, timeout=120) for j in (nosuch, exhausted)}
        assert failed[nosuch]["status"] == "failed" and "nosuch" in failed[nosuch]["error"], failed[
            nosuch
        ]
        assert failed[exhausted]["status"] == "failed", failed[exhausted]
        assert failed[exhausted]["error"].startswith("attempts exhausted"), failed[exhausted]
        assert failed[nosuch]["attempts"] == 1 and failed[exhausted]["attempts"] == 1

        good = submit(c.client, train_body("dice", SMALL, epochs=2))
        check_succeeded_once(c.client, [wait_job(c.client, good, timeout=120)], epochs=2)

        wait_for(
            lambda: queue_info(url, DEAD)[0] == len(raw) + 1, 60, 0.2, "the dead-lettered messages"
        )
        dead = drain(url, DEAD)
        bodies = sorted(body for _, body in dead)
        assert bodies == sorted(
            [*raw.values(), json.dumps({"job_id": nosuch, "kind": "train"}).encode()]
        )
        for properties, _ in dead:
            [death] = properties.headers["x-death"]
            assert (
                death["queue"] == JOBS and death["reason"] == "rejected" and death["count"] == 1
            ), death
        assert models_per_job(c.client) == Counter({good: 1})
        log = process.output()
        for message_id in ("bad-json", "unknown-kind", "no-job-id"):
            assert log.count(f"message {message_id} dead-lettered") == 1, log
        assert log.count(f"job {unknown}: the server does not know this job") == 1, log
        assert log.count(f"job {exhausted}: dead-lettered: attempts exhausted") == 1, log
        wait_queues_empty(broker)


# -- (g) priorities ----------------------------------------------------------------------------------


def test_priorities_are_honoured(tmp_path, broker, url):
    """Jobs queued while no processor runs are started highest priority first (ties: first
    submitted first) once one processor comes."""
    seed_dataset(tmp_path, "dice", 600, SMALL_SIZE)
    with cluster(tmp_path, url) as c:
        priorities = [-100, -40, 0, 0, 40, 100]  # AMQP priorities 0, 3, 5, 5, 7, 10
        ids = [
            submit(c.client, train_body("dice", SMALL, epochs=1, priority=p)) for p in priorities
        ]
        assert queue_info(url)[0] == len(ids)
        c.processor("solo")
        jobs = wait_all(c.client, ids)
        check_succeeded_once(c.client, jobs, epochs=1)
        order = [
            j["id"] for j in sorted(jobs, key=lambda j: datetime.fromisoformat(j["started_at"]))
        ]
        assert order == [ids[5], ids[4], ids[2], ids[3], ids[1], ids[0]]
        wait_queues_empty(broker)
