"""Processors end to end: a real server process (uvicorn on a loopback port) and real
``python -m dicebox.processor`` processes. A job trains with per-epoch events, history and a
model; the dataset export is cached by ETag; warm starts (init, LOAD_BEST_WEIGHTS_ON_START);
a processor killed mid-job leaves the job to another, which resumes from the checkpoint;
cancel stops a job within one epoch; SIGTERM hands the job back; a missing server or broker
never crashes a processor. RabbitMQ mode end to end is in test_rabbitmq.py."""

from __future__ import annotations

import signal
import subprocess
import sys

import numpy as np
import pytest
from servers import (
    Process,
    Processor,
    Server,
    base_env,
    free_port,
    png_bytes,
    read_sse,
    wait_for,
    wait_job,
)

import dicebox

KEY = "processor-test-key"
SIZE = 16
COUNT = 600
LEASE_SECONDS = 2  # short, so a killed processor's job is taken up again soon
# Fast: about a tenth of a second per epoch on one thread.
LIGHT = {"optimizer": {"name": "adam", "learning_rate": 0.005},
         "layers": [{"type": "conv2d", "filters": 16, "kernel": [3, 3], "padding": "same", "activation": "relu"},
                    {"type": "maxpool2d", "kernel": [2, 2]},
                    {"type": "dense", "size": 32, "activation": "relu"}]}
# Slow: about a second per epoch on one thread, so a test can act between two epochs.
HEAVY = {"optimizer": {"name": "adam", "learning_rate": 0.005},
         "layers": [{"type": "conv2d", "filters": 64, "kernel": [3, 3], "padding": "same", "activation": "relu"},
                    {"type": "conv2d", "filters": 64, "kernel": [3, 3], "padding": "same", "activation": "relu"},
                    {"type": "maxpool2d", "kernel": [2, 2]},
                    {"type": "dense", "size": 64, "activation": "relu"}]}
PARAMS = {"batch_size": 16, "patience": 0, "seed": 1}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("processor-e2e")
    server = Server(home, api_key=KEY, extra_env={"DICEBOX_LEASE_SECONDS": str(LEASE_SECONDS)})
    client = server.client()
    r = client.post("/v1/datasets", json={"name": "dice", "width": SIZE, "height": SIZE, "channels": 1})
    assert r.status_code in (200, 201), r.text
    dice = dicebox.datasets.make_dice(count=COUNT, size=SIZE, seed=0)
    for c, category in enumerate(dice.categories):
        files = [("files", (f"{i}.png", png_bytes(dice.images[i]), "image/png"))
                 for i in np.flatnonzero(dice.labels == c)]
        r = client.post("/v1/datasets/dice/images", data={"category": category}, files=files)
        assert r.status_code == 200, r.text
    assert client.get("/v1/datasets/dice").json()["count"] == COUNT
    server.http = client
    yield server
    client.close()
    server.stop()


@pytest.fixture
def processors(server):
    """Start processors with ``processors(name, **env)``; all are stopped after the test. Their
    logs are printed (pytest shows them when the test failed)."""
    started: list[Processor] = []

    def start(name: str, **env: str) -> Processor:
        started.append(Processor(server, name, threads=1, extra_env=env))
        return started[-1]

    yield start
    for p in started:
        p.stop()
        print(f"--- {p.log.name}\n{p.log.read_text(errors='replace')}")


def submit(server, genome, epochs, **extra) -> str:
    body = {"kind": "train", "dataset": "dice", "genome": genome, "params": {**PARAMS, "epochs": epochs}, **extra}
    r = server.http.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def epoch_events(server, job_id) -> list[dict]:
    return [e["data"] for e in read_sse(server.http, f"/v1/jobs/{job_id}/events") if e["event"] == "epoch"]


def wait_running_epoch(server, job_id) -> dict:
    """Until the job has reported an epoch (its checkpoint is stored by then)."""
    def reported():
        job = server.http.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] == "running" and job["history"] else None
    return wait_for(reported, 120, 0.05, f"job {job_id} to report an epoch")


def kept_validation_accuracy(history):
    return min(history, key=lambda e: e["val_loss"])["val_accuracy"]


def test_a_job_trains_reports_epochs_and_stores_its_model(server, processors):
    processors("a")
    job_id = submit(server, LIGHT, epochs=6)
    job = wait_job(server.http, job_id, 120)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 1 and job["progress"] == 1.0 and job["error"] is None
    result = job["result"]
    history = result["history"]
    assert [e["epoch"] for e in history] == [1, 2, 3, 4, 5, 6] and result["epochs"] == 6
    assert result["fitness"] == kept_validation_accuracy(history)
    assert result["training_seconds"] == pytest.approx(sum(e["seconds"] for e in history))
    metrics = result["metrics"]
    assert np.asarray(metrics["confusion"]).shape == (6, 6)
    assert np.asarray(metrics["confusion"]).sum() == COUNT // 10  # the test part
    assert 0 <= metrics["accuracy"] <= 1 and {"loss", "top_k", "precision", "recall", "f1"} <= set(metrics)
    assert job["history"] == history

    # One epoch event per epoch, in order, and the status changes around them.
    events = read_sse(server.http, f"/v1/jobs/{job_id}/events")
    epochs = [e["data"] for e in events if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4, 5, 6] and {e["attempt"] for e in epochs} == {1}
    assert [{k: v for k, v in e.items() if k != "attempt"} for e in epochs] == history
    statuses = [e["data"]["status"] for e in events if e["event"] == "status"]
    assert statuses == ["queued", "running", "succeeded"]

    # The model is registered for the job, with its dataset version and the test metrics.
    model = server.http.get(f"/v1/models/{result['model_id']}").json()
    assert model["job_id"] == job_id and model["dataset"] == "dice" and model["dataset_version"] == COUNT
    assert model["metrics"]["accuracy"] == metrics["accuracy"] and model["history"] == history
    assert model["genome"] == dicebox.Genome.from_dict(LIGHT).to_dict()
    # Its checkpoint is gone now that the job has ended.
    assert not (server.home / "checkpoints" / job_id).exists()
    # The export is cached under the processor's cache, keyed by name and version.
    assert (server.home / "cache" / "datasets" / "dice" / f"{COUNT}.dbx").is_file()
    assert (server.home / "cache" / "datasets" / "dice" / f"{COUNT}.etag").is_file()


def test_warm_start_from_init_reuses_the_cached_export(server, processors):
    p = processors("b")
    cold_id = submit(server, LIGHT, epochs=4)
    cold = wait_job(server.http, cold_id, 120)
    assert cold["status"] == "succeeded", cold
    model_id = cold["result"]["model_id"]
    warm_id = submit(server, LIGHT, epochs=2, init=model_id)
    warm = wait_job(server.http, warm_id, 120)
    assert warm["status"] == "succeeded", warm
    assert f"job {warm_id}: warm start from model {model_id}" in p.output()
    # Trained weights learn from where they are: the first epoch is far better than a cold one.
    assert warm["result"]["history"][0]["loss"] < cold["result"]["history"][0]["loss"]
    # The second job found the export in the cache (ETag revalidation, no download).
    assert "the cached copy is current" in p.output()
    # The model it started from is cached too.
    assert (server.home / "cache" / "models" / model_id / "model.json").is_file()


def test_load_best_weights_on_start(server, processors):
    best = server.http.get("/v1/models/best", params={"dataset": "dice"}).json()
    p = processors("best", LOAD_BEST_WEIGHTS_ON_START="true")
    job_id = submit(server, best["genome"], epochs=1)
    job = wait_job(server.http, job_id, 120)
    assert job["status"] == "succeeded", job["error"]
    assert f"warm start from the best model of 'dice', {best['id']}" in p.output()
    # Another genome cannot start from those weights: it trains from scratch.
    other = {"optimizer": {"name": "sgd", "learning_rate": 0.05},
             "layers": [{"type": "dense", "size": 8, "activation": "relu"}]}
    other_id = submit(server, other, epochs=1)
    assert wait_job(server.http, other_id, 120)["status"] == "succeeded"
    assert f"job {other_id}: the best model of 'dice' has another genome" in p.output()


def test_a_killed_processor_s_job_resumes_from_its_checkpoint(server, processors):
    first = processors("doomed")
    job_id = submit(server, HEAVY, epochs=4)
    wait_running_epoch(server, job_id)
    first.proc.kill()  # SIGKILL: no goodbye, the lease just stops being renewed
    first.proc.wait()
    processors("heir")
    job = wait_job(server.http, job_id, 180)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 2
    assert [e["epoch"] for e in job["result"]["history"]] == [1, 2, 3, 4]
    epochs = epoch_events(server, job_id)
    numbers = [e["epoch"] for e in epochs]
    assert numbers == sorted(set(numbers)), f"epochs repeated: {numbers}"
    second = [e["epoch"] for e in epochs if e["attempt"] == 2]
    # The second attempt started after the epochs the first one stored, not from scratch.
    assert second and second[0] > 1 and second[-1] == 4


def test_cancel_stops_a_running_job_within_one_epoch(server, processors):
    p = processors("c")
    job_id = submit(server, HEAVY, epochs=30)
    wait_running_epoch(server, job_id)
    r = server.http.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 200 and r.json()["cancel_requested"] is True
    job = wait_job(server.http, job_id, 120)
    assert job["status"] == "canceled", job
    events = read_sse(server.http, f"/v1/jobs/{job_id}/events")
    asked = next(i for i, e in enumerate(events) if e["event"] == "cancel_requested")
    after = [e for e in events[asked:] if e["event"] == "epoch"]
    assert len(after) <= 1, after
    assert len([e for e in events if e["event"] == "epoch"]) < 30
    assert not (server.home / "checkpoints" / job_id).exists()
    # The processor carries on with the next job.
    next_id = submit(server, LIGHT, epochs=1)
    assert wait_job(server.http, next_id, 120)["status"] == "succeeded"
    assert p.alive


def test_sigterm_hands_the_job_back(server, processors):
    leaving = processors("leaving")
    job_id = submit(server, HEAVY, epochs=4)
    wait_running_epoch(server, job_id)
    leaving.signal(signal.SIGTERM)
    assert leaving.proc.wait(60) == 0
    job = server.http.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "queued" and job["error"] == "processor stopped" and job["attempts"] == 1
    assert "handing the job back" in leaving.output()
    processors("successor")
    job = wait_job(server.http, job_id, 180)
    assert job["status"] == "succeeded", job["error"]
    assert job["attempts"] == 2
    assert [e["epoch"] for e in job["result"]["history"]] == [1, 2, 3, 4]
    second = [e["epoch"] for e in epoch_events(server, job_id) if e["attempt"] == 2]
    assert second and second[0] > 1


def test_concurrency_runs_jobs_side_by_side(server):
    env = {**base_env(server.home, KEY), "DICEBOX_THREADS": "1"}
    cmd = [sys.executable, "-m", "dicebox.processor", "--server", server.url, "--name", "pair",
           "--concurrency", "2"]
    pair = Process(cmd, env, server.home / "processor-pair.log")
    try:
        ids = [submit(server, HEAVY, epochs=2) for _ in range(2)]
        jobs = [wait_job(server.http, job_id, 180) for job_id in ids]
        assert [j["status"] for j in jobs] == ["succeeded", "succeeded"], pair.output()
        owners = set()
        for job_id in ids:
            for e in read_sse(server.http, f"/v1/jobs/{job_id}/events"):
                if e["event"] == "status" and e["data"]["status"] == "running":
                    owners.add(e["data"]["owner"])
        assert owners == {"pair:0", "pair:1"}
    finally:
        assert pair.stop() == 0


def test_an_unreachable_server_does_not_crash_a_processor(tmp_path):
    env = base_env(tmp_path, KEY)
    cmd = [sys.executable, "-m", "dicebox.processor", "--server", f"http://127.0.0.1:{free_port()}",
           "--name", "lonely", "--cache", str(tmp_path / "cache")]
    log_path = tmp_path / "lonely.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: "cannot claim jobs" in log_path.read_text(), 60, 0.1, "a failed claim")
            wait_for(lambda: log_path.read_text().count("cannot claim jobs") >= 2, 60, 0.1, "a retry")
            assert proc.poll() is None
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_an_unreachable_broker_does_not_crash_a_processor(tmp_path):
    env = base_env(tmp_path, KEY)
    cmd = [sys.executable, "-m", "dicebox.processor", "--broker", f"amqp://guest:secret@127.0.0.1:{free_port()}/%2F",
           "--server", f"http://127.0.0.1:{free_port()}", "--name", "adrift", "--cache", str(tmp_path / "cache")]
    log_path = tmp_path / "adrift.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: log_path.read_text().count("cannot connect to amqp://") >= 2, 60, 0.1,
                     "two failed connection attempts")
            assert proc.poll() is None
            assert "secret" not in log_path.read_text()  # the broker password is never logged
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.parametrize("args, env, words", [
    (["--broker", "amqp://127.0.0.1/", "--handoff-seconds", "0"], {}, "--handoff-seconds"),
    (["--broker", "amqp://127.0.0.1/", "--handoff-seconds", "nan"], {}, "--handoff-seconds"),
    ([], {"DICEBOX_BROKER_URL": "amqp://127.0.0.1/", "DICEBOX_BROKER_HANDOFF_SECONDS": "soon"},
     "DICEBOX_BROKER_HANDOFF_SECONDS"),
    ([], {"DICEBOX_BROKER_URL": "amqp://127.0.0.1/", "DICEBOX_BROKER_HANDOFF_SECONDS": "-5"},
     "DICEBOX_BROKER_HANDOFF_SECONDS"),
    (["--broker", "redis://x"], {}, "broker_url"),
    (["--concurrency", "0"], {}, "concurrency"),
    (["--threads", "0"], {}, "threads"),
    (["--server", "ftp://x"], {}, "server_url"),
    (["--name", " "], {}, "name"),
])
def test_bad_configuration_exits_2(tmp_path, monkeypatch, capsys, args, env, words):
    from dicebox import processor

    monkeypatch.setenv("DICEBOX_HOME", str(tmp_path))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert processor.main(args) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


# -- the processor's pieces, in process -----------------------------------------------------

def test_split_follows_the_contract(band_data):
    from dicebox.processor import split

    data = band_data[0]
    train, val, test = split(data, 0.1, 0.1, seed=3)
    expected = data.split([0.8, 0.1, 0.1], seed=3)
    assert [len(p) for p in (train, val, test)] == [len(p) for p in expected]
    assert np.array_equal(test.images, expected[2].images)
    train, val, test = split(data, 0.2, 0.0, seed=0)
    assert test is None and len(val) == len(data.split([0.8, 0.2], seed=0)[1])
    train, val, test = split(data, 0.0, 0.25, seed=0)
    assert val is None and len(test) == len(data.split([0.75, 0.25], seed=0)[1])
    train, val, test = split(data, 0.0, 0.0, seed=0)
    assert train is data and val is None and test is None
    for validation, test_part, words in ((-0.1, 0.1, "params.validation"), (0.1, 1.0, "params.test"),
                                         (0.6, 0.5, "must be < 1")):
        with pytest.raises(ValueError, match=words.replace(".", r"\.")):
            split(data, validation, test_part, seed=0)


def test_checkpoint_uses_init_reads_the_trainer_s_fingerprint(band_data, trained, tmp_path):
    from conftest import MLP

    from dicebox.processor import checkpoint_uses_init

    train, val = band_data
    cold, warm = tmp_path / "cold", tmp_path / "warm"
    dicebox.train(MLP, train, val=val, epochs=1, batch_size=32, threads=1, checkpoint_dir=cold)
    dicebox.train(MLP, train, val=val, epochs=1, batch_size=32, threads=1, checkpoint_dir=warm, init=trained)
    assert checkpoint_uses_init(cold / "checkpoint.safetensors") is False
    assert checkpoint_uses_init(warm / "checkpoint.safetensors") is True
    (tmp_path / "junk").write_bytes(b"\xff" * 64)
    assert checkpoint_uses_init(tmp_path / "junk") is None
    assert checkpoint_uses_init(tmp_path / "missing") is None


@pytest.mark.parametrize("name", ["../../etc", "/abs", "a/b", "..", "x" * 200, "dice\x00"])
def test_cache_keys_from_the_server_never_leave_the_cache(tmp_path, name):
    from dicebox.processor import DiskCache, _safe_component

    key = _safe_component(name)
    assert "/" not in key and key not in ("", ".", "..") and len(key) <= 64
    cache = DiskCache(tmp_path / "cache")
    assert cache.workdir(name).parent == tmp_path / "cache" / "work"
