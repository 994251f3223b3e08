"""The jobs routes in-process (FastAPI TestClient): submission checks, idempotency, listing,
the public view, cancel, the events stream of a finished job, and the CLI's refusals."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from fastapi.testclient import TestClient

import dicebox
from dicebox.server import create_app
from dicebox.settings import Settings

GENOME = {"optimizer": {"name": "adam", "learning_rate": 0.001},
          "layers": [{"type": "dense", "size": 16, "activation": "relu"}]}


@pytest.fixture
def app(tmp_path):
    settings = Settings(home=tmp_path, api_key="k", max_epochs=50, max_population=10)
    with TestClient(create_app(settings), headers={"Authorization": "Bearer k"}) as client:
        dice = dicebox.datasets.make_dice(count=60, size=8, seed=0)
        client.app.state.services.sensory.create("dice", 8, 8, 1)
        client.app.state.services.sensory.add_arrays("dice", dice.images, [dice.categories[i] for i in dice.labels])
        client.app.state.services.sensory.create("empty", 8, 8, 1)
        yield client


def test_submit_list_get_and_public_view(app):
    r = app.post("/v1/jobs", json={"kind": "train", "dataset": "dice", "genome": GENOME,
                                   "params": {"epochs": 2}, "priority": 3})
    assert r.status_code == 202 and r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    job_id = r.json()["id"]
    job = app.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "queued" and job["priority"] == 3 and job["dataset"] == "dice"
    assert job["spec"]["version"] == 60 and job["spec"]["params"]["epochs"] == 2
    assert job["spec"]["genome"]["layers"][0]["size"] == 16 and job["history"] == []
    for internal in ("payload", "lease_expires_at", "state", "idempotency_key"):
        assert internal not in job
    second = app.post("/v1/jobs", json={"kind": "evolve", "dataset": "dice",
                                        "evolution": {"population": 4, "generations": 2}}).json()["id"]
    page = app.get("/v1/jobs", params={"limit": 1}).json()
    assert [j["id"] for j in page["items"]] == [second] and page["next"]
    rest = app.get("/v1/jobs", params={"limit": 1, "cursor": page["next"]}).json()
    assert [j["id"] for j in rest["items"]] == [job_id]
    assert app.get("/v1/jobs", params={"status": "succeeded"}).json()["items"] == []


def test_idempotency_key(app):
    body = {"kind": "train", "dataset": "dice", "genome": GENOME, "idempotency_key": "abc"}
    ids = {app.post("/v1/jobs", json=body).json()["id"] for _ in range(3)}
    assert len(ids) == 1
    assert len(app.get("/v1/jobs").json()["items"]) == 1


@pytest.mark.parametrize("body, status, words", [
    ({"kind": "train", "dataset": "nope", "genome": GENOME}, 404, "nope"),
    ({"kind": "train", "dataset": "empty", "genome": GENOME}, 400, "at least"),
    ({"kind": "train", "dataset": "dice"}, 400, "genome"),
    ({"kind": "train", "dataset": "dice", "genome": {**GENOME, "layers": [{"type": "dense", "size": 0}]}}, 400,
     "layers[0].size"),
    ({"kind": "train", "dataset": "dice", "genome": {**GENOME, "layers": [{"type": "conv2d", "filters": 4,
                                                                 "kernel": [9, 9], "padding": "valid"}]}},
     400, "layers[0]"),
    ({"kind": "train", "dataset": "dice", "genome": {**GENOME, "layers": [{"type": "dense", "size": 4096}] * 4}}, 400,
     "parameters"),
    ({"kind": "train", "dataset": "dice", "genome": GENOME, "params": {"epochs": 51}}, 400, "DICEBOX_MAX_EPOCHS"),
    ({"kind": "train", "dataset": "dice", "genome": GENOME, "params": {"epochs": 0}}, 422, "params.epochs"),
    ({"kind": "train", "dataset": "dice", "genome": GENOME, "params": {"validation": 0.5, "test": 0.45}}, 400,
     "leave data"),
    ({"kind": "train", "dataset": "dice", "genome": GENOME, "params": {"lr": 1}}, 422, "params.lr"),
    ({"kind": "train", "dataset": "dice", "genome": GENOME, "priority": 101}, 422, "priority"),
    ({"kind": "train", "dataset": "dice", "genome": GENOME, "init": "0" * 32}, 400, "init"),
    ({"kind": "train", "dataset": "dice", "genome": GENOME, "evolution": {}}, 400, "evolution"),
    ({"kind": "evolve", "dataset": "dice", "evolution": {"population": 11}}, 400, "DICEBOX_MAX_POPULATION"),
    ({"kind": "evolve", "dataset": "dice", "evolution": {"population": 4, "space": {"max_layers": -1}}}, 400, "max_layers"),
    ({"kind": "evolve", "dataset": "dice", "evolution": {"population": 4, "space": "nope"}}, 400, "evolution"),
    ({"kind": "evolve", "dataset": "dice", "genome": GENOME}, 400, "genome"),
    ({"kind": "fit", "dataset": "dice"}, 422, "kind"),
    ({"kind": "train", "dataset": "../etc", "genome": GENOME}, 400, "name"),
])
def test_bad_submissions_are_refused_and_queue_nothing(app, body, status, words):
    r = app.post("/v1/jobs", json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]
    assert app.get("/v1/jobs").json()["items"] == []


def test_bad_query_and_unknown_ids(app):
    assert app.get("/v1/jobs", params={"status": "done"}).status_code == 422
    assert app.get("/v1/jobs", params={"cursor": "garbage"}).status_code == 400
    for path in ("/v1/jobs/nope", "/v1/jobs/nope/events"):
        r = app.get(path)
        assert r.status_code == 404 and "nope" in r.json()["error"]
    assert app.post("/v1/jobs/nope/cancel").status_code == 404


def test_cancel_queued_and_events_of_a_finished_job(app):
    job_id = app.post("/v1/jobs", json={"kind": "train", "dataset": "dice", "genome": GENOME}).json()["id"]
    canceled = app.post(f"/v1/jobs/{job_id}/cancel").json()
    assert canceled["status"] == "canceled" and canceled["finished_at"]
    with app.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        text = "".join(r.iter_text())
    assert r.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in text.split("\n\n") if b.strip() and not b.startswith("retry")]
    kinds = [next(line for line in b.split("\n") if line.startswith("event:")) for b in blocks]
    assert kinds == ["event: status", "event: status", "event: end"]
    assert '"status":"canceled"' in blocks[-1]
    assert app.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "x"}).status_code == 400


def test_key_required(app):
    r = app.get("/v1/jobs", headers={"Authorization": ""})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert app.get("/v1/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401


@pytest.mark.parametrize("args, message", [
    (["serve", "--host", "0.0.0.0"], "loopback"),
    (["serve", "--broker", "http://127.0.0.1:5672/"], "amqp://"),
    (["serve", "--workers", "-1"], "--workers"),
])
def test_serve_refuses_bad_settings(tmp_path, args, message):
    env = {"PATH": "/usr/bin:/bin", "DICEBOX_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "dicebox", *args], env=env, capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert not np.any([p.name == "dicebox.db" for p in tmp_path.iterdir()])
