"""The server side of RabbitMQ mode (issue 6): ``POST /v1/worker/jobs/{id}/start`` (what a
processor does with a job message), ``/v1/worker/claim`` refused in broker mode, and the
outbox against a real broker: a submitted train job's message is on the broker (persistent,
with the job's priority) before the client hears 202; a job submitted while the broker is
down is kept and published once it is back; an evolve job's children are published, the
evolve job never; and a real ``dicebox serve`` with ``DICEBOX_BROKER_URL``.

The broker is a private RabbitMQ node (tests/rabbit.py); the messages are read back with pika.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pika
import pytest
from fastapi.testclient import TestClient
from rabbit import PrivateBroker, amqp_url, purge_dicebox_queues, require_rabbitmq  # noqa: F401
from servers import Server, read_sse, upload_dice, wait_for, wait_job

import dicebox
from dicebox.client import Client
from dicebox.errors import NotFound
from dicebox.server import create_app
from dicebox.settings import Settings

KEY = "broker-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}
JOBS = "dicebox.jobs"
LEASE = 0.2  # seconds: a lease that tests let expire
GENOME = {"optimizer": {"name": "adam", "learning_rate": 0.01},
          "layers": [{"type": "dense", "size": 8, "activation": "relu"}]}
TRAIN = {"kind": "train", "dataset": "dice", "genome": GENOME, "params": {"epochs": 1}}


def add_dice(client: TestClient) -> None:
    sensory = client.app.state.services.sensory
    dice = dicebox.datasets.make_dice(count=60, size=8, seed=0)
    sensory.create("dice", 8, 8, 1)
    sensory.add_arrays("dice", dice.images, [dice.categories[i] for i in dice.labels])


def make_client(settings: Settings) -> TestClient:
    return TestClient(create_app(settings), headers=HEADERS)


@pytest.fixture
def embedded(tmp_path):
    """The app without a broker: /start works in either mode."""
    with make_client(Settings(home=tmp_path, api_key=KEY, lease_seconds=30)) as client:
        yield client


@pytest.fixture
def broker_app(tmp_path, amqp_url):  # noqa: F811 - the fixture imported from rabbit
    purge_dicebox_queues(amqp_url)
    settings = Settings(home=tmp_path, api_key=KEY, broker_url=amqp_url, lease_seconds=30,
                        max_population=10)
    with make_client(settings) as client:
        add_dice(client)
        yield client


def queue_of(client: TestClient):
    return client.app.state.services.queue


def drain(url: str, queue: str = JOBS) -> list[tuple[pika.BasicProperties, dict]]:
    """Every message now in ``queue`` (consumed), in the order the broker hands them out."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        messages = []
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return messages
            messages.append((properties, json.loads(body)))
    finally:
        connection.close()


def amqp_priority(job_priority: int) -> int:
    """The message priority the contract gives a job priority (-100..100 -> 0..10)."""
    return round((job_priority + 100) / 20)


# -- /v1/worker/jobs/{id}/start ----------------------------------------------------------------

def start(client: TestClient, job_id: str, worker: str = "p1"):
    return client.post(f"/v1/worker/jobs/{job_id}/start", json={"worker": worker})


def test_start_runs_a_queued_job_then_others_wait(embedded):
    queue = queue_of(embedded)
    job_id = queue.submit("train", {"dataset": "dice"})["id"]
    r = start(embedded, job_id, "p1")
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["action"] == "run" and answer["lease_seconds"] == 30
    got = answer["job"]
    assert got["id"] == job_id and got["payload"] == {"dataset": "dice"}
    assert got["status"] == "running" and got["lease_owner"] == "p1" and got["attempts"] == 1
    assert queue.get(job_id)["lease_owner"] == "p1"
    # The owner carries on with the usual protocol.
    r = embedded.post(f"/v1/worker/jobs/{job_id}/heartbeat", json={"worker": "p1", "progress": 0.5})
    assert r.json() == {"continue": True}

    # A second message for the same job (a redelivery) while p1's lease is alive: wait.
    for worker in ("p2", "p1"):
        answer = start(embedded, job_id, worker).json()
        assert answer["action"] == "wait" and answer["job"]["lease_owner"] == "p1"
        assert 1.0 <= answer["retry_after"] <= 30.0 and answer["lease_seconds"] == 30
    job = queue.get(job_id)
    assert job["lease_owner"] == "p1" and job["attempts"] == 1 and job["progress"] == 0.5


def test_start_takes_over_an_expired_job_from_its_checkpoint(embedded):
    queue = queue_of(embedded)
    job_id = queue.submit("train", {})["id"]
    queue.claim_job(job_id, "dead", LEASE)
    checkpoint = embedded.app.state.services.settings.home / "checkpoints" / job_id
    checkpoint.mkdir(parents=True)
    (checkpoint / "checkpoint.safetensors").write_bytes(b"epoch 3")
    time.sleep(LEASE + 0.15)
    answer = start(embedded, job_id, "p2").json()
    assert answer["action"] == "run" and answer["job"]["attempts"] == 2
    assert answer["job"]["lease_owner"] == "p2"
    # The new owner resumes from the dead one's checkpoint.
    r = embedded.get(f"/v1/worker/jobs/{job_id}/checkpoint", params={"worker": "p2"})
    assert r.status_code == 200 and r.content == b"epoch 3"
    r = embedded.post(f"/v1/worker/jobs/{job_id}/heartbeat", json={"worker": "dead"})
    assert r.json() == {"continue": False}


def test_start_of_an_exhausted_job_is_dead_and_ends_it_failed(broker_app):
    queue = queue_of(broker_app)
    job_id = queue.submit("train", {}, max_attempts=2)["id"]
    queue.claim_job(job_id, "p1", 30)
    queue.fail(job_id, "p1", "CUDA out of memory")
    queue.claim_job(job_id, "p2", LEASE)  # the last attempt; its processor dies
    checkpoint = broker_app.app.state.services.settings.home / "checkpoints" / job_id
    checkpoint.mkdir(parents=True)
    (checkpoint / "checkpoint.safetensors").write_bytes(b"epoch 1")
    time.sleep(LEASE + 0.15)
    # The coordinator's claims (evolve jobs) leave the dead train job to its message, so the
    # processor that receives it hears "dead" and dead-letters it.
    assert queue.claim("coordinator", 30, kinds=("evolve",)) is None
    assert queue.get(job_id)["status"] == "running"
    answer = start(broker_app, job_id, "p3").json()
    assert answer["action"] == "dead"
    assert answer["error"] == "attempts exhausted (last error: CUDA out of memory)"
    assert answer["job"]["status"] == "failed"
    job = broker_app.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"] == answer["error"] and job["attempts"] == 2
    assert not checkpoint.exists()
    # Any later copy of the message: the job has ended.
    assert start(broker_app, job_id, "p4").json()["action"] == "done"


def test_start_of_an_ended_job_is_done_and_changes_nothing(embedded):
    queue = queue_of(embedded)
    job_id = queue.submit("train", {})["id"]
    queue.claim_job(job_id, "p1", 30)
    queue.complete(job_id, "p1", {"model_id": "m1"})
    before = (queue.get(job_id), queue.events(job_id))
    answer = start(embedded, job_id, "p2").json()
    assert answer["action"] == "done" and answer["status"] == "succeeded"
    assert answer["job"]["result"] == {"model_id": "m1"}
    assert (queue.get(job_id), queue.events(job_id)) == before


@pytest.mark.parametrize("path_id, body, status, words", [
    ("0" * 32, {"worker": "p1"}, 404, "no job"),
    ("not-a-job", {"worker": "p1"}, 404, "no job"),
    ("EVOLVE", {"worker": "p1"}, 404, "evolve job"),
    ("JOB", {}, 422, "worker"),
    ("JOB", {"worker": ""}, 422, "worker"),
    ("JOB", {"worker": "x" * 256}, 422, "worker"),
    ("JOB", {"worker": "p1", "lease": 5}, 422, "lease"),
    ("JOB", None, 422, "body"),
])
def test_start_refuses_bad_requests_and_changes_nothing(embedded, path_id, body, status, words):
    queue = queue_of(embedded)
    job_id = queue.submit("train", {})["id"]
    evolve_id = queue.submit("evolve", {})["id"]
    path_id = {"JOB": job_id, "EVOLVE": evolve_id}.get(path_id, path_id)
    before = [queue.get(job_id), queue.get(evolve_id), queue.events(job_id), queue.events(evolve_id)]
    r = embedded.post(f"/v1/worker/jobs/{path_id}/start", json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]
    # (The coordinator may take the evolve job meanwhile; it runs on the server, not here.)
    after = [queue.get(job_id), queue.get(evolve_id), queue.events(job_id), queue.events(evolve_id)]
    assert after[0] == before[0] and after[2] == before[2]
    assert after[1]["lease_owner"] != "p1"
    r = embedded.post(f"/v1/worker/jobs/{job_id}/start", json={"worker": "p1"},
                      headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and queue.get(job_id)["status"] == "queued"


def test_client_worker_start(embedded):
    queue = queue_of(embedded)
    job_id = queue.submit("train", {"n": 1})["id"]
    with Client("http://testserver", api_key=KEY, transport=embedded._transport) as client:
        answer = client.worker.start(job_id, "p1")
        assert answer["action"] == "run" and answer["job"]["payload"] == {"n": 1}
        assert client.worker.start(job_id, "p2")["action"] == "wait"
        assert client.worker.heartbeat(job_id, "p1") is True
        assert client.worker.complete(job_id, "p1", {"model_id": "m"}) is True
        assert client.worker.start(job_id, "p2") | {"job": None} == {
            "action": "done", "status": "succeeded", "job": None, "lease_seconds": 30}
        with pytest.raises(NotFound, match="no job"):
            client.worker.start("0" * 32, "p1")


# -- broker mode --------------------------------------------------------------------------------

def test_claim_is_refused_in_broker_mode(broker_app):
    queue = queue_of(broker_app)
    job_id = broker_app.post("/v1/jobs", json=TRAIN).json()["id"]
    r = broker_app.post("/v1/worker/claim", json={"worker": "old-processor", "wait": 1})
    assert r.status_code == 409
    assert "RabbitMQ" in r.json()["error"] and "--broker" in r.json()["error"]
    job = queue.get(job_id)
    assert job["status"] == "queued" and job["lease_owner"] is None and job["attempts"] == 0
    # Processors start jobs by the message instead.
    assert start(broker_app, job_id, "p1").json()["action"] == "run"


def test_submit_publishes_a_persistent_message_with_the_job_priority(broker_app, amqp_url):  # noqa: F811
    queue = queue_of(broker_app)
    ids = {}
    for priority in (0, -100, 37, 100, -10):
        r = broker_app.post("/v1/jobs", json={**TRAIN, "priority": priority})
        assert r.status_code == 202, r.text
        body = r.json()
        assert body["published"] is True and body["status"] == "queued"
        # Confirmed means recorded before the answer.
        assert queue.get(body["id"])["published_at"] is not None
        ids[body["id"]] = priority
    # The same idempotency key twice: one job, one message.
    keyed = [broker_app.post("/v1/jobs", json={**TRAIN, "priority": 1, "idempotency_key": "k"}).json()
             for _ in range(2)]
    assert keyed[0] == keyed[1] and keyed[0]["published"] is True
    ids[keyed[0]["id"]] = 1

    messages = drain(amqp_url)
    assert sorted(m["job_id"] for _, m in messages) == sorted(ids)
    for properties, message in messages:
        assert message == {"job_id": message["job_id"], "kind": "train"}
        assert properties.delivery_mode == 2  # persistent
        assert properties.content_type == "application/json"
        assert properties.message_id == message["job_id"]
        assert properties.priority == amqp_priority(ids[message["job_id"]])
    # The broker hands them out highest priority first.
    priorities = [properties.priority for properties, _ in messages]
    assert priorities == sorted(priorities, reverse=True) and priorities[0] == 10
    assert queue.unpublished() == []


def test_evolve_children_are_published_the_evolve_job_never(broker_app, amqp_url):  # noqa: F811
    queue = queue_of(broker_app)
    r = broker_app.post("/v1/jobs", json={"kind": "evolve", "dataset": "dice", "priority": 4,
                                          "evolution": {"population": 4, "generations": 1},
                                          "params": {"epochs": 1}})
    assert r.status_code == 202 and r.json()["published"] is False
    evolve_id = r.json()["id"]

    def children_published():
        children = queue.children(evolve_id)
        if len(children) == 4 and all(c["published_at"] for c in children):
            return children
        return None

    children = wait_for(children_published, 60, what="the evolve job's 4 children to be published")
    assert all(c["kind"] == "train" and c["priority"] == 4 for c in children)
    messages = drain(amqp_url)
    assert sorted(m["job_id"] for _, m in messages) == sorted(c["id"] for c in children)
    assert all(p.priority == amqp_priority(4) for p, _ in messages)
    assert queue.get(evolve_id)["published_at"] is None
    # Evolve jobs are not for processors, whatever message names one.
    assert start(broker_app, evolve_id, "p1").status_code == 404


def test_a_job_submitted_while_the_broker_is_down_is_published_when_it_is_back(tmp_path):
    require_rabbitmq()
    broker = PrivateBroker(tmp_path / "rabbitmq")
    try:
        broker.start()
        settings = Settings(home=tmp_path / "home", api_key=KEY, broker_url=broker.url)
        with make_client(settings) as client:
            add_dice(client)
            queue = queue_of(client)
            before = client.post("/v1/jobs", json=TRAIN).json()
            assert before["published"] is True

            broker.stop()
            r = client.post("/v1/jobs", json={**TRAIN, "priority": 60})
            assert r.status_code == 202, r.text
            kept = r.json()
            assert kept["published"] is False and kept["status"] == "queued"
            assert queue.get(kept["id"])["published_at"] is None
            assert [j["id"] for j in queue.unpublished()] == [kept["id"]]
            assert client.get(f"/v1/jobs/{kept['id']}").json()["status"] == "queued"

            broker.start()  # same port and data directory: the first message survived
            wait_for(lambda: queue.get(kept["id"])["published_at"], 120,
                     what="the kept job to be published after the broker came back")
            after = client.post("/v1/jobs", json=TRAIN).json()
            assert after["published"] is True

            messages = drain(broker.url)
            assert [m["job_id"] for _, m in messages] == [kept["id"], before["id"], after["id"]]
            assert [p.priority for p, _ in messages] == [amqp_priority(60), 5, 5]
            assert all(p.delivery_mode == 2 for p, _ in messages)
            assert queue.unpublished() == []
    finally:
        broker.close()


def test_dicebox_serve_with_a_broker_url(tmp_path, amqp_url):  # noqa: F811
    purge_dicebox_queues(amqp_url)
    server = Server(tmp_path, api_key=KEY, extra_env={"DICEBOX_BROKER_URL": amqp_url})
    try:
        with server.client() as client:
            upload_dice(client, "dice", 60)
            r = client.post("/v1/jobs", json={**TRAIN, "priority": -40})
            assert r.status_code == 202, r.text
            assert r.json()["published"] is True
            job_id = r.json()["id"]
            r = client.post("/v1/worker/claim", json={"worker": "w"})
            assert r.status_code == 409 and "RabbitMQ" in r.json()["error"]
            [(properties, message)] = drain(amqp_url)
            assert message == {"job_id": job_id, "kind": "train"}
            assert properties.priority == amqp_priority(-40) and properties.delivery_mode == 2
            answer = client.post(f"/v1/worker/jobs/{job_id}/start", json={"worker": "p1"}).json()
            assert answer["action"] == "run" and answer["job"]["lease_owner"] == "p1"
        # A clean stop on SIGTERM (uvicorn re-raises the signal once it has shut down).
        code = server.stop()
        log = server.log.read_text(errors="replace")
        assert code in (0, -signal.SIGTERM) and "Traceback" not in log, log
    finally:
        server.kill()


def test_dicebox_serve_with_a_broker_starts_its_local_processors_in_broker_mode(tmp_path, amqp_url):  # noqa: F811
    purge_dicebox_queues(amqp_url)
    server = Server(tmp_path, api_key=KEY, workers=1, extra_env={"DICEBOX_BROKER_URL": amqp_url})
    try:
        with server.client() as client:
            upload_dice(client, "dice", 60)
            r = client.post("/v1/jobs", json=TRAIN)
            assert r.status_code == 202 and r.json()["published"] is True
            job = wait_job(client, r.json()["id"], timeout=120)
            assert job["status"] == "succeeded", job
            assert client.get(f"/v1/models/{job['result']['model_id']}").status_code == 200
            # Taken through /start by the local processor (it cannot claim in broker mode).
            running = [e for e in read_sse(client, f"/v1/jobs/{job['id']}/events")
                       if e.get("event") == "status" and e["data"]["status"] == "running"]
            assert len(running) == 1 and running[0]["data"]["owner"].endswith(":local0:0")
    finally:
        server.stop()
    # The message was acknowledged (an unacknowledged one would be back in the queue now
    # that the processor's connection is closed).
    assert drain(amqp_url) == []


def test_the_embedded_mode_never_imports_pika(tmp_path):
    code = ("import sys\n"
            "from fastapi.testclient import TestClient\n"
            "from dicebox.server import create_app\n"
            "from dicebox.settings import Settings\n"
            f"with TestClient(create_app(Settings(home={str(tmp_path)!r}))) as client:\n"
            "    assert client.post('/v1/worker/claim', json={'worker': 'w'}).status_code == 204\n"
            "print('pika' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICEBOX_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_images_published_to_the_sensory_queue_are_ingested_by_the_server(broker_app, amqp_url):  # noqa: F811
    """The server consumes dicebox.sensory: an image with its dataset and category in the
    headers lands in the dataset like an upload."""
    import io

    from PIL import Image

    client = broker_app
    client.post("/v1/datasets", json={"name": "stream", "width": 8, "height": 8, "channels": 1})
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for i in range(3):
            png = io.BytesIO()
            Image.new("L", (8, 8), color=40 * i).save(png, format="PNG")
            channel.basic_publish("", "dicebox.sensory", png.getvalue(), pika.BasicProperties(
                delivery_mode=2, headers={"dataset": "stream", "category": f"c{i % 2}"}))
    finally:
        connection.close()
    info = wait_for(lambda: (d := client.get("/v1/datasets/stream").json())["count"] == 3 and d, 60, 0.1,
                    "three images ingested")
    assert info["counts"] == {"c0": 2, "c1": 1}
