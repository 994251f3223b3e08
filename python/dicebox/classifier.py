"""Classification with registered models: decode a request's images, run them through the
model in one batch, and answer with the categories.

:class:`Classifier` keeps the most recently used models loaded (an LRU of ``capacity``
models). Lookups are thread-safe; a model that is not loaded is loaded outside the lock, once
per id even when several requests ask for it at the same moment (the others wait for that
load). A request's images are decoded with :func:`dicebox.imagefolder.decode_image` (the
preprocessing datasets get at ingest) to the model's input size and channels, stacked into one
uint8 [N, C, H, W] batch and classified by a single ``Model.predict`` call, which runs in the
C++ core with the GIL released. :class:`BatchRunner` (``Classifier.batches``) does the same for
the small requests of many connections at once: a server's event loop hands them to one
thread, which decodes and predicts whatever has arrived in one round.

Every image is checked against the service's limits before it is decoded: bytes per image,
images per request, and the pixel count its header declares (so a 20000 x 20000 PNG of a few
kilobytes is refused without allocating its pixels). Errors are :mod:`dicebox.errors`: bad
image -> InvalidInput naming the image, limit exceeded -> TooLarge, unknown model ->
NotFound.
"""

from __future__ import annotations

import asyncio
import io
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from dicebox import _core
from dicebox.errors import InvalidInput, TooLarge
from dicebox.imagefolder import decode_image
from dicebox.model import Model
from dicebox.registry import BEST, ModelRegistry, check_model_id
from dicebox.settings import Settings

__all__ = ["DEFAULT_TOP", "MAX_TOP", "BatchRunner", "Classifier", "LoadedModel", "declared_size",
           "image_size"]

DEFAULT_TOP = 5
MAX_TOP = 100
# How long "best model of a dataset" is remembered before the database is asked again. A
# registration in this process forgets it at once; one made by another server process
# sharing the database is seen within this time.
BEST_TTL_SECONDS = 1.0


def _default(field: str) -> Any:
    return Settings.model_fields[field].default


@dataclass(frozen=True)
class LoadedModel:
    """A model in the cache, with what every request needs already read from the core."""

    id: str
    model: Model
    categories: tuple[str, ...]
    channels: int
    height: int
    width: int


class Classifier:
    """Classifies images with the models of ``registry``, keeping up to ``capacity`` of them
    loaded. Limits come from ``settings`` (max_images_per_request, max_image_bytes,
    max_image_pixels); without settings, the Settings defaults apply. ``threads`` sets the
    intra-op threads of inference in this process (None leaves LibTorch's setting alone)."""

    def __init__(self, registry: ModelRegistry, capacity: int = 8, *,
                 settings: Settings | None = None, threads: int | None = 1) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")
        if threads is not None:
            # Intra-op threads of every forward pass in this process (LibTorch's setting is
            # process-wide). A server runs many small forward passes side by side, one per
            # batch or request; splitting each over several threads only adds hand-offs,
            # and when the cores are busy a parallel region waits for its slowest thread
            # (a 32x32 CNN: 0.1 ms on one thread, 5 ms on two under load). Training sets
            # its own thread count and is unaffected.
            _core.set_threads(threads)
        self.registry = registry
        self.capacity = capacity
        if settings is not None:
            self.max_images = settings.max_images_per_request
            self.max_image_bytes = settings.max_image_bytes
            self.max_image_pixels = settings.max_image_pixels
        else:
            self.max_images = _default("max_images_per_request")
            self.max_image_bytes = _default("max_image_bytes")
            self.max_image_pixels = _default("max_image_pixels")
        self._lock = threading.Lock()
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._loading: dict[str, Future[LoadedModel]] = {}
        self._best: dict[str, tuple[str, float]] = {}  # dataset -> (model id, expires)
        self._best_generation = registry.generation
        self.loads = 0  # models loaded from disk so far (cache misses)
        self.batches = BatchRunner(self)

    # -- the model cache ----------------------------------------------------------------------

    def cached(self) -> list[str]:
        """Ids of the loaded models, least recently used first."""
        with self._lock:
            return list(self._models)

    def model(self, model_ref: str, dataset: str | None = None) -> LoadedModel:
        """The loaded model for an id, or for ``"best"`` of ``dataset`` (loading it if needed).

        InvalidInput for a malformed id or ``"best"`` without a dataset; NotFound for an
        unknown model or a dataset without models."""
        model_id = self._best_of(dataset) if model_ref == BEST else check_model_id(model_ref)
        with self._lock:
            entry = self._models.get(model_id)
            if entry is not None:
                self._models.move_to_end(model_id)
                return entry
            pending = self._loading.get(model_id)
            owner = pending is None
            if pending is None:
                pending = self._loading[model_id] = Future()
        if not owner:
            return pending.result()
        # This thread loads; the lock is not held, so requests for other (loaded) models go on.
        try:
            model = self.registry.load(model_id)
            c, h, w = model.input_shape
            entry = LoadedModel(model_id, model, tuple(model.categories), c, h, w)
        except BaseException as exc:
            with self._lock:
                del self._loading[model_id]
            pending.set_exception(exc)
            raise
        with self._lock:
            self._models[model_id] = entry
            while len(self._models) > self.capacity:
                self._models.popitem(last=False)  # in-flight requests keep their reference
            del self._loading[model_id]
            self.loads += 1
        pending.set_result(entry)
        return entry

    def _best_of(self, dataset: str | None) -> str:
        if dataset is None or dataset == "":
            raise InvalidInput("model 'best' needs a dataset: add ?dataset=NAME")
        now = time.monotonic()
        with self._lock:
            if self._best_generation != self.registry.generation:
                self._best.clear()
                self._best_generation = self.registry.generation
            cached = self._best.get(dataset)
            if cached is not None and cached[1] > now:
                return cached[0]
            generation = self._best_generation
        model_id = self.registry.best(dataset)["id"]
        with self._lock:
            if generation == self.registry.generation:
                self._best[dataset] = (model_id, now + BEST_TTL_SECONDS)
        return model_id

    # -- classification -----------------------------------------------------------------------

    def check_count(self, count: int) -> None:
        """InvalidInput for no images, TooLarge for more than max_images_per_request."""
        if count == 0:
            raise InvalidInput("no images: send at least one")
        if count > self.max_images:
            raise TooLarge(f"{count} images in one request exceed the limit of {self.max_images}"
                           " (DICEBOX_MAX_IMAGES_PER_REQUEST)", {"limit": self.max_images})

    def check_bytes(self, index: int, size: int) -> None:
        """TooLarge when image ``index`` of ``size`` bytes exceeds max_image_bytes."""
        if size > self.max_image_bytes:
            raise TooLarge(f"image {index}: {size} bytes exceed the limit of"
                           f" {self.max_image_bytes} (DICEBOX_MAX_IMAGE_BYTES)",
                           {"index": index, "limit": self.max_image_bytes})

    def check_request(self, images: Sequence[Any], top: int = DEFAULT_TOP) -> int:
        """The checks that need no model: ``top``, the number of images, and each one's size
        in bytes and declared pixels (read from its header, nothing decoded). Raises
        InvalidInput or TooLarge naming the image; returns the total declared pixels (an
        image whose header cannot be read counts 0: decoding it fails at once)."""
        if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= MAX_TOP:
            raise InvalidInput(f"top must be an integer in 1..{MAX_TOP}, got {top!r}")
        self.check_count(len(images))
        total = 0
        for index, data in enumerate(images):
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise InvalidInput(f"image {index}: expected bytes, got {type(data).__name__}",
                                   {"index": index})
            if len(data) == 0:
                raise InvalidInput(f"image {index}: empty file", {"index": index})
            self.check_bytes(index, len(data))
            try:
                size = declared_size(data)
            except Image.DecompressionBombError:
                limit = self.max_image_pixels
                raise TooLarge(f"image {index}: more pixels than the limit of {limit}"
                               " (DICEBOX_MAX_IMAGE_PIXELS)",
                               {"index": index, "limit": limit}) from None
            if size is None:
                continue
            pixels = size[0] * size[1]
            if pixels > self.max_image_pixels:
                raise TooLarge(f"image {index}: {size[0]} x {size[1]} = {pixels} pixels exceed"
                               f" the limit of {self.max_image_pixels} (DICEBOX_MAX_IMAGE_PIXELS)",
                               {"index": index, "limit": self.max_image_pixels})
            total += pixels
        return total

    def classify(self, model_ref: str, images: Sequence[bytes], dataset: str | None = None,
                 top: int = DEFAULT_TOP) -> list[dict[str, Any]]:
        """Classify encoded PNG/JPEG ``images`` with a model id or ``"best"`` (of ``dataset``).

        Returns, in input order, ``{"category", "probability", "top": [{"category",
        "probability"}, ...]}`` per image, ``top`` holding the ``top`` most probable
        categories (at most as many as the model has), most probable first. The request is
        checked (:meth:`check_request`) before the model is looked up, and the model before
        any image is decoded."""
        self.check_request(images, top)
        return self.run(self.model(model_ref, dataset), images, top)

    def run(self, entry: LoadedModel, images: Sequence[bytes], top: int) -> list[dict[str, Any]]:
        """:meth:`classify` for a request already checked, with its model at hand: decode,
        one predict call for the whole batch, answers."""
        batch = self.decode(entry, images)
        return self.answer(entry, entry.model.predict(batch), top)

    def peek(self, model_ref: str, dataset: str | None = None) -> LoadedModel | None:
        """The model if it is loaded (and, for "best", known) right now, else None; never
        touches the disk or the database, so it is safe on an event loop."""
        with self._lock:
            if model_ref == BEST:
                cached = self._best.get(dataset or "")
                if (cached is None or cached[1] <= time.monotonic()
                        or self._best_generation != self.registry.generation):
                    return None
                model_ref = cached[0]
            entry = self._models.get(model_ref)
            if entry is not None:
                self._models.move_to_end(model_ref)
            return entry

    @staticmethod
    def decode(entry: LoadedModel, images: Sequence[bytes]) -> np.ndarray:
        """uint8 [N, C, H, W]: every image decoded to the model's size and channels."""
        batch = np.empty((len(images), entry.channels, entry.height, entry.width), dtype=np.uint8)
        size = (entry.width, entry.height)
        for index, data in enumerate(images):
            try:
                batch[index] = decode_image(bytes(data), size, entry.channels,
                                            name=f"image {index}")
            except ValueError as exc:
                raise InvalidInput(str(exc), {"index": index}) from None
        return batch

    @staticmethod
    def answer(entry: LoadedModel, probabilities: np.ndarray, top: int) -> list[dict[str, Any]]:
        """The answer dicts for float32 [N, classes] probabilities."""
        k = min(top, len(entry.categories))
        # Stable sort on the negated probabilities: equal probabilities keep category order.
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        ranked = np.take_along_axis(probabilities, order, axis=1).tolist()
        categories = entry.categories
        answers = []
        for indices, values in zip(order.tolist(), ranked):
            best = [{"category": categories[i], "probability": p} for i, p in zip(indices, values)]
            answers.append({"category": best[0]["category"], "probability": best[0]["probability"],
                            "top": best})
        return answers


# ---------------------------------------------------------------------------------------------
# batching concurrent requests


class _Waiting:
    """One request handed to the batch thread: its model, images, top-k, and where to answer."""

    __slots__ = ("answer", "entry", "error", "future", "images", "loop", "top")

    def __init__(self, entry: LoadedModel, images: Sequence[bytes], top: int,
                 loop: asyncio.AbstractEventLoop, future: asyncio.Future) -> None:
        self.entry, self.images, self.top, self.loop, self.future = entry, images, top, loop, future
        self.answer: list[dict[str, Any]] | None = None
        self.error: BaseException | None = None


def _settle(done: list[_Waiting]) -> None:
    """On the requests' event loop: hand each its answer (unless its client went away)."""
    for request in done:
        if request.future.done():
            continue
        if request.error is not None:
            request.future.set_exception(request.error)
        else:
            request.future.set_result(request.answer)


class BatchRunner:
    """A thread that classifies the requests waiting for it together.

    Every request that arrives while the thread is busy waits for the next round; a round
    decodes the images of all waiting requests and runs one ``predict`` per model over all
    of them (up to ``max_images``), then answers every request with one wake-up of its event
    loop. Under concurrent load this replaces a thread-pool round trip per request (a
    thread wake-up, a lock hand-off and an event-loop wake-up each) by one per round, and
    the core's batched forward pass is cheaper per image. A request alone gets a batch of its
    own. A bad image fails only its own request.
    """

    def __init__(self, classifier: Classifier, max_images: int = 256) -> None:
        self.classifier = classifier
        self.max_images = max_images
        self._waiting: list[_Waiting] = []
        self._condition = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.rounds = 0  # batches run so far

    async def classify(self, entry: LoadedModel, images: Sequence[bytes],
                       top: int) -> list[dict[str, Any]]:
        """:meth:`Classifier.run` on the batch thread; awaited on the caller's event loop."""
        loop = asyncio.get_running_loop()
        request = _Waiting(entry, images, top, loop, loop.create_future())
        with self._condition:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="dicebox-classify",
                                                daemon=True)
                self._thread.start()
            self._waiting.append(request)
            self._condition.notify()
        return await request.future

    def stop(self) -> None:
        """Answer the waiting requests and end the thread (the next request starts a new
        one)."""
        with self._condition:
            self._stopping = True
            self._condition.notify()
            thread = self._thread
        if thread is not None:
            thread.join()
        with self._condition:
            self._stopping = False

    def _serve(self) -> None:
        while True:
            with self._condition:
                while not self._waiting and not self._stopping:
                    self._condition.wait()
                if not self._waiting:
                    self._thread = None  # decided under the lock: a new request starts another
                    return
                # Take whole requests up to max_images (at least one, however large).
                taken, count = 0, 0
                for request in self._waiting:
                    if taken and count + len(request.images) > self.max_images:
                        break
                    taken += 1
                    count += len(request.images)
                batch, self._waiting = self._waiting[:taken], self._waiting[taken:]
            self._round(batch)

    def _round(self, batch: list[_Waiting]) -> None:
        self.rounds += 1
        by_model: dict[str, list[_Waiting]] = {}
        for request in batch:
            by_model.setdefault(request.entry.id, []).append(request)
        for requests in by_model.values():
            try:
                self._run_model(requests)
            except BaseException as exc:  # noqa: BLE001 - the thread must outlive any request
                for request in requests:
                    if request.answer is None and request.error is None:
                        request.error = exc
        by_loop: dict[asyncio.AbstractEventLoop, list[_Waiting]] = {}
        for request in batch:
            by_loop.setdefault(request.loop, []).append(request)
        for loop, done in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, done)
            except RuntimeError:  # that loop has closed: nobody is waiting any more
                pass

    def _run_model(self, requests: list[_Waiting]) -> None:
        entry = requests[0].entry
        decoded, good = [], []
        for request in requests:
            try:
                decoded.append(self.classifier.decode(entry, request.images))
                good.append(request)
            except BaseException as exc:  # noqa: BLE001 - delivered to that request only
                request.error = exc
        if not good:
            return
        try:
            batch = decoded[0] if len(decoded) == 1 else np.concatenate(decoded)
            probabilities = entry.model.predict(batch)
            start = 0
            for request in good:
                end = start + len(request.images)
                request.answer = self.classifier.answer(entry, probabilities[start:end],
                                                        request.top)
                start = end
        except BaseException as exc:  # noqa: BLE001 - delivered to every request of the batch
            for request in good:
                request.error = exc


# ---------------------------------------------------------------------------------------------
# image headers

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic...): they carry the
# image size. C4 (DHT), C8 (JPG) and CC (DAC) share the range but are not frames.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM and RST0-7 (SOI/EOI never precede a frame header).
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


def declared_size(data: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    """(width, height) from the header: :func:`image_size`, or Pillow's header parser for a
    file that one cannot read (Pillow decodes nothing before ``load``); None when neither
    can read a PNG/JPEG header. Pillow's own bomb guard (``Image.DecompressionBombError``,
    over twice ``Image.MAX_IMAGE_PIXELS``) propagates."""
    size = image_size(data)
    if size is not None:
        return size
    try:
        with Image.open(io.BytesIO(data), formats=("PNG", "JPEG")) as img:
            return img.size
    except Image.DecompressionBombError:
        raise
    except Exception:  # noqa: BLE001 - unreadable header: decoding will say why
        return None


def image_size(data: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    """(width, height) declared by a PNG or JPEG header, without decoding any pixels; None
    when ``data`` is neither or its header cannot be read (the decoder then says why)."""
    view = memoryview(data)
    if len(view) >= 24 and view[:8] == _PNG_SIGNATURE and view[12:16] == b"IHDR":
        width, height = struct.unpack(">II", view[16:24])
        return width, height
    if len(view) >= 4 and view[0] == 0xFF and view[1] == 0xD8:
        pos = 2
        end = len(view)
        while pos + 4 <= end:
            if view[pos] != 0xFF:
                return None
            marker = view[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            if marker in _JPEG_STANDALONE:
                pos += 2
                continue
            (length,) = struct.unpack(">H", view[pos + 2:pos + 4])
            if marker in _JPEG_SOF:
                if pos + 9 > end:
                    return None
                height, width = struct.unpack(">HH", view[pos + 5:pos + 9])
                return width, height
            if length < 2:
                return None
            pos += 2 + length
    return None
