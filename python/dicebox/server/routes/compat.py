"""The original dicebox services' HTTP API, kept so existing clients keep working.

The original dicebox was four Flask services (sensory, classification, training and a
sensory batch processor behind RabbitMQ); their routes are served here with the same paths,
bodies and answers, backed by this service's stores. What the originals did (their sensory
service ``app/sensoryservice.py``, classification service ``app/classificationservice.py``,
training service ``app/trainingservice.py`` and batch processor
``app/sensory_service_batch_processor.py``, their newest versions) and how it is matched:

Headers. Every /api route but ``/api/version`` compared ``API-ACCESS-KEY`` with the
configured key and ``API-VERSION`` with the configured API version (400 on a mismatch). Here
the key is checked like everywhere else in the service (``API-ACCESS-KEY`` or a bearer
token); any ``API-VERSION`` is accepted, or none. A missing or wrong key answers 401 with
the service's error body; the originals answered 403 (401 in their first versions), and a
missing header failed Flask's lookup with a 400.

Bodies are JSON objects read whatever the Content-Type says (the originals' clients always
sent ``application/json``); images are base64 strings. Line breaks inside the base64 are
ignored, because the original clients encoded with Python 2's ``str.encode('base64')``,
which wraps lines every 76 characters.

``POST /api/sensory/store`` ``{"name", "width", "height", "category", "data"}`` ->
    200 ``{"sensory_store": true}``. The original wrote the PNG into a folder per dataset and
    size, ``<name>_<width>x<height>/data/<category>/``, and read it as grey ("L") when
    training. Here dataset ``name`` is created on first use at ``width`` x ``height`` with
    one channel (grey); the image is decoded at once to the dataset's size and channels and
    appended under ``category`` (a string; a number is taken as its decimal string, as the
    original's folder names were). Storing into an existing dataset of another size answers
    409 (the original would have started a separate folder). JPEG is accepted as well as PNG.
``GET /api/sensory/category`` -> 200 ``{"category_map": {category: index}}``: category names
    to label indices (ints), as the original's file-system connector built it. The original
    numbered the category folders in sorted order; here the index is the dataset's label,
    categories numbered in the order they first arrived (sorted for a dataset imported from
    folders), so that labels, both maps and classifications always agree.
``POST /api/sensory/request`` ``{"batch_size", "noise"}`` -> 201 ``{"labels", "data"}``:
    ``batch_size`` images drawn at random without replacement; ``labels`` one one-hot list of
    floats per image (length = number of categories), ``data`` one flat list of pixel values
    (ints 0-255, not normalised: the original's trainers divided by 255 themselves) per
    image. Pixels are listed column by column (x outer, y inner), the order the original's
    ``process_image`` read them in; an RGB dataset lists each pixel's three values together.
    ``noise`` (0-1) is, as in the original, the probability that an image is rotated by up to
    10 degrees and, independently, scaled by 0.7-1.5 about its centre (cropped or padded
    back to size) before it is listed. ``noise`` may be left out (0); the original required it.
``POST /api/sensory/batch`` ``{"batch_size", "noise"}`` -> 202 ``{"batch_id": uuid}``, then
``POST /api/sensory/poll`` ``{"batch_id"}`` -> 200 ``{"label": one-hot, "data": flat}``, one
    image per poll, and ``{"label": null, "data": null}`` once the order is used up or for an
    unknown id (the original answered the same for an empty or missing queue). The original
    published each order to RabbitMQ, where a batch processor filled a queue named by the
    batch id that expired 30 minutes after its last use. Here an order is a small file under
    ``DICEBOX_HOME/compat/batches/`` (the drawn image indices and a cursor, taken under a
    file lock), so every server process on the home sees it, orders survive a restart, and
    an order unused for ``ORDER_TTL_SECONDS`` (30 minutes, as the original) is dropped. Each
    image is read (and noise applied) when it is polled, from the dataset version the order
    was drawn from. At most ``MAX_PENDING_ORDERS`` orders wait at once (429 beyond).
``POST /api/classify`` ``{"data"}`` -> 200 ``{"classification": index}``: the index, in the
    category map of ``/api/category``, of the category the best model of the default dataset
    predicts. The original answered ``{"classification": -1}`` when it had no model to load;
    here that is a 404 with the service's error body (its clients treated both as a server
    error).
``GET /api/category`` -> 200 ``{"category_map": {"0": category, ...}}``: index (a string) to
    category name, as the original classification service turned its ``category_map.json``
    around.
``GET /api/train/request`` -> 202 ``{"training_request_id": id}``: the original queued a
    training request for its processor, which trained the configured "lonestar" network
    (its first versions took a POST, answered 201; POST is accepted here too).
    Here it queues a train job (the id is the job's) of ``DICEBOX_DEFAULT_GENOME`` (or
    ``DEFAULT_GENOME``) on the default dataset at its current version, with the default
    training parameters; follow it under ``/v1/jobs/{id}``.
``GET /api/version`` -> 200 ``{"version": "<dicebox version>"}``, open (no key), as the
    original (which answered its configured API version, e.g. "0.2.2"). ``GET /health/plain`` -> 200 ``true`` as plain text, open.

Every path but store works on the default dataset (``DICEBOX_DEFAULT_DATASET``, "dicebox"
unless set). Where the originals answered 500 to a malformed request (a missing field, a
``batch_size`` larger than the dataset), these answer 400 with ``{"error", "detail"}``
naming the field, and store nothing; a default dataset that does not exist yet is a 404
(the category maps are then empty instead, as the original's were without data).
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import math
import os
import struct
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from PIL import Image

from dicebox import __version__
from dicebox.errors import Conflict, InvalidInput, NotFound, ServiceError, TooLarge
from dicebox.genome import Genome
from dicebox.imagefolder import decode_image
from dicebox.jobspec import TRAIN_ATTEMPTS, JobSubmission, build_payload
from dicebox.registry import BEST
from dicebox.sensory import check_category, check_dataset_name
from dicebox.server.deps import Authorized, ServicesDep
from dicebox.server.metrics import MetricsDep
from dicebox.server.openapi import error_responses

# The open paths (/health/plain, /api/version) are on ``router``; the others on ``api``,
# which requires the key and is included into ``router`` below.
router = APIRouter(tags=["compatibility"], responses=error_responses())
api = APIRouter(tags=["compatibility"], dependencies=Authorized,
                responses=error_responses(401, 404, 409, 429))

#: Images per ``/api/sensory/request`` (one JSON answer).
MAX_REQUEST_BATCH = 1024
#: Images per batch order (``/api/sensory/batch``), handed out one per poll.
MAX_ORDER_BATCH = 10_000
#: Pixel values in one ``/api/sensory/request`` answer (about 4 bytes of JSON each).
MAX_REQUEST_VALUES = 1 << 24
#: Batch orders waiting to be polled, over all clients.
MAX_PENDING_ORDERS = 256
#: An order not polled for this long is dropped (the original queues' x-expires).
ORDER_TTL_SECONDS = 1800.0

#: Trained by ``/api/train/request`` when DICEBOX_DEFAULT_GENOME is not set: a small CNN for
#: grey images like the original's (dice faces, 100 x 100, 19 categories). It needs images of
#: at least 6 x 6 pixels (the second 3 x 3 convolution comes after a 2 x 2 pooling); a train
#: request on a smaller default dataset gets a 400 naming the layer.
DEFAULT_GENOME: dict[str, Any] = {
    "optimizer": {"name": "adam", "learning_rate": 0.001},
    "layers": [
        {"type": "conv2d", "filters": 16, "kernel": [3, 3], "stride": [1, 1], "padding": "same",
         "activation": "relu"},
        {"type": "maxpool2d", "kernel": [2, 2]},
        {"type": "conv2d", "filters": 32, "kernel": [3, 3], "stride": [1, 1], "padding": "same",
         "activation": "relu"},
        {"type": "maxpool2d", "kernel": [2, 2]},
        {"type": "dropout", "rate": 0.25},
        {"type": "dense", "size": 64, "activation": "relu"},
    ],
}


class TooManyOrders(ServiceError):
    """Too many batch orders are waiting to be polled (429)."""

    status = 429


class Misconfigured(ServiceError):
    """A setting of the server is unusable (500): the operator has to fix it, not the client."""

    status = 500


# ---------------------------------------------------------------------------------------------
# request bodies

async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("body: expected a JSON object", {"field": "body"}) from None
    if not isinstance(body, dict):
        raise InvalidInput(f"body: expected a JSON object, got {type(body).__name__}",
                           {"field": "body"})
    return body


def _required(body: dict[str, Any], field: str) -> Any:
    if field not in body or body[field] is None:
        raise InvalidInput(f"{field}: missing", {"field": field})
    return body[field]


def _integer(body: dict[str, Any], field: str, lo: int, hi: int) -> int:
    value = _required(body, field)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidInput(f"{field}: expected an integer in {lo}..{hi}, got {_short(value)!r}",
                           {"field": field})
    return value


def _noise(body: dict[str, Any]) -> float:
    value = body.get("noise")
    if value is None:
        return 0.0
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not 0.0 <= value <= 1.0):
        raise InvalidInput(f"noise: expected a number in 0..1 (the chance of each distortion), "
                           f"got {_short(value)!r}", {"field": "noise"})
    return float(value)


def _image_bytes(body: dict[str, Any], services) -> bytes:
    """The image of ``body["data"]``: base64 (line breaks allowed), within max_image_bytes."""
    value = _required(body, "data")
    if not isinstance(value, str):
        raise InvalidInput(f"data: expected a base64 string of a PNG image, got "
                           f"{type(value).__name__}", {"field": "data"})
    compact = "".join(value.split())
    limit = services.settings.max_image_bytes
    if len(compact) // 4 * 3 > limit + 2:
        raise TooLarge(f"data: the image is larger than the limit of {limit} bytes "
                       "(DICEBOX_MAX_IMAGE_BYTES)", {"field": "data", "limit": limit})
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("data: not valid base64", {"field": "data"}) from None
    if not data:
        raise InvalidInput("data: empty image", {"field": "data"})
    return data


def _short(value: Any, limit: int = 80) -> Any:
    """Client values echoed in errors are cut short."""
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + "..."
    return value


# ---------------------------------------------------------------------------------------------
# answers in the original's shapes

def _flat(images: np.ndarray) -> list[list[int]]:
    """uint8 [N, C, H, W] -> per image the pixel values column by column (x outer, y inner),
    a pixel's channels together: the original's ``process_image`` order."""
    return images.transpose(0, 3, 2, 1).reshape(len(images), -1).tolist()


def _one_hot(labels: np.ndarray, classes: int) -> list[list[float]]:
    return np.eye(classes, dtype=np.float64)[labels].tolist()


def _distort(image: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """The original's noise on one uint8 [C, H, W] image: with chance ``noise`` a rotation by
    up to 10 degrees either way, and independently a scaling by 0.7-1.5 about the centre
    (cropped or padded with black back to the size)."""
    if noise <= 0.0:
        return image
    rotate = rng.random() < noise
    scale = rng.random() < noise
    if not rotate and not scale:
        return image
    channels, height, width = image.shape
    picture = (Image.fromarray(image[0], "L") if channels == 1
               else Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)), "RGB"))
    if rotate:
        picture = picture.rotate(float(rng.uniform(-10.0, 10.0)), resample=Image.BILINEAR)
    if scale:
        factor = float(rng.uniform(0.7, 1.5))
        new_width, new_height = max(1, int(width * factor)), max(1, int(height * factor))
        picture = picture.resize((new_width, new_height), Image.BILINEAR)
        left, upper = (new_width - width) // 2, (new_height - height) // 2
        picture = picture.crop((left, upper, left + width, upper + height))
    pixels = np.asarray(picture, dtype=np.uint8)
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


# ---------------------------------------------------------------------------------------------
# batch orders

class BatchOrders:
    """Batch orders waiting to be polled, one file each under ``root``.

    A file holds a header (next item, items, metadata length), the order's metadata as JSON
    (dataset, version, noise) and the drawn image indices (int64). A poll takes the file's
    lock, reads the next index and writes the advanced cursor before letting go, so
    concurrent polls from any process on this home never hand out an item twice; the poll
    that takes the last item deletes the file. Files unused for ``ttl`` seconds are dropped.
    """

    _HEADER = struct.Struct("<QQI")
    _INDEX = struct.Struct("<q")
    _SUFFIX = ".order"

    def __init__(self, root: Path, ttl: float = ORDER_TTL_SECONDS,
                 limit: int = MAX_PENDING_ORDERS) -> None:
        self.root = root
        self.ttl = ttl
        self.limit = limit

    def create(self, meta: dict[str, Any], indices: np.ndarray) -> str:
        """Store a new order; returns its id (a uuid string). TooManyOrders at the limit."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self._sweep() >= self.limit:
            raise TooManyOrders(f"{self.limit} batch orders are waiting to be polled; poll them "
                                f"empty or wait for unused ones to expire "
                                f"({int(self.ttl)} s)", {"limit": self.limit})
        batch_id = str(uuid.uuid4())
        encoded = json.dumps(meta).encode()
        blob = (self._HEADER.pack(0, len(indices), len(encoded)) + encoded
                + np.asarray(indices, dtype="<i8").tobytes())
        partial = self.root / f".{batch_id}.partial"
        try:
            partial.write_bytes(blob)
            os.replace(partial, self._path(batch_id))
        finally:
            partial.unlink(missing_ok=True)
        return batch_id

    def pop(self, batch_id: str) -> tuple[dict[str, Any], int] | None:
        """(metadata, image index) of the order's next item; None when the order is used up,
        expired or unknown (including ids that are not uuids: no path is built from them)."""
        try:
            canonical = str(uuid.UUID(batch_id))
        except (ValueError, TypeError, AttributeError):
            return None
        path = self._path(canonical)
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if time.time() - os.fstat(fd).st_mtime > self.ttl:
                path.unlink(missing_ok=True)
                return None
            header = os.pread(fd, self._HEADER.size, 0)
            if len(header) < self._HEADER.size:
                return None
            cursor, count, meta_length = self._HEADER.unpack(header)
            if cursor >= count:
                path.unlink(missing_ok=True)
                return None
            meta = json.loads(os.pread(fd, meta_length, self._HEADER.size))
            offset = self._HEADER.size + meta_length + cursor * self._INDEX.size
            (index,) = self._INDEX.unpack(os.pread(fd, self._INDEX.size, offset))
            # The cursor is written before the file goes: a poll already waiting on this
            # lock (holding the file open) then sees the order used up.
            os.pwrite(fd, self._HEADER.pack(cursor + 1, count, meta_length), 0)
            if cursor + 1 >= count:
                path.unlink(missing_ok=True)
            return meta, index
        finally:
            os.close(fd)  # releases the lock

    def _path(self, batch_id: str) -> Path:
        return self.root / f"{batch_id}{self._SUFFIX}"

    def _sweep(self) -> int:
        """Deletes expired orders and stale partial files; returns the orders left."""
        cutoff = time.time() - self.ttl
        pending = 0
        for entry in self.root.iterdir():
            try:
                expired = entry.stat().st_mtime < cutoff
            except FileNotFoundError:
                continue
            if expired:
                entry.unlink(missing_ok=True)
            elif entry.name.endswith(self._SUFFIX):
                pending += 1
        return pending


def _orders(services) -> BatchOrders:
    return BatchOrders(services.settings.home / "compat" / "batches", ORDER_TTL_SECONDS,
                       MAX_PENDING_ORDERS)


# ---------------------------------------------------------------------------------------------
# the default dataset

def _default_dataset(services) -> dict[str, Any]:
    """The default dataset's record; NotFound naming the setting when it does not exist."""
    name = services.settings.default_dataset
    try:
        return services.sensory.get(name)
    except NotFound:
        raise NotFound(f"the default dataset {name!r} (DICEBOX_DEFAULT_DATASET) does not exist "
                       "yet; store images with POST /api/sensory/store",
                       {"dataset": name}) from None


def _categories(services) -> list[str]:
    """The default dataset's categories in label order; none when it does not exist yet."""
    try:
        return [c["name"] for c in _default_dataset(services)["categories"]]
    except NotFound:
        return []


def _draw(services, batch_size: int) -> tuple[dict[str, Any], np.ndarray]:
    """(the default dataset's record, ``batch_size`` distinct random image indices of its
    current version)."""
    info = _default_dataset(services)
    count = int(info["count"])
    if batch_size > count:
        raise InvalidInput(f"batch_size: the dataset {info['name']!r} holds {count} images, fewer "
                           f"than the {batch_size} asked for", {"field": "batch_size"})
    return info, np.random.default_rng().choice(count, size=batch_size, replace=False)


# ---------------------------------------------------------------------------------------------
# routes

def _json_body_doc(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    """``openapi_extra`` describing a JSON body the route reads by hand (see the module
    docstring: the body is read whatever the Content-Type says)."""
    schema = {"type": "object", "properties": properties, "required": required}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


_BATCH_DOC = _json_body_doc({"batch_size": {"type": "integer", "minimum": 1},
                             "noise": {"type": "number", "minimum": 0, "maximum": 1}},
                            ["batch_size"])
_IMAGE_DATA = {"type": "string", "description": "base64 PNG (line breaks ignored)"}


# response_class=Response (no media type of its own), so that the error answers this route
# shares with every other are documented as the JSON they are.
@router.get("/health/plain", response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "`true`"}})
async def health_plain() -> PlainTextResponse:
    """``true`` while the server is up (open, like ``/healthz``)."""
    return PlainTextResponse("true")


@router.get("/api/version")
async def version() -> dict:
    """The service's version (open, as in the original)."""
    return {"version": __version__}


@api.post("/api/sensory/store", openapi_extra=_json_body_doc(
    {"name": {"type": "string"}, "width": {"type": "integer"}, "height": {"type": "integer"},
     "category": {"type": ["string", "integer"]}, "data": _IMAGE_DATA},
    ["name", "width", "height", "category", "data"]))
async def sensory_store(request: Request, services: ServicesDep, metrics: MetricsDep) -> dict:
    """Store one image ``{"name", "width", "height", "category", "data": base64 PNG}`` in
    dataset ``name``, created at ``width`` x ``height`` (grey) on first use."""
    body = await _json_body(request)
    name = _required(body, "name")
    check_dataset_name(name)
    side = services.settings.max_dataset_side
    width = _integer(body, "width", 1, side)
    height = _integer(body, "height", 1, side)
    category = _required(body, "category")
    if isinstance(category, int) and not isinstance(category, bool):
        category = str(category)
    check_category(category)
    data = _image_bytes(body, services)

    def store() -> None:
        sensory = services.sensory
        sensory.check_image_header(data, "data")
        try:
            existing: dict[str, Any] | None = sensory.get(name)
        except NotFound:
            existing = None
        if existing is not None and (existing["width"], existing["height"]) != (width, height):
            raise Conflict(f"dataset {name!r} holds {existing['width']} x {existing['height']} "
                           f"images, not {width} x {height}", {"dataset": name})
        channels = existing["channels"] if existing is not None else 1
        # Decoded before the dataset is created, so a bad image creates nothing.
        try:
            image = decode_image(data, (width, height), channels, "data")
        except ValueError as exc:
            raise InvalidInput(str(exc), {"field": "data"}) from None
        if existing is None:
            sensory.create(name, width, height, channels)
        sensory.add_arrays(name, image[None], [category])

    await run_in_threadpool(store)
    metrics.ingested_images.inc()
    return {"sensory_store": True}


@api.get("/api/sensory/category")
async def sensory_category(services: ServicesDep) -> dict:
    """``{"category_map": {category: index}}`` of the default dataset."""
    categories = await run_in_threadpool(_categories, services)
    return {"category_map": {name: index for index, name in enumerate(categories)}}


@api.get("/api/category")
async def category(services: ServicesDep) -> dict:
    """``{"category_map": {"index": category}}`` of the default dataset."""
    categories = await run_in_threadpool(_categories, services)
    return {"category_map": {str(index): name for index, name in enumerate(categories)}}


@api.post("/api/sensory/request", status_code=201, openapi_extra=_BATCH_DOC)
async def sensory_request(request: Request, services: ServicesDep) -> JSONResponse:
    """``batch_size`` random images of the default dataset: ``{"labels": one-hot lists,
    "data": flat pixel lists}``."""
    body = await _json_body(request)
    batch_size = _integer(body, "batch_size", 1, MAX_REQUEST_BATCH)
    noise = _noise(body)

    def work() -> JSONResponse:
        info, indices = _draw(services, batch_size)
        values = batch_size * info["channels"] * info["height"] * info["width"]
        if values > MAX_REQUEST_VALUES:
            raise InvalidInput(f"batch_size: {batch_size} images of {info['name']!r} are {values} "
                               f"pixel values, more than the {MAX_REQUEST_VALUES} one answer may "
                               "hold; ask for fewer or use /api/sensory/batch",
                               {"field": "batch_size", "limit": MAX_REQUEST_VALUES})
        dataset = services.sensory.dataset(info["name"], int(info["count"]))
        images = np.asarray(dataset.images[indices])
        labels = np.asarray(dataset.labels[indices])
        if noise > 0.0:
            rng = np.random.default_rng()
            images = np.stack([_distort(image, noise, rng) for image in images])
        # Rendered here, off the event loop: an answer may hold millions of values.
        return JSONResponse({"labels": _one_hot(labels, len(dataset.categories)),
                             "data": _flat(images)}, status_code=201)

    return await run_in_threadpool(work)


@api.post("/api/sensory/batch", status_code=202, openapi_extra=_BATCH_DOC)
async def sensory_batch(request: Request, services: ServicesDep) -> JSONResponse:
    """Order ``batch_size`` random images of the default dataset: ``{"batch_id"}``; poll
    ``/api/sensory/poll`` for them one at a time."""
    body = await _json_body(request)
    batch_size = _integer(body, "batch_size", 1, MAX_ORDER_BATCH)
    noise = _noise(body)

    def work() -> str:
        info, indices = _draw(services, batch_size)
        meta = {"dataset": info["name"], "version": int(info["count"]), "noise": noise}
        return _orders(services).create(meta, indices)

    return JSONResponse({"batch_id": await run_in_threadpool(work)}, status_code=202)


@api.post("/api/sensory/poll", openapi_extra=_json_body_doc({"batch_id": {"type": "string"}},
                                                                 ["batch_id"]))
async def sensory_poll(request: Request, services: ServicesDep) -> dict:
    """The next image of a batch order, ``{"label": one-hot, "data": flat pixels}``, or
    ``{"label": null, "data": null}`` when it has none left (or is unknown)."""
    body = await _json_body(request)
    batch_id = _required(body, "batch_id")
    if not isinstance(batch_id, str):
        raise InvalidInput(f"batch_id: expected the string /api/sensory/batch answered, got "
                           f"{type(batch_id).__name__}", {"field": "batch_id"})

    def work() -> dict[str, Any]:
        item = _orders(services).pop(batch_id)
        if item is None:
            return {"label": None, "data": None}
        meta, index = item
        dataset = services.sensory.dataset(meta["dataset"], meta["version"])
        image = _distort(np.asarray(dataset.images[index]), meta["noise"], np.random.default_rng())
        label = np.asarray(dataset.labels[index:index + 1])
        return {"label": _one_hot(label, len(dataset.categories))[0], "data": _flat(image[None])[0]}

    return await run_in_threadpool(work)


@api.post("/api/classify", openapi_extra=_json_body_doc({"data": _IMAGE_DATA}, ["data"]))
async def classify(request: Request, services: ServicesDep, metrics: MetricsDep) -> dict:
    """``{"data": base64 PNG}`` -> ``{"classification": index}`` in the category map, by the
    best model of the default dataset."""
    started = time.perf_counter()
    body = await _json_body(request)
    data = _image_bytes(body, services)
    classifier = services.classifier

    def work() -> int:
        classifier.check_request([data], 1)
        try:
            entry = classifier.model(BEST, services.settings.default_dataset)
        except NotFound:
            raise NotFound(f"no trained model for the default dataset "
                           f"{services.settings.default_dataset!r} yet; request one with "
                           "GET /api/train/request", {"dataset": services.settings.default_dataset}
                           ) from None
        answer = classifier.run(entry, [data], 1)[0]
        # Categories only ever get appended, so the model's label index is the dataset's.
        return entry.categories.index(answer["category"])

    index = await run_in_threadpool(work)
    metrics.classified_images.inc()
    metrics.classify_latency.observe(time.perf_counter() - started)
    return {"classification": index}


def _genome(services) -> dict[str, Any]:
    """DICEBOX_DEFAULT_GENOME when set (Misconfigured if it is no genome), else DEFAULT_GENOME."""
    text = services.settings.default_genome.strip()
    if not text:
        return DEFAULT_GENOME
    try:
        return Genome.from_json(text).to_dict()
    except ValueError as exc:
        raise Misconfigured(f"DICEBOX_DEFAULT_GENOME is not a valid genome: {exc}") from None


@api.get("/api/train/request", status_code=202)
@api.post("/api/train/request", status_code=202)
async def train_request(services: ServicesDep, metrics: MetricsDep) -> JSONResponse:
    """Queue a train job of the default genome on the default dataset:
    ``{"training_request_id": job id}``."""

    def work() -> dict[str, Any]:
        _default_dataset(services)  # a 404 that names the setting
        submission = JobSubmission(kind="train", dataset=services.settings.default_dataset,
                                   genome=_genome(services))
        payload = build_payload(submission, services.sensory, services.registry, services.settings)
        return services.queue.submit("train", payload, max_attempts=TRAIN_ATTEMPTS)

    job = await run_in_threadpool(work)
    services.notifier.notify()
    metrics.jobs_submitted.labels("train").inc()
    return JSONResponse({"training_request_id": job["id"]}, status_code=202)


router.include_router(api)
