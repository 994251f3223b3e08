"""The processor protocol (/v1/worker) in process: claim and its long-poll, heartbeats with
epochs and cancel answers, lease ownership (409 for anyone else), checkpoints, model upload,
complete/fail/canceled, and bad input that changes nothing."""

from __future__ import annotations

import io
import socket
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import dicebox
from dicebox.client import Client, ServerUnavailable
from dicebox.errors import Conflict, InvalidInput, NotFound, Unauthorized
from dicebox.server import create_app
from dicebox.server.routes import worker as worker_routes
from dicebox.settings import Settings

KEY = "worker-key"
GENOME = {"optimizer": {"name": "adam", "learning_rate": 0.01}, "layers": [{"type": "dense", "size": 4}]}
PAYLOAD = {"dataset": "bands", "version": 240, "genome": GENOME,
           "params": {"epochs": 4}, "init": None, "evolve": None}
EPOCH = {"epoch": 1, "loss": 0.9, "accuracy": 0.5, "val_loss": 0.8, "val_accuracy": 0.6,
         "samples_per_second": 1234.5, "seconds": 0.2}


@pytest.fixture
def app(tmp_path):
    settings = Settings(home=tmp_path, api_key=KEY, lease_seconds=30, max_artifact_bytes=64 * 1024)
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


def services(app):
    return app.app.state.services


def submit(app, payload=None, kind="train") -> str:
    return services(app).queue.submit(kind, payload or PAYLOAD)["id"]


def claim(app, worker="w1", wait=0.0) -> dict:
    r = app.post("/v1/worker/claim", json={"worker": worker, "wait": wait})
    assert r.status_code == 200, r.text
    return r.json()


def job(app, job_id) -> dict:
    return services(app).queue.get(job_id)


def checkpoint_dir(app, job_id):
    return services(app).settings.home / "checkpoints" / job_id


# -- claim ------------------------------------------------------------------------------------

def test_claim_hands_out_train_jobs_under_a_lease(app):
    assert app.post("/v1/worker/claim", json={"worker": "w1"}).status_code == 204
    job_id = submit(app)
    answer = claim(app)
    assert answer["lease_seconds"] == 30
    got = answer["job"]
    assert got["id"] == job_id and got["payload"] == PAYLOAD and got["status"] == "running"
    assert got["lease_owner"] == "w1" and got["attempts"] == 1
    assert job(app, job_id)["status"] == "running"
    # Nothing else is queued: the next claim waits its (zero) time and gets nothing.
    assert app.post("/v1/worker/claim", json={"worker": "w2", "wait": 0}).status_code == 204


def test_claim_never_hands_out_evolve_jobs(app):
    evolve_id = submit(app, {"dataset": "bands"}, kind="evolve")
    assert app.post("/v1/worker/claim", json={"worker": "w1"}).status_code == 204
    assert job(app, evolve_id)["lease_owner"] != "w1"


def test_claim_long_poll_answers_204_after_wait(app):
    r = app.post("/v1/worker/claim", json={"worker": "w1", "wait": 0.6})
    assert r.status_code == 204 and r.content == b""


def test_claim_long_poll_wakes_on_submit_from_another_thread(app, monkeypatch):
    # With the periodic re-check out of the picture, only the notifier can answer the claim
    # before its wait ends: a 200 proves the submit woke it.
    monkeypatch.setattr(worker_routes, "POLL_SECONDS", 3600.0)
    notifier = services(app).notifier
    waiting = threading.Event()
    original_wait = notifier.wait

    async def wait(timeout):
        waiting.set()
        return await original_wait(timeout)

    monkeypatch.setattr(notifier, "wait", wait)
    answers = []
    poller = threading.Thread(target=lambda: answers.append(
        app.post("/v1/worker/claim", json={"worker": "w1", "wait": 30})))
    poller.start()
    assert waiting.wait(30), "the claim never started waiting"
    job_id = submit(app)
    notifier.notify()  # what POST /v1/jobs does after every submit
    poller.join(60)
    assert not poller.is_alive()
    assert answers[0].status_code == 200 and answers[0].json()["job"]["id"] == job_id


def test_claim_long_poll_wakes_on_post_jobs(app, monkeypatch):
    """The real submit route notifies: a waiting claim gets the job it queued."""
    monkeypatch.setattr(worker_routes, "POLL_SECONDS", 3600.0)
    dice = dicebox.datasets.make_dice(count=30, size=8, seed=0)
    store = services(app).sensory
    store.create("dice", 8, 8, 1)
    store.add_arrays("dice", dice.images, [dice.categories[i] for i in dice.labels])
    waiting = threading.Event()
    notifier = services(app).notifier
    original_wait = notifier.wait

    async def wait(timeout):
        waiting.set()
        return await original_wait(timeout)

    monkeypatch.setattr(notifier, "wait", wait)
    answers = []
    poller = threading.Thread(target=lambda: answers.append(
        app.post("/v1/worker/claim", json={"worker": "w1", "wait": 30})))
    poller.start()
    assert waiting.wait(30)
    r = app.post("/v1/jobs", json={"kind": "train", "dataset": "dice", "genome": GENOME})
    assert r.status_code == 202, r.text
    poller.join(60)
    assert answers[0].status_code == 200 and answers[0].json()["job"]["id"] == r.json()["id"]


@pytest.mark.parametrize("body, field", [
    ({"worker": "w1", "wait": 31}, "wait"),
    ({"worker": "w1", "wait": -1}, "wait"),
    ({"worker": ""}, "worker"),
    ({"wait": 1}, "worker"),
    ({"worker": "w1", "extra": 1}, "extra"),
])
def test_claim_rejects_bad_bodies_and_takes_nothing(app, body, field):
    job_id = submit(app)
    r = app.post("/v1/worker/claim", json=body)
    assert r.status_code == 422 and field in r.json()["error"]
    assert job(app, job_id)["status"] == "queued"


def test_worker_routes_need_the_api_key(app):
    job_id = submit(app)
    bare = TestClient(app.app)
    assert bare.post("/v1/worker/claim", json={"worker": "w1"}).status_code == 401
    assert bare.post(f"/v1/worker/jobs/{job_id}/heartbeat", json={"worker": "w1"}).status_code == 401
    assert job(app, job_id)["status"] == "queued"


# -- heartbeats -----------------------------------------------------------------------------

def test_heartbeat_renews_and_records_epochs(app):
    job_id = submit(app)
    before = claim(app)["job"]["lease_expires_at"]
    r = app.post(f"/v1/worker/jobs/{job_id}/heartbeat", json={"worker": "w1"})
    assert r.status_code == 200 and r.json() == {"continue": True}
    assert job(app, job_id)["lease_expires_at"] >= before
    r = app.post(f"/v1/worker/jobs/{job_id}/heartbeat",
                 json={"worker": "w1", "progress": 0.25, "epoch": EPOCH, "samples_per_second": 1234.5})
    assert r.json() == {"continue": True}
    assert job(app, job_id)["progress"] == 0.25
    epochs = [e["data"] for e in services(app).queue.events(job_id) if e["type"] == "epoch"]
    assert epochs == [{**EPOCH, "attempt": 1}]
    # Running jobs show the epochs reported so far as their history.
    assert app.get(f"/v1/jobs/{job_id}").json()["history"] == [{**EPOCH, "attempt": 1}]
    metrics = app.get("/metrics").text
    assert "dicebox_training_epochs_total 1.0" in metrics
    assert 'dicebox_training_samples_per_second{worker="w1"} 1234.5' in metrics


def test_heartbeat_answers_stop_after_a_cancel(app):
    job_id = submit(app)
    claim(app)
    assert app.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    r = app.post(f"/v1/worker/jobs/{job_id}/heartbeat", json={"worker": "w1"})
    assert r.json() == {"continue": False}
    # The processor confirms it stopped: the job ends canceled.
    r = app.post(f"/v1/worker/jobs/{job_id}/canceled", json={"worker": "w1"})
    assert r.status_code == 200 and r.json() == {"ok": True}
    assert job(app, job_id)["status"] == "canceled"


def test_heartbeat_of_another_worker_answers_stop_and_records_nothing(app):
    job_id = submit(app)
    lease = claim(app)["job"]["lease_expires_at"]
    r = app.post(f"/v1/worker/jobs/{job_id}/heartbeat", json={"worker": "intruder", "epoch": EPOCH})
    assert r.status_code == 200 and r.json() == {"continue": False}
    assert [e for e in services(app).queue.events(job_id) if e["type"] == "epoch"] == []
    assert job(app, job_id)["lease_owner"] == "w1" and job(app, job_id)["lease_expires_at"] == lease
    assert "dicebox_training_epochs_total 0.0" in app.get("/metrics").text


@pytest.mark.parametrize("body, status, words", [
    ({"worker": "w1", "epoch": {"loss": 1.0}}, 400, "epoch.epoch"),
    ({"worker": "w1", "epoch": {"epoch": 0}}, 400, "epoch.epoch"),
    ({"worker": "w1", "epoch": {"epoch": True}}, 400, "epoch.epoch"),
    ({"worker": "w1", "progress": 1.5}, 422, "progress"),
    ({"worker": "w1", "samples_per_second": -1}, 422, "samples_per_second"),
    ({"progress": 0.5}, 422, "worker"),
])
def test_heartbeat_rejects_bad_bodies_and_changes_nothing(app, body, status, words):
    job_id = submit(app)
    lease = claim(app)["job"]["lease_expires_at"]
    r = app.post(f"/v1/worker/jobs/{job_id}/heartbeat", json=body)
    assert r.status_code == status and words in r.json()["error"], r.text
    after = job(app, job_id)
    assert after["progress"] == 0.0 and after["lease_expires_at"] == lease
    assert [e for e in services(app).queue.events(job_id) if e["type"] == "epoch"] == []


@pytest.mark.parametrize("job_id", ["0" * 32, "..", "..%2F..%2Fetc", "ABC"])
def test_unknown_or_malformed_job_ids_are_404(app, job_id):
    submit(app)
    claim(app)
    for method, path, kwargs in (
            ("POST", "heartbeat", {"json": {"worker": "w1"}}),
            ("PUT", "checkpoint?worker=w1", {"content": b"x"}),
            ("GET", "checkpoint?worker=w1", {}),
            ("POST", "complete", {"json": {"worker": "w1", "result": {}}}),
            ("POST", "fail", {"json": {"worker": "w1", "error": "e"}}),
            ("POST", "canceled", {"json": {"worker": "w1"}})):
        r = app.request(method, f"/v1/worker/jobs/{job_id}/{path}", **kwargs)
        assert r.status_code == 404, (method, path, r.text)
    assert not (services(app).settings.home / "checkpoints").exists() or \
        list((services(app).settings.home / "checkpoints").iterdir()) == []


# -- checkpoints ------------------------------------------------------------------------------

def test_checkpoint_round_trip_and_ownership(app):
    job_id = submit(app)
    claim(app)
    url = f"/v1/worker/jobs/{job_id}/checkpoint"
    assert app.get(url, params={"worker": "w1"}).status_code == 404
    data = bytes(range(256)) * 100
    r = app.put(url, params={"worker": "w1"}, content=data)
    assert r.status_code == 200 and r.json() == {"ok": True, "bytes": len(data)}
    got = app.get(url, params={"worker": "w1"})
    assert got.status_code == 200 and got.content == data
    assert (checkpoint_dir(app, job_id) / "checkpoint.safetensors").read_bytes() == data
    # A newer epoch replaces it.
    app.put(url, params={"worker": "w1"}, content=b"epoch 2")
    assert app.get(url, params={"worker": "w1"}).content == b"epoch 2"
    # Nobody but the lease owner reads or writes it.
    r = app.put(url, params={"worker": "intruder"}, content=b"evil")
    assert r.status_code == 409 and "intruder" in r.json()["error"]
    assert app.get(url, params={"worker": "intruder"}).status_code == 409
    assert app.get(url, params={"worker": "w1"}).content == b"epoch 2"
    assert [p.name for p in checkpoint_dir(app, job_id).iterdir()] == ["checkpoint.safetensors"]


def test_checkpoint_rejects_empty_and_oversized_bodies(app):
    job_id = submit(app)
    claim(app)
    url = f"/v1/worker/jobs/{job_id}/checkpoint"
    app.put(url, params={"worker": "w1"}, content=b"good")
    r = app.put(url, params={"worker": "w1"}, content=b"")
    assert r.status_code == 400 and "empty" in r.json()["error"]
    r = app.put(url, params={"worker": "w1"}, content=b"x" * (64 * 1024 + 1))
    assert r.status_code == 413 and "DICEBOX_MAX_ARTIFACT_BYTES" in r.json()["error"]
    # A body without Content-Length is cut off as it streams in.
    r = app.put(url, params={"worker": "w1"}, content=iter([b"x" * 40_000, b"y" * 40_000]))
    assert r.status_code == 413
    assert app.get(url, params={"worker": "w1"}).content == b"good"
    assert [p.name for p in checkpoint_dir(app, job_id).iterdir()] == ["checkpoint.safetensors"]
    assert app.put(url, content=b"x").status_code == 422  # worker is required


def test_checkpoint_survives_a_retry_and_goes_when_the_job_ends(app):
    job_id = submit(app)
    claim(app)
    url = f"/v1/worker/jobs/{job_id}/checkpoint"
    app.put(url, params={"worker": "w1"}, content=b"epoch 1")
    r = app.post(f"/v1/worker/jobs/{job_id}/fail", json={"worker": "w1", "error": "processor stopped"})
    assert r.json() == {"ok": True}
    assert job(app, job_id)["status"] == "queued"
    # The next processor resumes from it.
    again = claim(app, "w2")["job"]
    assert again["id"] == job_id and again["attempts"] == 2
    assert app.get(url, params={"worker": "w2"}).content == b"epoch 1"
    assert app.get(url, params={"worker": "w1"}).status_code == 409
    r = app.post(f"/v1/worker/jobs/{job_id}/fail", json={"worker": "w2", "error": "bad genome", "retry": False})
    assert r.json() == {"ok": True}
    after = job(app, job_id)
    assert after["status"] == "failed" and after["error"] == "bad genome"
    assert not checkpoint_dir(app, job_id).exists()


def test_checkpoints_of_jobs_ended_elsewhere_are_swept(app, monkeypatch):
    monkeypatch.setattr(worker_routes, "SWEEP_SECONDS", 0.0)
    job_id = submit(app)
    claim(app)
    app.put(f"/v1/worker/jobs/{job_id}/checkpoint", params={"worker": "w1"}, content=b"epoch 1")
    app.post(f"/v1/worker/jobs/{job_id}/fail", json={"worker": "w1", "error": "processor stopped"})
    services(app).queue.cancel(job_id)  # canceled while queued: no processor says so
    assert checkpoint_dir(app, job_id).exists()
    assert app.post("/v1/worker/claim", json={"worker": "w1"}).status_code == 204
    assert not checkpoint_dir(app, job_id).exists()


# -- the end of a job -------------------------------------------------------------------------

def test_complete_only_by_the_lease_owner(app):
    job_id = submit(app)
    claim(app)
    app.put(f"/v1/worker/jobs/{job_id}/checkpoint", params={"worker": "w1"}, content=b"epoch 4")
    result = {"model_id": "m", "metrics": {"accuracy": 1.0}, "fitness": 1.0, "history": [EPOCH],
              "training_seconds": 0.2, "epochs": 1}
    r = app.post(f"/v1/worker/jobs/{job_id}/complete", json={"worker": "intruder", "result": result})
    assert r.status_code == 409 and r.json()["detail"] == {"status": "running", "lease_owner": "w1"}
    assert job(app, job_id)["status"] == "running"
    r = app.post(f"/v1/worker/jobs/{job_id}/complete", json={"worker": "w1", "result": result})
    assert r.status_code == 200 and r.json() == {"ok": True}
    done = job(app, job_id)
    assert done["status"] == "succeeded" and done["result"] == result and done["progress"] == 1.0
    assert not checkpoint_dir(app, job_id).exists()
    # Ended: nobody can end it again.
    r = app.post(f"/v1/worker/jobs/{job_id}/complete", json={"worker": "w1", "result": result})
    assert r.status_code == 409
    r = app.post(f"/v1/worker/jobs/{job_id}/fail", json={"worker": "w1", "error": "late"})
    assert r.status_code == 409 and job(app, job_id)["status"] == "succeeded"


@pytest.mark.parametrize("path, body", [
    ("complete", {"worker": "w1"}),
    ("complete", {"worker": "w1", "result": [1, 2]}),
    ("fail", {"worker": "w1", "error": ""}),
    ("fail", {"worker": "w1", "error": "x", "retry": "maybe"}),
])
def test_end_calls_reject_bad_bodies_and_change_nothing(app, path, body):
    job_id = submit(app)
    claim(app)
    r = app.post(f"/v1/worker/jobs/{job_id}/{path}", json=body)
    assert r.status_code == 422, r.text
    assert job(app, job_id)["status"] == "running" and job(app, job_id)["lease_owner"] == "w1"


def test_canceled_without_a_cancel_request_changes_nothing(app):
    job_id = submit(app)
    claim(app)
    r = app.post(f"/v1/worker/jobs/{job_id}/canceled", json={"worker": "w1"})
    assert r.status_code == 200 and r.json() == {"ok": False}
    assert job(app, job_id)["status"] == "running"
    r = app.post(f"/v1/worker/jobs/{job_id}/canceled", json={"worker": "intruder"})
    assert r.status_code == 409 and job(app, job_id)["status"] == "running"


def test_fail_with_retry_ends_failed_after_max_attempts(app):
    job_id = services(app).queue.submit("train", PAYLOAD, max_attempts=2)["id"]
    for attempt, worker in ((1, "w1"), (2, "w2")):
        assert claim(app, worker)["job"]["attempts"] == attempt
        app.post(f"/v1/worker/jobs/{job_id}/fail", json={"worker": worker, "error": f"boom {attempt}"})
    after = job(app, job_id)
    assert after["status"] == "failed" and after["error"] == "boom 2" and after["attempts"] == 2


def test_long_errors_are_cut_short(app):
    job_id = submit(app)
    claim(app)
    app.post(f"/v1/worker/jobs/{job_id}/fail", json={"worker": "w1", "error": "e" * 50_000, "retry": False})
    error = job(app, job_id)["error"]
    assert error.startswith("eee") and len(error) <= worker_routes.MAX_ERROR_CHARS + 3


# -- model upload ---------------------------------------------------------------------------

def model_files(trained, tmp_path):
    directory = trained.save(tmp_path / "model")
    return {"weights": ("weights.safetensors", (directory / "weights.safetensors").read_bytes()),
            "model": ("model.json", (directory / "model.json").read_bytes())}


def test_model_upload_is_idempotent_per_job(app, trained, tmp_path):
    trained.metadata = {**trained.metadata, "training_seconds": 1.5, "fitness": 0.75}
    job_id = submit(app)
    claim(app)
    url = f"/v1/worker/jobs/{job_id}/model"
    files = model_files(trained, tmp_path)
    r = app.post(url, params={"worker": "w1"}, files=files)
    assert r.status_code == 200, r.text
    model_id = r.json()["model_id"]
    assert app.post(url, params={"worker": "w1"}, files=files).json() == {"model_id": model_id}
    registry = services(app).registry
    assert [m["id"] for m in registry.list()["items"]] == [model_id]
    record = registry.get(model_id)
    assert record["job_id"] == job_id and record["dataset"] == "bands" and record["dataset_version"] == 240
    assert record["training_seconds"] == 1.5 and record["fitness"] == 0.75
    assert record["categories"] == trained.categories
    # The model is served like any other.
    assert app.get(f"/v1/models/{model_id}/weights").content == files["weights"][1]


def test_model_upload_only_by_the_lease_owner_and_only_valid_models(app, trained, tmp_path):
    job_id = submit(app)
    claim(app)
    url = f"/v1/worker/jobs/{job_id}/model"
    files = model_files(trained, tmp_path)
    r = app.post(url, params={"worker": "intruder"}, files=files)
    assert r.status_code == 409
    r = app.post(url, params={"worker": "w1"}, files={**files, "weights": ("weights.safetensors", b"not weights")})
    assert r.status_code == 400 and "model" in r.json()["error"]
    r = app.post(url, params={"worker": "w1"}, files={**files, "model": ("model.json", b"{nope")})
    assert r.status_code == 400 and "model.json" in r.json()["error"]
    r = app.post(url, params={"worker": "w1"}, files={"weights": files["weights"]})
    assert r.status_code == 422 and "model" in r.json()["error"]
    assert services(app).registry.list()["items"] == []
    assert job(app, job_id)["status"] == "running"


# -- the client over the same routes ----------------------------------------------------------

@pytest.fixture
def client(app):
    """dicebox.client.Client talking to the in-process app (TestClient's transport)."""
    with Client("http://testserver", api_key=KEY, transport=app._transport) as c:
        yield c


def test_client_runs_the_worker_protocol(app, client, trained, tmp_path):
    assert client.worker.claim("w1") is None
    job_id = submit(app)
    answer = client.worker.claim("w1", wait=1)
    assert answer["job"]["id"] == job_id and answer["lease_seconds"] == 30
    assert client.worker.heartbeat(job_id, "w1", progress=0.5, epoch=EPOCH, samples_per_second=10.0) is True
    assert client.worker.heartbeat(job_id, "intruder") is False
    target = tmp_path / "got" / "checkpoint.safetensors"
    assert client.worker.get_checkpoint(job_id, "w1", target) is False and not target.exists()
    (tmp_path / "ckpt").write_bytes(b"epoch 1 state")
    client.worker.put_checkpoint(job_id, "w1", tmp_path / "ckpt")
    assert client.worker.get_checkpoint(job_id, "w1", target) is True
    assert target.read_bytes() == b"epoch 1 state"
    with pytest.raises(Conflict) as conflict:
        client.worker.put_checkpoint(job_id, "intruder", tmp_path / "ckpt")
    assert conflict.value.status == 409 and conflict.value.detail["lease_owner"] == "w1"
    model_dir = trained.save(tmp_path / "model")
    model_id = client.worker.upload_model(job_id, "w1", model_dir)
    assert client.worker.upload_model(job_id, "w1", model_dir) == model_id
    assert client.worker.canceled(job_id, "w1") is False
    assert client.worker.complete(job_id, "w1", {"model_id": model_id}) is True
    with pytest.raises(Conflict):
        client.worker.fail(job_id, "w1", "late")
    with pytest.raises(NotFound, match="no job"):
        client.worker.heartbeat("0" * 32, "w1")
    assert job(app, job_id)["status"] == "succeeded"


def test_client_resources_and_errors(app, client, tmp_path):
    assert client.datasets.create("dice", 8, 8, 1)["name"] == "dice"
    dice = dicebox.datasets.make_dice(count=36, size=8, seed=0)

    def png(i):
        out = io.BytesIO()
        Image.fromarray(dice.images[i][0]).save(out, format="PNG")
        return out.getvalue()

    for c, category in enumerate(dice.categories):
        files = [(f"{i}.png", png(i)) for i in np.flatnonzero(dice.labels == c)]
        client.datasets.add_images("dice", category, files)
    assert client.datasets.get("dice")["count"] == 36
    assert [d["name"] for d in client.datasets.list()["items"]] == ["dice"]
    target = tmp_path / "dice.dbx"
    etag = client.datasets.export("dice", target, version=36)
    assert etag and len(dicebox.Dataset.load(target)) == 36
    before = target.stat().st_mtime_ns
    assert client.datasets.export("dice", target, version=36, etag=etag) == etag  # 304
    assert target.stat().st_mtime_ns == before
    with pytest.raises(NotFound):
        client.datasets.get("nope")
    with pytest.raises(InvalidInput) as invalid:
        client.jobs.submit("train", "dice", genome={"layers": []}, params={"epochs": 0})
    assert invalid.value.status == 422 and "params.epochs" in invalid.value.message

    submitted = client.jobs.submit("train", "dice", genome=GENOME, params={"epochs": 1})
    assert submitted["status"] == "queued"
    assert client.jobs.get(submitted["id"])["status"] == "queued"
    assert [j["id"] for j in client.jobs.list(status="queued")["items"]] == [submitted["id"]]
    assert client.jobs.cancel(submitted["id"])["status"] == "canceled"
    events = list(client.jobs.events(submitted["id"]))
    assert [e["event"] for e in events][-1] == "end" and events[-1]["data"]["status"] == "canceled"
    assert [e["data"]["status"] for e in events if e["event"] == "status"] == ["queued", "canceled"]

    with Client("http://testserver", api_key="wrong", transport=app._transport) as stranger, \
            pytest.raises(Unauthorized):
        stranger.jobs.list()
    assert client.models.list()["items"] == []


def test_client_turns_an_unreachable_server_into_server_unavailable():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Client(f"http://127.0.0.1:{port}", timeout=5) as c, pytest.raises(ServerUnavailable) as err:
        c.worker.claim("w1")
    assert err.value.status == 503 and "ConnectError" in err.value.message
    with pytest.raises(ValueError, match="server_url"):
        Client("ftp://127.0.0.1")
