"""The model registry: every trained model the service keeps, its files and its record.

A model is a directory ``root/<id>/`` exactly as :meth:`dicebox.Model.save` writes it
(``weights.safetensors`` + ``model.json``) plus one row in the ``models`` table (the job that
trained it, its dataset and dataset version, categories, input shape, genome, history,
metrics, fitness). Ids are uuid4 hex; every id coming from outside is checked against
``^[0-9a-f]{32}$`` before a path is built from it.

Registration is crash-safe in one direction: files first, row second. The files are written
under a temporary directory inside ``root``, fsynced, validated by loading them with the
core, renamed into place, and only then is the row inserted. A crash in between leaves at
worst a directory without a row (an orphan, removed by :meth:`ModelRegistry.cleanup`, which
runs at start-up), never a row without files. Registration is idempotent per job: the
``job_id`` column is unique, and registering a job that already has a model returns that
model and stores nothing.

The best model of a dataset is the one with the highest fitness (validation accuracy of the
kept weights), the newest winning ties. Errors are :mod:`dicebox.errors` (InvalidInput,
NotFound), which the server maps to 400/404, and StorageError (an OSError naming the file;
507 or 503 over HTTP) when the disk is full or the folder is not writable; the temporary
directory is removed then, so a failed registration leaves neither files nor a row.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from sqlalchemy import JSON, BigInteger, Engine, Float, Index, Integer, String, and_, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from dicebox.db import Base, Transactions, UTCDateTime, iso
from dicebox.db import now as _now
from dicebox.errors import InvalidInput, NotFound, as_storage_error
from dicebox.faults import crash_point
from dicebox.model import Model

__all__ = ["BEST", "MODEL_FILE", "WEIGHTS_FILE", "ModelRecord", "ModelRegistry", "check_model_id"]

WEIGHTS_FILE = "weights.safetensors"
MODEL_FILE = "model.json"
#: The model reference that means "the best model of a dataset".
BEST = "best"
MAX_LIST_LIMIT = 1000
MAX_DATASET_NAME = 255
MAX_JOB_ID = 64
# Temporary directories of registrations in progress start with this (never a valid id).
_TEMP_PREFIX = ".tmp-"
# Orphans younger than this are left alone by start-up cleanup: another server process
# sharing the same home may be between its rename and its insert right now.
ORPHAN_GRACE_SECONDS = 600.0
_MODEL_ID = re.compile(r"[0-9a-f]{32}")
_COPY_CHUNK = 1 << 20


class ModelRecord(Base):
    """One row per registered model; its files are ``root/<id>/``."""

    __tablename__ = "models"
    __table_args__ = (
        # best(dataset): highest fitness, newest first within one dataset.
        Index("ix_models_dataset_fitness", "dataset", "fitness", "created_at"),
        # list(): newest first, optionally within one dataset.
        Index("ix_models_created", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    # The train job that produced it; unique so a retried upload cannot make a second model.
    # None for models registered outside a job (several NULLs are allowed by both backends).
    job_id: Mapped[str | None] = mapped_column(String(MAX_JOB_ID), unique=True, nullable=True)
    dataset: Mapped[str] = mapped_column(String(MAX_DATASET_NAME))
    dataset_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    categories: Mapped[Any] = mapped_column(JSON)
    input_shape: Mapped[Any] = mapped_column(JSON)  # [channels, height, width]
    genome: Mapped[Any] = mapped_column(JSON)
    history: Mapped[Any] = mapped_column(JSON)
    metrics: Mapped[Any | None] = mapped_column(JSON, nullable=True)
    fitness: Mapped[float | None] = mapped_column(Float, nullable=True)
    val_accuracy: Mapped[float | None] = mapped_column(Float, nullable=True)
    training_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    weights_sha256: Mapped[str] = mapped_column(String(64))
    weights_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    def to_dict(self, full: bool = True) -> dict[str, Any]:
        """The public description. ``full=False`` (list pages) leaves out the per-epoch
        history and the confusion matrix, which grow with epochs and categories squared."""
        metrics = self.metrics
        if not full and isinstance(metrics, dict):
            metrics = {k: v for k, v in metrics.items() if k != "confusion"}
        out: dict[str, Any] = {
            "id": self.id,
            "job_id": self.job_id,
            "dataset": self.dataset,
            "dataset_version": self.dataset_version,
            "categories": self.categories,
            "input_shape": self.input_shape,
            "genome": self.genome,
            "metrics": metrics,
            "fitness": self.fitness,
            "val_accuracy": self.val_accuracy,
            "epochs": len(self.history or []),
            "training_seconds": self.training_seconds,
            "weights_sha256": self.weights_sha256,
            "weights_bytes": self.weights_bytes,
            "created_at": iso(self.created_at),
        }
        if full:
            out["history"] = self.history
        return out


# ---------------------------------------------------------------------------------------------
# argument checks (each names what it rejects)

def check_model_id(model_id: Any) -> str:
    """``model_id`` if it is 32 lowercase hex characters (a registry id), else InvalidInput."""
    if not isinstance(model_id, str) or _MODEL_ID.fullmatch(model_id) is None:
        raise InvalidInput("model id must be 32 lowercase hex characters (or 'best' with a"
                           f" dataset), got {_shorten(model_id)!r}")
    return model_id


def _check_dataset(dataset: Any) -> str:
    if not isinstance(dataset, str) or not dataset.strip() or len(dataset) > MAX_DATASET_NAME:
        raise InvalidInput(f"dataset must be a non-empty name of at most {MAX_DATASET_NAME}"
                           f" characters, got {_shorten(dataset)!r}")
    return dataset


def _check_job_id(job_id: Any) -> str | None:
    if job_id is None:
        return None
    if not isinstance(job_id, str) or not job_id or len(job_id) > MAX_JOB_ID:
        raise InvalidInput(f"job_id must be a non-empty string of at most {MAX_JOB_ID}"
                           f" characters, got {_shorten(job_id)!r}")
    return job_id


def _check_number(name: str, value: Any, lo: float, hi: float) -> float | None:
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or not lo <= value <= hi):
        raise InvalidInput(f"{name} must be a number in [{lo}, {hi}], got {_shorten(value)!r}")
    return float(value)


def _check_version(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"dataset_version must be an integer >= 0, got {_shorten(value)!r}")
    return value


def _check_metrics(metrics: Any) -> dict | None:
    if metrics is None:
        return None
    if not isinstance(metrics, dict):
        raise InvalidInput(f"metrics must be a JSON object, got {type(metrics).__name__}")
    try:
        json.dumps(metrics, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"metrics must be JSON-serialisable: {exc}") from None
    return metrics


def _shorten(value: Any, limit: int = 80) -> Any:
    """Values echoed in error messages are cut short: they come from clients."""
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + "..."
    return value


def validation_accuracy(history: list[dict[str, Any]]) -> float | None:
    """``val_accuracy`` of the epoch with the lowest ``val_loss`` (the epoch whose weights
    training keeps), or None without validation."""
    number = (int, float)
    scored = [e for e in history
              if isinstance(e.get("val_loss"), number) and isinstance(e.get("val_accuracy"), number)
              and math.isfinite(e["val_loss"])]
    if not scored:
        return None
    return float(min(scored, key=lambda e: e["val_loss"])["val_accuracy"])


def _json_clean(value: Any) -> Any:
    """NaN/inf (e.g. a loss that diverged) become None so the row stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_clean(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# files

def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (no-op where directories cannot be
    opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(target: Path, source: bytes | IO[bytes] | Path) -> tuple[str, int]:
    """Write ``source`` (bytes, a binary file object read to its end, or a file path) to
    ``target``, fsync it, and return its sha256 hex digest and size in bytes."""
    if isinstance(source, Path):
        with open(source, "rb") as stream:
            return _write_file(target, stream)
    digest = hashlib.sha256()
    size = 0
    try:
        with open(target, "wb") as out:
            if isinstance(source, (bytes, bytearray, memoryview)):
                chunks: Iterable[Any] = (bytes(source),)
            else:
                chunks = iter(lambda: source.read(_COPY_CHUNK), b"")
            for chunk in chunks:
                if not isinstance(chunk, (bytes, bytearray)):
                    raise InvalidInput("weights: expected bytes or a binary file, read"
                                       f" {type(chunk).__name__}")
                out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        # A failed write or close (a full disk) names no file: name it.
        if exc.filename is None:
            exc.filename = str(target)
        raise
    return digest.hexdigest(), size


class ModelRegistry:
    """Models under ``root`` (created if missing), rows in ``engine``'s ``models`` table.

    The schema is made by the migrations (:func:`dicebox.db.migrate`); the registry only
    reads and writes rows. Every public method runs its own short transaction and returns
    plain dicts; all methods are thread-safe.
    """

    def __init__(self, engine: Engine, root: str | os.PathLike, cleanup: bool = True) -> None:
        self.engine = engine
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        # Short transactions; writes take SQLite's lock up front (see dicebox.db.Transactions).
        self._tx = Transactions(engine)  # ValueError for a backend other than SQLite/PostgreSQL
        # Bumped by every model registered through this object, so caches of "the best model
        # of a dataset" (the Classifier's) know when to look again.
        self.generation = 0
        self._generation_lock = threading.Lock()
        if cleanup:
            self.cleanup()

    # -- registration -------------------------------------------------------------------------

    def register(self, job_id: str | None, model_dir: str | os.PathLike, *, dataset: str,
                 dataset_version: int | None = None, training_seconds: float | None = None,
                 metrics: dict | None = None, fitness: float | None = None) -> dict:
        """Store a copy of the model directory ``model_dir`` (as written by
        :meth:`dicebox.Model.save`) as a new model and return its record.

        ``job_id`` is the train job that produced it (None: not made by a job); a job that
        already has a model gets that model back and nothing is stored. ``metrics`` default
        to the ones saved in the model (:meth:`Model.evaluate`); ``fitness`` defaults to the
        validation accuracy of the kept weights (from the model's history).

        Raises InvalidInput when the directory does not hold a loadable model (nothing is
        stored then) or an argument is invalid.
        """
        source = Path(model_dir)
        if not (source / MODEL_FILE).is_file() or not (source / WEIGHTS_FILE).is_file():
            raise InvalidInput(f"model directory {str(source)!r} must hold {MODEL_FILE} and"
                               f" {WEIGHTS_FILE}")
        return self._register(job_id, source / WEIGHTS_FILE, (source / MODEL_FILE).read_bytes(),
                              dataset=dataset,
                              dataset_version=dataset_version, training_seconds=training_seconds,
                              metrics=metrics, fitness=fitness)

    def register_upload(self, job_id: str | None, weights: bytes | IO[bytes], model_json: bytes, *,
                        dataset: str, dataset_version: int | None = None,
                        training_seconds: float | None = None, metrics: dict | None = None,
                        fitness: float | None = None) -> dict:
        """:meth:`register` for files that arrive over HTTP (the worker upload route).

        ``weights`` is the content of ``weights.safetensors`` (bytes, or a binary file object
        read to its end, e.g. ``UploadFile.file``); ``model_json`` the content of
        ``model.json``. The pair is validated by loading it with the core before anything is
        kept: a corrupt or mismatched upload raises InvalidInput and stores nothing.
        Idempotent per ``job_id`` like :meth:`register` (a repeated upload does not even read
        ``weights``).
        """
        if not isinstance(model_json, (bytes, bytearray, memoryview)):
            raise InvalidInput(f"model: expected the bytes of {MODEL_FILE}, got"
                               f" {type(model_json).__name__}")
        return self._register(job_id, weights, bytes(model_json), dataset=dataset,
                              dataset_version=dataset_version, training_seconds=training_seconds,
                              metrics=metrics, fitness=fitness)

    def _register(self, job_id: str | None, weights: bytes | IO[bytes] | Path, model_json: bytes, *,
                  dataset: str, dataset_version: int | None, training_seconds: float | None,
                  metrics: dict | None, fitness: float | None) -> dict:
        job_id = _check_job_id(job_id)
        dataset = _check_dataset(dataset)
        dataset_version = _check_version(dataset_version)
        training_seconds = _check_number("training_seconds", training_seconds, 0.0, 1e12)
        fitness = _check_number("fitness", fitness, 0.0, 1.0)
        metrics = _check_metrics(metrics)
        if job_id is not None:
            existing = self._by_job(job_id)
            if existing is not None:
                return existing

        self._check_model_json(model_json)

        model_id = uuid.uuid4().hex
        temp = self.root / f"{_TEMP_PREFIX}{model_id}"
        final = self.root / model_id
        what = "cannot store the model's files"
        try:
            temp.mkdir()
        except OSError as exc:
            raise as_storage_error(exc, what, temp) from exc
        try:
            try:
                weights_sha256, weights_bytes = _write_file(temp / WEIGHTS_FILE, weights)
                _write_file(temp / MODEL_FILE, model_json)
            except OSError as exc:
                raise as_storage_error(exc, what) from exc
            model = self._validate(temp)
            _fsync_dir(temp)
            crash_point("registry.files_written")
            try:
                os.rename(temp, final)
            except OSError as exc:
                raise as_storage_error(exc, what, final) from exc
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        crash_point("registry.renamed")

        history = _json_clean(model.history)
        val_accuracy = validation_accuracy(history)
        if metrics is None:
            metrics = model.metrics
        record = ModelRecord(
            id=model_id, job_id=job_id, dataset=dataset, dataset_version=dataset_version,
            categories=model.categories, input_shape=list(model.input_shape),
            genome=model.genome.to_dict(), history=history,
            metrics=_json_clean(metrics) if metrics is not None else None,
            fitness=fitness if fitness is not None else val_accuracy, val_accuracy=val_accuracy,
            training_seconds=training_seconds, weights_sha256=weights_sha256,
            weights_bytes=weights_bytes, created_at=_now())
        try:
            with self._tx.write() as session:
                session.add(record)
            with self._generation_lock:
                self.generation += 1
            crash_point("registry.committed")
            return record.to_dict()
        except IntegrityError:
            # Lost a race with a concurrent registration for the same job: the winner's row is
            # committed, so drop our files and answer with its model.
            shutil.rmtree(final, ignore_errors=True)
            existing = self._by_job(job_id) if job_id is not None else None
            if existing is None:
                raise
            return existing
        except BaseException:
            # No row, so the files must not stay either.
            shutil.rmtree(final, ignore_errors=True)
            raise

    @staticmethod
    def _check_model_json(model_json: bytes) -> None:
        """A readable error for the common upload mistakes, before the core sees the files."""
        try:
            description = json.loads(model_json)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"{MODEL_FILE}: not valid JSON ({exc})") from None
        if not isinstance(description, dict):
            raise InvalidInput(f"{MODEL_FILE}: expected a JSON object")
        named = description.get("weights", WEIGHTS_FILE)
        if named != WEIGHTS_FILE:
            raise InvalidInput(f"{MODEL_FILE}: names its weights file {_shorten(named)!r};"
                               f" expected {WEIGHTS_FILE!r}")

    @staticmethod
    def _validate(directory: Path) -> Model:
        try:
            return Model.load(directory)
        except (OSError, ValueError, RuntimeError) as exc:
            # Name the file, not the server's directory layout.
            reason = str(exc).replace(str(directory) + os.sep, "").replace(str(directory), "model")
            raise InvalidInput(f"not a loadable dicebox model: {reason}") from None

    def _by_job(self, job_id: str) -> dict | None:
        with self._tx.read() as session:
            stmt = select(ModelRecord).where(ModelRecord.job_id == job_id)
            row = session.scalars(stmt).one_or_none()
            return row.to_dict() if row is not None else None

    def cleanup(self, older_than: float = ORPHAN_GRACE_SECONDS) -> list[str]:
        """Remove what crashed registrations left behind: temporary directories and model
        directories without a row, last modified more than ``older_than`` seconds ago.
        Returns the names removed."""
        cutoff = time.time() - older_than
        candidates = []
        for entry in self.root.iterdir():
            name = entry.name
            ours = name.startswith(_TEMP_PREFIX) or _MODEL_ID.fullmatch(name) is not None
            if not ours or not entry.is_dir():
                continue
            try:
                if entry.stat().st_mtime > cutoff:
                    continue
            except FileNotFoundError:
                continue
            candidates.append(entry)
        ids = [e.name for e in candidates if _MODEL_ID.fullmatch(e.name)]
        known: set[str] = set()
        if ids:
            with self._tx.read() as session:
                known = set(session.scalars(select(ModelRecord.id).where(ModelRecord.id.in_(ids))))
        removed = []
        for entry in candidates:
            if entry.name not in known:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
        return removed

    # -- reading ------------------------------------------------------------------------------

    def get(self, model_id: str) -> dict:
        """The full record of one model (history included); NotFound if unknown."""
        check_model_id(model_id)
        with self._tx.read() as session:
            row = session.get(ModelRecord, model_id)
            if row is None:
                raise NotFound(f"model {model_id!r} not found")
            return row.to_dict()

    def best(self, dataset: str) -> dict:
        """The model of ``dataset`` with the highest fitness (newest first among equals;
        models without a fitness come last); NotFound if the dataset has no model."""
        _check_dataset(dataset)
        stmt = (select(ModelRecord).where(ModelRecord.dataset == dataset)
                .order_by(ModelRecord.fitness.is_(None), ModelRecord.fitness.desc(),
                          ModelRecord.created_at.desc(), ModelRecord.id.desc())
                .limit(1))
        with self._tx.read() as session:
            row = session.scalars(stmt).one_or_none()
            if row is None:
                raise NotFound(f"dataset {_shorten(dataset)!r} has no model yet")
            return row.to_dict()

    def resolve(self, model_ref: str, dataset: str | None = None) -> dict:
        """A model id, or ``"best"`` with ``dataset`` (InvalidInput without it)."""
        if model_ref == BEST:
            if dataset is None or dataset == "":
                raise InvalidInput("model 'best' needs a dataset: add ?dataset=NAME")
            return self.best(dataset)
        return self.get(model_ref)

    def list(self, dataset: str | None = None, limit: int = 50,
             cursor: str | None = None) -> dict:
        """Models newest first, ``limit`` at a time, optionally of one dataset:
        ``{"items": [...], "next": cursor or None}`` (keyset pagination on (created_at, id),
        so pages stay consistent while models are added). Items leave out the history and
        the confusion matrix (see :meth:`get`)."""
        if (isinstance(limit, bool) or not isinstance(limit, int)
                or not 1 <= limit <= MAX_LIST_LIMIT):
            raise InvalidInput(f"limit must be an integer in 1..{MAX_LIST_LIMIT},"
                               f" got {_shorten(limit)!r}")
        stmt = (select(ModelRecord)
                .order_by(ModelRecord.created_at.desc(), ModelRecord.id.desc())
                .limit(limit + 1))
        if dataset is not None:
            stmt = stmt.where(ModelRecord.dataset == _check_dataset(dataset))
        if cursor is not None:
            after_time, after_id = _decode_cursor(cursor)
            stmt = stmt.where(or_(ModelRecord.created_at < after_time,
                                  and_(ModelRecord.created_at == after_time,
                                       ModelRecord.id < after_id)))
        with self._tx.read() as session:
            rows = session.scalars(stmt).all()
            more = len(rows) > limit
            rows = rows[:limit]
            return {"items": [row.to_dict(full=False) for row in rows],
                    "next": _encode_cursor(rows[-1]) if more else None}

    def path(self, model_id: str) -> Path:
        """The model's directory (NotFound if it is not registered)."""
        self.get(model_id)
        return self.root / model_id

    def file(self, model_id: str, name: str) -> Path:
        """One of the model's two files (``weights.safetensors`` or ``model.json``)."""
        if name not in (WEIGHTS_FILE, MODEL_FILE):
            raise InvalidInput(f"file must be {WEIGHTS_FILE!r} or {MODEL_FILE!r},"
                               f" got {_shorten(name)!r}")
        return self.path(model_id) / name

    def load(self, model_id: str) -> Model:
        """The model, loaded by the core (its directory was validated at registration)."""
        return Model.load(self.path(model_id))


def _encode_cursor(row: ModelRecord) -> str:
    raw = f"{row.created_at.isoformat()}|{row.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode()


def _decode_cursor(cursor: Any) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor.encode()).decode()
        when, model_id = raw.split("|", 1)
        created = datetime.fromisoformat(when)
        if created.tzinfo is None or _MODEL_ID.fullmatch(model_id) is None:
            raise ValueError
        return created, model_id
    except (AttributeError, ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidInput("cursor is not one returned by a model list:"
                           f" {_shorten(cursor)!r}") from None
