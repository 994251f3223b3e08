"""Models: list and describe trained models, download their files, classify images with them.

``{model_id}`` is a registry id (32 hex characters) or ``best``, the best model of the
dataset named by ``?dataset=`` (400 without it, 404 when that dataset has no model).

Classification is the service's hot path, so its route reads the request by hand (no
pydantic body model or query validation) and checks it on the event loop; decoding and the
forward pass (one ``predict`` for all images of a request, in the C++ core with the GIL
released) happen off the loop: small requests on the classifier's batch thread, together
with those of other connections, large ones in the thread pool (see ``BATCH_PIXELS``).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from dicebox.classifier import DEFAULT_TOP, MAX_TOP, Classifier, LoadedModel
from dicebox.errors import InvalidInput, TooLarge, UnsupportedMedia
from dicebox.registry import MODEL_FILE, WEIGHTS_FILE, ModelRegistry
from dicebox.server.deps import Authorized
from dicebox.server.openapi import error_responses


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    # The classifier's batch thread starts with the first request; it ends with the app.
    try:
        yield
    finally:
        await run_in_threadpool(app.state.services.classifier.batches.stop)


router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=Authorized,
                   responses=error_responses(401, 404, 422), lifespan=_lifespan)

# Requests whose images declare at most this many pixels and bytes in total go to the
# classifier's batch thread, which runs the small requests of all connections together
# (one thread hand-off and one predict call per round instead of per request). Larger
# requests (and those for a model not loaded yet) get a thread-pool call of their own, so
# one big request never holds up a round of small ones.
BATCH_PIXELS = 128 * 128 * 4
BATCH_BYTES = 256 << 10
# Bodies up to this size are parsed on the event loop; larger ones in the thread pool.
INLINE_PARSE_BYTES = 1 << 20

DATASET_HELP = "Required when the model id is 'best': the dataset whose best model to use."
DatasetQuery = Query(default=None, max_length=255, description=DATASET_HELP)


def _registry(request: Request) -> ModelRegistry:
    return request.app.state.services.registry


def _classifier(request: Request) -> Classifier:
    return request.app.state.services.classifier


@router.get("")
async def list_models(request: Request,
                      dataset: str | None = Query(default=None, max_length=255),
                      limit: int = Query(default=50, ge=1, le=1000),
                      cursor: str | None = Query(default=None, max_length=200)) -> dict:
    """Models newest first, optionally of one dataset; ``next`` is the cursor of the following
    page (null at the end). Items leave out the per-epoch history and the confusion matrix."""
    return await run_in_threadpool(_registry(request).list, dataset, limit, cursor)


@router.get("/{model_id}")
async def get_model(request: Request, model_id: str,
                    dataset: str | None = DatasetQuery) -> dict:
    """One model: genome, dataset and version, categories, input shape [C, H, W], history,
    metrics, fitness (validation accuracy), the job that trained it and when."""
    return await run_in_threadpool(_registry(request).resolve, model_id, dataset)


def _etag_matches(request: Request, etag: str) -> bool:
    header = request.headers.get("if-none-match")
    if not header:
        return False
    tags = (tag.strip().removeprefix("W/") for tag in header.split(","))
    return header.strip() == "*" or etag in tags


async def _model_file(request: Request, model_id: str, dataset: str | None, name: str,
                      media_type: str) -> Response:
    registry = _registry(request)
    record = await run_in_threadpool(registry.resolve, model_id, dataset)
    # Models never change after registration: the weights' digest is a strong validator for
    # both files (model.json is written together with those weights, once).
    etag = f'"{record["weights_sha256"]}{"" if name == WEIGHTS_FILE else "-model"}"'
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if _etag_matches(request, etag):
        return Response(status_code=304, headers=headers)
    path = registry.root / record["id"] / name
    return FileResponse(path, media_type=media_type, headers=headers,
                        filename=None if name == MODEL_FILE else f"{record['id']}.safetensors")


@router.get("/{model_id}/weights", response_class=Response, responses={
    200: {"content": {"application/octet-stream": {}}, "description": "the safetensors file"},
    304: {"description": "the client's copy (If-None-Match) is current"}})
async def get_weights(request: Request, model_id: str,
                      dataset: str | None = DatasetQuery) -> Response:
    """The weights as a safetensors file (tensor names as the PyTorch module's state dict).
    ETag = the file's sha256; ``If-None-Match`` answers 304."""
    return await _model_file(request, model_id, dataset, WEIGHTS_FILE, "application/octet-stream")


@router.get("/{model_id}/model.json", response_class=Response, responses={
    200: {"content": {"application/json": {}}, "description": "the model's model.json"},
    304: {"description": "the client's copy (If-None-Match) is current"}})
async def get_model_json(request: Request, model_id: str,
                         dataset: str | None = DatasetQuery) -> Response:
    """The model's ``model.json``: with the weights saved as ``weights.safetensors`` beside it,
    the directory ``dicebox.Model.load`` reads (a processor's warm start)."""
    return await _model_file(request, model_id, dataset, MODEL_FILE, "application/json")


# -- classification ------------------------------------------------------------------------------

_FILES_SCHEMA = {"type": "object", "required": ["files"], "properties": {
    "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}
_ITEMS_SCHEMA = {"type": "object", "required": ["items"], "properties": {
    "items": {"type": "array", "items": {"type": "object", "required": ["data"], "properties": {
        "data": {"type": "string", "description": "base64 PNG or JPEG (a data: URL works too)"}}}}}}
_EXAMPLE = {"predictions": [{"category": "3", "probability": 0.97, "top": [
    {"category": "3", "probability": 0.97}, {"category": "5", "probability": 0.02}]}],
    "model_id": "0c4e7f3a9d2b4e18a6f1c0d9e8b7a654"}
_CLASSIFY_OPENAPI = {
    "parameters": [
        {"name": "dataset", "in": "query", "required": False, "description": DATASET_HELP,
         "schema": {"type": "string", "maxLength": 255}},
        {"name": "top", "in": "query", "required": False,
         "description": "How many of the most probable categories each prediction lists.",
         "schema": {"type": "integer", "minimum": 1, "maximum": MAX_TOP, "default": DEFAULT_TOP}},
    ],
    "requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": _FILES_SCHEMA},
        "application/json": {"schema": _ITEMS_SCHEMA}}},
    "responses": {"200": {"description": "One prediction per image, in input order.",
                          "content": {"application/json": {"example": _EXAMPLE}}}},
}


def _query_top(request: Request) -> int:
    raw = request.query_params.get("top")
    if raw is None:
        return DEFAULT_TOP
    try:
        top = int(raw)
    except ValueError:
        raise InvalidInput(f"top must be an integer in 1..{MAX_TOP}, got {raw[:20]!r}") from None
    if not 1 <= top <= MAX_TOP:
        raise InvalidInput(f"top must be an integer in 1..{MAX_TOP}, got {top}")
    return top


def _disconnected() -> InvalidInput:
    # Nobody will read the answer; a ServiceError ends the request without a logged traceback.
    return InvalidInput("the client disconnected before sending the whole body")


async def _json_images(request: Request, classifier: Classifier) -> list[bytes]:
    try:
        body = await request.body()
    except ClientDisconnect:
        raise _disconnected() from None
    if len(body) <= INLINE_PARSE_BYTES:
        return _parse_json_images(body, classifier)
    return await run_in_threadpool(_parse_json_images, body, classifier)


def _parse_json_images(body: bytes, classifier: Classifier) -> list[bytes]:
    """The images of ``{"items": [{"data": BASE64}, ...]}``, each checked against the byte
    limit before it is decoded."""
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"body is not valid JSON: {exc}") from None
    items = parsed.get("items") if isinstance(parsed, dict) else None
    if not isinstance(items, list):
        raise InvalidInput('body must be a JSON object {"items": [{"data": BASE64}, ...]}',
                           {"field": "items"})
    if len(items) > classifier.max_images:
        classifier.check_count(len(items))
    images = []
    # base64 is 4 characters per 3 bytes: refuse an oversized image before decoding it.
    max_chars = (classifier.max_image_bytes + 2) // 3 * 4
    for index, item in enumerate(items):
        data = item.get("data") if isinstance(item, dict) else None
        if not isinstance(data, str):
            raise InvalidInput(f"items[{index}].data: expected a base64 string", {"index": index})
        if data.startswith("data:"):  # a data URL: "data:image/png;base64,...."
            data = data.partition(",")[2]
        if len(data) > max_chars + 4:
            limit = classifier.max_image_bytes
            raise TooLarge(f"image {index}: larger than the limit of {limit} bytes"
                           " (DICEBOX_MAX_IMAGE_BYTES)", {"index": index, "limit": limit})
        try:
            images.append(base64.b64decode(data, validate=True))
        except (binascii.Error, ValueError):
            raise InvalidInput(f"items[{index}].data: not valid base64", {"index": index}) from None
    return images


async def _multipart_images(request: Request, classifier: Classifier) -> list[bytes]:
    try:
        body = await request.body()
    except ClientDisconnect:
        raise _disconnected() from None
    content_type = request.headers.get("content-type", "")
    if len(body) <= INLINE_PARSE_BYTES:
        return _parse_multipart_images(body, content_type, classifier)
    return await run_in_threadpool(_parse_multipart_images, body, content_type, classifier)


class _FilesReader:
    """python-multipart callbacks that keep the ``files`` parts of a multipart body.

    The body is already in memory (bounded by the body limit), so parts are collected as
    bytes: no spooled temporary file and no UploadFile per image, which is what makes
    Starlette's general-purpose form parser several times slower for one small image. Every
    limit is applied while parsing: files per request, bytes per file, other fields."""

    MAX_OTHER_FIELDS = 100

    def __init__(self, classifier: Classifier) -> None:
        self.classifier = classifier
        self.images: list[bytes] = []
        self.others = 0
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._chunks: list[bytes] = []
        self._size = 0
        self._keep = False
        self.ended = False

    def callbacks(self) -> dict[str, Any]:
        return {"on_part_begin": self.on_part_begin, "on_part_data": self.on_part_data,
                "on_part_end": self.on_part_end, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished, "on_end": self.on_end}

    def on_part_begin(self) -> None:
        self._disposition = b""
        self._chunks, self._size, self._keep = [], 0, False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_field.lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if options.get(b"name") != b"files":
            self.others += 1
            if self.others > self.MAX_OTHER_FIELDS:
                raise InvalidInput(f"more than {self.MAX_OTHER_FIELDS} multipart fields besides"
                                   " 'files'")
            return
        index = len(self.images)
        if b"filename" not in options:
            raise InvalidInput(f"files[{index}]: expected a file upload, got a text field",
                               {"index": index})
        self.classifier.check_count(index + 1)  # TooLarge as soon as one file too many arrives
        self._keep = True

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._keep:
            self._size += end - start
            self.classifier.check_bytes(len(self.images), self._size)
            self._chunks.append(data[start:end])

    def on_part_end(self) -> None:
        if self._keep:
            self.images.append(b"".join(self._chunks))

    def on_end(self) -> None:
        self.ended = True


def _parse_multipart_images(body: bytes, content_type: str, classifier: Classifier) -> list[bytes]:
    """The files of the multipart fields named ``files``, in order."""
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise InvalidInput("multipart/form-data without a boundary in its Content-Type")
    reader = _FilesReader(classifier)
    try:
        parser = MultipartParser(boundary, reader.callbacks())
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise InvalidInput(f"cannot read the multipart body: {exc}") from None
    if not reader.ended:
        raise InvalidInput("cannot read the multipart body: it ends before its closing boundary")
    if not reader.images:
        raise InvalidInput("no images: send them as multipart fields named 'files'",
                           {"field": "files"})
    return reader.images


@router.post("/{model_id}/classify", openapi_extra=_CLASSIFY_OPENAPI, responses=error_responses(415))
async def classify(request: Request, model_id: str) -> Response:
    """Classify PNG/JPEG images: multipart ``files`` or JSON ``{"items": [{"data": base64}]}``.

    Answers ``{"predictions": [{"category", "probability", "top": [{"category",
    "probability"}]}], "model_id"}``: predictions in input order, ``top`` holding the
    ``?top=`` (default 5) most probable categories; ``model_id`` the model that answered
    (which ``best`` stood for). ``?dataset=`` names the dataset when the id is ``best``.
    """
    # The query is read by hand (documented in _CLASSIFY_OPENAPI): FastAPI's parameter
    # validation costs more per request than the rest of the handler's bookkeeping.
    started = time.perf_counter()
    classifier = _classifier(request)
    dataset = request.query_params.get("dataset")
    top = _query_top(request)
    content_type = request.headers.get("content-type", "")
    media = content_type.partition(";")[0].strip().lower()
    if media == "application/json":
        images = await _json_images(request, classifier)
    elif media == "multipart/form-data":
        images = await _multipart_images(request, classifier)
    else:
        raise UnsupportedMedia(f"content type {content_type[:100]!r} is not accepted: send images"
                               " as multipart/form-data (field 'files') or application/json"
                               ' ({"items": [{"data": BASE64}]})')
    pixels = classifier.check_request(images, top)
    entry = classifier.peek(model_id, dataset)
    if entry is not None and pixels <= BATCH_PIXELS and sum(map(len, images)) <= BATCH_BYTES:
        predictions = await classifier.batches.classify(entry, images, top)
    else:
        entry, predictions = await run_in_threadpool(_classify, classifier, model_id, images,
                                                     dataset, top)
    metrics = request.app.state.metrics
    metrics.classified_images.inc(len(images))
    metrics.classify_latency.observe(time.perf_counter() - started)
    return JSONResponse({"predictions": predictions, "model_id": entry.id})


def _classify(classifier: Classifier, model_ref: str, images: list[bytes], dataset: str | None,
              top: int) -> tuple[LoadedModel, list[dict[str, Any]]]:
    # Checked already on the event loop: look the model up (maybe loading it) and run.
    entry = classifier.model(model_ref, dataset)
    return entry, classifier.run(entry, images, top)
