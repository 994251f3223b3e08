"""The embedded job queue (dicebox.jobqueue) on SQLite (a file) and PostgreSQL.

PostgreSQL: DICEBOX_TEST_POSTGRES_URL (see conftest.new_engine); each test gets a fresh schema.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime

import pytest
from sqlalchemy import event

from dicebox.jobqueue import MAX_LIST_LIMIT, Job, JobQueue

LEASE = 0.2  # seconds; tests that need expiry sleep past it


@pytest.fixture
def backend(new_engine):
    """(queue, make_queue) where make_queue() opens a second JobQueue on a new engine."""
    queue = JobQueue(new_engine())
    queue.create_schema()
    return queue, lambda: JobQueue(new_engine())


@pytest.fixture
def queue(backend):
    return backend[0]


def test_priority_first_then_fifo(queue):
    low = [queue.submit("train", {"n": i}, priority=-5)["id"] for i in range(2)]
    mid = [queue.submit("train", {"n": i})["id"] for i in range(3)]
    high = queue.submit("evolve", {"n": 0}, priority=10)["id"]
    assert queue.depth() == {10: 1, 0: 3, -5: 2}
    order = []
    while (job := queue.claim("w", 30)) is not None:
        order.append(job["id"])
    assert order == [high, *mid, *low]
    assert queue.depth() == {}


def test_job_shape_and_times(queue):
    job = queue.submit("train", {"epochs": 2})
    assert {"id", "kind", "status", "progress", "attempts", "error", "created_at", "started_at",
            "finished_at", "parent_id", "result"} <= job.keys()
    assert (job["status"], job["progress"], job["attempts"], job["error"]) == ("queued", 0, 0, None)
    created = datetime.fromisoformat(job["created_at"])
    assert created.utcoffset().total_seconds() == 0
    child = queue.submit("train", {}, parent_id=job["id"])
    assert child["parent_id"] == job["id"]
    claimed = queue.claim("w", 30)
    assert claimed["id"] == job["id"] and claimed["status"] == "running"
    assert claimed["attempts"] == 1 and claimed["lease_owner"] == "w"
    assert datetime.fromisoformat(claimed["started_at"]) >= created
    assert queue.progress(job["id"], "w", 0.5) is True
    assert queue.get(job["id"])["progress"] == 0.5
    assert queue.complete(job["id"], "w", {"accuracy": 0.9}) is True
    done = queue.get(job["id"])
    assert done["status"] == "succeeded" and done["progress"] == 1.0
    assert done["result"] == {"accuracy": 0.9} and done["finished_at"] is not None


def test_idempotency_key_returns_same_job(queue):
    first = queue.submit("train", {"a": 1}, idempotency_key="k1")
    again = queue.submit("evolve", {"a": 2}, priority=5, idempotency_key="k1")
    assert again == first
    assert queue.submit("train", {"a": 1}, idempotency_key="k2")["id"] != first["id"]
    assert len(queue.list()["items"]) == 2


def test_concurrent_submits_with_one_key_create_one_job(queue):
    threads_n = 6
    barrier = threading.Barrier(threads_n)
    ids, errors = [], []

    def submit():
        try:
            barrier.wait()
            ids.append(queue.submit("train", {}, idempotency_key="same")["id"])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=submit) for _ in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(ids) == threads_n and len(set(ids)) == 1
    assert len(queue.list()["items"]) == 1


def test_concurrent_claimers_never_share_a_job(queue):
    submitted = {queue.submit("train", {"n": i}, priority=i % 3)["id"] for i in range(50)}
    claimed, errors = [], []
    lock = threading.Lock()

    def worker(name):
        try:
            while (job := queue.claim(name, 30)) is not None:
                with lock:
                    claimed.append(job["id"])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(claimed) == sorted(submitted)  # each job exactly once
    assert all(j["attempts"] == 1 for j in queue.list(status="running", limit=100)["items"])


def test_expired_lease_makes_job_claimable_again(queue):
    job = queue.submit("train", {})
    assert queue.claim("dead", LEASE)["attempts"] == 1
    assert queue.claim("other", LEASE) is None  # lease still valid
    time.sleep(LEASE + 0.15)
    again = queue.claim("other", 30)
    assert again["id"] == job["id"] and again["attempts"] == 2 and again["lease_owner"] == "other"
    # the first owner lost it: it must stop
    assert queue.renew(job["id"], "dead", 30) is False
    assert queue.complete(job["id"], "dead", {}) is False
    assert queue.renew(job["id"], "other", 30) is True


def test_max_attempts_ends_failed_with_last_error(queue):
    job = queue.submit("train", {}, max_attempts=2)
    assert queue.claim("w", 30)["attempts"] == 1
    assert queue.fail(job["id"], "w", "boom 1") is True
    requeued = queue.get(job["id"])
    assert requeued["status"] == "queued" and requeued["error"] == "boom 1"
    assert queue.claim("w", 30)["attempts"] == 2
    assert queue.fail(job["id"], "w", "boom 2") is True
    failed = queue.get(job["id"])
    assert failed["status"] == "failed" and failed["error"] == "boom 2"
    assert failed["attempts"] == 2 and failed["finished_at"] is not None
    assert queue.claim("w", 30) is None


def test_max_attempts_by_lease_expiry(queue):
    job = queue.submit("train", {}, max_attempts=2)
    queue.claim("w", 30)
    queue.fail(job["id"], "w", "out of memory")
    queue.claim("w", LEASE)  # attempt 2, then the processor dies
    time.sleep(LEASE + 0.15)
    assert queue.claim("x", 30) is None
    failed = queue.get(job["id"])
    assert failed["status"] == "failed" and failed["attempts"] == 2
    assert failed["error"] == "lease expired after 2 attempts (last error: out of memory)"


def test_fail_without_retry(queue):
    job = queue.submit("evolve", {})
    queue.claim("w", 30)
    assert queue.fail(job["id"], "w", "bad payload", retry=False) is True
    assert queue.get(job["id"])["status"] == "failed"


def test_renew_by_stale_owner_returns_false(queue):
    job = queue.submit("train", {})
    queue.claim("a", 30)
    assert queue.renew(job["id"], "a", 30) is True
    assert queue.renew(job["id"], "b", 30) is False
    assert queue.complete(job["id"], "a", None) is True
    assert queue.renew(job["id"], "a", 30) is False  # finished


def test_complete_by_non_owner_refused(queue):
    job = queue.submit("train", {})
    queue.claim("owner", 30)
    assert queue.complete(job["id"], "intruder", {"x": 1}) is False
    assert queue.fail(job["id"], "intruder", "no") is False
    assert queue.progress(job["id"], "intruder", 0.3) is False
    state = queue.get(job["id"])
    assert state["status"] == "running" and state["result"] is None and state["progress"] == 0


def test_cancel_queued_running_and_finished(queue):
    queued = queue.submit("train", {}, priority=-1)
    running = queue.submit("train", {}, priority=1)
    assert queue.claim("w", 30)["id"] == running["id"]

    canceled = queue.cancel(queued["id"])
    assert canceled["status"] == "canceled" and canceled["finished_at"] is not None
    assert queue.claim("w2", 30) is None

    requested = queue.cancel(running["id"])
    assert requested["status"] == "running" and requested["cancel_requested"] is True
    assert queue.renew(running["id"], "w", 30) is False  # owner learns it must stop
    assert queue.fail(running["id"], "w", "stopped: canceled") is True
    assert queue.get(running["id"])["status"] == "canceled"

    # acknowledge_cancel is the other way to give a canceled job up
    other = queue.submit("evolve", {})
    queue.claim("w", 30)
    queue.cancel(other["id"])
    assert queue.acknowledge_cancel(other["id"], "intruder") is False
    assert queue.acknowledge_cancel(other["id"], "w") is True
    assert queue.get(other["id"])["status"] == "canceled"

    # finished jobs are unchanged
    assert queue.cancel(queued["id"]) == queue.get(queued["id"])
    assert queue.cancel(other["id"])["status"] == "canceled"


def test_cancel_requested_job_with_dead_owner_ends_canceled(queue):
    job = queue.submit("train", {})
    queue.claim("dead", LEASE)
    queue.cancel(job["id"])
    time.sleep(LEASE + 0.15)
    assert queue.claim("w", 30) is None
    assert queue.get(job["id"])["status"] == "canceled"


def test_list_pagination(queue):
    ids = [queue.submit("train", {"n": i})["id"] for i in range(7)]
    queue.claim("w", 30)  # the oldest becomes running
    seen, cursor, pages = [], None, 0
    while True:
        page = queue.list(limit=3, cursor=cursor)
        seen += [j["id"] for j in page["items"]]
        pages += 1
        cursor = page["next"]
        if cursor is None:
            break
    assert pages == 3 and seen == ids[::-1]  # newest first, each exactly once
    queued = queue.list(status="queued", limit=50)
    assert [j["id"] for j in queued["items"]] == ids[:0:-1] and queued["next"] is None
    assert [j["id"] for j in queue.list(status="running")["items"]] == [ids[0]]
    assert queue.list(status="failed") == {"items": [], "next": None}


def test_unknown_ids_raise_key_error(queue):
    for call in (lambda: queue.get("nope"), lambda: queue.cancel("nope"),
                 lambda: queue.renew("nope", "w", 1), lambda: queue.complete("nope", "w", None),
                 lambda: queue.fail("nope", "w", "e"), lambda: queue.progress("nope", "w", 0.1),
                 lambda: queue.submit("train", {}, parent_id="nope")):
        with pytest.raises(KeyError):
            call()
    assert queue.list()["items"] == []


BAD_CALLS = [
    ("kind", lambda q, j: q.submit("predict", {})),
    ("priority", lambda q, j: q.submit("train", {}, priority=101)),
    ("priority", lambda q, j: q.submit("train", {}, priority=-101)),
    ("priority", lambda q, j: q.submit("train", {}, priority=1.5)),
    ("max_attempts", lambda q, j: q.submit("train", {}, max_attempts=0)),
    ("payload", lambda q, j: q.submit("train", {"x": object()})),
    ("idempotency_key", lambda q, j: q.submit("train", {}, idempotency_key="")),
    ("lease_seconds", lambda q, j: q.claim("w", 0)),
    ("lease_seconds", lambda q, j: q.claim("w", -1)),
    ("lease_seconds", lambda q, j: q.renew(j, "w", 0)),
    ("owner", lambda q, j: q.claim("", 10)),
    ("value", lambda q, j: q.progress(j, "w", 1.5)),
    ("status", lambda q, j: q.list(status="done")),
    ("limit", lambda q, j: q.list(limit=0)),
    ("cursor", lambda q, j: q.list(cursor="garbage!")),
]


@pytest.mark.parametrize("argument,call", BAD_CALLS, ids=[f"{a}-{i}" for i, (a, _) in
                                                          enumerate(BAD_CALLS)])
def test_bad_arguments_raise_value_error_and_change_nothing(queue, argument, call):
    queue.submit("train", {}, priority=3)
    job = queue.claim("w", 30)
    queue.submit("evolve", {})
    before = (queue.list(limit=100), queue.depth())
    with pytest.raises(ValueError, match=argument):
        call(queue, job["id"])
    assert (queue.list(limit=100), queue.depth()) == before


def test_second_queue_sees_the_same_jobs(backend):
    queue, make_queue = backend
    job = queue.submit("train", {"epochs": 1}, idempotency_key="durable")
    queue.claim("w", 30)
    queue.submit("evolve", {})
    other = make_queue()
    other.create_schema()  # idempotent on an existing database
    assert other.get(job["id"])["status"] == "running"
    assert other.submit("train", {}, idempotency_key="durable")["id"] == job["id"]
    assert other.depth() == {0: 1}
    assert other.complete(job["id"], "w", {"ok": True}) is True
    assert queue.get(job["id"])["status"] == "succeeded"


# -- events, owner state, kinds, counts --------------------------------------------------------

def test_status_changes_are_recorded_as_events_in_order(queue):
    job = queue.submit("train", {})
    queue.claim("w", 30)
    assert queue.report(job["id"], "w", "epoch", {"epoch": 1, "loss": 0.5}, progress=0.5) is True
    assert queue.report(job["id"], "other", "epoch", {"epoch": 2}) is False
    queue.fail(job["id"], "w", "boom")              # retried: back to queued
    queue.claim("w2", 30)
    queue.complete(job["id"], "w2", {"ok": True})
    events = queue.events(job["id"])
    assert [(e["type"], e["data"].get("status")) for e in events] == [
        ("status", "queued"), ("status", "running"), ("epoch", None), ("status", "queued"),
        ("status", "running"), ("status", "succeeded")]
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    assert events[2]["data"] == {"epoch": 1, "loss": 0.5}
    assert events[3]["data"]["error"] == "boom" and events[4]["data"]["attempts"] == 2
    assert queue.events(job["id"], after=events[3]["seq"]) == events[4:]
    assert queue.events(job["id"], after=events[-1]["seq"]) == []
    with pytest.raises(KeyError):
        queue.events("nope")
    with pytest.raises(ValueError, match="type"):
        queue.report(job["id"], "w2", "", {})


def test_cancel_events_and_no_duplicate_cancel_request(queue):
    job = queue.submit("train", {})
    queue.claim("w", 30)
    queue.cancel(job["id"])
    queue.cancel(job["id"])
    queue.acknowledge_cancel(job["id"], "w")
    types = [(e["type"], e["data"].get("status")) for e in queue.events(job["id"])]
    assert types == [("status", "queued"), ("status", "running"), ("cancel_requested", None),
                     ("status", "canceled")]


def test_claim_by_kind(queue):
    evolve = queue.submit("evolve", {}, priority=50)
    train = queue.submit("train", {})
    assert queue.claim("p", 30, kinds=("train",))["id"] == train["id"]
    assert queue.claim("p", 30, kinds=("train",)) is None
    assert queue.claim("c", 30, kinds=("evolve",))["id"] == evolve["id"]
    for bad in ((), ("nope",)):
        with pytest.raises(ValueError, match="kinds"):
            queue.claim("p", 30, kinds=bad)


def test_owner_state_survives_and_only_the_owner_writes_it(queue):
    job = queue.submit("evolve", {})
    queue.claim("c1", 30)
    assert queue.save_state(job["id"], "c1", {"generation": 2}, progress=0.25) is True
    assert queue.save_state(job["id"], "c2", {"generation": 9}) is False
    stored = queue.get(job["id"])
    assert stored["state"] == {"generation": 2} and stored["progress"] == 0.25
    with pytest.raises(ValueError, match="state"):
        queue.save_state(job["id"], "c1", {"x": float("nan")})
    assert queue.get(job["id"])["state"] == {"generation": 2}


def test_counts_find_by_key_children_and_list_by_parent(queue):
    parent = queue.submit("evolve", {}, idempotency_key="p")
    kids = [queue.submit("train", {"i": i}, parent_id=parent["id"]) for i in range(3)]
    queue.cancel(kids[0]["id"])
    assert queue.counts() == {"queued": 3, "running": 0, "succeeded": 0, "failed": 0, "canceled": 1}
    assert queue.find_by_key("p")["id"] == parent["id"]
    assert queue.find_by_key("q") is None
    assert [k["id"] for k in queue.children(parent["id"])] == [k["id"] for k in kids]
    listed = queue.list(parent_id=parent["id"])["items"]
    assert sorted(j["id"] for j in listed) == sorted(k["id"] for k in kids)


def test_cancel_reaches_children_also_without_an_owner(queue):
    parent = queue.submit("evolve", {})
    queued_child = queue.submit("train", {}, parent_id=parent["id"])
    running_child = queue.submit("train", {}, parent_id=parent["id"])
    queue.claim("coord", 30, kinds=("evolve",))
    queue.claim("p", 30, kinds=("train",))  # takes queued_child (oldest)
    queue.cancel(parent["id"])
    assert queue.get(queued_child["id"])["cancel_requested"] is True
    assert queue.get(running_child["id"])["status"] == "canceled"
    assert queue.renew(queued_child["id"], "p", 30) is False


def test_parent_ended_by_lease_expiry_cancels_its_children(queue):
    parent = queue.submit("evolve", {}, max_attempts=1)
    child = queue.submit("train", {}, parent_id=parent["id"])
    queue.claim("coord", LEASE, kinds=("evolve",))
    time.sleep(LEASE * 2)
    assert queue.claim("p", 30, kinds=("evolve",)) is None  # ends the dead parent
    assert queue.get(parent["id"])["status"] == "failed"
    assert queue.get(child["id"])["status"] == "canceled"


# -- RabbitMQ mode: claim_job (one given job) and the outbox ------------------------------------

def test_claim_job_runs_a_queued_job(queue):
    job = queue.submit("train", {"n": 1})
    other = queue.submit("train", {"n": 2}, priority=50)  # claim_job ignores the queue order
    action, got = queue.claim_job(job["id"], "p1", 30)
    assert action == "run"
    assert got["id"] == job["id"] and got["payload"] == {"n": 1} and got["status"] == "running"
    assert got["attempts"] == 1 and got["lease_owner"] == "p1" and got["started_at"] is not None
    assert datetime.fromisoformat(got["lease_expires_at"]) > datetime.fromisoformat(got["started_at"])
    assert queue.get(job["id"]) == got
    assert queue.get(other["id"])["status"] == "queued"
    status = queue.events(job["id"])[-1]
    assert status["type"] == "status"
    assert status["data"] == {"status": "running", "attempts": 1, "progress": 0.0, "error": None,
                              "owner": "p1"}
    # The owner goes on exactly as after claim().
    assert queue.renew(job["id"], "p1", 30) is True
    assert queue.complete(job["id"], "p1", {"ok": 1}) is True


def test_claim_job_waits_for_a_live_owner(queue):
    job = queue.submit("train", {})
    queue.claim_job(job["id"], "p1", 30)
    before = (queue.get(job["id"]), queue.events(job["id"]))
    for owner in ("p2", "p1"):  # also its own owner: a second delivery must not run it twice
        action, got = queue.claim_job(job["id"], owner, 30)
        assert action == "wait" and got == before[0]
    assert (queue.get(job["id"]), queue.events(job["id"])) == before


def test_claim_job_takes_over_an_expired_lease(queue):
    job = queue.submit("train", {})
    queue.claim_job(job["id"], "dead", LEASE)
    queue.report(job["id"], "dead", "epoch", {"epoch": 1}, progress=0.5)
    time.sleep(LEASE + 0.15)
    action, got = queue.claim_job(job["id"], "p2", 30)
    assert action == "run" and got["attempts"] == 2 and got["lease_owner"] == "p2"
    assert got["progress"] == 0.0 and got["status"] == "running"
    assert queue.events(job["id"])[-1]["data"]["owner"] == "p2"
    # The dead owner, if it was only slow, has lost the job.
    assert queue.renew(job["id"], "dead", 30) is False
    assert queue.complete(job["id"], "dead", {}) is False
    assert queue.claim_job(job["id"], "p3", 30)[0] == "wait"


def test_claim_job_after_a_retryable_failure_runs_again(queue):
    job = queue.submit("train", {}, max_attempts=2)
    queue.claim_job(job["id"], "p1", 30)
    queue.fail(job["id"], "p1", "out of memory")
    action, got = queue.claim_job(job["id"], "p2", 30)
    assert action == "run" and got["attempts"] == 2 and got["error"] == "out of memory"


def test_claim_job_with_attempts_exhausted_ends_it_failed(queue):
    job = queue.submit("train", {}, max_attempts=2)
    queue.claim_job(job["id"], "p1", 30)
    queue.fail(job["id"], "p1", "out of memory")
    queue.claim_job(job["id"], "p2", LEASE)  # attempt 2, then the processor dies
    time.sleep(LEASE + 0.15)
    action, got = queue.claim_job(job["id"], "p3", 30)
    assert action == "dead"
    assert got["status"] == "failed" and got["attempts"] == 2 and got["finished_at"] is not None
    assert got["error"] == "attempts exhausted (last error: out of memory)"
    assert got["lease_owner"] is None and got["lease_expires_at"] is None
    assert queue.get(job["id"]) == got
    assert queue.events(job["id"])[-1]["data"]["status"] == "failed"
    # Another copy of the message later: the job has ended.
    assert queue.claim_job(job["id"], "p4", 30) == ("done", got)


def test_claims_leave_dead_brokered_jobs_to_claim_job(new_engine):
    """RabbitMQ mode: a dead train job is ended by claim_job (its message then goes to the
    dead-letter queue), never by the coordinator's claims of evolve jobs."""
    plain = JobQueue(new_engine())
    plain.create_schema()
    brokered = JobQueue(new_engine(), brokered_kinds=("train",))

    def dead_train_job() -> str:
        job_id = plain.submit("train", {}, max_attempts=1)["id"]
        plain.claim_job(job_id, "p1", LEASE)
        time.sleep(LEASE + 0.15)
        return job_id

    job_id = dead_train_job()
    assert brokered.claim("coordinator", 30, kinds=("evolve",)) is None
    assert brokered.get(job_id)["status"] == "running"
    assert brokered.claim_job(job_id, "p2", 30)[0] == "dead"
    assert brokered.get(job_id)["error"] == "attempts exhausted (last error: none)"
    # The embedded queue's claims end dead jobs of every kind, as before.
    job_id = dead_train_job()
    assert plain.claim("coordinator", 30, kinds=("evolve",)) is None
    assert plain.get(job_id)["status"] == "failed"
    assert plain.get(job_id)["error"] == "lease expired after 1 attempts (last error: none)"
    with pytest.raises(ValueError, match="brokered_kinds"):
        JobQueue(plain.engine, brokered_kinds=("predict",))


def test_claim_job_with_attempts_exhausted_while_queued(queue):
    # Not reachable through fail() (it ends the job at its last attempt), but a queued job
    # over its attempts must not run again: e.g. one whose max_attempts was lowered by hand.
    job = queue.submit("train", {}, max_attempts=2)
    queue.claim_job(job["id"], "p1", 30)
    queue.fail(job["id"], "p1", "boom")
    with queue._write() as session:
        session.get(Job, job["id"]).max_attempts = 1
    action, got = queue.claim_job(job["id"], "p2", 30)
    assert action == "dead" and got["status"] == "failed"
    assert got["error"] == "attempts exhausted (last error: boom)"


def test_claim_job_on_an_ended_job_changes_nothing(queue):
    ended = {}
    for status in ("succeeded", "failed", "canceled"):
        job = queue.submit("train", {})
        if status == "canceled":
            queue.cancel(job["id"])
        else:
            queue.claim_job(job["id"], "p1", 30)
            if status == "succeeded":
                queue.complete(job["id"], "p1", {"model_id": "m"})
            else:
                queue.fail(job["id"], "p1", "bad dataset", retry=False)
        ended[status] = job["id"]
    for status, job_id in ended.items():
        before = (queue.get(job_id), queue.events(job_id))
        action, got = queue.claim_job(job_id, "p2", 30)
        assert (action, got["status"]) == ("done", status)
        assert (queue.get(job_id), queue.events(job_id)) == before


def test_claim_job_of_a_canceled_job_whose_owner_died(queue):
    parent = queue.submit("train", {})
    child = queue.submit("train", {}, parent_id=parent["id"])
    queue.claim_job(parent["id"], "dead", LEASE)
    queue.cancel(parent["id"])
    time.sleep(LEASE + 0.15)
    action, got = queue.claim_job(parent["id"], "p2", 30)
    assert action == "done" and got["status"] == "canceled" and got["attempts"] == 1
    assert queue.get(child["id"])["status"] == "canceled"


def test_claim_job_two_processors_at_once_one_runs(backend):
    queue, make_queue = backend
    other = make_queue()
    job = queue.submit("train", {})
    barrier = threading.Barrier(2)
    actions, errors = [], []

    def start(q, owner):
        try:
            barrier.wait()
            actions.append((q.claim_job(job["id"], owner, 30)[0], owner))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(q, f"p{i}")) for i, q in enumerate((queue, other))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(a for a, _ in actions) == ["run", "wait"]
    runner = next(owner for action, owner in actions if action == "run")
    assert queue.get(job["id"])["lease_owner"] == runner and queue.get(job["id"])["attempts"] == 1


def test_claim_job_bad_arguments_change_nothing(queue):
    job = queue.submit("train", {})
    before = (queue.get(job["id"]), queue.events(job["id"]))
    with pytest.raises(KeyError):
        queue.claim_job("f" * 32, "p1", 30)
    for args, word in (((job["id"], "", 30), "owner"), ((job["id"], "p1", 0), "lease_seconds"),
                       ((job["id"], "p1", float("inf")), "lease_seconds"),
                       ((job["id"], None, 30), "owner"), (("", "p1", 30), "job_id")):
        with pytest.raises(ValueError, match=word):
            queue.claim_job(*args)
    assert (queue.get(job["id"]), queue.events(job["id"])) == before


def test_unpublished_in_publish_order_and_mark_published(queue):
    low = queue.submit("train", {}, priority=-10)
    first = queue.submit("train", {})
    high = queue.submit("train", {}, priority=20)
    second = queue.submit("train", {})
    evolve = queue.submit("evolve", {}, priority=99)   # never published: the server runs it
    running = queue.submit("train", {}, priority=99)
    queue.claim_job(running["id"], "p", 30)              # not queued any more
    canceled = queue.submit("train", {}, priority=99)
    queue.cancel(canceled["id"])
    assert all(j["published_at"] is None for j in (low, first, high, second, evolve))
    expected = [high["id"], first["id"], second["id"], low["id"]]
    assert [j["id"] for j in queue.unpublished()] == expected
    assert [j["id"] for j in queue.unpublished(limit=2)] == expected[:2]
    head = queue.unpublished(limit=1)[0]
    assert head["payload"] == {} and head["kind"] == "train" and head["priority"] == 20

    assert queue.mark_published([high["id"], second["id"]]) == 2
    assert [j["id"] for j in queue.unpublished()] == [first["id"], low["id"]]
    stamped = queue.get(high["id"])["published_at"]
    assert datetime.fromisoformat(stamped).utcoffset().total_seconds() == 0
    # Idempotent: marking again (a publisher repeating itself) keeps the first time.
    assert queue.mark_published([high["id"], "f" * 32]) == 0
    assert queue.get(high["id"])["published_at"] == stamped
    assert queue.mark_published([]) == 0
    # A published job that goes back to the queue (a retryable failure) keeps its message:
    # the broker redelivers it, so it is not published again.
    queue.claim_job(high["id"], "p", 30)
    queue.fail(high["id"], "p", "boom")
    assert queue.get(high["id"])["status"] == "queued"
    assert [j["id"] for j in queue.unpublished()] == [first["id"], low["id"]]
    assert queue.mark_published(j["id"] for j in queue.unpublished()) == 2
    assert queue.unpublished() == []


def test_unpublished_and_mark_published_bad_arguments(queue):
    job = queue.submit("train", {})
    for call, word in ((lambda: queue.unpublished(0), "limit"),
                       (lambda: queue.unpublished(MAX_LIST_LIMIT + 1), "limit"),
                       (lambda: queue.mark_published(job["id"]), "ids"),
                       (lambda: queue.mark_published([job["id"], ""]), "job_id"),
                       (lambda: queue.mark_published([job["id"], 7]), "job_id")):
        with pytest.raises(ValueError, match=word):
            call()
    assert [j["id"] for j in queue.unpublished()] == [job["id"]]


def test_outbox_query_reads_the_partial_index(queue):
    """The outbox looks often; with many queued (published) jobs it must read only the few
    unpublished ones, through ix_jobs_unpublished, not walk the queue."""
    for i in range(30):
        queue.submit("train", {}, priority=i % 3)
    executed = []

    def capture(_conn, _cursor, statement, parameters, _context, _many):
        executed.append((statement, parameters))

    event.listen(queue.engine, "before_cursor_execute", capture)
    try:
        assert len(queue.unpublished()) == 30
    finally:
        event.remove(queue.engine, "before_cursor_execute", capture)
    statement, parameters = next((s, p) for s, p in executed if "FROM jobs" in s)
    with queue.engine.connect() as connection:
        if queue.dialect == "sqlite":
            plan = connection.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters).all()
        else:
            # On a table this small PostgreSQL would rather scan it; the question here is only
            # whether the index matches the query.
            connection.exec_driver_sql("SET enable_seqscan = off")
            plan = connection.exec_driver_sql("EXPLAIN " + statement, parameters).all()
    assert "ix_jobs_unpublished" in " ".join(str(row) for row in plan), plan
