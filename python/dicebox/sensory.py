"""The sensory store: named datasets that grow one upload at a time, kept as packed files.

A dataset has a fixed image shape (channels 1 or 3, height, width) chosen at creation. Images
arrive already decoded (``add_arrays``: CLI import, compatibility API) or encoded
(``add_encoded``: PNG/JPEG uploads, decoded here once, converted to the dataset's size and
channels), and are appended to two append-only files under ``root/<name>/``:

- ``pixels.u8``: C*H*W bytes per image (uint8, CHW), image ``i`` at byte ``i * C*H*W``;
- ``labels.i64``: one little-endian int64 per image, an index into the dataset's categories.

The database row (table ``datasets``) holds the committed image count, the ordered category
list, each category's first image index and the images per category. An append takes the
row's lock, writes and fsyncs both files at offset ``count * size``, then commits the new
count in that same transaction. A crash in between leaves bytes past the committed count;
they are ignored and overwritten by the next append, so an image is either entirely in the
dataset or not at all, and concurrent appends never lose or tear an image.

Versions: the store only ever appends, so *version N* is simply the first N images, and a
version number is an image count. Categories are append-only too (declared ones first, then in
order of first appearance), so version N's categories are a prefix of the list: those declared
at creation plus those whose first image index is below N. ``export`` packs a version into the
core's dataset file (``dicebox.Dataset.save``) once, keeps it under ``root/<name>/exports/``
for reuse, and names it with a strong ETag; only the most recently used few exports are kept.

Every public method runs in its own short transaction and returns plain data (times as ISO
8601 UTC strings). Bad input raises the service's errors (``dicebox.errors``): InvalidInput
(400), NotFound (404), Conflict (409), TooLarge (413); nothing is changed when one is raised.
A full disk or an unwritable folder raises StorageError (an OSError naming the file; 507 or
503 over HTTP) and changes nothing either: an append that fails part-way gives back the
space it took past the committed count, an export that cannot be written leaves no file.

The files must be on storage shared by every process that uses the same database (one server
and the CLI on one machine, typically); the database row is the only cross-process lock.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from sqlalchemy import JSON, BigInteger, CheckConstraint, Engine, Integer, String, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from dicebox.db import Base, Transactions, UTCDateTime, iso
from dicebox.db import now as _now
from dicebox.errors import Conflict, InvalidInput, NotFound, TooLarge, as_storage_error
from dicebox.faults import crash_point
from dicebox.settings import Settings

__all__ = ["DatasetRecord", "SensoryStore", "check_category", "check_dataset_name"]

DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_CATEGORY_LENGTH = 64
MAX_LIST_LIMIT = 1000
# Exports are a cache of packed versions: keep the most recently used few per dataset.
KEEP_EXPORTS = 4
# A half-written export older than this is left over from a crash (builds take seconds).
STALE_PARTIAL_SECONDS = 3600.0
# Bumped if the way an export is built ever changes, so cached copies get new ETags.
EXPORT_FORMAT = 1
PIXELS_FILE = "pixels.u8"
LABELS_FILE = "labels.i64"
LABEL_BYTES = 8
_HEADER_FORMATS = ("PNG", "JPEG")


class DatasetRecord(Base):
    """One row per dataset; see the module docstring for what the columns mean."""

    __tablename__ = "datasets"
    __table_args__ = (
        CheckConstraint("channels IN (1, 3)", name="ck_datasets_channels"),
        CheckConstraint("count >= 0", name="ck_datasets_count"),
    )

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    # Random per creation: a dataset deleted from the database and created again under the
    # same name (files left behind) never reuses an old export or ETag.
    uid: Mapped[str] = mapped_column(String(32))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    channels: Mapped[int] = mapped_column(Integer)
    count: Mapped[int] = mapped_column(BigInteger, default=0)
    categories: Mapped[Any] = mapped_column(JSON)  # [name, ...] in label order
    # First image index of each category; -1 for categories declared at creation (part of
    # every version, 0 included).
    category_starts: Mapped[Any] = mapped_column(JSON)
    counts: Mapped[Any] = mapped_column(JSON)  # images per category, parallel to categories
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)

    @property
    def image_bytes(self) -> int:
        return self.channels * self.height * self.width

    def categories_at(self, version: int) -> list[str]:
        """Categories of version ``version`` (a prefix of ``categories``)."""
        return [c for c, start in zip(self.categories, self.category_starts) if start < version]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "width": self.width,
            "height": self.height,
            "channels": self.channels,
            "shape": [self.channels, self.height, self.width],
            "count": self.count,
            "version": self.count,
            # In label order: label i is categories[i]; counts also as a mapping.
            "categories": [{"name": c, "count": n} for c, n in zip(self.categories, self.counts)],
            "counts": dict(zip(self.categories, self.counts)),
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
        }


# ---------------------------------------------------------------------------------------------
# argument checks (each names what it rejects)

def check_dataset_name(name: Any) -> str:
    """A dataset name: 1-64 of letters, digits, ".", "_", "-", starting with a letter or digit,
    without "..". Safe as a single path component."""
    if not isinstance(name, str) or not DATASET_NAME.fullmatch(name) or ".." in name:
        raise InvalidInput(
            f"dataset name must be 1-64 letters, digits, '.', '_' or '-', starting with a letter "
            f"or digit and without '..', got {name!r}", {"field": "name"})
    return name


def check_category(category: Any, field: str = "category") -> str:
    """A category name: 1-64 printable characters, no "/", "\\" or control characters."""
    if (not isinstance(category, str) or not 1 <= len(category) <= MAX_CATEGORY_LENGTH
            or not category.isprintable() or "/" in category or "\\" in category):
        raise InvalidInput(
            f"{field} must be 1-{MAX_CATEGORY_LENGTH} printable characters without '/' or '\\', "
            f"got {category!r}", {"field": field})
    return category


def _check_int(field: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise InvalidInput(f"{field} must be an integer in {lo}..{hi}, got {value!r}",
                           {"field": field})
    return int(value)


def _check_channels(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value not in (1, 3):
        raise InvalidInput(f"channels must be 1 (grey) or 3 (RGB), got {value!r}",
                           {"field": "channels"})
    return int(value)


# ---------------------------------------------------------------------------------------------
# files

def _write_at(fd: int, data: memoryview, offset: int) -> None:
    """All of ``data`` at ``offset`` (pwrite may write less than asked)."""
    while len(data):
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written


def _truncate_quietly(path: Path, size: int) -> None:
    """Cut ``path`` down to ``size`` bytes if it is longer; errors are ignored (this only
    frees space, the bytes past the committed count are never read)."""
    try:
        if path.stat().st_size > size:
            os.truncate(path, size)
    except OSError:
        pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SensoryStore:
    """Datasets over one SQLAlchemy ``Engine`` (SQLite or PostgreSQL) and a folder of files.

    ``root`` holds one folder per dataset; ``settings`` gives the limits (max_dataset_side,
    max_categories, max_image_bytes, max_image_pixels, max_images_per_request, threads).
    The schema comes from the service's migrations (``dicebox.db.migrate``).
    """

    def __init__(self, engine: Engine, root: Path, settings: Settings) -> None:
        self.engine = engine
        tx = Transactions(engine)  # ValueError for a backend other than SQLite/PostgreSQL
        self.dialect = tx.dialect
        # Short transactions; writes take SQLite's lock up front (see dicebox.db.Transactions).
        self._read, self._write = tx.read, tx.write
        self.root = Path(root)
        self.settings = settings
        # In-process serialisation per dataset: appends queue here instead of contending for the
        # database lock (SQLite's busy timeout), exports of one dataset are built one at a time.
        self._guard = threading.Lock()
        self._append_locks: dict[str, threading.Lock] = {}
        # Re-entrant: ``dataset`` holds it around ``export`` while it maps the file.
        self._export_locks: dict[str, threading.RLock] = {}

    def _row(self, session: Session, name: str, lock: bool = False) -> DatasetRecord:
        stmt = select(DatasetRecord).where(DatasetRecord.name == name)
        if lock and self.dialect == "postgresql":
            stmt = stmt.with_for_update()
        row = session.scalars(stmt).one_or_none()
        if row is None:
            raise NotFound(f"dataset {name!r} does not exist; create it with POST /v1/datasets",
                           {"dataset": name})
        return row

    def _lock_for(self, table: dict, name: str, factory=threading.Lock):
        with self._guard:
            lock = table.get(name)
            if lock is None:
                lock = table[name] = factory()
            return lock

    def _folder(self, name: str) -> Path:
        # Only ever called with a name that passed check_dataset_name (one safe component).
        return self.root / name

    # -- datasets -----------------------------------------------------------------------------

    def create(self, name: str, width: int, height: int, channels: int,
               categories: Sequence[str] | None = None) -> tuple[dict, bool]:
        """Create a dataset of ``width`` x ``height`` pixels with ``channels`` 1 or 3.

        ``categories`` declares category names up front, in label order (more are added as
        images of new categories arrive). Idempotent: creating a dataset that exists with the
        same shape (and the same declared categories, when given) returns it unchanged, so a
        retried request is harmless; a different shape or different declared categories raise
        Conflict (409).

        Returns ``(dataset dict, created)``: ``created`` is False when it already existed.
        """
        check_dataset_name(name)
        side = self.settings.max_dataset_side
        width = _check_int("width", width, 1, side)
        height = _check_int("height", height, 1, side)
        channels = _check_channels(channels)
        declared: list[str] | None = None
        if categories is not None:
            if isinstance(categories, (str, bytes)) or not isinstance(categories, Sequence):
                raise InvalidInput(f"categories must be a list of names, got {categories!r}",
                                   {"field": "categories"})
            declared = [check_category(c, f"categories[{i}]") for i, c in enumerate(categories)]
            if len(set(declared)) != len(declared):
                seen: set[str] = set()
                duplicate = next(c for c in declared if c in seen or seen.add(c))
                raise InvalidInput(f"categories: {duplicate!r} is listed twice",
                                   {"field": "categories"})
            if len(declared) > self.settings.max_categories:
                raise InvalidInput(
                    f"categories: {len(declared)} given, more than the limit of "
                    f"{self.settings.max_categories} (DICEBOX_MAX_CATEGORIES)",
                    {"field": "categories"})

        for attempt in range(2):
            try:
                return self._create(name, width, height, channels, declared)
            except IntegrityError:
                # Another process inserted the same name between our check and insert
                # (PostgreSQL; SQLite's BEGIN IMMEDIATE cannot race): look again.
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _create(self, name: str, width: int, height: int, channels: int,
                declared: list[str] | None) -> tuple[dict, bool]:
        with self._write() as session:
            existing = session.scalars(
                select(DatasetRecord).where(DatasetRecord.name == name)).one_or_none()
            if existing is not None:
                shape = (existing.width, existing.height, existing.channels)
                if shape != (width, height, channels):
                    raise Conflict(
                        f"dataset {name!r} exists with width {existing.width}, height "
                        f"{existing.height}, channels {existing.channels}; asked for "
                        f"{width}, {height}, {channels}", existing.to_dict())
                if declared is not None:
                    had = [c for c, s in zip(existing.categories, existing.category_starts)
                           if s < 0]
                    if had != declared:
                        raise Conflict(f"dataset {name!r} exists with declared categories "
                                       f"{had}, not {declared}", existing.to_dict())
                return existing.to_dict(), False
            # The files may be left over from an earlier dataset of this name (database reset):
            # that is harmless, bytes past the committed count (0) are never read.
            folder = self._folder(name)
            try:
                folder.mkdir(parents=True, exist_ok=True)
                for file in (PIXELS_FILE, LABELS_FILE):
                    os.close(os.open(folder / file, os.O_WRONLY | os.O_CREAT, 0o644))
                _fsync_dir(folder)
            except OSError as exc:
                raise as_storage_error(exc, f"dataset {name!r}: cannot create its files",
                                       folder) from exc
            declared = declared or []
            moment = _now()
            row = DatasetRecord(name=name, uid=uuid.uuid4().hex, width=width, height=height,
                                channels=channels, count=0, categories=declared,
                                category_starts=[-1] * len(declared), counts=[0] * len(declared),
                                created_at=moment, updated_at=moment)
            session.add(row)
            session.flush()
            return row.to_dict(), True

    def get(self, name: str) -> dict:
        """One dataset: name, width, height, channels, shape [C, H, W], count (= the newest
        version), categories in label order as ``[{"name", "count"}]``, counts as
        ``{category: images}``, created_at, updated_at."""
        check_dataset_name(name)
        with self._read() as session:
            return self._row(session, name).to_dict()

    def list(self, limit: int = 100, cursor: str | None = None) -> dict:
        """Datasets by name, ``limit`` at a time: ``{"items": [...], "next": cursor or None}``."""
        limit = _check_int("limit", limit, 1, MAX_LIST_LIMIT)
        stmt = select(DatasetRecord).order_by(DatasetRecord.name).limit(limit + 1)
        if cursor is not None:
            stmt = stmt.where(DatasetRecord.name > _decode_cursor(cursor))
        with self._read() as session:
            rows = session.scalars(stmt).all()
        more = len(rows) > limit
        rows = rows[:limit]
        return {"items": [row.to_dict() for row in rows],
                "next": _encode_cursor(rows[-1].name) if more else None}

    # -- adding images ------------------------------------------------------------------------

    def add_arrays(self, name: str, images: np.ndarray, categories: Sequence[str]) -> dict:
        """Append already-decoded images.

        Args:
            name: the dataset.
            images: uint8 [N, C, H, W] with the dataset's (C, H, W).
            categories: N category names, one per image (new names are added to the dataset).

        Returns:
            ``{"added": N, "count": images now in the dataset, "counts": {category: images}}``.
        """
        check_dataset_name(name)
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
            raise InvalidInput("images must be a uint8 numpy array [N, C, H, W], got "
                               + (f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray)
                                  else type(images).__name__), {"field": "images"})
        if isinstance(categories, (str, bytes)) or len(categories) != len(images):
            raise InvalidInput(f"categories must name one category per image ({len(images)}), "
                               f"got {categories!r:.200}", {"field": "categories"})
        names = [check_category(c, f"categories[{i}]") for i, c in enumerate(categories)]
        return self._append(name, images, names)

    def add_encoded(self, name: str, items: Sequence[tuple[str, bytes, str]]) -> dict:
        """Decode and append PNG/JPEG images: all of them, or none when any item is bad.

        Args:
            name: the dataset.
            items: ``(category, encoded bytes, label)``; the label names the item in errors
                (an upload's field and file name, a JSON item's index).

        Every item is checked before anything is stored: its category; its size against
        ``max_image_bytes`` (TooLarge, 413); its pixel count, read from the image header before
        any decoding, against ``max_image_pixels`` (TooLarge, 413: a 20000 x 20000 PNG is refused
        without allocating it); then it is decoded once (``dicebox.imagefolder.decode_image``)
        to the dataset's size and channels (InvalidInput, 400, for a corrupt or truncated file
        or a format other than PNG/JPEG). At most ``max_images_per_request`` items (TooLarge).

        Returns:
            ``{"added", "count", "counts"}`` as ``add_arrays``.
        """
        from dicebox.imagefolder import decode_image

        check_dataset_name(name)
        items = list(items)
        if not items:
            raise InvalidInput("no images given", {"field": "items"})
        limit = self.settings.max_images_per_request
        if len(items) > limit:
            raise TooLarge(f"{len(items)} images in one request, more than the limit of {limit} "
                           "(DICEBOX_MAX_IMAGES_PER_REQUEST); send them in several requests",
                           {"limit": limit})
        dataset = self.get(name)  # NotFound before any decoding
        size = (dataset["width"], dataset["height"])
        channels = dataset["channels"]
        names = []
        for index, item in enumerate(items):
            category, data, label = item
            if not isinstance(data, (bytes, bytearray)):
                raise InvalidInput(f"image {label!r}: expected encoded bytes, got "
                                   f"{type(data).__name__}", {"item": index, "name": label})
            names.append(check_category(category, f"category of {label}"))
            self.check_image_bytes(len(data), label)
            self.check_image_header(data, label, index)

        images = np.empty((len(items), channels, size[1], size[0]), dtype=np.uint8)

        def decode(index: int) -> None:
            _, data, label = items[index]
            try:
                images[index] = decode_image(data, size, channels, label)
            except ValueError as exc:
                raise InvalidInput(str(exc), {"item": index, "name": label}) from None

        workers = min(len(items), self.settings.threads or os.cpu_count() or 1)
        if workers <= 1:
            for index in range(len(items)):
                decode(index)
        else:
            with ThreadPoolExecutor(max_workers=workers,
                                    thread_name_prefix="dicebox-sensory") as pool:
                futures = [pool.submit(decode, index) for index in range(len(items))]
                try:
                    for future in futures:  # the first failure in item order
                        future.result()
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
        return self._append(name, images, names)

    def check_image_bytes(self, size: int, label: str) -> None:
        """TooLarge (413) when an encoded image of ``size`` bytes exceeds max_image_bytes."""
        limit = self.settings.max_image_bytes
        if size > limit:
            raise TooLarge(f"image {label!r} is larger than the limit of {limit} bytes "
                           "(DICEBOX_MAX_IMAGE_BYTES)", {"name": label, "limit": limit})

    def check_image_header(self, data: bytes, label: str, index: int | None = None) -> None:
        """Reads only the header: InvalidInput if it is not a PNG/JPEG header, TooLarge when
        width x height exceeds max_image_pixels."""
        detail = {"name": label} if index is None else {"item": index, "name": label}
        limit = self.settings.max_image_pixels
        try:
            with Image.open(io.BytesIO(data), formats=_HEADER_FORMATS) as img:
                width, height = img.size
        except Image.DecompressionBombError:
            # Pillow's own guard (above 2x PIL.Image.MAX_IMAGE_PIXELS), raised at open.
            raise TooLarge(f"image {label!r} has more pixels than the limit of {limit} "
                           "(DICEBOX_MAX_IMAGE_PIXELS)", {**detail, "limit": limit}) from None
        except UnidentifiedImageError:
            raise InvalidInput(f"cannot read image {label!r}: not a PNG or JPEG image (or its "
                               "header is corrupt)", detail) from None
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - any header failure means a bad file
            reason = str(exc).strip() or type(exc).__name__
            raise InvalidInput(f"cannot read image {label!r}: {reason}", detail) from None
        if width * height > limit:
            raise TooLarge(f"image {label!r} is {width} x {height} = {width * height} pixels, more "
                           f"than the limit of {limit} (DICEBOX_MAX_IMAGE_PIXELS)",
                           {**detail, "limit": limit})

    def _append(self, name: str, images: np.ndarray, names: list[str]) -> dict:
        """Append ``images`` [N, C, H, W] labelled by category ``names`` (both checked)."""
        with self._lock_for(self._append_locks, name), self._write() as session:
            row = self._row(session, name, lock=True)
            if images.shape[1:] != (row.channels, row.height, row.width):
                raise InvalidInput(
                    f"images: expected shape [N, {row.channels}, {row.height}, {row.width}] for "
                    f"dataset {name!r}, got {list(images.shape)}", {"field": "images"})
            start = row.count
            categories = list(row.categories)
            starts = list(row.category_starts)
            counts = list(row.counts)
            index = {c: i for i, c in enumerate(categories)}
            labels = np.empty(len(names), dtype="<i8")
            for i, category in enumerate(names):
                label = index.get(category)
                if label is None:
                    label = index[category] = len(categories)
                    categories.append(category)
                    starts.append(start + i)
                    counts.append(0)
                labels[i] = label
                counts[label] += 1
            if len(categories) > self.settings.max_categories:
                new = categories[len(row.categories):]
                raise InvalidInput(
                    f"dataset {name!r} would have {len(categories)} categories, more than the "
                    f"limit of {self.settings.max_categories} (DICEBOX_MAX_CATEGORIES); new: "
                    f"{new[:10]}", {"limit": self.settings.max_categories})
            if len(names):
                self._write_files(name, start, row.image_bytes, images, labels)
                crash_point("sensory.files_written")
            row.count = start + len(names)
            row.categories = categories
            row.category_starts = starts
            row.counts = counts
            row.updated_at = _now()
            result = {"added": len(names), "count": row.count,
                      "counts": dict(zip(categories, counts))}
        # Leaving the block committed the new count: only now are the images part of it.
        crash_point("sensory.committed")
        return result

    def _write_files(self, name: str, start: int, image_bytes: int, images: np.ndarray,
                     labels: np.ndarray) -> None:
        """Writes images and labels from index ``start`` and makes them durable before the
        caller commits the count. Each file ends up exactly ``start + N`` records long, which
        drops whatever an earlier crash left past the committed count."""
        folder = self._folder(name)
        pixels = np.ascontiguousarray(images).reshape(-1)
        files = ((folder / PIXELS_FILE, pixels, image_bytes),
                 (folder / LABELS_FILE, labels, LABEL_BYTES))
        for path, data, record in files:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    _write_at(fd, memoryview(data).cast("B"), start * record)
                    os.ftruncate(fd, (start + len(labels)) * record)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                # Nothing is committed: give back what this append wrote past the count (on a
                # full disk the next append needs that room), then say which file failed.
                for other, _, other_record in files:
                    _truncate_quietly(other, start * other_record)
                raise as_storage_error(exc, f"dataset {name!r}: cannot store the images",
                                       path) from exc

    # -- versions and exports -----------------------------------------------------------------

    def export_info(self, name: str, version: int | None = None) -> dict:
        """What ``export`` would serve, without building anything.

        Returns ``{"name", "version", "etag", "categories", "shape": [C, H, W]}``; ``version``
        None means the newest (the current count). ``etag`` is a strong, quoted entity tag
        derived from the dataset's identity, the version, its categories and the shape.
        Raises InvalidInput for a negative version, NotFound for one past the current count,
        Conflict for a version without categories (nothing to export yet).
        """
        return self._export_info(name, version)[0]

    def _export_info(self, name: str, version: int | None) -> tuple[dict, str, int]:
        """``export_info`` plus the dataset's uid and bytes per image (for building)."""
        check_dataset_name(name)
        if version is not None:
            _check_int("version", version, 0, 2**62)
        with self._read() as session:
            row = self._row(session, name)
        if version is None:
            version = row.count
        elif version > row.count:
            raise NotFound(f"dataset {row.name!r} has no version {version}: it holds {row.count} "
                           f"images (versions 0..{row.count})",
                           {"dataset": row.name, "count": row.count})
        categories = row.categories_at(version)
        if not categories:
            raise Conflict(f"dataset {row.name!r} has no categories at version {version}; add "
                           "images (or declare categories) before exporting",
                           {"dataset": row.name, "version": version})
        shape = [row.channels, row.height, row.width]
        identity = json.dumps([EXPORT_FORMAT, row.uid, row.name, version, categories, shape],
                              ensure_ascii=True, separators=(",", ":"))
        digest = hashlib.sha256(identity.encode()).hexdigest()[:32]
        info = {"name": row.name, "version": version, "etag": f'"v{version}-{digest}"',
                "categories": categories, "shape": shape}
        return info, row.uid, row.image_bytes

    def export(self, name: str, version: int | None = None) -> dict:
        """The packed file of a version (newest when None), built once and reused.

        Returns ``export_info``'s dict plus ``path`` (str) and ``size`` (bytes). The file is in
        the core's format (``dicebox.Dataset.load``). Only the ``KEEP_EXPORTS`` most recently
        used exports of a dataset are kept, so open the file soon (an open file stays readable
        after it is pruned; a pruned one is simply built again).
        """
        info, uid, image_bytes = self._export_info(name, version)
        folder = self._folder(name) / "exports"
        path = folder / f"{info['version']}-{uid}.dbx"
        with self._lock_for(self._export_locks, name, threading.RLock):
            try:
                os.utime(path)  # most recently used: pruned last
            except FileNotFoundError:
                self._build(name, info, image_bytes, path)
                self._prune(folder, keep=path)
            except OSError:
                pass  # a read-only folder: the export is still served, just not marked used
            return {**info, "path": str(path), "size": path.stat().st_size}

    def dataset(self, name: str, version: int | None = None):
        """Version ``version`` (newest when None) as a ``dicebox.Dataset``, memory-mapped from
        its export file."""
        from dicebox.dataset import Dataset

        for attempt in range(3):
            # Under the export lock no thread of this process prunes the file between its build
            # and its mapping; another process might (rarely), and then it is built again.
            with self._lock_for(self._export_locks, name, threading.RLock):
                path = self.export(name, version)["path"]
                try:
                    return Dataset.load(path)
                except OSError:
                    if attempt == 2 or os.path.exists(path):
                        raise
        raise AssertionError("unreachable")

    def _build(self, name: str, info: dict, image_bytes: int, path: Path) -> None:
        from dicebox.dataset import Dataset

        version = info["version"]
        channels, height, width = info["shape"]
        folder = self._folder(name)
        pixels_path, labels_path = folder / PIXELS_FILE, folder / LABELS_FILE
        need_pixels, need_labels = version * image_bytes, version * LABEL_BYTES
        for file, need in ((pixels_path, need_pixels), (labels_path, need_labels)):
            have = file.stat().st_size if file.exists() else 0
            if have < need:
                raise RuntimeError(f"dataset {name!r}: {file} holds {have} bytes, fewer than the "
                                   f"{need} of its {version} committed images; the files were "
                                   "changed or lost outside dicebox")
        if version:
            # Committed bytes are never rewritten (appends only write past the count), so they
            # can be read without the append lock.
            images = np.memmap(pixels_path, dtype=np.uint8, mode="r",
                               shape=(version, channels, height, width))
            labels = np.fromfile(labels_path, dtype="<i8", count=version).astype(np.int64)
        else:
            images = np.empty((0, channels, height, width), dtype=np.uint8)
            labels = np.empty(0, dtype=np.int64)
        packed = Dataset.from_arrays(images, labels, info["categories"])
        del images
        # A unique temporary name, renamed into place: another process building the same
        # version at the same time never writes into our file.
        partial = path.parent / f".{path.stem}.{uuid.uuid4().hex}.partial"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            packed.save(partial)
            os.replace(partial, path)
        except OSError as exc:
            raise as_storage_error(exc, f"dataset {name!r}: cannot write the export of version "
                                   f"{version}", path) from exc
        finally:
            try:
                partial.unlink(missing_ok=True)
            except OSError:
                pass

    @staticmethod
    def _prune(folder: Path, keep: Path) -> None:
        """Drops all but the KEEP_EXPORTS most recently used exports, and stale partial files."""
        exports = []
        cutoff = time.time() - STALE_PARTIAL_SECONDS
        for entry in folder.iterdir():
            try:
                stat = entry.stat()
            except FileNotFoundError:
                continue
            if entry.suffix == ".dbx":
                exports.append((entry == keep, stat.st_mtime, entry))
            elif entry.name.startswith(".") and stat.st_mtime < cutoff:
                entry.unlink(missing_ok=True)
        exports.sort(reverse=True)
        for _, _, entry in exports[KEEP_EXPORTS:]:
            entry.unlink(missing_ok=True)


def _encode_cursor(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode()


def _decode_cursor(cursor: Any) -> str:
    try:
        return check_dataset_name(base64.urlsafe_b64decode(cursor.encode()).decode())
    except (AttributeError, ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidInput(f"cursor is not a cursor returned by a dataset list: {cursor!r}",
                           {"field": "cursor"}) from None
