"""The processor protocol: how training processors, local or on other machines, take train
jobs from the embedded queue and report back over HTTP.

A processor claims a job (long-poll; answered at once when a job is submitted), keeps its
lease alive with heartbeats (which also carry the per-epoch history and tell it to stop when
a cancel was requested or the lease was lost), stores its epoch checkpoint here so the job
can resume on any machine, uploads the trained model and only then completes the job. Every
call that changes a job must come from the processor holding its lease (409 otherwise).

Checkpoints live in ``home/checkpoints/<job id>/checkpoint.safetensors`` (written
atomically) and are deleted once the job has ended.

In RabbitMQ mode processors do not claim: the broker hands each one a message naming a job,
and the processor asks ``POST /jobs/{id}/start`` what to do with it (run it under a lease,
wait for its live owner, drop a duplicate of an ended job, or dead-letter a job that used up
its attempts; see ``JobQueue.claim_job``). Everything after that is the same protocol.
``/claim`` answers 409 then, so a processor started without ``--broker`` learns at once why
it gets no work.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import shutil
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile as StarletteUploadFile

from dicebox.errors import Conflict, InvalidInput, NotFound, TooLarge
from dicebox.jobqueue import FINISHED
from dicebox.server.deps import Authorized, ServicesDep
from dicebox.server.openapi import error_responses
from dicebox.server.services import Services

router = APIRouter(prefix="/v1/worker", tags=["worker"], dependencies=Authorized,
                   responses=error_responses(401, 404, 409, 422))

log = logging.getLogger("dicebox.server.worker")

# Only train jobs go to processors; evolve jobs are run by the server's coordinator.
PROCESSOR_KINDS = ("train",)
MAX_WAIT = 30.0
# A waiting claim re-reads the queue at least this often (changes made by other processes,
# expired leases); a submit in this process wakes it at once through the notifier.
POLL_SECONDS = 0.5
# Checkpoints of jobs that ended without passing through this router (expired after their
# last attempt, canceled while queued) are swept at most this often.
SWEEP_SECONDS = 60.0
CHECKPOINT_FILE = "checkpoint.safetensors"
# Shortest "look again in" of a /start answered "wait" (a lease about to expire).
MIN_RETRY_AFTER = 1.0
MAX_ERROR_CHARS = 10_000
_JOB_ID = re.compile(r"[0-9a-f]{32}")
_CHUNK = 1 << 20
_sweep_lock = threading.Lock()

Worker = Field(min_length=1, max_length=255, description="the processor's name (lease owner)")


class ClaimRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    worker: str = Worker
    wait: float = Field(default=0.0, ge=0.0, le=MAX_WAIT,
                        description="seconds to wait for a job before answering 204")


class StartRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    worker: str = Worker


class HeartbeatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    worker: str = Worker
    progress: float | None = Field(default=None, ge=0.0, le=1.0)
    epoch: dict[str, Any] | None = Field(default=None, description="one history entry of the trainer")
    samples_per_second: float | None = Field(default=None, ge=0.0, allow_inf_nan=False)


class CompleteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    worker: str = Worker
    result: dict[str, Any]


class FailRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    worker: str = Worker
    error: str = Field(min_length=1)
    retry: bool = True


class CanceledRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    worker: str = Worker


# ---------------------------------------------------------------------------------------------
# helpers (blocking ones run in the thread pool)

def _check_job_id(job_id: str) -> str:
    # Job ids name a directory under home/checkpoints: nothing but queue ids gets that far.
    if _JOB_ID.fullmatch(job_id) is None:
        raise NotFound(f"no job {job_id[:80]!r}")
    return job_id


def _get(services: Services, job_id: str) -> dict[str, Any]:
    try:
        return services.queue.get(job_id)
    except KeyError:
        raise NotFound(f"no job {job_id!r}") from None


def _owned(services: Services, job_id: str, worker: str) -> dict[str, Any]:
    """The job if ``worker`` holds its lease; Conflict otherwise (NotFound if unknown)."""
    job = _get(services, job_id)
    if job["status"] != "running" or job["lease_owner"] != worker:
        raise Conflict(f"worker {worker!r} does not hold job {job_id}",
                       {"status": job["status"], "lease_owner": job["lease_owner"]})
    return job


def _not_owner(services: Services, job_id: str, worker: str) -> Conflict:
    job = _get(services, job_id)
    return Conflict(f"worker {worker!r} does not hold job {job_id}",
                    {"status": job["status"], "lease_owner": job["lease_owner"]})


def _checkpoint_root(services: Services) -> Path:
    return services.settings.home / "checkpoints"


def _checkpoint_dir(services: Services, job_id: str) -> Path:
    return _checkpoint_root(services) / _check_job_id(job_id)


def _drop_checkpoint(services: Services, job_id: str) -> None:
    shutil.rmtree(_checkpoint_dir(services, job_id), ignore_errors=True)


def _sweep_checkpoints(services: Services, state: Any) -> None:
    """Delete the checkpoints of ended (or unknown) jobs, at most every SWEEP_SECONDS
    (``state`` is the app's state, which remembers the last sweep)."""
    now = time.monotonic()
    with _sweep_lock:
        if now - getattr(state, "worker_checkpoint_sweep", -math.inf) < SWEEP_SECONDS:
            return
        state.worker_checkpoint_sweep = now
    root = _checkpoint_root(services)
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if not entry.is_dir() or _JOB_ID.fullmatch(entry.name) is None:
            continue
        try:
            status = services.queue.get(entry.name)["status"]
        except KeyError:
            status = "unknown"
        if status in FINISHED or status == "unknown":
            log.debug("removing the checkpoint of %s job %s", status, entry.name)
            shutil.rmtree(entry, ignore_errors=True)


def _model_extra(model_json: bytes) -> dict[str, Any]:
    """The metadata ("extra") saved in an uploaded model.json, {} when absent or unreadable
    (the registry then refuses the file with a clear message)."""
    try:
        extra = json.loads(model_json).get("extra")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return {}
    return extra if isinstance(extra, dict) else {}


async def _disconnected(request: Request) -> bool:
    try:
        return await request.is_disconnected()
    except (anyio.ClosedResourceError, anyio.EndOfStream, OSError):
        return True


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


# ---------------------------------------------------------------------------------------------
# routes

@router.post("/claim", responses={204: {"description": "no job within `wait` seconds"}})
async def claim(body: ClaimRequest, request: Request, services: ServicesDep):
    """The next train job under a lease of ``lease_seconds`` for ``worker``, waiting up to
    ``wait`` seconds for one: ``{"job": {...}, "lease_seconds": s}``, or 204."""
    if services.broker_mode:
        raise Conflict("this server runs in RabbitMQ mode: processors take jobs from the broker "
                       "(python -m dicebox.processor --broker URL), not from /v1/worker/claim",
                       {"mode": "rabbitmq"})
    lease = services.settings.lease_seconds
    loop = asyncio.get_running_loop()
    deadline = loop.time() + body.wait
    await run_in_threadpool(_sweep_checkpoints, services, request.app.state)
    while True:
        # A processor that went away (killed while it waited) must not be handed a job
        # nobody would run: it would sit leased until the lease expired.
        if await _disconnected(request):
            return Response(status_code=204)
        try:
            job = await run_in_threadpool(services.queue.claim, body.worker, lease, PROCESSOR_KINDS)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        if job is not None:
            services.notifier.notify()  # the job is running now: wake its event streams
            return {"job": job, "lease_seconds": lease}
        remaining = deadline - loop.time()
        if remaining <= 0:
            return Response(status_code=204)
        await services.notifier.wait(min(POLL_SECONDS, remaining))


@router.post("/jobs/{job_id}/start")
async def start(job_id: str, body: StartRequest, services: ServicesDep) -> dict:
    """What to do with a broker message naming train job ``job_id`` (RabbitMQ mode; works in
    either mode). ``action`` is one of:

    - ``run``: the job is now ``worker``'s under a lease of ``lease_seconds`` (attempts + 1;
      ``job`` holds the payload): run it, then ack the message once the result is stored;
    - ``wait``: another owner's lease is alive; look again in ``retry_after`` seconds (park
      the message that long);
    - ``done``: the job has ended (``status``): a duplicate message, ack it;
    - ``dead``: the job used up its attempts and has just ended failed with ``error``:
      dead-letter the message.

    404 for an unknown job or one that is not a train job (a message no processor may run).
    """
    _check_job_id(job_id)
    lease = services.settings.lease_seconds

    def work() -> tuple[str, dict[str, Any]]:
        job = _get(services, job_id)
        if job["kind"] not in PROCESSOR_KINDS:
            raise NotFound(f"job {job_id} is a {job['kind']} job: processors run only train jobs",
                           {"kind": job["kind"]})
        try:
            action, job = services.queue.claim_job(job_id, body.worker, lease)
        except KeyError:
            raise NotFound(f"no job {job_id!r}") from None
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        if action == "dead":
            _drop_checkpoint(services, job_id)
        return action, job

    action, job = await run_in_threadpool(work)
    answer: dict[str, Any] = {"action": action, "job": job, "lease_seconds": lease}
    if action == "wait":
        answer["retry_after"] = _retry_after(job, lease)
    else:
        # "run" started the job, "dead" (and "done" for a dead owner's canceled job) ended
        # it: wake its event streams.
        services.notifier.notify()
        if action == "done":
            answer["status"] = job["status"]
        elif action == "dead":
            answer["error"] = job["error"]
    return answer


def _retry_after(job: dict[str, Any], lease: float) -> float:
    """Seconds until the live lease of ``job`` expires (at least MIN_RETRY_AFTER, at most one
    lease: the owner renews it meanwhile, so the message will come back to a live owner
    again, or to a dead one's lease just expired)."""
    expires = datetime.fromisoformat(job["lease_expires_at"])
    remaining = (expires - datetime.now(timezone.utc)).total_seconds()
    return round(min(max(remaining, MIN_RETRY_AFTER), lease), 3)


@router.post("/jobs/{job_id}/heartbeat")
async def heartbeat(job_id: str, body: HeartbeatRequest, request: Request, services: ServicesDep) -> dict:
    """Renew the lease; with ``epoch``, record that epoch (an ``epoch`` event). Answers
    ``{"continue": false}`` when the processor must stop: a cancel was requested or the lease
    is no longer its own."""
    _check_job_id(job_id)
    if body.epoch is not None:
        epoch = body.epoch.get("epoch")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
            raise InvalidInput(f"epoch.epoch must be an integer >= 1, got {epoch!r}")
    lease = services.settings.lease_seconds

    def work() -> tuple[bool, bool]:
        job = _get(services, job_id)
        recorded = False
        try:
            if body.epoch is not None:
                data = {**body.epoch, "attempt": job["attempts"]}
                recorded = services.queue.report(job_id, body.worker, "epoch", data, body.progress)
            elif body.progress is not None:
                services.queue.progress(job_id, body.worker, body.progress)
            return services.queue.renew(job_id, body.worker, lease), recorded
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None

    keep_going, recorded = await run_in_threadpool(work)
    metrics = request.app.state.metrics
    if recorded:
        metrics.epochs.inc()
        services.notifier.notify()  # event streams show the epoch at once
    if body.samples_per_second is not None and (recorded or keep_going):
        metrics.training_samples_per_second.labels(body.worker).set(body.samples_per_second)
    return {"continue": keep_going}


@router.put("/jobs/{job_id}/checkpoint")
async def put_checkpoint(job_id: str, request: Request, services: ServicesDep,
                         worker: str = Query(min_length=1, max_length=255)) -> dict:
    """Store the trainer's checkpoint (raw bytes of checkpoint.safetensors) for the job, so
    it resumes from this epoch wherever it runs next. Only from the lease owner."""
    directory = _checkpoint_dir(services, job_id)
    await run_in_threadpool(_owned, services, job_id, worker)
    limit = services.settings.max_artifact_bytes
    await run_in_threadpool(directory.mkdir, parents=True, exist_ok=True)
    temp = directory / f".{CHECKPOINT_FILE}.{uuid.uuid4().hex}.tmp"
    size = 0
    try:
        out = await run_in_threadpool(open, temp, "wb")
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise TooLarge(f"checkpoint exceeds the limit of {limit} bytes (DICEBOX_MAX_ARTIFACT_BYTES)")
                await run_in_threadpool(out.write, chunk)
            await run_in_threadpool(out.flush)
            await run_in_threadpool(os.fsync, out.fileno())
        finally:
            await run_in_threadpool(out.close)
        if size == 0:
            raise InvalidInput("checkpoint: the body is empty")

        def commit() -> None:
            # Ownership again: the lease may have passed to another processor while the
            # bytes arrived, and the new owner's checkpoint must not be replaced.
            _owned(services, job_id, worker)
            os.replace(temp, directory / CHECKPOINT_FILE)

        await run_in_threadpool(commit)
    finally:
        await run_in_threadpool(temp.unlink, missing_ok=True)
    return {"ok": True, "bytes": size}


@router.get("/jobs/{job_id}/checkpoint", response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}}}})
async def get_checkpoint(job_id: str, services: ServicesDep,
                         worker: str = Query(min_length=1, max_length=255)):
    """The job's last stored checkpoint (404 if none). Only for the lease owner."""
    directory = _checkpoint_dir(services, job_id)
    await run_in_threadpool(_owned, services, job_id, worker)
    path = directory / CHECKPOINT_FILE
    try:
        # Opened here so a checkpoint replaced meanwhile is still sent whole (the old file).
        handle = await run_in_threadpool(open, path, "rb")
    except FileNotFoundError:
        raise NotFound(f"job {job_id} has no checkpoint") from None
    size = os.fstat(handle.fileno()).st_size

    async def body():
        try:
            while chunk := await run_in_threadpool(handle.read, _CHUNK):
                yield chunk
        finally:
            handle.close()

    return StreamingResponse(body(), media_type="application/octet-stream",
                             headers={"Content-Length": str(size)})


@router.post("/jobs/{job_id}/model")
async def upload_model(job_id: str, weights: UploadFile, model: UploadFile, services: ServicesDep,
                       worker: str = Query(min_length=1, max_length=255)) -> dict:
    """Register the trained model (multipart ``weights`` = weights.safetensors, ``model`` =
    model.json) for the job. One model per job: a repeated upload answers the same id."""
    _check_job_id(job_id)
    for name, part in (("weights", weights), ("model", model)):
        if not isinstance(part, StarletteUploadFile):
            raise InvalidInput(f"{name}: expected a file part")

    def work() -> dict[str, Any]:
        job = _owned(services, job_id, worker)
        payload = job["payload"] or {}
        model_json = model.file.read()
        extra = _model_extra(model_json)
        version = payload.get("version")
        record = services.registry.register_upload(
            job_id, weights.file, model_json, dataset=payload.get("dataset"),
            dataset_version=version if isinstance(version, int) else None,
            training_seconds=_number(extra.get("training_seconds")),
            metrics=None, fitness=_number(extra.get("fitness")))
        return record

    record = await run_in_threadpool(work)
    return {"model_id": record["id"]}


@router.post("/jobs/{job_id}/complete")
async def complete(job_id: str, body: CompleteRequest, services: ServicesDep) -> dict:
    """End the job succeeded with ``result`` (after the model was uploaded)."""
    _check_job_id(job_id)

    def work() -> bool:
        try:
            done = services.queue.complete(job_id, body.worker, body.result)
        except KeyError:
            raise NotFound(f"no job {job_id!r}") from None
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        if not done:
            raise _not_owner(services, job_id, body.worker)
        _drop_checkpoint(services, job_id)
        return done

    ok = await run_in_threadpool(work)
    services.notifier.notify()
    return {"ok": ok}


@router.post("/jobs/{job_id}/fail")
async def fail(job_id: str, body: FailRequest, services: ServicesDep) -> dict:
    """Give the job up: with ``retry`` it goes back to the queue while attempts are left (and
    resumes from its checkpoint), otherwise it ends failed with ``error``."""
    _check_job_id(job_id)
    error = body.error if len(body.error) <= MAX_ERROR_CHARS else body.error[:MAX_ERROR_CHARS] + "..."

    def work() -> bool:
        try:
            done = services.queue.fail(job_id, body.worker, error, retry=body.retry)
        except KeyError:
            raise NotFound(f"no job {job_id!r}") from None
        if not done:
            raise _not_owner(services, job_id, body.worker)
        if services.queue.get(job_id)["status"] in FINISHED:
            _drop_checkpoint(services, job_id)
        return done

    ok = await run_in_threadpool(work)
    services.notifier.notify()
    return {"ok": ok}


@router.post("/jobs/{job_id}/canceled")
async def canceled(job_id: str, body: CanceledRequest, services: ServicesDep) -> dict:
    """Confirm that the processor stopped after a cancel request: the job ends canceled.
    ``{"ok": false}`` when no cancel was requested (the job stays the processor's)."""
    _check_job_id(job_id)

    def work() -> bool:
        try:
            done = services.queue.acknowledge_cancel(job_id, body.worker)
        except KeyError:
            raise NotFound(f"no job {job_id!r}") from None
        if done:
            _drop_checkpoint(services, job_id)
            return True
        _owned(services, job_id, body.worker)  # Conflict unless it still holds the job
        return False

    ok = await run_in_threadpool(work)
    services.notifier.notify()
    return {"ok": ok}
