"""Datasets (the sensory store over HTTP): create, list, read, add images, export.

Images arrive as ``multipart/form-data`` (one ``category`` field and one or more ``files``) or
as JSON ``{"items": [{"category": ..., "data": base64}]}``; either way they go to
``SensoryStore.add_encoded``, which decodes every image once (off the event loop) and stores
all of them or none. ``GET /v1/datasets/{name}/export`` serves a version's packed file with a
strong ETag, and answers ``If-None-Match`` with 304, so processors download each version once.
``GET /v1/datasets/{name}/images/{index}`` answers one stored image as a PNG (the dashboard's
sample grid), its category in the ``X-Dicebox-Category`` header.

Refusals: 415 for another content type; 400 for malformed bodies, bad base64, bad category
names and images that are not readable PNG/JPEG files (corrupt, truncated, GIF, BMP...); 413
for an image over DICEBOX_MAX_IMAGE_BYTES, over DICEBOX_MAX_IMAGE_PIXELS (read from its header
before decoding: a configured limit exceeded, like the byte limits) or more images than
DICEBOX_MAX_IMAGES_PER_REQUEST; 404 for an unknown dataset. Nothing is stored on any refusal.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
from collections.abc import Iterator
from typing import Any, BinaryIO
from urllib.parse import quote

import numpy as np
from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, StrictInt
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from dicebox.errors import InvalidInput, NotFound, TooLarge, UnsupportedMedia
from dicebox.server.deps import Authorized, ServicesDep
from dicebox.server.metrics import MetricsDep
from dicebox.server.openapi import error_responses

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], dependencies=Authorized,
                   responses=error_responses(401, 404, 422))

# Uploads are read this much at a time, so an oversized file is refused at the limit instead of
# being read whole; exports are streamed in chunks of the same size.
CHUNK_BYTES = 1 << 20
# Form fields other than files that a multipart upload may carry (just "category").
MAX_FORM_FIELDS = 4
# Exports are revalidated on every use (a 304 costs nothing) rather than trusted for a time.
EXPORT_CACHE_CONTROL = "no-cache"
IMAGE_MEDIA_TYPES = "multipart/form-data or application/json"
# Upload file names are echoed in error messages, cut to this length.
MAX_NAME_IN_ERRORS = 100
# A stored image never changes (the store only appends), so clients may keep it a while.
IMAGE_CACHE_CONTROL = "private, max-age=3600"


class DatasetCreate(BaseModel):
    """A new dataset: image size in pixels, 1 (grey) or 3 (RGB) channels, and optionally the
    category names in label order (more are added as images of new categories arrive)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    width: StrictInt
    height: StrictInt
    channels: StrictInt = 1
    categories: list[str] | None = None


@router.post("", status_code=201, responses={200: {"description": "existed with this shape"},
                                             **error_responses(409)})
def create(body: DatasetCreate, services: ServicesDep) -> JSONResponse:
    """Create a dataset: 201. Idempotent: the same name and shape again answers 200 with the
    existing dataset; a different shape (or different declared categories) answers 409."""
    dataset, created = services.sensory.create(body.name, body.width, body.height, body.channels,
                                               body.categories)
    return JSONResponse(dataset, status_code=201 if created else 200)


@router.get("")
def list_datasets(services: ServicesDep, limit: int = Query(100, ge=1, le=1000),
                  cursor: str | None = None) -> dict[str, Any]:
    """Datasets by name: ``{"items": [...], "next": cursor or null}``."""
    return services.sensory.list(limit=limit, cursor=cursor)


@router.get("/{name}")
def get_dataset(name: str, services: ServicesDep) -> dict[str, Any]:
    """One dataset with its shape, image count (= newest version) and counts per category."""
    return services.sensory.get(name)


_UPLOAD_OPENAPI = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["category", "files"], "properties": {
        "category": {"type": "string"},
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "application/json": {"schema": {"type": "object", "required": ["items"], "properties": {
        "items": {"type": "array", "items": {"type": "object", "required": ["category", "data"],
                                             "properties": {"category": {"type": "string"},
                                                            "data": {"type": "string",
                                                                     "description": "base64 PNG or JPEG"}}}}}}}}}}


@router.post("/{name}/images", openapi_extra=_UPLOAD_OPENAPI, responses=error_responses(415))
async def add_images(name: str, request: Request, services: ServicesDep,
                     metrics: MetricsDep) -> dict[str, Any]:
    """Add images: multipart (``category`` + ``files``) or JSON ``{"items": [{"category",
    "data"}]}``. All are stored or none: any bad image answers 4xx naming it, nothing added.
    Answers ``{"added", "count", "counts"}``."""
    sensory = services.sensory
    await run_in_threadpool(sensory.get, name)  # 400/404 before reading the body
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type == "multipart/form-data":
        items = await _multipart_items(request, services.settings.max_images_per_request, sensory)
    elif media_type == "application/json" or (media_type.startswith("application/")
                                             and media_type.endswith("+json")):
        items = await _json_items(request, services.settings.max_images_per_request, sensory)
    else:
        raise UnsupportedMedia(f"Content-Type must be {IMAGE_MEDIA_TYPES}, got "
                               f"{media_type or 'none'!r}", {"accepted": IMAGE_MEDIA_TYPES})
    result = await run_in_threadpool(sensory.add_encoded, name, items)
    metrics.ingested_images.inc(result["added"])
    return result


def _too_many(count: int, limit: int) -> TooLarge:
    return TooLarge(f"more than {limit} images in one request (DICEBOX_MAX_IMAGES_PER_REQUEST); "
                    "send them in several requests", {"limit": limit, "given": count})


async def _multipart_items(request: Request, limit: int, sensory) -> list[tuple[str, bytes, str]]:
    try:
        form = await request.form(max_files=limit, max_fields=MAX_FORM_FIELDS)
    except StarletteHTTPException as exc:
        # Starlette turns python-multipart's errors into a 400 with a reason; a request with
        # too many files is over a configured limit like any other (413).
        if str(exc.detail).startswith("Too many files"):
            raise _too_many(limit + 1, limit) from None
        raise InvalidInput(f"multipart body: {exc.detail}") from None
    try:
        unexpected = sorted(set(form.keys()) - {"category", "files"})
        if unexpected:
            raise InvalidInput(f"unexpected form field(s) {unexpected}; send one 'category' field "
                               "and the images as 'files'", {"fields": unexpected})
        categories = form.getlist("category")
        if len(categories) != 1 or not isinstance(categories[0], str):
            raise InvalidInput("multipart upload needs exactly one 'category' text field, got "
                               f"{len(categories)}", {"field": "category"})
        files = form.getlist("files")
        if not files:
            raise InvalidInput("no images given: attach them as 'files'", {"field": "files"})
        items = []
        for index, upload in enumerate(files):
            label = f"files[{index}]"
            if not isinstance(upload, UploadFile):
                raise InvalidInput(f"{label} must be a file upload, not a text field",
                                   {"field": label})
            if upload.filename:
                label = f"{label} ({upload.filename[:MAX_NAME_IN_ERRORS]})"
            items.append((categories[0], await _read_limited(upload, label, sensory), label))
        return items
    finally:
        await form.close()


async def _read_limited(upload: UploadFile, label: str, sensory) -> bytes:
    """The upload's bytes, read in chunks and refused (413) as soon as they pass the limit."""
    if upload.size is not None:
        sensory.check_image_bytes(upload.size, label)
    chunks, total = [], 0
    while chunk := await upload.read(CHUNK_BYTES):
        total += len(chunk)
        sensory.check_image_bytes(total, label)  # raises past the limit
        chunks.append(chunk)
    return b"".join(chunks)


async def _json_items(request: Request, limit: int, sensory) -> list[tuple[str, bytes, str]]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"body is not valid JSON: {exc}") from None
    if not isinstance(body, dict) or not isinstance(body.get("items"), list):
        raise InvalidInput('body must be {"items": [{"category": ..., "data": base64}, ...]}',
                           {"field": "items"})
    unexpected = sorted(set(body) - {"items"})
    if unexpected:
        raise InvalidInput(f"unexpected field(s) {unexpected}", {"fields": unexpected})
    entries = body["items"]
    if not entries:
        raise InvalidInput("no images given: items is empty", {"field": "items"})
    if len(entries) > limit:
        raise _too_many(len(entries), limit)
    items = []
    for index, entry in enumerate(entries):
        label = f"items[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("data"), str):
            raise InvalidInput(f'{label} must be {{"category": ..., "data": base64}}',
                               {"field": label})
        extra = sorted(set(entry) - {"category", "data"})
        if extra:
            raise InvalidInput(f"{label}: unexpected field(s) {extra}", {"field": label})
        text = "".join(entry["data"].split())  # line-wrapped base64 is fine
        # Four characters carry three bytes: refuse before decoding what cannot fit.
        sensory.check_image_bytes((len(text) // 4) * 3 - 2, label)
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(f"{label}.data is not valid base64", {"field": f"{label}.data"}) \
                from None
        sensory.check_image_bytes(len(data), label)
        items.append((entry.get("category"), data, label))
    return items


def _etag_matches(if_none_match: str | None, etag: str) -> bool:
    """``If-None-Match`` (a list of tags, or ``*``) against our strong tag; weak comparison, as
    RFC 9110 prescribes for this header."""
    if if_none_match is None:
        return False
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate == "*" or candidate.removeprefix("W/") == etag:
            return True
    return False


@router.get("/{name}/export", response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}}},
                       304: {"description": "the client's copy (If-None-Match) is current"},
                       **error_responses(409)})
def export(name: str, services: ServicesDep, version: int | None = None,
           if_none_match: str | None = Header(None)) -> Response:
    """A version's packed dataset file (``dicebox.Dataset.load`` reads it); the newest when
    ``version`` is not given. A version is an image count: version N is the first N images.
    The ETag names the content; send it back in ``If-None-Match`` to get 304 when unchanged."""
    sensory = services.sensory
    info = sensory.export_info(name, version)
    headers = {"ETag": info["etag"], "Cache-Control": EXPORT_CACHE_CONTROL,
               "X-Dicebox-Dataset-Version": str(info["version"])}
    if _etag_matches(if_none_match, info["etag"]):
        return Response(status_code=304, headers=headers)
    # The resolved version, not "newest": images added meanwhile must not change what the
    # ETag above names.
    file = _open_export(sensory, name, info["version"])
    size = os.fstat(file.fileno()).st_size
    headers.update({"Content-Length": str(size),
                    "Content-Disposition": f'attachment; filename="{name}-{info["version"]}.dbx"'})
    return StreamingResponse(_chunks(file), media_type="application/octet-stream", headers=headers)


def _open_export(sensory, name: str, version: int) -> BinaryIO:
    # Another request may prune the file between its build and our open; it is then built
    # again. Once open it stays readable even if pruned.
    for attempt in range(3):
        path = sensory.export(name, version)["path"]
        try:
            return open(path, "rb")
        except FileNotFoundError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _chunks(file: BinaryIO) -> Iterator[bytes]:
    with file:
        while chunk := file.read(CHUNK_BYTES):
            yield chunk


@router.get("/{name}/images/{index}", response_class=Response,
            responses={200: {"content": {"image/png": {}},
                             "description": "the image, its category in X-Dicebox-Category"}})
def get_image(name: str, index: int, services: ServicesDep) -> Response:
    """Image ``index`` (0-based, in the order stored) as a PNG at the dataset's size, grey or
    RGB as the dataset. Its category is in the ``X-Dicebox-Category`` header (percent-encoded
    UTF-8) and its label number in ``X-Dicebox-Label``. 400 for a negative index, 404 for
    one past the last image."""
    if index < 0:
        raise InvalidInput(f"index must be >= 0, got {index}", {"field": "index"})
    count = services.sensory.get(name)["count"]  # 400/404 for the name first
    if index >= count:
        raise NotFound(f"dataset {name!r} has no image {index}: it holds {count} images "
                       f"(indices 0..{count - 1})" if count else
                       f"dataset {name!r} has no image {index}: it holds no images",
                       {"dataset": name, "count": count})
    dataset = services.sensory.dataset(name, count)
    pixels = dataset.images[index]  # uint8 [C, H, W]
    label = int(dataset.labels[index])
    category = dataset.categories[label]
    picture = Image.fromarray(np.ascontiguousarray(
        pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)))
    out = io.BytesIO()
    picture.save(out, format="PNG")
    headers = {"Cache-Control": IMAGE_CACHE_CONTROL, "X-Dicebox-Label": str(label),
               "X-Dicebox-Category": quote(category, safe="")}
    return Response(out.getvalue(), media_type="image/png", headers=headers)
