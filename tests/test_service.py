"""The service end to end: a real server process on a loopback port and real processor
processes. Upload, train, events, classification of fresh images, evolution across two
processors, cancel, idempotency, priorities, a server restart, and bad input over HTTP."""

from __future__ import annotations

import io
import signal
import struct
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from servers import (
    SIZE,
    Processor,
    Server,
    b64_png,
    png_bytes,
    read_sse,
    upload_dice,
    wait_for,
    wait_job,
)

import dicebox
from dicebox.demo import DEMO_GENOME

KEY = "test-key-0123456789"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A server with two processors and a dice dataset of 2400 images."""
    home = tmp_path_factory.mktemp("service")
    server = Server(home, api_key=KEY)
    processors = [Processor(server, f"p{i}") for i in range(2)]
    client = server.client()
    upload_dice(client, "dice", 2400)
    yield server, client, processors
    client.close()
    for p in processors:
        p.stop()
    server.stop()


def submit(client, **body) -> str:
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    assert r.json()["status"] == "queued"
    return r.json()["id"]


def test_train_events_and_classification_of_fresh_dice(service):
    _, client, _ = service
    job_id = submit(client, kind="train", dataset="dice", genome=DEMO_GENOME,
                    params={"epochs": 30, "patience": 6, "seed": 0})
    events = read_sse(client, f"/v1/jobs/{job_id}/events")
    kinds = [e.get("event") for e in events]
    statuses = [e["data"]["status"] for e in events if e.get("event") == "status"]
    assert statuses[0] == "queued" and statuses[-1] == "succeeded" and "running" in statuses
    epochs = [e["data"] for e in events if e.get("event") == "epoch"]
    assert [e["epoch"] for e in epochs] == list(range(1, len(epochs) + 1)) and len(epochs) >= 6
    assert kinds[-1] == "end" and events[-1]["data"]["status"] == "succeeded"
    ids = [int(e["id"]) for e in events if "id" in e]
    assert ids == sorted(ids)

    job = client.get(f"/v1/jobs/{job_id}").json()
    result = job["result"]
    assert job["progress"] == 1.0 and job["attempts"] == 1 and job["error"] is None
    assert len(result["history"]) == len(epochs)
    assert {"accuracy", "loss", "confusion", "f1"} <= result["metrics"].keys()
    assert np.asarray(result["metrics"]["confusion"]).shape == (6, 6)
    assert result["training_seconds"] > 0

    model = client.get(f"/v1/models/{result['model_id']}").json()
    assert model["dataset"] == "dice" and model["categories"] == [str(i) for i in range(1, 7)]
    assert model["genome"]["layers"][0]["type"] == "conv2d"

    fresh = dicebox.datasets.make_dice(count=120, size=SIZE, seed=99)
    files = [("files", (f"{i}.png", png_bytes(img), "image/png")) for i, img in enumerate(fresh.images)]
    r = client.post(f"/v1/models/{result['model_id']}/classify", files=files)
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    assert len(predictions) == len(fresh)
    truth = [fresh.categories[i] for i in fresh.labels]
    accuracy = np.mean([p["category"] == t for p, t in zip(predictions, truth)])
    assert accuracy >= 0.9, accuracy
    first = predictions[0]
    assert first["top"][0]["category"] == first["category"]
    assert abs(sum(t["probability"] for t in first["top"]) - 1.0) < 0.05 or len(first["top"]) < 6

    # JSON body, model "best" of the dataset: the same answers.
    items = [{"data": b64_png(img)} for img in fresh.images[:10]]
    r = client.post("/v1/models/best/classify", params={"dataset": "dice"}, json={"items": items})
    assert r.status_code == 200, r.text
    best = client.get("/v1/models", params={"dataset": "dice"}).json()["items"]
    assert best, "the finished job registered a model"

    # A client that connects after the end still sees every event, then the end.
    late = read_sse(client, f"/v1/jobs/{job_id}/events")
    assert [e.get("event") for e in late] == kinds
    # ... and one that resumes with Last-Event-ID only what followed.
    resumed = read_sse(client, f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": str(ids[-3])})
    assert [e.get("id") for e in resumed][:-1] == [str(i) for i in ids[-2:]]


def test_evolve_across_two_processors(service):
    _, client, _ = service
    job_id = submit(client, kind="evolve", dataset="dice",
                    evolution={"population": 4, "generations": 2, "space": {"max_layers": 3}},
                    params={"epochs": 2, "seed": 3})
    job = wait_job(client, job_id, timeout=600)
    assert job["status"] == "succeeded", job
    result = job["result"]
    assert len(result["generations"]) == 2 and result["leaderboard"]
    assert result["model_id"] and result["fitness"] == result["leaderboard"][0]["fitness"]
    children = client.get("/v1/jobs", params={"parent_id": job_id, "limit": 100}).json()["items"]
    assert children and all(c["status"] == "succeeded" and c["kind"] == "train" for c in children)
    owners = set()
    for child in children:
        for e in read_sse(client, f"/v1/jobs/{child['id']}/events"):
            if e.get("event") == "status" and e["data"]["status"] == "running":
                owners.add(e["data"]["owner"].split(":")[0])  # "--name" (plus a slot suffix)
    assert len(owners) == 2, f"both processors trained individuals: {owners}"
    events = read_sse(client, f"/v1/jobs/{job_id}/events")
    assert sum(e.get("event") == "individual" for e in events) == result["trained"] + result["cache_hits"]
    assert sum(e.get("event") == "generation" for e in events) == 2


def test_cancel_stops_a_running_job_within_one_epoch(service):
    _, client, _ = service
    job_id = submit(client, kind="train", dataset="dice", genome=DEMO_GENOME,
                    params={"epochs": 200, "patience": 0})
    wait_for(lambda: client.get(f"/v1/jobs/{job_id}").json()["history"], 120, 0.1, "a first epoch")
    seen = len(client.get(f"/v1/jobs/{job_id}").json()["history"])
    r = client.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 200 and r.json()["cancel_requested"] is True
    job = wait_job(client, job_id, timeout=120)
    assert job["status"] == "canceled"
    epochs = [e for e in read_sse(client, f"/v1/jobs/{job_id}/events") if e.get("event") == "epoch"]
    assert len(epochs) <= seen + 1
    # A finished job is answered unchanged.
    assert client.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "canceled"


def test_idempotency_key_gives_the_same_job(service):
    _, client, _ = service
    body = {"kind": "train", "dataset": "dice", "genome": DEMO_GENOME, "params": {"epochs": 1},
            "idempotency_key": "order-42"}
    first = client.post("/v1/jobs", json=body).json()["id"]
    again = client.post("/v1/jobs", json=body).json()["id"]
    assert first == again
    listed = [j for j in client.get("/v1/jobs", params={"limit": 1000}).json()["items"] if j["id"] == first]
    assert len(listed) == 1
    wait_job(client, first)


def test_bad_input_gets_a_clear_4xx_and_changes_nothing(service):
    server, client, _ = service
    before = client.get("/v1/datasets/dice").json()
    jobs_before = len(client.get("/v1/jobs", params={"limit": 1000}).json()["items"])
    good = png_bytes(np.zeros((1, SIZE, SIZE), np.uint8))

    def upload(files, **kw):
        return client.post("/v1/datasets/dice/images", data={"category": "1"}, files=files, **kw)

    corrupt = bytearray(good)
    corrupt[40:60] = b"\x00" * 20
    jpeg = io.BytesIO()
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(jpeg, format="JPEG")
    huge = _png_header_only(20000, 20000)
    cases = [
        ("corrupt PNG", upload([("files", ("a.png", bytes(corrupt), "image/png"))])),
        ("truncated JPEG", upload([("files", ("a.jpg", jpeg.getvalue()[: len(jpeg.getvalue()) // 2], "image/jpeg"))])),
        ("20000x20000 image", upload([("files", ("big.png", huge, "image/png"))])),
        ("wrong content type", client.post("/v1/datasets/dice/images", content=good,
                                           headers={"Content-Type": "image/png"})),
        ("../ in a dataset name", client.post("/v1/datasets", json={"name": "../evil", "width": 8, "height": 8,
                                                                    "channels": 1})),
        ("../ in a category", client.post("/v1/datasets/dice/images", data={"category": "../x"},
                                          files=[("files", ("a.png", good, "image/png"))])),
        ("unknown dataset", client.post("/v1/jobs", json={"kind": "train", "dataset": "nope", "genome": DEMO_GENOME})),
        ("invalid genome", client.post("/v1/jobs", json={"kind": "train", "dataset": "dice",
                                                         "genome": {**DEMO_GENOME, "layers": [{"type": "dense", "size": -3}]}})),
        ("oversized epochs", client.post("/v1/jobs", json={"kind": "train", "dataset": "dice", "genome": DEMO_GENOME,
                                                           "params": {"epochs": 10**6}})),
        ("oversized body", client.post("/v1/datasets/dice/images", content=b"x" * (65 << 20),
                                       headers={"Content-Type": "application/json"})),
    ]
    for what, r in cases:
        assert 400 <= r.status_code < 500, (what, r.status_code, r.text)
        body = r.json()
        assert body["error"], what
    statuses = {what: r.status_code for what, r in cases}
    assert statuses["wrong content type"] == 415
    assert statuses["oversized body"] == 413
    assert statuses["unknown dataset"] == 404
    assert "layers[0].size" in dict(cases)["invalid genome"].json()["error"]
    assert client.get("/v1/datasets/dice").json() == before
    assert len(client.get("/v1/jobs", params={"limit": 1000}).json()["items"]) == jobs_before
    assert not (server.home / "datasets" / ".." / "evil").exists()


def test_auth_and_open_routes(service):
    server, _, _ = service

    assert httpx.get(server.url + "/v1/jobs").status_code == 401
    assert httpx.get(server.url + "/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(server.url + "/v1/jobs", headers={"API-ACCESS-KEY": KEY}).status_code == 200
    for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"):
        assert httpx.get(server.url + path).status_code == 200, path
    metrics = httpx.get(server.url + "/metrics").text
    for name in ("dicebox_jobs{", "dicebox_queue_depth_total", "dicebox_training_samples_per_second",
                 "dicebox_classify_latency_seconds"):
        assert name in metrics, name
    assert KEY not in server.output()


def test_priorities_and_server_restart_lose_nothing(tmp_path):
    """Jobs queued with priorities run highest first; a server killed with queued and running
    jobs comes back with all of them, and every job ends succeeded."""
    server = Server(tmp_path, api_key=KEY)
    client = server.client()
    upload_dice(client, "dice", 600, multipart=False)
    genome = {"optimizer": {"name": "adam", "learning_rate": 0.002},
              "layers": [{"type": "dense", "size": 64, "activation": "relu"}]}
    low = [submit(client, kind="train", dataset="dice", genome=genome, params={"epochs": 8, "patience": 0},
                  priority=-1) for _ in range(2)]
    high = submit(client, kind="train", dataset="dice", genome=genome, params={"epochs": 8, "patience": 0},
                  priority=5)
    processor = Processor(server, "solo")
    try:
        wait_for(lambda: client.get(f"/v1/jobs/{high}").json()["history"], 120, 0.05, "the first epoch")
        assert all(client.get(f"/v1/jobs/{j}").json()["status"] == "queued" for j in low)
        server.signal(signal.SIGKILL)
        server.proc.wait()
        client.close()
        server = Server(tmp_path, api_key=KEY, port=server.port)
        client = server.client()
        jobs = [wait_job(client, j, timeout=300) for j in [high, *low]]
        assert [j["status"] for j in jobs] == ["succeeded"] * 3, [j["error"] for j in jobs]
        started = [j["started_at"] for j in jobs]
        assert started[0] < started[1] and started[0] < started[2]
        models = client.get("/v1/models", params={"dataset": "dice", "limit": 100}).json()["items"]
        assert sorted(m["job_id"] for m in models) == sorted([high, *low])
    finally:
        processor.stop()
        client.close()
        server.stop()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, with a tiny (invalid-length) image body:
    a server must refuse it from the header, before trying to allocate the pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def test_serve_with_local_workers_runs_jobs_and_stops_them(tmp_path):
    """``dicebox serve --workers 2``: the processors start with the server, take its jobs, and
    go away with it."""
    server = Server(tmp_path, workers=2)
    client = server.client()
    try:
        upload_dice(client, "dice", 120, multipart=False)
        genome = {"optimizer": {"name": "adam", "learning_rate": 0.01},
                  "layers": [{"type": "dense", "size": 16, "activation": "relu"}]}
        jobs = [submit(client, kind="train", dataset="dice", genome=genome, params={"epochs": 1})
                for _ in range(4)]
        finished = [wait_job(client, j, timeout=120) for j in jobs]
        assert [j["status"] for j in finished] == ["succeeded"] * 4
        owners = {e["data"]["owner"] for j in jobs for e in read_sse(client, f"/v1/jobs/{j}/events")
                  if e.get("event") == "status" and e["data"]["status"] == "running"}
        assert owners and all(":local" in o for o in owners), owners
        children = _children(server.proc.pid)
        assert len(children) == 2
    finally:
        client.close()
        server.stop()
    assert all(not Path(f"/proc/{pid}").exists() for pid in children)


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out
