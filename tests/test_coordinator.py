"""The evolution coordinator (dicebox.coordinator) over the real job queue and sensory store, on
SQLite (a file) and PostgreSQL.

Child train jobs are taken from the queue by a test processor that scores each genome with a
hash (the real processor is tested end to end with the server); one test trains for real and
checks that the service finds what ``dicebox.evolve`` finds. The coordinator is driven with
``step()``, so every test is deterministic; one test runs its thread.

PostgreSQL: DICEBOX_TEST_POSTGRES_URL or postgresql+psycopg://postgres@127.0.0.1:5432/test; each
test gets a fresh schema. Unreachable -> skipped locally, failed when CI=true.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time

import numpy as np
import pytest
from conftest import bands, engine_factory

import dicebox
from dicebox.coordinator import Coordinator
from dicebox.db import migrate
from dicebox.evolution import Evolution, EvolutionParams, SearchSpace
from dicebox.jobqueue import JobQueue
from dicebox.sensory import SensoryStore
from dicebox.settings import Settings

PG_URL = os.environ.get("DICEBOX_TEST_POSTGRES_URL",
                        "postgresql+psycopg://postgres@127.0.0.1:5432/test")
FINISHED = ("succeeded", "failed", "canceled")
SMALL = {"min_layers": 1, "max_layers": 3, "min_size": 4, "max_size": 24, "filters": [2, 4],
         "kernels": [3]}
DATASET, VERSION = "bands", 60


# ---------------------------------------------------------------------------------------------
# fixtures: a database (SQLite or PostgreSQL) with the service's schema, and a dataset in it

class Service:
    """What one server holds: an engine, the queue and sensory store over it."""

    def __init__(self, engine, home, **settings):
        self.engine = engine
        self.settings = Settings(home=home, **settings)
        self.queue = JobQueue(engine)
        self.sensory = SensoryStore(engine, home / "datasets", self.settings)
        self.notifier = CountingNotifier()

    def coordinator(self, **kwargs) -> Coordinator:
        return Coordinator(self.queue, self.sensory, None, self.settings, self.notifier, **kwargs)


class CountingNotifier:
    def __init__(self) -> None:
        self.count = 0

    def notify(self) -> None:
        self.count += 1


def _database(kind: str, request, tmp_path):
    """open_service(**settings) -> a Service on a new engine over one database holding the
    dataset (a second call is a second server)."""
    new_engine = engine_factory(kind, request, tmp_path)

    def open_service(**settings) -> Service:
        return Service(new_engine(), tmp_path, **settings)

    first = open_service()
    migrate(first.engine)
    first.sensory.create(DATASET, 8, 8, 1)
    data = bands(VERSION, 0)
    first.sensory.add_arrays(DATASET, data.images, [data.categories[i] for i in data.labels])
    return open_service


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    return _database(request.param, request, tmp_path)


@pytest.fixture
def sqlite_db(request, tmp_path):
    """The same on SQLite only, for the tests whose subject is not the database."""
    return _database("sqlite", request, tmp_path)


# ---------------------------------------------------------------------------------------------
# helpers: payloads, a test processor, the reference run of the state machine

def evolve_payload(population=6, generations=3, epochs=3, seed=0, schedule=None, time_budget=None,
                   **evolution):
    return {"dataset": DATASET, "version": VERSION,
            "evolution": {"population": population, "generations": generations, "retain": 0.4,
                          "random_select": 0.1, "mutate_chance": 0.2, "space": SMALL,
                          "schedule": schedule, "time_budget": time_budget, **evolution},
            "params": {"epochs": epochs, "batch_size": 16, "patience": 2, "seed": seed,
                       "augment": 0.0, "label_smoothing": 0.0, "validation": 0.2, "test": 0.2}}


def hash_fitness(genome: dict) -> float:
    """A deterministic stand-in for validation accuracy."""
    digest = hashlib.sha256(json.dumps(genome, sort_keys=True).encode()).digest()
    return round(int.from_bytes(digest[:4], "big") / 2**32, 6)


class Processor:
    """Takes child train jobs like a processor and completes them at once with hash_fitness;
    individuals in ``failing`` fail (no retry)."""

    def __init__(self, queue: JobQueue, name: str = "p1", failing=(), error="CUDA out of memory",
                 results=None):
        self.queue, self.name, self.failing, self.error = queue, name, set(failing), error
        self.results = results or {}  # individual -> the result to deliver instead
        self.completed: list[str] = []

    def claim(self):
        return self.queue.claim(self.name, 30, kinds=("train",))

    def finish(self, job) -> None:
        payload = job["payload"]
        if payload["evolve"]["individual"] in self.failing:
            assert self.queue.fail(job["id"], self.name, self.error, retry=False)
            return
        fitness = hash_fitness(payload["genome"])
        epochs = payload["params"]["epochs"]
        result = {"model_id": f"model-{job['id']}", "metrics": {"accuracy": fitness / 2},
                  "fitness": fitness, "history": [{"epoch": epochs, "val_accuracy": fitness}],
                  "training_seconds": 1.0, "epochs": epochs}
        result = self.results.get(payload["evolve"]["individual"], result)
        assert self.queue.complete(job["id"], self.name, result)
        self.completed.append(job["id"])

    def drain(self, limit: int | None = None) -> int:
        done = 0
        while limit is None or done < limit:
            job = self.claim()
            if job is None:
                break
            self.finish(job)
            done += 1
        return done


def run_to_end(coordinator: Coordinator, queue: JobQueue, job_id: str, processor: Processor,
               watch=None) -> dict:
    for _ in range(200):
        coordinator.step()
        if watch is not None:
            watch(queue.get(job_id))
        job = queue.get(job_id)
        if job["status"] in FINISHED:
            return job
        processor.drain()
    raise AssertionError(f"job {job_id} did not finish: {queue.get(job_id)['status']}")


def reference(payload: dict, failing=()) -> Evolution:
    """The state machine driven directly with the same scores (what dicebox.evolve does)."""
    evolution, params = payload["evolution"], payload["params"]
    evo = Evolution(EvolutionParams(population=evolution["population"], generations=evolution["generations"],
                                    retain=evolution["retain"], random_select=evolution["random_select"],
                                    mutate_chance=evolution["mutate_chance"], epochs=params["epochs"],
                                    seed=params["seed"], schedule=evolution["schedule"]),
                    SearchSpace.coerce(evolution["space"]), (1, 8, 8), 3)
    while True:
        todo = evo.tasks()
        if not todo:
            if not evo.advance():
                return evo
            continue
        for ind, budget in todo:
            if ind["id"] in failing:
                evo.record(ind["id"], None, 0, 0.0, budget)
            else:
                evo.record(ind["id"], hash_fitness(json.loads(ind["genome"])), budget, 1.0, budget)


def submit_evolve(queue: JobQueue, payload: dict, **kwargs) -> str:
    return queue.submit("evolve", payload, max_attempts=kwargs.pop("max_attempts", 100), **kwargs)["id"]


def events(queue: JobQueue, job_id: str, type_: str) -> list[dict]:
    return [e["data"] for e in queue.events(job_id, limit=10_000) if e["type"] == type_]


def task_key(child: dict) -> tuple[int, int]:
    return child["payload"]["evolve"]["individual"], child["payload"]["evolve"]["budget"]


# ---------------------------------------------------------------------------------------------
# a full run

def test_full_run_breeds_from_children_scores_and_reports_the_best(db):
    service = db()
    queue = service.queue
    payload = evolve_payload(population=6, generations=3)
    job_id = submit_evolve(queue, payload, priority=3)
    coordinator = service.coordinator()
    second_server = db().coordinator()  # another server on the same database
    processor = Processor(queue)
    progress = []

    def watch(job):
        progress.append(job["progress"])
        assert second_server.step() is False  # the job is held: nothing for the other server
        assert second_server.jobs == []

    job = run_to_end(coordinator, queue, job_id, processor, watch)
    expected = reference(payload)

    assert job["status"] == "succeeded", job["error"]
    assert job["progress"] == 1.0 and progress == sorted(progress)  # never goes back
    assert progress[0] == 0.0 and any(0 < p < 1 for p in progress)
    result = job["result"]
    assert result["stopped"] == "completed"
    assert result["generations"] == expected.generations()
    assert result["leaderboard"] == expected.leaderboard()
    assert result["trained"] == expected.state["trained"] == len(processor.completed)
    assert result["trained"] + result["cache_hits"] == 6 * 3 and result["cache_hits"] > 0
    # The best genome's child: its model, metrics and history are the job's.
    top = expected.leaderboard()[0]
    best_child = queue.get(result["job_id"])
    assert best_child["payload"]["genome"] == top["genome"] == result["genome"]
    assert result["fitness"] == top["fitness"] == max(hash_fitness(c["payload"]["genome"])
                                                      for c in queue.children(job_id))
    assert result["model_id"] == f"model-{best_child['id']}"
    assert result["metrics"] == best_child["result"]["metrics"]
    assert result["history"] == best_child["result"]["history"]
    assert result["individual"] == top["id"] and result["elapsed"] >= 0

    # One child train job per trained individual, shaped as the contract's train payload.
    children = queue.children(job_id)
    assert len(children) == result["trained"]
    assert len({task_key(c) for c in children}) == len(children)
    genomes = {i["id"]: i["genome"] for g in expected.generations() for i in g["individuals"]}
    for child in children:
        assert child["kind"] == "train" and child["priority"] == 3 and child["parent_id"] == job_id
        individual, budget = task_key(child)
        assert child["payload"]["genome"] == genomes[individual]
        assert child["payload"]["params"] == {**payload["params"], "epochs": budget} and budget == 3
        assert child["payload"]["evolve"]["job"] == job_id
        assert (child["payload"]["dataset"], child["payload"]["version"]) == (DATASET, VERSION)
        assert child["idempotency_key"] == f"{job_id}/{individual}/{budget}"
    assert service.notifier.count >= 3  # once per generation at least

    # Events: every individual (trained or cached) once, every generation once.
    individuals = events(queue, job_id, "individual")
    assert len(individuals) == 6 * 3
    assert [(e["generation"], e["id"]) for e in individuals] == sorted((e["generation"], e["id"])
                                                                      for e in individuals)
    for event in individuals:
        if event["cached"]:
            assert event["job_id"] is None and event["model_id"] is None
        else:
            assert queue.get(event["job_id"])["payload"]["evolve"]["individual"] == event["id"]
            assert event["model_id"] == f"model-{event['job_id']}"
    assert events(queue, job_id, "generation") == [
        {"generation": g["generation"], "best_fitness": g["best_fitness"], "mean_fitness": g["mean_fitness"]}
        for g in expected.generations()]
    assert coordinator.jobs == [] and coordinator.step() is False


def test_two_processors_train_individuals_at_once_on_the_coordinators_thread(sqlite_db):
    service = sqlite_db()
    queue = service.queue
    payload = evolve_payload(population=4, generations=2)
    job_id = submit_evolve(queue, payload)
    coordinator = service.coordinator()
    both_holding = threading.Barrier(2, timeout=60)
    taken = {"p1": [], "p2": []}
    errors = []

    def work(name: str) -> None:
        processor = Processor(service.queue, name)
        give_up = time.monotonic() + 120  # a hang guard, not a timing assertion
        try:
            first = True
            while queue.get(job_id)["status"] not in FINISHED and time.monotonic() < give_up:
                job = processor.claim()
                if job is None:
                    time.sleep(0.01)
                    continue
                taken[name].append(job["id"])
                if first:  # both hold a child of the first generation before either finishes
                    both_holding.wait()
                    first = False
                processor.finish(job)
        except Exception as exc:  # noqa: BLE001 - re-raised by the main thread
            errors.append(exc)

    coordinator.start()
    assert coordinator.alive
    workers = [threading.Thread(target=work, args=(name,), daemon=True) for name in taken]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    coordinator.stop()
    coordinator.stop()  # idempotent
    if errors:
        raise errors[0]
    assert not coordinator.alive
    job = queue.get(job_id)
    assert job["status"] == "succeeded", job["error"]
    assert taken["p1"] and taken["p2"] and not set(taken["p1"]) & set(taken["p2"])
    assert job["result"]["leaderboard"] == reference(payload).leaderboard()


# ---------------------------------------------------------------------------------------------
# cancel, restart

def test_cancel_reaches_queued_and_running_children(db):
    service = db()
    queue = service.queue
    job_id = submit_evolve(queue, evolve_payload(population=4))
    coordinator = service.coordinator()
    assert coordinator.step() is True
    processor = Processor(queue)
    running = processor.claim()  # one child in training, three queued
    assert queue.cancel(job_id)["cancel_requested"] is True
    assert coordinator.step() is True

    assert queue.get(job_id)["status"] == "canceled"
    children = {c["id"]: c for c in queue.children(job_id)}
    assert len(children) == 4
    assert [c["status"] for c in children.values() if c["id"] != running["id"]] == ["canceled"] * 3
    assert children[running["id"]]["cancel_requested"] is True
    # The processor hears it at its next heartbeat and stops.
    assert queue.renew(running["id"], "p1", 30) is False
    assert queue.acknowledge_cancel(running["id"], "p1") is True
    assert {c["status"] for c in queue.children(job_id)} == {"canceled"}
    assert coordinator.jobs == [] and coordinator.step() is False
    assert len(queue.children(job_id)) == 4


def test_a_job_ended_while_its_coordinator_stalled_has_its_children_cancelled(db):
    service = db(lease_seconds=0.3)
    queue = service.queue
    job_id = submit_evolve(queue, evolve_payload(population=4))
    coordinator = service.coordinator()
    coordinator.step()
    processor = Processor(queue)
    running = processor.claim()  # one individual is in training
    queue.cancel(job_id)  # the queue passes the cancel on to the children at once
    children = queue.children(job_id)
    assert sorted(c["status"] for c in children) == ["canceled", "canceled", "canceled", "running"]
    assert queue.renew(running["id"], "p1", 30) is False  # the one in training hears it
    time.sleep(0.4)  # the coordinator stalls past its lease...
    assert processor.claim() is None  # ...and a claim ends the abandoned, cancelled job
    assert queue.get(job_id)["status"] == "canceled"
    assert coordinator.step() is True  # it wakes up and lets the job go
    assert coordinator.jobs == []


def test_restart_carries_on_from_the_recorded_generation(db):
    first = db(lease_seconds=0.3)
    queue = first.queue
    payload = evolve_payload(population=6, generations=3)
    job_id = submit_evolve(queue, payload)
    old = first.coordinator()
    processor = Processor(queue)
    old.step()
    processor.drain()
    old.step()  # generation 0 scored, generation 1 bred and submitted
    processor.drain(limit=2)
    in_flight = processor.claim()  # taken by a processor when the server dies
    old.step()  # the two are recorded
    saved = queue.get(job_id)["state"]
    assert len(saved["evolution"]["state"]["generations"]) == 2
    assert in_flight is not None and in_flight["id"] in saved["children"].values()
    children_before = {c["id"] for c in queue.children(job_id)}
    # The server dies here (no stop, no more steps). Its lease runs out; the processor
    # delivers the child it was training meanwhile.
    processor.finish(in_flight)
    time.sleep(0.4)

    second = db()  # a new server process on the same database
    new = second.coordinator()
    assert new.step() is True and new.jobs == [job_id]
    resumed = queue.get(job_id)
    # (2 attempts, or more if the old coordinator, slowed down, took its own expired lease again)
    assert resumed["attempts"] >= 2 and resumed["lease_owner"] == new.owner
    assert len(resumed["state"]["evolution"]["state"]["generations"]) >= 2  # not from scratch
    job = run_to_end(new, second.queue, job_id, processor)

    assert job["status"] == "succeeded", job["error"]
    expected = reference(payload)
    assert job["result"]["leaderboard"] == expected.leaderboard()
    assert job["result"]["generations"] == expected.generations()
    children = queue.children(job_id)
    assert children_before <= {c["id"] for c in children}
    assert len({task_key(c) for c in children}) == len(children) == len(processor.completed)
    assert len(processor.completed) == expected.state["trained"]  # nothing trained twice
    assert len(events(queue, job_id, "individual")) == 6 * 3
    # The old server, had it only stalled, lets go of the job when it wakes up; nothing changes.
    assert old.jobs == [job_id]
    old.step()
    assert old.jobs == [] and queue.get(job_id) == job
    assert len(queue.children(job_id)) == len(children)


class CrashOnSave:
    """The queue, but the ``n``-th save_state raises (the server dies between submitting
    children and saving their ids)."""

    def __init__(self, queue: JobQueue, n: int):
        self._queue, self._n = queue, n

    def __getattr__(self, name):
        return getattr(self._queue, name)

    def save_state(self, *args, **kwargs):
        self._n -= 1
        if self._n == 0:
            raise OSError("simulated crash before the state was saved")
        return self._queue.save_state(*args, **kwargs)


def test_a_crash_between_submitting_children_and_saving_them_makes_no_duplicates(sqlite_db):
    service = sqlite_db()
    queue = service.queue
    payload = evolve_payload(population=5, generations=2)
    job_id = submit_evolve(queue, payload)
    coordinator = Coordinator(CrashOnSave(queue, 2), service.sensory, None, service.settings,
                              service.notifier)
    coordinator.step()  # the first save (new run) passes, the second (children) raises
    assert len(queue.children(job_id)) == 5
    assert queue.get(job_id)["state"]["children"] == {}
    assert coordinator.jobs == [job_id]  # continues from the saved state
    job = run_to_end(coordinator, queue, job_id, Processor(queue))
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["leaderboard"] == reference(payload).leaderboard()
    children = queue.children(job_id)
    assert len({task_key(c) for c in children}) == len(children) == job["result"]["trained"]


# ---------------------------------------------------------------------------------------------
# halving, time budget, failures

def test_halving_trains_everyone_short_and_the_best_third_in_full(sqlite_db):
    service = sqlite_db()
    queue = service.queue
    payload = evolve_payload(population=6, generations=2, epochs=6, schedule="halving")
    job_id = submit_evolve(queue, payload)
    job = run_to_end(service.coordinator(), queue, job_id, Processor(queue))
    assert job["status"] == "succeeded", job["error"]
    expected = reference(payload)
    assert job["result"]["generations"] == expected.generations()
    assert job["result"]["leaderboard"] == expected.leaderboard()
    first_generation = {i["id"] for i in expected.generations()[0]["individuals"]}
    budgets = sorted(task_key(c)[1] for c in queue.children(job_id) if task_key(c)[0] in first_generation)
    assert budgets == [2] * 6 + [6] * 2
    # the job's best comes from a full-length training
    assert job["result"]["leaderboard"][0]["budget"] == 6
    assert queue.get(job["result"]["job_id"])["payload"]["params"]["epochs"] == 6


def test_time_budget_stops_with_the_best_so_far_and_cancels_the_rest(sqlite_db):
    service = sqlite_db()
    queue = service.queue
    now = [1000.0]
    job_id = submit_evolve(queue, evolve_payload(population=4, generations=3, time_budget=60))
    coordinator = service.coordinator(clock=lambda: now[0])
    coordinator.step()
    processor = Processor(queue)
    processor.drain(limit=2)
    now[0] += 61
    coordinator.step()

    job = queue.get(job_id)
    assert job["status"] == "succeeded", job["error"]
    result = job["result"]
    assert result["stopped"] == "time_budget" and result["elapsed"] == 61
    assert result["trained"] == 2 and len(result["leaderboard"]) == 2
    scored = {c["id"]: c["result"]["fitness"] for c in queue.children(job_id) if c["status"] == "succeeded"}
    assert result["fitness"] == max(scored.values())
    assert result["model_id"] == f"model-{max(scored, key=scored.get)}"
    assert sorted(c["status"] for c in queue.children(job_id)) == ["canceled", "canceled", "succeeded",
                                                                  "succeeded"]
    assert events(queue, job_id, "generation") == []  # generation 0 never finished


def test_time_budget_out_before_anything_was_trained_fails_the_job(sqlite_db):
    service = sqlite_db()
    queue = service.queue
    now = [0.0]
    job_id = submit_evolve(queue, evolve_payload(population=3, time_budget=5))
    coordinator = service.coordinator(clock=lambda: now[0])
    coordinator.step()
    now[0] = 10.0
    coordinator.step()
    job = queue.get(job_id)
    assert job["status"] == "failed" and "time_budget" in job["error"]
    assert {c["status"] for c in queue.children(job_id)} == {"canceled"}


def test_failed_and_cancelled_children_score_none_and_the_run_goes_on(db):
    service = db()
    queue = service.queue
    payload = evolve_payload(population=6, generations=2)
    job_id = submit_evolve(queue, payload)
    coordinator = service.coordinator()
    coordinator.step()
    by_individual = {task_key(c)[0]: c["id"] for c in queue.children(job_id)}
    queue.cancel(by_individual[3])  # someone cancels one child directly
    job = run_to_end(coordinator, queue, job_id, Processor(queue, failing={1, 2}))

    assert job["status"] == "succeeded", job["error"]
    expected = reference(payload, failing={1, 2, 3})
    assert job["result"]["generations"] == expected.generations()
    assert job["result"]["leaderboard"] == expected.leaderboard()
    first = {i["id"]: i for i in job["result"]["generations"][0]["individuals"]}
    assert [first[i]["fitness"] for i in (1, 2, 3)] == [None, None, None]
    assert job["result"]["fitness"] is not None


def test_a_malformed_child_result_counts_as_no_score(sqlite_db):
    service = sqlite_db()
    queue = service.queue
    job_id = submit_evolve(queue, evolve_payload(population=4, generations=2))
    bad = {"model_id": "m", "fitness": "0.99", "epochs": -1, "training_seconds": "slow"}
    job = run_to_end(service.coordinator(), queue, job_id, Processor(queue, results={0: bad}))
    assert job["status"] == "succeeded", job["error"]
    first = job["result"]["generations"][0]["individuals"][0]
    assert (first["id"], first["fitness"], first["epochs"], first["seconds"]) == (0, None, 3, 0.0)
    assert job["result"]["fitness"] is not None and job["result"]["fitness"] != "0.99"


def test_a_generation_in_which_everyone_fails_fails_the_job(sqlite_db):
    service = sqlite_db()
    queue = service.queue
    job_id = submit_evolve(queue, evolve_payload(population=4, generations=3))
    job = run_to_end(service.coordinator(), queue, job_id, Processor(queue, failing=range(100)))
    assert job["status"] == "failed"
    assert "generation 0: every individual failed to train" in job["error"]
    assert "CUDA out of memory" in job["error"]
    assert len(queue.children(job_id)) == 4  # nothing bred from nothing
    assert events(queue, job_id, "generation") == []


# ---------------------------------------------------------------------------------------------
# bad payloads, bad jobs

@pytest.mark.parametrize("change, message", [
    ({"dataset": "nope"}, "dataset 'nope' does not exist"),
    ({"version": 10_000}, "has no version 10000"),
    ({"version": "60"}, "version must be an image count"),
    ({"dataset": None}, "dataset must be a dataset name"),
    ({"evolution": {"population": 1}}, "evolution.population must be in 2..10000, got 1"),
    ({"evolution": {"population": "8"}}, "evolution.population must be an integer"),
    ({"evolution": {"retain": 1.5}}, "evolution.retain must be in [0, 1], got 1.5"),
    ({"evolution": {"space": {"neurons": [1, 2]}}}, "neurons"),
    ({"evolution": {"space": "huge"}}, "evolution.space"),
    ({"evolution": {"schedule": "fast"}}, "evolution.schedule must be None or 'halving'"),
    ({"evolution": {"time_budget": 0}}, "evolution.time_budget must be > 0"),
    ({"evolution": "big"}, "evolution must be an object"),
    ({"params": {"epochs": 0}}, "params.epochs must be in 1..100000, got 0"),
    ({"params": {"seed": 1.5}}, "params.seed must be an integer"),
])
def test_a_bad_payload_fails_the_job_with_a_clear_error_and_nothing_else(sqlite_db, change, message):
    service = sqlite_db()
    queue = service.queue
    payload = evolve_payload()
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(payload.get(key), dict):
            payload[key] = {**payload[key], **value}
        else:
            payload[key] = value
    job_id = submit_evolve(queue, payload)
    coordinator = service.coordinator()
    assert coordinator.step() is True
    job = queue.get(job_id)
    assert job["status"] == "failed" and job["attempts"] == 1
    assert message in job["error"]
    assert job["state"] is None and job["result"] is None
    assert queue.children(job_id) == []
    assert {e["type"] for e in queue.events(job_id)} == {"status"}
    assert coordinator.jobs == [] and coordinator.step() is False


class BrokenSensory:
    """The store, but one dataset's files cannot be read."""

    def __init__(self, sensory):
        self._sensory = sensory

    def dataset(self, name, version):
        if name == "broken":
            raise OSError("pixels.u8: Input/output error")
        return self._sensory.dataset(name, version)


def test_a_job_that_cannot_start_is_retried_then_failed_and_the_others_run(sqlite_db):
    service = sqlite_db()
    queue = service.queue
    broken = submit_evolve(queue, {**evolve_payload(), "dataset": "broken"}, max_attempts=2)
    good_payload = evolve_payload(population=4, generations=2)
    good = submit_evolve(queue, good_payload)
    coordinator = Coordinator(queue, BrokenSensory(service.sensory), None, service.settings,
                              service.notifier)
    coordinator.step()
    assert queue.get(broken)["status"] == "queued"  # handed back with its error
    assert "Input/output error" in queue.get(broken)["error"]
    job = run_to_end(coordinator, queue, good, Processor(queue))
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["leaderboard"] == reference(good_payload).leaderboard()
    broken_job = queue.get(broken)
    assert broken_job["status"] == "failed" and broken_job["attempts"] == 2
    assert "OSError: pixels.u8: Input/output error" in broken_job["error"]


# ---------------------------------------------------------------------------------------------
# the same search as dicebox.evolve

def test_the_service_finds_what_dicebox_evolve_finds(sqlite_db):
    """Children trained for real (as the processor does): the same genomes, scores and best as a
    local dicebox.evolve run with the same seed and data."""
    service = sqlite_db()
    queue = service.queue
    payload = evolve_payload(population=3, generations=2, epochs=2, seed=0)
    params = payload["params"]
    job_id = submit_evolve(queue, payload)
    data = service.sensory.dataset(DATASET, VERSION)
    train, val, test = data.split([1 - params["validation"] - params["test"], params["validation"],
                                   params["test"]], seed=params["seed"])

    def train_child(job) -> None:
        p = job["payload"]["params"]
        model = dicebox.train(job["payload"]["genome"], train, val=val, epochs=p["epochs"],
                              batch_size=p["batch_size"], patience=p["patience"], seed=p["seed"],
                              augment=p["augment"], threads=1)
        kept = min((h for h in model.history if h["val_loss"] is not None), key=lambda h: h["val_loss"])
        metrics = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in model.evaluate(test).items()}
        assert queue.complete(job["id"], "p1", {"model_id": f"model-{job['id']}", "metrics": metrics,
                                                "fitness": kept["val_accuracy"], "history": model.history,
                                                "training_seconds": 0.0, "epochs": len(model.history)})

    coordinator = service.coordinator()
    for _ in range(100):
        coordinator.step()
        if queue.get(job_id)["status"] in FINISHED:
            break
        while (child := queue.claim("p1", 30, kinds=("train",))) is not None:
            train_child(child)
    job = queue.get(job_id)
    assert job["status"] == "succeeded", job["error"]

    local = dicebox.evolve(train, val, space=SMALL, population=3, generations=2, epochs=2, seed=0,
                           patience=params["patience"], batch_size=params["batch_size"], threads=1, workers=1,
                           test=test, retain=0.4, random_select=0.1, mutate_chance=0.2)

    def scores(board):
        return [(e["genome"], e["fitness"], e["epochs"]) for e in board]

    assert scores(job["result"]["leaderboard"]) == scores(local.leaderboard)
    assert job["result"]["genome"] == local.best_genome.to_dict()
    assert job["result"]["fitness"] == local.best_fitness
    assert job["result"]["metrics"]["accuracy"] == pytest.approx(local.test_metrics["accuracy"])
    assert np.isfinite(job["result"]["fitness"])
