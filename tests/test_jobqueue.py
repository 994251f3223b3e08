"""The embedded job queue (dicebox.jobqueue) on SQLite (a file) and PostgreSQL.

PostgreSQL: DICEBOX_TEST_POSTGRES_URL or postgresql+psycopg://postgres@127.0.0.1:5432/test; each
test gets a fresh schema. Unreachable -> skipped locally, failed when CI=true.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from datetime import datetime

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from dicebox.jobqueue import JobQueue

PG_URL = os.environ.get("DICEBOX_TEST_POSTGRES_URL",
                        "postgresql+psycopg://postgres@127.0.0.1:5432/test")
LEASE = 0.2  # seconds; tests that need expiry sleep past it


def _postgres_engine():
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT",
                          connect_args={"connect_timeout": 3})
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        admin.dispose()
        message = f"PostgreSQL unreachable at {PG_URL}: {exc.orig}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    schema = f"jq_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine = create_engine(PG_URL, connect_args={"options": f"-csearch_path={schema}"})
    return admin, engine, schema


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path):
    """(queue, make_queue) where make_queue() opens a second JobQueue on a new engine."""
    engines = []
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'jobs.db'}"

        def new_engine():
            engines.append(create_engine(url))
            return engines[-1]
        admin = schema = None
    else:
        admin, first, schema = _postgres_engine()
        engines.append(first)

        def new_engine():
            engines.append(create_engine(
                PG_URL, connect_args={"options": f"-csearch_path={schema}"}))
            return engines[-1]

    first_engine = engines[0] if engines else new_engine()
    queue = JobQueue(first_engine)
    queue.create_schema()
    yield queue, lambda: JobQueue(new_engine())
    for engine in engines:
        engine.dispose()
    if admin is not None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


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
