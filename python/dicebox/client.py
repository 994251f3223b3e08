"""A small typed HTTP client for the dicebox server's REST API (httpx).

One :class:`Client` per server, one attribute per resource: ``client.worker`` (the
processor protocol under ``/v1/worker``), ``client.datasets``, ``client.jobs`` and
``client.models``. Answers are plain dicts as the server sends them. Error answers are
turned into :mod:`dicebox.errors` classes from the server's JSON body
(``{"error": ..., "detail": ...}``): 400/422 InvalidInput, 401 Unauthorized, 404 NotFound,
409 Conflict, 413 TooLarge, 415 UnsupportedMedia; 5xx answers raise :class:`ServerError`,
and a server that cannot be reached (connection refused or reset, timeout, 502/503/504)
raises :class:`ServerUnavailable`, the one error worth retrying as it is.

A Client may be shared between threads (httpx.Client is thread-safe); close it when done.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Self
from urllib.parse import quote

import httpx

from dicebox.errors import (
    Conflict,
    InvalidInput,
    NotFound,
    ServiceError,
    TooLarge,
    Unauthorized,
    UnsupportedMedia,
)

__all__ = ["Client", "DatasetsAPI", "JobsAPI", "ModelsAPI", "ServerError", "ServerUnavailable",
           "WorkerAPI"]

# Streamed downloads and uploads move this much at a time.
CHUNK = 1 << 20
# Seconds to wait on a plain request (long-polls add their own wait on top).
DEFAULT_TIMEOUT = 60.0


class ServerError(ServiceError):
    """The server failed on its side (5xx)."""

    status = 500


class ServerUnavailable(ServerError):
    """The server could not be reached or is not serving now: worth retrying later."""

    status = 503


_BY_STATUS: dict[int, type[ServiceError]] = {
    400: InvalidInput, 401: Unauthorized, 404: NotFound, 409: Conflict, 413: TooLarge,
    415: UnsupportedMedia, 422: InvalidInput,
}
_UNAVAILABLE = {502, 503, 504}


def _seg(value: str) -> str:
    """One path segment: names and ids are quoted whole, so none can reach another route."""
    return quote(str(value), safe="")


def error_from_response(response: httpx.Response) -> ServiceError:
    """The dicebox.errors exception for an error answer (status >= 400)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        message, detail = body["error"], body.get("detail")
    else:
        text = response.text.strip()
        message, detail = (text[:500] or response.reason_phrase or "error"), None
    status = response.status_code
    if status in _UNAVAILABLE:
        cls: type[ServiceError] = ServerUnavailable
    elif status >= 500:
        cls = ServerError
    else:
        cls = _BY_STATUS.get(status, ServiceError)
    error = cls(message, detail)
    error.status = status  # the real status, also for 4xx codes without a class of their own
    return error


def _checked(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        response.read()
        raise error_from_response(response)
    return response


def _write_atomically(target: Path, response: httpx.Response) -> int:
    """Stream the body of ``response`` to ``target`` through a temporary file beside it
    (renamed into place, so readers never see half a file); returns the size in bytes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    size = 0
    try:
        with open(temp, "wb") as out:
            for chunk in response.iter_bytes(CHUNK):
                out.write(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return size


class Client:
    """The REST API of one dicebox server.

    ``server_url`` e.g. ``http://127.0.0.1:8000``; ``api_key`` is sent as
    ``Authorization: Bearer KEY``. ``transport`` lets tests route requests to an app in process
    (``httpx.ASGITransport``/``fastapi.testclient``) instead of the network.
    """

    def __init__(self, server_url: str, api_key: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, transport: httpx.BaseTransport | None = None) -> None:
        if not isinstance(server_url, str) or not server_url.startswith(("http://", "https://")):
            raise ValueError(f"server_url: expected an http:// or https:// URL, got {server_url!r}")
        headers = {"User-Agent": "dicebox-client"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.server_url = server_url.rstrip("/")
        self.timeout = timeout
        self.http = httpx.Client(base_url=self.server_url, headers=headers, timeout=timeout,
                                 transport=transport)
        self.worker = WorkerAPI(self)
        self.datasets = DatasetsAPI(self)
        self.jobs = JobsAPI(self)
        self.models = ModelsAPI(self)

    @classmethod
    def from_settings(cls, settings: Any, **kwargs: Any) -> Client:
        """A client for ``settings.server_url`` with ``settings.api_key``."""
        key = settings.api_key.get_secret_value() if settings.api_key is not None else None
        return cls(settings.server_url, api_key=key, **kwargs)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- plumbing shared by the resources ------------------------------------------------------

    def send(self, method: str, path: str, *, stream: bool = False, **kwargs: Any) -> httpx.Response:
        """One request; an error answer raises (see the module docstring). With ``stream``
        the body is not read yet: read it, then close the response."""
        try:
            request = self.http.build_request(method, path, **kwargs)
            response = self.http.send(request, stream=stream)
        except httpx.TransportError as exc:
            raise ServerUnavailable(f"{method} {self.server_url}{path}: {type(exc).__name__}: {exc}") from None
        if response.status_code >= 400:
            try:
                _checked(response)
            finally:
                response.close()
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        """A request answered with JSON (None for 204 No Content)."""
        response = self.send(method, path, **kwargs)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    def download(self, path: str, target: str | os.PathLike, *, etag: str | None = None,
                 params: dict[str, Any] | None = None, timeout: float | None = None) -> str | None:
        """GET ``path`` into the file ``target`` (atomically). With ``etag``, sends
        ``If-None-Match`` and leaves ``target`` alone when the server answers 304. Returns the
        answer's ETag (or ``etag`` on 304)."""
        headers = {"If-None-Match": etag} if etag else {}
        extra = {"timeout": timeout} if timeout is not None else {}
        response = self.send("GET", path, params=params, headers=headers, stream=True, **extra)
        try:
            if response.status_code == 304:
                return etag
            _write_atomically(Path(target), response)
            return response.headers.get("etag")
        except httpx.TransportError as exc:  # the connection broke while the body streamed
            raise ServerUnavailable(f"GET {self.server_url}{path}: {type(exc).__name__}: {exc}") from None
        finally:
            response.close()


class WorkerAPI:
    """The processor protocol (``/v1/worker``): claim a train job under a lease, keep the
    lease with heartbeats, store the epoch checkpoint, upload the model, end the job."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def claim(self, worker: str, wait: float = 0.0) -> dict | None:
        """The next train job for ``worker`` (long-polls up to ``wait`` <= 30 s), or None.

        Returns ``{"job": {...}, "lease_seconds": float}``; the job holds its ``payload``."""
        # The read timeout covers the long-poll on top of the usual answer time.
        return self._c.json("POST", "/v1/worker/claim", json={"worker": worker, "wait": wait},
                            timeout=httpx.Timeout(self._c.timeout, read=self._c.timeout + wait))

    def start(self, job_id: str, worker: str) -> dict:
        """RabbitMQ mode: what to do with a broker message naming job ``job_id``.

        Returns ``{"action": "run" | "wait" | "done" | "dead", "job": {...},
        "lease_seconds": s}`` plus ``retry_after`` (wait), ``status`` (done) or ``error``
        (dead); with "run" ``worker`` now holds the job's lease. NotFound for an unknown job
        or one that is not a train job (dead-letter the message)."""
        return self._c.json("POST", f"/v1/worker/jobs/{_seg(job_id)}/start", json={"worker": worker})

    def heartbeat(self, job_id: str, worker: str, *, progress: float | None = None,
                  epoch: dict[str, Any] | None = None,
                  samples_per_second: float | None = None) -> bool:
        """Renew the lease (and record an epoch); False means stop: cancel requested or
        the lease is lost."""
        body: dict[str, Any] = {"worker": worker}
        if progress is not None:
            body["progress"] = progress
        if epoch is not None:
            body["epoch"] = epoch
        if samples_per_second is not None:
            body["samples_per_second"] = samples_per_second
        answer = self._c.json("POST", f"/v1/worker/jobs/{_seg(job_id)}/heartbeat", json=body)
        return bool(answer["continue"])

    def put_checkpoint(self, job_id: str, worker: str, path: str | os.PathLike) -> None:
        """Upload the trainer's checkpoint file (streamed); Conflict if the lease is lost."""
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self._c.send("PUT", f"/v1/worker/jobs/{_seg(job_id)}/checkpoint", params={"worker": worker},
                         content=iter(lambda: f.read(CHUNK), b""),
                         headers={"Content-Type": "application/octet-stream",
                                  "Content-Length": str(size)})

    def get_checkpoint(self, job_id: str, worker: str, target: str | os.PathLike) -> bool:
        """Download the job's checkpoint into ``target``; False when the server has none."""
        try:
            self._c.download(f"/v1/worker/jobs/{_seg(job_id)}/checkpoint", target, params={"worker": worker})
        except NotFound:
            return False
        return True

    def upload_model(self, job_id: str, worker: str, model_dir: str | os.PathLike) -> str:
        """Upload a saved model directory (weights.safetensors + model.json); returns the model
        id. The server keeps one model per job, so repeating this is safe."""
        directory = Path(model_dir)
        with open(directory / "weights.safetensors", "rb") as weights, \
                open(directory / "model.json", "rb") as model:
            files = {"weights": ("weights.safetensors", weights, "application/octet-stream"),
                     "model": ("model.json", model, "application/json")}
            answer = self._c.json("POST", f"/v1/worker/jobs/{_seg(job_id)}/model", params={"worker": worker},
                                  files=files)
        return answer["model_id"]

    def complete(self, job_id: str, worker: str, result: dict[str, Any]) -> bool:
        """End the job succeeded with ``result``; Conflict if ``worker`` no longer holds it."""
        return bool(self._c.json("POST", f"/v1/worker/jobs/{_seg(job_id)}/complete",
                                 json={"worker": worker, "result": result})["ok"])

    def fail(self, job_id: str, worker: str, error: str, retry: bool = True) -> bool:
        """Give the job up with ``error``: back to the queue with ``retry`` (while attempts
        are left), else it ends failed. Conflict if ``worker`` no longer holds it."""
        return bool(self._c.json("POST", f"/v1/worker/jobs/{_seg(job_id)}/fail",
                                 json={"worker": worker, "error": error, "retry": retry})["ok"])

    def canceled(self, job_id: str, worker: str) -> bool:
        """Confirm that work stopped after a cancel request (the job ends canceled). False when
        no cancel was requested; Conflict if ``worker`` no longer holds the job."""
        return bool(self._c.json("POST", f"/v1/worker/jobs/{_seg(job_id)}/canceled",
                                 json={"worker": worker})["ok"])


class DatasetsAPI:
    """``/v1/datasets``: create, list, read, add images, export the packed file."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def create(self, name: str, width: int, height: int, channels: int = 1) -> dict:
        return self._c.json("POST", "/v1/datasets",
                            json={"name": name, "width": width, "height": height, "channels": channels})

    def list(self, **params: Any) -> dict:
        return self._c.json("GET", "/v1/datasets", params=params)

    def get(self, name: str) -> dict:
        return self._c.json("GET", f"/v1/datasets/{_seg(name)}")

    def add_images(self, name: str, category: str,
                   files: Sequence[tuple[str, bytes | IO[bytes]]]) -> dict:
        """Add encoded images (PNG/JPEG) of one category: ``files`` = [(filename, data)]."""
        parts = [("files", (filename, data, "application/octet-stream")) for filename, data in files]
        return self._c.json("POST", f"/v1/datasets/{_seg(name)}/images", data={"category": category}, files=parts)

    def add_items(self, name: str, items: Sequence[dict[str, Any]]) -> dict:
        """Add images as JSON items ``{"category", "data" (base64)}``."""
        return self._c.json("POST", f"/v1/datasets/{_seg(name)}/images", json={"items": list(items)})

    def export(self, name: str, target: str | os.PathLike, version: int | None = None,
               etag: str | None = None) -> str | None:
        """Download the packed dataset (``dicebox.Dataset.load`` reads it) into ``target``;
        with ``etag`` an unchanged export is not downloaded again. Returns the ETag."""
        params = {"version": version} if version is not None else None
        return self._c.download(f"/v1/datasets/{_seg(name)}/export", target, etag=etag, params=params)


class JobsAPI:
    """``/v1/jobs``: submit, list, read, cancel, follow the events."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def submit(self, kind: str, dataset: str, *, genome: dict | None = None,
               evolution: dict | None = None, params: dict | None = None, init: str | None = None,
               priority: int | None = None, idempotency_key: str | None = None) -> dict:
        """Queue a job; returns ``{"id", "status"}``."""
        body: dict[str, Any] = {"kind": kind, "dataset": dataset}
        for key, value in (("genome", genome), ("evolution", evolution), ("params", params),
                           ("init", init), ("priority", priority), ("idempotency_key", idempotency_key)):
            if value is not None:
                body[key] = value
        return self._c.json("POST", "/v1/jobs", json=body)

    def list(self, status: str | None = None, limit: int = 50, cursor: str | None = None) -> dict:
        params: dict[str, Any] = {"limit": limit}
        if status is not None:
            params["status"] = status
        if cursor is not None:
            params["cursor"] = cursor
        return self._c.json("GET", "/v1/jobs", params=params)

    def get(self, job_id: str) -> dict:
        return self._c.json("GET", f"/v1/jobs/{_seg(job_id)}")

    def cancel(self, job_id: str) -> dict:
        return self._c.json("POST", f"/v1/jobs/{_seg(job_id)}/cancel")

    def events(self, job_id: str, after: int = 0) -> Iterator[dict[str, Any]]:
        """The job's Server-Sent Events as ``{"id", "event", "data"}`` (data decoded from
        JSON), until the stream ends (after the ``end`` event, once the job has ended)."""
        headers = {"Last-Event-ID": str(after)} if after else {}
        response = self._c.send("GET", f"/v1/jobs/{_seg(job_id)}/events", headers=headers, stream=True,
                                timeout=httpx.Timeout(DEFAULT_TIMEOUT, read=None))
        try:
            event: dict[str, Any] = {}
            data: list[str] = []
            for line in response.iter_lines():
                if not line:
                    if data:
                        text = "\n".join(data)
                        try:
                            event["data"] = json.loads(text)
                        except ValueError:
                            event["data"] = text
                        event.setdefault("event", "message")
                        yield event
                    event, data = {}, []
                elif line.startswith(":"):
                    continue
                else:
                    field, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    if field == "data":
                        data.append(value)
                    elif field in ("event", "id"):
                        event[field] = value
        except httpx.TransportError as exc:
            raise ServerUnavailable(f"events of job {job_id}: {type(exc).__name__}: {exc}") from None
        finally:
            response.close()


class ModelsAPI:
    """``/v1/models``: list, read, download, classify."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def list(self, dataset: str | None = None, limit: int = 50, cursor: str | None = None) -> dict:
        params: dict[str, Any] = {"limit": limit}
        if dataset is not None:
            params["dataset"] = dataset
        if cursor is not None:
            params["cursor"] = cursor
        return self._c.json("GET", "/v1/models", params=params)

    def get(self, model_id: str, dataset: str | None = None) -> dict:
        """One model; ``model_id="best"`` with ``dataset`` names the dataset's best model."""
        params = {"dataset": dataset} if dataset is not None else None
        return self._c.json("GET", f"/v1/models/{_seg(model_id)}", params=params)

    def download(self, model_id: str, directory: str | os.PathLike) -> Path:
        """Write the model's ``weights.safetensors`` and ``model.json`` into ``directory``
        (``dicebox.Model.load`` reads it); model.json last, as Model.save does."""
        target = Path(directory)
        self._c.download(f"/v1/models/{_seg(model_id)}/weights", target / "weights.safetensors")
        self._c.download(f"/v1/models/{_seg(model_id)}/model.json", target / "model.json")
        return target

    def classify(self, model_id: str, files: Sequence[tuple[str, bytes | IO[bytes]]],
                 dataset: str | None = None) -> dict:
        """Classify encoded images ``[(filename, data)]``; ``{"predictions": [...]}``."""
        parts = [("files", (filename, data, "application/octet-stream")) for filename, data in files]
        params = {"dataset": dataset} if dataset is not None else None
        return self._c.json("POST", f"/v1/models/{_seg(model_id)}/classify", files=parts, params=params)
