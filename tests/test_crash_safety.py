"""Crash safety of the data: a server killed with SIGKILL while images are appended or a model
is registered, a processor killed while it writes its checkpoint, and full or read-only disks.

After every crash each dataset and model is whole (an image or a model is entirely in or not
at all, nothing acknowledged is lost, nothing is duplicated) and the service carries on. A
full disk answers 507 and a read-only one 503, with a JSON error naming the problem (Python
callers get a StorageError, an OSError naming the file), and nothing changes.

Kills come at named points inside the stores and the processor (``DICEBOX_CRASH_AT``, see
dicebox.faults) and at seeded random moments; model uploads are made the way a processor
makes them, through the worker routes under a claimed job. Full disks are real: a small
tmpfs mounted for the test. Read-only folders are read-only bind mounts, because chmod does
not stop root. Mounting needs root (CAP_SYS_ADMIN), which CI has; elsewhere those two tests
are skipped, in CI they fail.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import struct
import subprocess
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import sqlalchemy.exc
from fastapi.testclient import TestClient
from servers import Processor, Server, b64_png, png_bytes, read_sse, upload_dice, wait_for, wait_job

import dicebox
from dicebox.db import make_engine, storage_errno
from dicebox.errors import StorageError
from dicebox.registry import ModelRegistry
from dicebox.server import create_app
from dicebox.settings import Settings

KEY = "crash-safety-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SIDE = 8  # images are SIDE x SIDE grey: 64 bytes, the first four of which are the image's id
PIXELS = SIDE * SIDE
CATEGORIES = ("red", "green", "blue")
DATASETS = ("alpha", "beta")
BATCH = 6
UPLOADERS_PER_DATASET = 2
SIGKILLED = -9
TINY = {"optimizer": {"name": "sgd", "learning_rate": 0.05},
        "layers": [{"type": "dense", "size": 8, "activation": "relu"}]}
# About a tenth of a second per epoch on one thread (as in test_processor.py).
LIGHT = {"optimizer": {"name": "adam", "learning_rate": 0.005},
         "layers": [{"type": "conv2d", "filters": 16, "kernel": [3, 3], "padding": "same", "activation": "relu"},
                    {"type": "maxpool2d", "kernel": [2, 2]},
                    {"type": "dense", "size": 32, "activation": "relu"}]}


# ---------------------------------------------------------------------------------------------
# identifiable images: each one's pixels are a function of its id, which its first bytes hold

def image_of(uid: int) -> np.ndarray:
    pixels = np.random.default_rng(uid).integers(0, 256, PIXELS, dtype=np.uint8)
    pixels[:4] = np.frombuffer(struct.pack("<I", uid), dtype=np.uint8)
    return pixels.reshape(1, SIDE, SIDE)


def category_of(uid: int) -> str:
    return CATEGORIES[uid % len(CATEGORIES)]


def uid_of(pixels: np.ndarray) -> int:
    return struct.unpack("<I", pixels.reshape(-1)[:4].tobytes())[0]


def items_of(uids) -> list[dict]:
    return [{"category": category_of(u), "data": b64_png(image_of(u))} for u in uids]


@dataclass
class Batch:
    dataset: str
    uids: list[int]
    # "acked" (200), "unsent" (the connection was refused: certainly not stored), "unknown"
    # (the server died with the request in flight: stored whole or not at all)
    outcome: str


class Uploader(threading.Thread):
    """Appends batches of new images to one dataset in a loop until ``stop`` is set,
    recording what became of each."""

    def __init__(self, url: str, dataset: str, first_uid: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.url, self.dataset, self.next_uid, self.stop = url, dataset, first_uid, stop
        self.batches: list[Batch] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.url, headers=AUTH, timeout=60) as http:
            while not self.stop.is_set():
                uids = list(range(self.next_uid, self.next_uid + BATCH))
                self.next_uid += BATCH
                try:
                    r = http.post(f"/v1/datasets/{self.dataset}/images", json={"items": items_of(uids)})
                    outcome = "acked" if r.status_code == 200 else f"refused {r.status_code}: {r.text}"
                except httpx.ConnectError:
                    outcome = "unsent"
                except httpx.TransportError:
                    outcome = "unknown"
                self.batches.append(Batch(self.dataset, uids, outcome))
                if outcome != "acked":
                    self.stop.wait(0.05)


def sigkilled(process, timeout: float = 180.0) -> None:
    """Waits for ``process`` (a servers.Process) to die and checks that SIGKILL ended it."""
    process.proc.wait(timeout)
    assert process.proc.returncode == SIGKILLED, process.output()


def dataset_files(home: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    folder = home / "datasets" / name
    return (np.fromfile(folder / "pixels.u8", dtype=np.uint8),
            np.fromfile(folder / "labels.i64", dtype="<i8"))


def check_datasets(server: Server, http: httpx.Client, batches: list[Batch],
                   scratch: Path) -> tuple[dict[str, int], set[int]]:
    """Every dataset is consistent with its row and with what the uploaders were told.
    Returns the bytes past the committed count per dataset (left by a crash) and the ids of
    the stored images."""
    tails, stored = {}, set()
    for name in DATASETS:
        info = http.get(f"/v1/datasets/{name}").json()
        count, categories = info["count"], [c["name"] for c in info["categories"]]
        pixels, labels = dataset_files(server.home, name)
        assert pixels.size >= count * PIXELS and labels.size >= count, \
            f"{name}: the files hold fewer than the {count} committed images"
        tails[name] = pixels.size - count * PIXELS + (labels.size - count) * 8
        images, labels = pixels[:count * PIXELS].reshape(count, PIXELS), labels[:count]

        if count:  # (an empty dataset has no categories yet, nothing to export)
            r = http.get(f"/v1/datasets/{name}/export")
            assert r.status_code == 200, r.text
            path = scratch / f"{name}-{count}.dbx"
            path.write_bytes(r.content)
            exported = dicebox.Dataset.load(path)
            assert len(exported) == count and exported.categories == categories
            assert np.array_equal(exported.images.reshape(count, PIXELS), images)
            assert np.array_equal(exported.labels, labels)

        uids = [uid_of(row) for row in images]
        for index, (row, uid, label) in enumerate(zip(images, uids, labels)):
            assert np.array_equal(row, image_of(uid).reshape(-1)), f"{name}: image {index} is torn"
            assert categories[label] == category_of(uid), f"{name}: image {index} has a wrong label"
        assert len(set(uids)) == count, f"{name}: duplicated images"
        assert Counter(category_of(u) for u in uids) == Counter({c: n for c, n in info["counts"].items() if n})

        position = {uid: index for index, uid in enumerate(uids)}
        accounted = 0
        for batch in (b for b in batches if b.dataset == name):
            where = [position.get(u) for u in batch.uids]
            present = [w is not None for w in where]
            if batch.outcome == "acked":
                assert all(present), f"{name}: acknowledged images {batch.uids} are missing"
            elif batch.outcome == "unsent":
                assert not any(present), f"{name}: images {batch.uids} that never arrived are stored"
            else:
                assert batch.outcome == "unknown", batch.outcome
                assert all(present) or not any(present), f"{name}: batch {batch.uids} is half stored"
            if all(present):
                assert where == list(range(where[0], where[0] + len(where))), "a batch is not contiguous"
                accounted += len(where)
        assert accounted == count, f"{name}: images nobody sent"
        stored.update(uids)
    return tails, stored


def test_server_killed_during_appends_keeps_every_image_whole(tmp_path):
    """Rounds of concurrent uploads to two datasets, each ended by SIGKILL: at the point
    between the fsync of the files and the commit of the count, at the point between the
    commit and the answer, and at seeded random moments."""
    home = tmp_path / "home"
    home.mkdir()
    rng = random.Random(20261206)
    rounds = [{"DICEBOX_CRASH_AT": "sensory.files_written@4"},
              {"DICEBOX_CRASH_AT": "sensory.committed@5"},
              *({"delay": rng.uniform(0.3, 1.5)} for _ in range(3))]
    batches: list[Batch] = []
    seen_tail = False
    for number, plan in enumerate(rounds):
        env = {k: v for k, v in plan.items() if k.startswith("DICEBOX_")}
        server = Server(home, api_key=KEY, extra_env=env)
        http = server.client()
        try:
            for name in DATASETS:
                r = http.post("/v1/datasets", json={"name": name, "width": SIDE, "height": SIDE, "channels": 1})
                assert r.status_code in (200, 201), r.text
            tails, _ = check_datasets(server, http, batches, tmp_path)  # after the previous crash
            seen_tail |= any(tails.values())
            stop = threading.Event()
            uploaders = [Uploader(server.url, name, (number * 10 + i) * 100_000 + 1, stop)
                         for i, name in enumerate(DATASETS * UPLOADERS_PER_DATASET)]
            for uploader in uploaders:
                uploader.start()
            if "delay" in plan:
                wait_for(lambda group=uploaders: sum(len(u.batches) for u in group) >= 2, 60, 0.01,
                         "the first appends")
                stop.wait(plan["delay"])
                server.proc.kill()
            sigkilled(server)
            stop.set()
            for uploader in uploaders:
                uploader.join(60)
                assert not uploader.is_alive()
                batches.extend(uploader.batches)
            refused = [b.outcome for b in batches if b.outcome.startswith("refused")]
            assert not refused, refused
        finally:
            http.close()
            server.stop()
    # The first round died with images fsynced past the committed count; the second after
    # committing a batch it never acknowledged.
    server = Server(home, api_key=KEY)
    http = server.client()
    try:
        tails, stored = check_datasets(server, http, batches, tmp_path)
        seen_tail |= any(tails.values())
        assert seen_tail, "no round left bytes past the committed count"
        second_round = [b for b in batches if b.uids[0] // 100_000 in range(10, 20)]
        assert any(b.outcome == "unknown" and b.uids[0] in stored for b in second_round), \
            "the commit-then-die round stored no unanswered batch"
        assert sum(b.outcome == "acked" for b in batches) >= len(rounds)
        unanswered_stored = sum(b.outcome == "unknown" and b.uids[0] in stored for b in batches)
        print(f"batches: {Counter(b.outcome for b in batches)}; unanswered but stored: {unanswered_stored}")

        # Appends go on where the committed data ends: the torn tail is overwritten and the
        # files end exactly at the new count.
        for i, name in enumerate(DATASETS):
            uids = list(range(9_000_000 + i * 1000, 9_000_000 + i * 1000 + BATCH))
            r = http.post(f"/v1/datasets/{name}/images", json={"items": items_of(uids)})
            assert r.status_code == 200, r.text
            batches.append(Batch(name, uids, "acked"))
            pixels, labels = dataset_files(home, name)
            assert pixels.size == r.json()["count"] * PIXELS and labels.size == r.json()["count"]
        assert not any(check_datasets(server, http, batches, tmp_path)[0].values())
    finally:
        http.close()
        server.stop()


# ---------------------------------------------------------------------------------------------
# model registration

def trained_model(http: httpx.Client, dataset: str, directory: Path) -> Path:
    """A small model trained here on the dataset's export, saved in ``directory``."""
    r = http.get(f"/v1/datasets/{dataset}/export")
    assert r.status_code == 200, r.text
    (directory.parent / "export.dbx").write_bytes(r.content)
    data = dicebox.Dataset.load(directory.parent / "export.dbx")
    return dicebox.train(TINY, data, epochs=1, threads=1).save(directory)


def claimed_job(http: httpx.Client, dataset: str, worker: str) -> str:
    r = http.post("/v1/jobs", json={"kind": "train", "dataset": dataset, "genome": TINY, "params": {"epochs": 1}})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    r = http.post("/v1/worker/claim", json={"worker": worker, "wait": 10})
    assert r.status_code == 200 and r.json()["job"]["id"] == job_id, r.text
    return job_id


def upload_model(http, job_id: str, worker: str, model_dir: Path) -> httpx.Response:
    files = {"weights": ("weights.safetensors", (model_dir / "weights.safetensors").read_bytes(),
                         "application/octet-stream"),
             "model": ("model.json", (model_dir / "model.json").read_bytes(), "application/json")}
    return http.post(f"/v1/worker/jobs/{job_id}/model", params={"worker": worker}, files=files)


def check_models(home: Path, http: httpx.Client) -> list[dict]:
    """Every listed model has its files in place, loads, and classifies."""
    items = http.get("/v1/models", params={"limit": 1000}).json()["items"]
    probe = [("files", ("probe.png", png_bytes(image_of(7)), "image/png"))]
    for item in items:
        directory = home / "models" / item["id"]
        weights = (directory / "weights.safetensors").read_bytes()
        assert hashlib.sha256(weights).hexdigest() == item["weights_sha256"]
        assert dicebox.Model.load(directory).categories == item["categories"]
        r = http.post(f"/v1/models/{item['id']}/classify", files=probe)
        assert r.status_code == 200 and len(r.json()["predictions"]) == 1, r.text
    return items


def test_server_killed_while_registering_a_model_leaves_it_whole_or_absent(tmp_path):
    """SIGKILL with the files written but not in place, in place without their row, and with
    the row committed but unanswered; after each restart the processor's upload is repeated."""
    home = tmp_path / "home"
    home.mkdir()
    worker = "uploader"
    lease = {"DICEBOX_LEASE_SECONDS": "600"}  # the claim outlives the restarts
    server = Server(home, api_key=KEY, extra_env=lease)
    with server.client() as http:
        r = http.post("/v1/datasets", json={"name": "shapes", "width": SIDE, "height": SIDE, "channels": 1})
        assert r.status_code == 201, r.text
        assert http.post("/v1/datasets/shapes/images", json={"items": items_of(range(1, 61))}).status_code == 200
        model_dir = trained_model(http, "shapes", tmp_path / "model")
    server.stop()

    registered: dict[str, str] = {}
    for point in ("registry.files_written", "registry.renamed", "registry.committed"):
        server = Server(home, api_key=KEY, extra_env={**lease, "DICEBOX_CRASH_AT": point})
        with server.client() as http:
            job_id = claimed_job(http, "shapes", worker)
            with pytest.raises(httpx.TransportError):
                upload_model(http, job_id, worker, model_dir)
        sigkilled(server)
        server.stop()

        server = Server(home, api_key=KEY, extra_env=lease)
        try:
            with server.client() as http:
                before = [m for m in check_models(home, http) if m["job_id"] == job_id]
                assert len(before) == (point == "registry.committed"), (point, before)
                r = upload_model(http, job_id, worker, model_dir)  # the processor's retry
                assert r.status_code == 200, r.text
                if before:
                    assert r.json()["model_id"] == before[0]["id"], "a second model for one job"
                after = [m for m in check_models(home, http) if m["job_id"] == job_id]
                assert [m["id"] for m in after] == [r.json()["model_id"]]
                registered[job_id] = r.json()["model_id"]
        finally:
            server.stop()

    # What the first two crashes left (a temporary directory, a directory without a row) is
    # never listed; clean-up removes exactly that and keeps every registered model.
    leftovers = {p.name for p in (home / "models").iterdir()} - set(registered.values())
    assert any(n.startswith(".tmp-") for n in leftovers) and any(not n.startswith(".") for n in leftovers)
    engine = make_engine(f"sqlite:///{home / 'dicebox.db'}")
    try:
        registry = ModelRegistry(engine, home / "models", cleanup=False)
        assert set(registry.cleanup(older_than=0)) == leftovers
        assert {p.name for p in (home / "models").iterdir()} == set(registered.values())
        for model_id in registered.values():
            registry.load(model_id)
    finally:
        engine.dispose()


def test_server_killed_at_random_while_a_processor_trains_and_uploads(tmp_path):
    """A real processor runs short jobs (a checkpoint upload per epoch, a model upload per
    job) while the server dies, first in the middle of registering the second model (files in
    place, no row yet), then twice at seeded random moments; each time it is restarted on its
    port. Every job ends succeeded with exactly one whole model."""
    home = tmp_path / "home"
    home.mkdir()
    rng = random.Random(4242)
    server = Server(home, api_key=KEY, extra_env={"DICEBOX_CRASH_AT": "registry.renamed@2"})
    port = server.port
    with server.client() as http:
        upload_dice(http, "dice", 300)
        jobs = []
        for seed in range(6):
            r = http.post("/v1/jobs", json={"kind": "train", "dataset": "dice", "genome": LIGHT,
                                            "params": {"epochs": 20, "patience": 0, "batch_size": 16, "seed": seed}})
            assert r.status_code == 202, r.text
            jobs.append(r.json()["id"])
    worker = Processor(server, "steady")
    try:
        for delay in (None, rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0)):
            if delay is not None:
                time.sleep(delay)
                server.proc.kill()
            sigkilled(server)
            server.stop()
            server = Server(home, api_key=KEY, port=port)
        with server.client() as http:
            for job_id in jobs:
                job = wait_job(http, job_id, 300)
                assert job["status"] == "succeeded", job["error"]
            models = check_models(home, http)
            assert sorted(m["job_id"] for m in models) == sorted(jobs)
            assert {m["id"] for m in models} == {wait_job(http, j)["result"]["model_id"] for j in jobs}
        assert re.search(r"server unreachable \(POST \S+/model: ", worker.output()), \
            "the processor did not see the server die under its model upload"
    finally:
        worker.stop()
        server.stop()


# ---------------------------------------------------------------------------------------------
# processor checkpoints

def checkpoint_epoch(path: Path) -> int:
    """The epochs a trainer checkpoint holds (from its safetensors header)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return json.loads(header["__metadata__"]["dicebox"])["epoch"]


def first_epoch_by_attempt(http: httpx.Client, job_id: str) -> dict[int, int]:
    firsts: dict[int, int] = {}
    for event in read_sse(http, f"/v1/jobs/{job_id}/events"):
        if event.get("event") == "epoch":
            firsts.setdefault(event["data"]["attempt"], event["data"]["epoch"])
    return firsts


def test_processor_killed_around_its_checkpoint_resumes_from_the_last_whole_one(tmp_path):
    """Processors killed after the trainer wrote a checkpoint (before it is uploaded), after
    the upload (before the epoch is reported), and at a random moment; torn leftovers of
    both copies of the checkpoint are planted. Each next attempt resumes right after the
    last checkpoint the server holds whole; a torn stored checkpoint means starting over."""
    home = tmp_path / "home"
    home.mkdir()
    server = Server(home, api_key=KEY, extra_env={"DICEBOX_LEASE_SECONDS": "2"})
    http = server.client()
    started: list[Processor] = []

    def processor(name: str, crash_at: str | None = None) -> Processor:
        started.append(Processor(server, name, extra_env={"DICEBOX_CRASH_AT": crash_at} if crash_at else {}))
        return started[-1]

    def submit(epochs: int) -> str:
        r = http.post("/v1/jobs", json={"kind": "train", "dataset": "dice", "genome": LIGHT,
                                        "params": {"epochs": epochs, "batch_size": 16, "patience": 0, "seed": 1}})
        assert r.status_code == 202, r.text
        return r.json()["id"]

    try:
        upload_dice(http, "dice", 300)
        job_id = submit(epochs=6)
        stored = home / "checkpoints" / job_id / "checkpoint.safetensors"

        # 1. Killed after the trainer wrote epoch 3's checkpoint, before uploading it: the
        # server keeps epoch 2's, whole. Leftovers of torn writes are planted beside both
        # copies: the server's half-received upload, the core's half-written temporary file.
        first = processor("first", "processor.checkpoint_written@3")
        sigkilled(first)
        assert checkpoint_epoch(stored) == 2
        whole = stored.read_bytes()
        (stored.parent / ".checkpoint.safetensors.0123abcd.tmp").write_bytes(whole[: len(whole) // 2])
        [dead_workdir] = (home / "cache" / "work").glob(f"*-{first.proc.pid}-*")
        (dead_workdir / "checkpoint" / "checkpoint.safetensors.Xy12Zw.tmp").write_bytes(whole[:100])

        # 2. Killed after uploading its second checkpoint (epoch 4), before reporting it.
        second = processor("second", "processor.checkpoint_uploaded@2")
        sigkilled(second)
        assert not dead_workdir.exists(), "the dead processor's working directory was not swept"
        assert checkpoint_epoch(stored) == 4

        # 3. Runs to the end from epoch 4's checkpoint.
        processor("third")
        job = wait_job(http, job_id, 300)
        assert job["status"] == "succeeded", job["error"]
        assert job["attempts"] == 3
        assert [e["epoch"] for e in job["result"]["history"]] == [1, 2, 3, 4, 5, 6]
        assert first_epoch_by_attempt(http, job_id) == {1: 1, 2: 3, 3: 5}
        check_models(home, http)

        # 4. Killed at a seeded random moment after its first epoch: the next attempt starts
        # right after whichever checkpoint was stored last.
        job_id = submit(epochs=12)  # far from done when the kill comes
        stored = home / "checkpoints" / job_id / "checkpoint.safetensors"
        wait_for(lambda: http.get(f"/v1/jobs/{job_id}").json()["history"], 180, 0.02, "a first epoch")
        time.sleep(random.Random(7).uniform(0.0, 0.5))
        started[-1].proc.kill()
        sigkilled(started[-1])
        # A checkpoint upload the server had wholly received is still stored after the
        # processor died; give it a moment before reading what the heir will resume from.
        time.sleep(1.0)
        at_kill = checkpoint_epoch(stored)
        processor("fourth")
        job = wait_job(http, job_id, 300)
        assert job["status"] == "succeeded", job["error"]
        assert first_epoch_by_attempt(http, job_id)[2] == at_kill + 1
        assert [e["epoch"] for e in job["result"]["history"]] == list(range(1, 13))
        started[-1].stop()

        # 5. A torn stored checkpoint (what a non-atomic writer or a lost tail leaves) is
        # refused, and the job starts over instead of failing on every attempt.
        job_id = submit(epochs=3)
        stored = home / "checkpoints" / job_id / "checkpoint.safetensors"
        stored.parent.mkdir(parents=True)
        stored.write_bytes(whole[: len(whole) - 1000])  # a whole header, its tensors cut short
        last = processor("fifth")
        job = wait_job(http, job_id, 300)
        assert job["status"] == "succeeded" and job["attempts"] == 1, job["error"]
        assert first_epoch_by_attempt(http, job_id) == {1: 1}
        assert "the stored checkpoint is unreadable or does not fit this run" in last.output()
    finally:
        for p in started:
            p.stop()
        http.close()
        server.stop()


# ---------------------------------------------------------------------------------------------
# full and read-only disks (real mounts)

def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, capture_output=True, text=True)


def _can_mount() -> bool:
    probe = Path(tempfile.mkdtemp(prefix="dicebox-mount-probe-"))
    try:
        if _run("mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)).returncode != 0:
            return False
        _run("umount", str(probe))
        return True
    except FileNotFoundError:
        return False
    finally:
        probe.rmdir()


needs_mounts = pytest.mark.skipif(
    os.environ.get("CI") != "true" and not _can_mount(),
    reason="mounting a tmpfs or a read-only bind mount needs root (CAP_SYS_ADMIN)")


@contextmanager
def small_disk(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    done = _run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    assert done.returncode == 0, f"cannot mount a tmpfs: {done.stderr}"
    try:
        yield path
    finally:
        _run("umount", "--lazy", str(path))


@contextmanager
def read_only(*paths: Path):
    mounted = []
    try:
        for path in paths:
            for cmd in (("mount", "--bind", str(path), str(path)),
                        ("mount", "-o", "remount,bind,ro", str(path))):
                done = _run(*cmd)
                assert done.returncode == 0, f"{' '.join(cmd)}: {done.stderr}"
            mounted.append(path)
        yield
    finally:
        for path in reversed(mounted):
            _run("umount", "--lazy", str(path))


def fill(directory: Path) -> Path:
    """A file that takes every free byte of ``directory``'s filesystem."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for chunk in (1 << 20, 1 << 12, 1):
            data = b"\xff" * chunk
            try:
                while True:
                    os.write(fd, data)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)
    return filler


def rgb_items(start: int, count: int) -> list[dict]:
    rng = np.random.default_rng(start)
    return [{"category": CATEGORIES[i % 3], "data": b64_png(rng.integers(0, 256, (3, 32, 32), dtype=np.uint8))}
            for i in range(count)]


def snapshot(home: Path, http) -> dict:
    """What must not change when a write is refused: the row, the files, the directories."""
    folder = home / "datasets" / "d"
    return {"dataset": http.get("/v1/datasets/d").json(),
            "pixels": (folder / "pixels.u8").read_bytes(), "labels": (folder / "labels.i64").read_bytes(),
            "exports": sorted(p.name for p in (folder / "exports").iterdir()),
            "models": sorted(p.name for p in (home / "models").iterdir()),
            "model rows": http.get("/v1/models").json()["items"],
            # Files only: a refused checkpoint may leave its job's (empty) directory behind.
            "checkpoints": sorted(str(p.relative_to(home)) for p in (home / "checkpoints").rglob("*")
                                  if p.is_file())}


@contextmanager
def storage_service(home: Path, scratch: Path):
    """An in-process server on ``home`` with dataset "d" (32 x 32 RGB) at version 30 of which
    version 20 is exported, a claimed job, and a trained model to upload for it."""
    with TestClient(create_app(Settings(home=home, api_key=KEY)), headers=AUTH) as http:
        r = http.post("/v1/datasets", json={"name": "d", "width": 32, "height": 32, "channels": 3})
        assert r.status_code == 201, r.text
        assert http.post("/v1/datasets/d/images", json={"items": rgb_items(0, 20)}).status_code == 200
        model_dir = trained_model(http, "d", scratch / "model")
        assert http.post("/v1/datasets/d/images", json={"items": rgb_items(20, 10)}).status_code == 200
        job_id = claimed_job(http, "d", "w")
        (home / "checkpoints" / "local").mkdir(parents=True)
        yield http, job_id, model_dir


def refused_writes(http, home: Path, job_id: str, model_dir: Path, status: int, reason: str) -> None:
    """Every kind of write answers ``status`` with ``reason`` in its JSON error and changes
    nothing; Python callers get a StorageError naming the file."""
    services = http.app.state.services
    before = snapshot(home, http)

    def refused(r: httpx.Response) -> None:
        assert r.status_code == status, r.text
        body = r.json()
        assert reason in body["error"] and body["detail"]["errno"], body
        assert str(home) not in r.text, "the answer shows the server's paths"

    refused(http.post("/v1/datasets/d/images", json={"items": rgb_items(100, 10)}))
    refused(http.get("/v1/datasets/d/export", params={"version": 30}))
    refused(upload_model(http, job_id, "w", model_dir))
    refused(http.put(f"/v1/worker/jobs/{job_id}/checkpoint", params={"worker": "w"}, content=b"\1" * (256 << 10)))
    assert http.get("/v1/datasets/d/export", params={"version": 20}).status_code == 200  # built before
    assert snapshot(home, http) == before

    images = np.zeros((10, 3, 32, 32), dtype=np.uint8)
    with pytest.raises(StorageError) as raised:
        services.sensory.add_arrays("d", images, ["red"] * 10)
    assert isinstance(raised.value, OSError) and raised.value.status == status
    assert raised.value.filename.endswith("pixels.u8") and raised.value.filename in str(raised.value)
    with pytest.raises(StorageError) as raised:
        services.registry.register(None, model_dir, dataset="d")
    assert isinstance(raised.value, OSError) and raised.value.filename.startswith(str(home / "models"))
    # The core's atomic writer: the error names the checkpoint, no file is left.
    data = dicebox.Dataset.load(services.sensory.export("d", 20)["path"])
    with pytest.raises(OSError, match=rf"{home / 'checkpoints' / 'local'}.*{reason}"):
        dicebox.train(TINY, data, epochs=1, threads=1, checkpoint_dir=home / "checkpoints" / "local")
    assert snapshot(home, http) == before


def accepted_writes(http, job_id: str, model_dir: Path) -> None:
    """Once there is room again, every write works."""
    r = http.post("/v1/datasets/d/images", json={"items": rgb_items(100, 10)})
    assert r.status_code == 200 and r.json()["count"] == 40, r.text
    assert http.get("/v1/datasets/d/export", params={"version": 40}).status_code == 200
    assert upload_model(http, job_id, "w", model_dir).status_code == 200
    r = http.put(f"/v1/worker/jobs/{job_id}/checkpoint", params={"worker": "w"}, content=b"\1" * (256 << 10))
    assert r.status_code == 200, r.text


@needs_mounts
def test_a_full_disk_answers_507_and_changes_nothing(tmp_path):
    with small_disk(tmp_path / "home", "24m") as home, \
            storage_service(home, tmp_path) as (http, job_id, model_dir):
        filler = fill(home)
        try:
            refused_writes(http, home, job_id, model_dir, 507, "No space left on device")
        finally:
            filler.unlink()
        accepted_writes(http, job_id, model_dir)


@needs_mounts
def test_unwritable_storage_answers_503_and_changes_nothing(tmp_path):
    home = tmp_path / "home"
    with storage_service(home, tmp_path) as (http, job_id, model_dir):
        with read_only(home / "datasets", home / "models", home / "checkpoints"):
            refused_writes(http, home, job_id, model_dir, 503, "Read-only file system")
            r = http.post("/v1/datasets", json={"name": "e", "width": 8, "height": 8, "channels": 1})
            assert r.status_code == 503, r.text
            assert http.get("/v1/datasets/e").status_code == 404
        accepted_writes(http, job_id, model_dir)


def test_a_full_database_is_recognised_as_a_full_disk(tmp_path):
    """SQLite's own "database or disk is full" (here from a page limit) maps to ENOSPC, so
    the server answers 507 for it too; other database errors are not storage errors."""
    engine = make_engine(f"sqlite:///{tmp_path / 'small.db'}")
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql("CREATE TABLE t (blob BLOB)")
            connection.exec_driver_sql("PRAGMA max_page_count = 8")
            with pytest.raises(sqlalchemy.exc.OperationalError) as raised:
                for _ in range(100):
                    connection.exec_driver_sql("INSERT INTO t VALUES (zeroblob(4096))")
            assert storage_errno(raised.value) == errno.ENOSPC
            with pytest.raises(sqlalchemy.exc.OperationalError) as raised:
                connection.exec_driver_sql("SELECT * FROM missing_table")
            assert storage_errno(raised.value) is None
    finally:
        engine.dispose()
