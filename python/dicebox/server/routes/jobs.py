"""Jobs: submit, list, read, cancel, and follow a job's progress as Server-Sent Events.

In RabbitMQ mode a submitted train job is first stored (the database is the truth), then
its message is published by the outbox (``dicebox.outbox``); the submit waits up to
``PUBLISH_WAIT_SECONDS`` for the broker's confirm and says how it went in ``published``:
true = the message is on the broker's disk; false = the broker did not confirm in time (or
the job is an evolve job, which the server runs itself and never publishes). Either way
the answer is 202 and the job is kept: an unpublished train job goes out once the broker
is back.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from dicebox.errors import InvalidInput, NotFound
from dicebox.jobqueue import FINISHED
from dicebox.jobspec import EVOLVE_ATTEMPTS, TRAIN_ATTEMPTS, JobSubmission, build_payload
from dicebox.server.deps import Authorized, ServicesDep
from dicebox.server.metrics import MetricsDep
from dicebox.server.openapi import error_responses

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=Authorized,
                   responses=error_responses(401, 404, 422))

# How often an events stream re-reads the database when nothing woke it (changes made by
# other processes), and how often it sends a comment to keep proxies from closing it.
POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0
# RabbitMQ mode: how long a submit waits for its job's publisher confirm.
PUBLISH_WAIT_SECONDS = 3.0

Status = Literal["queued", "running", "succeeded", "failed", "canceled"]


def public(job: dict[str, Any]) -> dict[str, Any]:
    """What clients see of a job: no lease internals or coordinator state."""
    payload = job.get("payload") or {}
    return {
        "id": job["id"],
        "kind": job["kind"],
        "status": job["status"],
        "priority": job["priority"],
        "progress": job["progress"],
        "attempts": job["attempts"],
        "max_attempts": job["max_attempts"],
        "error": job["error"],
        "created_at": job["created_at"],
        "started_at": job["started_at"],
        "finished_at": job["finished_at"],
        "parent_id": job["parent_id"],
        "dataset": payload.get("dataset"),
        "cancel_requested": job["cancel_requested"],
        "worker": job["lease_owner"],
        "spec": {k: v for k, v in payload.items() if k != "evolve"},
        "result": job["result"],
    }


def _get(services, job_id: str) -> dict[str, Any]:
    try:
        return services.queue.get(job_id)
    except KeyError:
        raise NotFound(f"no job {job_id!r}") from None
    except ValueError:
        raise NotFound(f"no job {job_id!r}") from None


@router.post("", status_code=202)
async def submit(sub: JobSubmission, services: ServicesDep, metrics: MetricsDep) -> JSONResponse:
    """Queue a train or evolve job. The same ``idempotency_key`` returns the same job."""

    def work() -> dict[str, Any]:
        if sub.idempotency_key is not None:
            existing = services.queue.find_by_key(sub.idempotency_key)
            if existing is not None:
                return existing
        payload = build_payload(sub, services.sensory, services.registry, services.settings)
        try:
            return services.queue.submit(
                sub.kind, payload, priority=sub.priority, idempotency_key=sub.idempotency_key,
                max_attempts=TRAIN_ATTEMPTS if sub.kind == "train" else EVOLVE_ATTEMPTS)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None

    job = await run_in_threadpool(work)
    body: dict[str, Any] = {"id": job["id"], "status": job["status"]}
    if services.outbox is not None:
        body["published"] = await _published(services, job)
    else:
        services.notifier.notify()
    metrics.jobs_submitted.labels(sub.kind).inc()
    return JSONResponse(body, status_code=202, headers={"Location": f"/v1/jobs/{job['id']}"})


async def _published(services, job: dict[str, Any]) -> bool:
    """RabbitMQ mode: wake the outbox (with the notifier, which also wakes waiting event
    streams) and wait up to PUBLISH_WAIT_SECONDS for the confirm of ``job``'s message."""
    outbox = services.outbox
    if job["published_at"] is not None:  # an earlier submit with the same idempotency key
        services.notifier.notify()
        return True
    if job["kind"] != "train" or job["status"] != "queued":
        # Evolve jobs are never published; a job found by its idempotency key that has
        # already left the queue unpublished (canceled) never will be.
        services.notifier.notify()
        return False
    # Expect before waking the outbox, so the confirm cannot slip by unseen.
    future = outbox.expect(job["id"])
    services.notifier.notify()
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), PUBLISH_WAIT_SECONDS)
    except asyncio.TimeoutError:
        return False
    finally:
        outbox.forget(job["id"], future)


@router.get("")
async def list_jobs(services: ServicesDep, status: Status | None = None,
                    parent_id: str | None = Query(default=None, max_length=64),
                    limit: int = Query(default=50, ge=1, le=1000),
                    cursor: str | None = Query(default=None, max_length=200)) -> dict:
    """Newest first; ``next`` is the cursor of the following page (null at the end)."""
    try:
        page = await run_in_threadpool(services.queue.list, status, limit, cursor, parent_id)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    return {"items": [public(j) for j in page["items"]], "next": page["next"]}


@router.get("/{job_id}")
async def get_job(job_id: str, services: ServicesDep) -> dict:
    """One job. While it runs, ``history`` holds the epochs reported so far (train jobs)."""

    def work() -> dict[str, Any]:
        job = _get(services, job_id)
        out = public(job)
        if job["kind"] == "train" and job["result"] is None:
            out["history"] = [e["data"] for e in services.queue.events(job_id, 0, 10_000)
                              if e["type"] == "epoch" and e["data"].get("attempt") == job["attempts"]]
        else:
            out["history"] = (job["result"] or {}).get("history", [])
        return out

    return await run_in_threadpool(work)


@router.post("/{job_id}/cancel")
async def cancel(job_id: str, services: ServicesDep) -> dict:
    """A queued job ends ``canceled`` at once; a running one stops within one epoch (an evolve
    job cancels its children). A finished job is returned unchanged."""

    def work() -> dict[str, Any]:
        _get(services, job_id)
        return services.queue.cancel(job_id)

    job = await run_in_threadpool(work)
    services.notifier.notify()
    return public(job)


@router.get("/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "the job's events, ending with `event: end`"}})
async def events(job_id: str, request: Request, services: ServicesDep,
                 last_event_id: str | None = Header(default=None)) -> StreamingResponse:
    """Server-Sent Events: every event of the job from the start (or after ``Last-Event-ID``),
    then live ones, until the job has ended; the last message is ``event: end`` with the job.
    Event types: ``status``, ``epoch``, ``individual``, ``generation``, ``model``, ``log``,
    ``cancel_requested``."""
    await run_in_threadpool(_get, services, job_id)
    try:
        after = int(last_event_id) if last_event_id else 0
    except ValueError:
        raise InvalidInput(f"Last-Event-ID: expected an event id, got {last_event_id!r}") from None

    async def stream():
        nonlocal after
        idle = 0.0
        yield "retry: 2000\n\n"
        while True:
            # Status first, then events: the final status event is written in the same
            # transaction as the status, so a finished job's events are all there to read.
            job = await run_in_threadpool(services.queue.get, job_id)
            batch = await run_in_threadpool(services.queue.events, job_id, after, 500)
            for event in batch:
                after = event["seq"]
                yield (f"id: {event['seq']}\nevent: {event['type']}\n"
                       f"data: {json.dumps(event['data'], separators=(',', ':'))}\n\n")
            if len(batch) == 500:
                continue
            if job["status"] in FINISHED:
                yield f"event: end\ndata: {json.dumps(public(job), separators=(',', ':'))}\n\n"
                return
            if await request.is_disconnected():
                return
            woke = await services.notifier.wait(POLL_SECONDS)
            idle = 0.0 if batch or woke else idle + POLL_SECONDS
            if idle >= KEEPALIVE_SECONDS:
                idle = 0.0
                yield ": keep-alive\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
