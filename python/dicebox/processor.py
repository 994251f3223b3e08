"""Training processors: take train jobs from a dicebox server and run them in the core.

``python -m dicebox.processor [--server URL] [--broker AMQP_URL] [--concurrency N] [--name NAME]
[--cache DIR] [--threads N] [--handoff-seconds S]`` (also ``dicebox worker``). A processor talks
to the server only over HTTP
(:class:`dicebox.client.Client`, the ``/v1/worker`` protocol), so it may run on any machine
that reaches the server. Each of its ``concurrency`` loops repeats:

1. claim a job (long-poll: the server answers as soon as a job is submitted);
2. fetch the dataset export of the job's version into the cache (reused with its ETag), the
   job's last epoch checkpoint if an earlier attempt left one, and the warm-start model (the
   job's ``init``, or with LOAD_BEST_WEIGHTS_ON_START the dataset's best model when its
   genome and categories match);
3. train (:func:`dicebox.train`), after every epoch uploading the checkpoint and then
   reporting the epoch; a lease thread renews the job's lease every lease/3 seconds, so a long
   epoch never loses it;
4. evaluate on the test part, upload the model, and only then complete the job.

A cancel requested on the server stops training within one epoch (the heartbeat answers
"stop" and the CancelToken is set). SIGTERM/SIGINT stop claiming, cancel the training and
hand the job back, so another processor resumes it from its checkpoint. A server that cannot
be reached is retried with back-off; a job whose lease was lost (409) is dropped quietly.

With a broker (``--broker`` / DICEBOX_BROKER_URL, RabbitMQ mode) step 1 changes: jobs arrive
as messages and the server is asked what to do with each (:class:`BrokerProcessor`); a
message is acknowledged only once the job's end is stored on the server.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

import dicebox
from dicebox.allocator import pin_mmap_threshold
from dicebox.client import Client, ServerUnavailable
from dicebox.dataset import Dataset
from dicebox.errors import Conflict, InvalidInput, NotFound, ServiceError, TooLarge
from dicebox.faults import crash_point
from dicebox.genome import Genome
from dicebox.model import Model
from dicebox.rabbitmq.connection import redact
from dicebox.rabbitmq.jobs import Delivery, JobConsumer
from dicebox.settings import Settings
from dicebox.training import default_threads

__all__ = ["BrokerProcessor", "DiskCache", "Processor", "main"]

log = logging.getLogger("dicebox.processor")

T = TypeVar("T")

# Seconds a claim waits on the server for a job (the server caps it at 30).
CLAIM_WAIT = 20.0
# Back-off between attempts to reach a server that does not answer: doubling, capped.
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0
# After SIGTERM: how long running jobs get to hand themselves back before the process exits.
STOP_GRACE = 60.0
# How long a job being handed back on shutdown keeps trying an unreachable server.
HANDBACK_SECONDS = 10.0
# Broker mode: a delivery is handed over after this long (RabbitMQ's consumer_timeout is 30
# minutes by default; this must stay below the broker's setting).
DEFAULT_HANDOFF_SECONDS = 1200.0
CHECKPOINT_FILE = "checkpoint.safetensors"
TRAIN_DEFAULTS = {"epochs": 10, "batch_size": 64, "patience": 5, "seed": 0, "augment": 0.0,
                  "label_smoothing": 0.0, "validation": 0.1, "test": 0.1}
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _safe_component(name: str) -> str:
    """``name`` when it is a harmless file name, else a digest of it (cache keys come from
    the server and must never become path tricks)."""
    if isinstance(name, str) and _SAFE_NAME.fullmatch(name) and ".." not in name:
        return name
    return "h-" + hashlib.sha256(str(name).encode()).hexdigest()[:40]


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None and numpy values -> Python, so results are strict JSON."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _write_text_atomically(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    temp.write_text(text)
    os.replace(temp, path)


def checkpoint_uses_init(path: str | os.PathLike) -> bool | None:
    """Whether the trainer's checkpoint at ``path`` was written by a warm-started run (its
    fingerprint records that), or None when the file is not a whole, readable checkpoint
    (a torn file: its tensors must end exactly where the file ends)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 << 20 or 8 + length > size:
                return None
            header = json.loads(f.read(length))
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
        if 8 + length + max(ends, default=0) != size:
            return None
        state = json.loads(header["__metadata__"]["dicebox"])
        return bool(state["fingerprint"]["init"])
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, struct.error):
        return None


def validation_fitness(history: list[dict[str, Any]]) -> float | None:
    """``val_accuracy`` of the epoch with the lowest ``val_loss`` (the kept weights)."""
    scored = [e for e in history
              if isinstance(e.get("val_loss"), (int, float)) and isinstance(e.get("val_accuracy"), (int, float))
              and math.isfinite(e["val_loss"])]
    if not scored:
        return None
    return float(min(scored, key=lambda e: e["val_loss"])["val_accuracy"])


class DiskCache:
    """Files a processor fetches from its server, under ``root``: dataset exports
    (``datasets/<name>/<version>.dbx``, with their ETag beside them), warm-start models
    (``models/<id>/``) and the working directories of running jobs (``work/``).

    Safe to share between the loops of one processor (per-key locks) and between processes
    (every file is written under a unique temporary name and renamed into place)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser()
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _lock(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    def dataset(self, client: Client, name: str, version: int | None) -> Dataset:
        """The export of dataset ``name`` at ``version``: downloaded once, then revalidated
        with If-None-Match (a 304 costs no transfer)."""
        directory = self.root / "datasets" / _safe_component(name)
        stem = str(version) if version is not None else "latest"
        target = directory / f"{stem}.dbx"
        etag_file = directory / f"{stem}.etag"
        with self._lock(f"dataset:{directory}:{stem}"):
            directory.mkdir(parents=True, exist_ok=True)
            etag = None
            if target.is_file() and etag_file.is_file():
                etag = etag_file.read_text().strip() or None
            for fresh in (False, True):
                if fresh:  # the cached file did not load: fetch it whole once more
                    log.warning("cached export %s is unreadable; downloading it again", target)
                    etag_file.unlink(missing_ok=True)
                    etag = None
                new_etag = client.datasets.export(name, target, version=version, etag=etag)
                if etag is not None and new_etag == etag:
                    log.info("dataset %r version %s: the cached copy is current", name, stem)
                else:
                    log.info("dataset %r version %s: downloaded", name, stem)
                if new_etag != etag:
                    if new_etag:
                        _write_text_atomically(etag_file, new_etag)
                    else:
                        etag_file.unlink(missing_ok=True)
                try:
                    return Dataset.load(target)
                except (OSError, ValueError):
                    if fresh or etag is None:
                        raise
            raise AssertionError("unreachable")

    def model(self, client: Client, model_id: str) -> Path:
        """The directory of model ``model_id`` (weights + model.json), downloaded once."""
        directory = self.root / "models" / _safe_component(model_id)
        with self._lock(f"model:{directory}"):
            if (directory / "model.json").is_file():
                return directory
            directory.parent.mkdir(parents=True, exist_ok=True)
            temp = directory.with_name(f".{directory.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                client.models.download(model_id, temp)
                try:
                    os.rename(temp, directory)
                except OSError:
                    if not (directory / "model.json").is_file():  # not another process's copy
                        raise
            finally:
                shutil.rmtree(temp, ignore_errors=True)
            return directory

    def workdir(self, job_id: str) -> Path:
        """A fresh working directory for one run of a job (removed by the caller)."""
        parent = self.root / "work"
        parent.mkdir(parents=True, exist_ok=True)
        prefix = f"{socket.gethostname()}-{os.getpid()}-{_safe_component(job_id)}-"
        return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))

    def sweep_work(self) -> None:
        """Remove working directories left by dead processes of this host (kill -9)."""
        parent = self.root / "work"
        if not parent.is_dir():
            return
        host = socket.gethostname()
        for entry in parent.iterdir():
            head, _, rest = entry.name.partition(f"{host}-")
            if head or not rest:
                continue
            pid_text = rest.split("-", 1)[0]
            if not pid_text.isdigit() or int(pid_text) == os.getpid():
                continue
            try:
                os.kill(int(pid_text), 0)
            except ProcessLookupError:
                shutil.rmtree(entry, ignore_errors=True)
            except PermissionError:
                pass


class _Interrupted(Exception):
    """The run was told to stop (cancel, lost lease, shutdown) outside of training."""


class JobRun:
    """One attempt at one claimed train job by one processor loop."""

    def __init__(self, processor: Processor, client: Client, worker: str, claim: dict[str, Any]) -> None:
        self.processor = processor
        self.client = client
        self.worker = worker
        self.job = claim["job"]
        self.id: str = self.job["id"]
        self.payload: dict[str, Any] = self.job.get("payload") or {}
        self.lease_seconds = float(claim.get("lease_seconds") or processor.settings.lease_seconds)
        self.token = dicebox.CancelToken()
        # Why the run stops early: "server" (heartbeat said stop: cancel requested or lease
        # lost), "lost" (a 409: the job is someone else's now), "shutdown" (SIGTERM).
        self.stop_reason: str | None = None
        self._reason_lock = threading.Lock()
        self._lease_done = threading.Event()
        self.checkpoint_path: Path | None = None
        # Set when the server refuses checkpoints of this size: stop sending them.
        self.checkpoint_refused = False
        self.epochs = 1
        # What becomes of the job's broker message once the run is over (RabbitMQ mode):
        # "ack" (the job ended, or is someone else's now), "requeue" (it is to run again, or
        # its end could not be stored), "reject" (it ended failed for good: dead-letter it).
        self.disposition = "requeue"
        # A report was refused with 409/404: the job is no longer this worker's.
        self._lost = False

    # -- stopping ---------------------------------------------------------------------------

    def interrupt(self, reason: str) -> None:
        """Stop the run (from any thread); the first reason given wins."""
        with self._reason_lock:
            if self.stop_reason is None:
                self.stop_reason = reason
        self.token.cancel()

    def _check(self) -> None:
        if self.stop_reason is not None:
            raise _Interrupted(self.stop_reason)

    def _retrying(self, call: Callable[[], T], deadline: float | None = None) -> T:
        """``call()``, retried with back-off while the server is unreachable: until
        ``deadline`` (monotonic seconds) if given, else until the processor stops or the
        job is lost."""
        delay = BACKOFF_FIRST
        while True:
            try:
                return call()
            except ServerUnavailable as exc:
                if deadline is not None:
                    if time.monotonic() + delay > deadline:
                        raise
                elif self.processor.stopping.is_set() or self.stop_reason == "lost":
                    raise
                log.warning("job %s: server unreachable (%s); retrying in %.1f s", self.id, exc.message, delay)
                if deadline is None:
                    self.processor.stopping.wait(delay)
                else:
                    time.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)

    # -- the lease ----------------------------------------------------------------------------

    def _keep_lease(self) -> None:
        interval = max(0.1, self.lease_seconds / 3)
        while not self._lease_done.wait(interval):
            try:
                keep = self.client.worker.heartbeat(self.id, self.worker)
            except (Conflict, NotFound):
                self.interrupt("lost")
                return
            except ServiceError as exc:
                log.warning("job %s: heartbeat failed: %s", self.id, exc.message)
                continue
            if not keep:
                self.interrupt("server")
                return

    # -- running -------------------------------------------------------------------------------

    def run(self) -> None:
        """Run the job and report its end to the server; never raises."""
        log.info("job %s: claimed by %s (attempt %s of %s)", self.id, self.worker,
                 self.job.get("attempts"), self.job.get("max_attempts"))
        lease = threading.Thread(target=self._keep_lease, name=f"lease-{self.id[:8]}", daemon=True)
        lease.start()
        workdir = None
        try:
            workdir = self.processor.cache.workdir(self.id)
            result = self._execute(workdir)
        except (dicebox.Cancelled, _Interrupted):
            self._report_stop()
        except Conflict:
            log.info("job %s: the lease is no longer %s's; dropped", self.id, self.worker)
            self._lost = True
        except ServerUnavailable as exc:
            # Only when stopping or lost (else _retrying waits for the server): the lease
            # expires and the job is taken up again from its stored checkpoint.
            log.warning("job %s: server unreachable, leaving the job to its lease: %s", self.id, exc.message)
        except (ValueError, NotFound, TooLarge) as exc:
            # Bad payload, genome or dataset, or a model over the server's upload limit:
            # another attempt would fail the same way.
            message = exc.message if isinstance(exc, ServiceError) else str(exc)
            log.error("job %s: failed: %s", self.id, message)
            if self._report("fail", lambda: self.client.worker.fail(self.id, self.worker, message, retry=False)):
                self.disposition = "reject"
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc.message if isinstance(exc, ServiceError) else exc}"
            log.exception("job %s: failed (will be retried while attempts are left)", self.id)
            if (self._report("fail", lambda: self.client.worker.fail(self.id, self.worker, message, retry=True))
                    and self._last_attempt()):
                self.disposition = "reject"  # the server ended it failed: no attempts left
        else:
            self._complete(result)
        finally:
            if self._lost or self.stop_reason == "lost":
                self.disposition = "ack"
            self._lease_done.set()
            lease.join()
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)

    def _last_attempt(self) -> bool:
        attempts, most = self.job.get("attempts"), self.job.get("max_attempts")
        return isinstance(attempts, int) and isinstance(most, int) and attempts >= most

    def _report(self, what: str, call: Callable[[], Any], deadline: float | None = None) -> bool:
        """The final word on the job; a lost lease or a server gone for good is logged."""
        if deadline is None and self.processor.stopping.is_set():
            deadline = time.monotonic() + HANDBACK_SECONDS
        try:
            self._retrying(call, deadline)
            return True
        except (Conflict, NotFound):
            log.info("job %s: %s refused, the lease is no longer %s's; dropped", self.id, what, self.worker)
            self._lost = True
        except ServiceError as exc:
            log.error("job %s: could not %s (%s); the lease will expire and the job be retried",
                      self.id, what, exc.message)
        return False

    def _complete(self, result: dict[str, Any]) -> None:
        try:
            self._retrying(lambda: self.client.worker.complete(self.id, self.worker, result),
                           time.monotonic() + HANDBACK_SECONDS if self.processor.stopping.is_set() else None)
            log.info("job %s: succeeded (model %s)", self.id, result["model_id"])
            self.disposition = "ack"
        except InvalidInput as exc:
            # The same result would be refused again: end the job with the reason.
            message = f"the server refused the result: {exc.message}"
            log.error("job %s: %s", self.id, message)
            if self._report("fail", lambda: self.client.worker.fail(self.id, self.worker, message, retry=False)):
                self.disposition = "reject"
        except (Conflict, NotFound):
            log.info("job %s: complete refused, the lease is no longer %s's; dropped", self.id, self.worker)
            self._lost = True
        except ServiceError as exc:
            log.error("job %s: could not complete (%s); the lease will expire and the job be retried",
                      self.id, exc.message)

    def _report_stop(self) -> None:
        reason = self.stop_reason
        if reason == "lost":
            log.info("job %s: lease lost; dropped", self.id)
        elif reason == "shutdown":
            log.info("job %s: processor stopping; handing the job back", self.id)
            self._report("hand back", lambda: self.client.worker.fail(
                self.id, self.worker, "processor stopped", retry=True),
                deadline=time.monotonic() + HANDBACK_SECONDS)
        else:
            def acknowledge() -> None:
                if self.client.worker.canceled(self.id, self.worker):
                    log.info("job %s: canceled", self.id)
                    self.disposition = "ack"
                else:  # told to stop without a cancel request: give it back
                    self.client.worker.fail(self.id, self.worker, "stopped by the server", retry=True)
            self._report("acknowledge the cancel", acknowledge)

    def _execute(self, workdir: Path) -> dict[str, Any]:
        payload = self.payload
        name = payload.get("dataset")
        if not isinstance(name, str) or not name:
            raise ValueError(f"payload.dataset: expected a dataset name, got {name!r}")
        version = payload.get("version")
        if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 0):
            raise ValueError(f"payload.version: expected an image count >= 0, got {version!r}")
        genome = Genome.coerce(payload.get("genome"))
        params = {**TRAIN_DEFAULTS, **(payload.get("params") or {})}
        self.epochs = max(1, int(params["epochs"]))

        dataset = self._retrying(lambda: self.processor.cache.dataset(self.client, name, version))
        self._check()
        train, val, test = split(dataset, float(params["validation"]), float(params["test"]), int(params["seed"]))
        init = self._warm_start(dataset, genome)
        self._check()

        checkpoint_dir = workdir / "checkpoint"
        checkpoint_dir.mkdir()
        self.checkpoint_path = checkpoint_dir / CHECKPOINT_FILE
        resumed = self._retrying(lambda: self.client.worker.get_checkpoint(self.id, self.worker, self.checkpoint_path))
        if resumed:
            used_init = checkpoint_uses_init(self.checkpoint_path)
            if used_init is None or used_init != (init is not None):
                # Torn, or the run it belongs to started differently (e.g. no best model
                # existed then): the trainer would refuse it, so start over rather than fail
                # the job on every attempt.
                log.warning("job %s: the stored checkpoint is unreadable or does not fit this run; "
                            "starting over", self.id)
                self.checkpoint_path.unlink(missing_ok=True)
            else:
                log.info("job %s: resuming from the stored checkpoint", self.id)
        self._check()

        model = dicebox.train(
            genome, train, val=val, epochs=self.epochs, batch_size=int(params["batch_size"]),
            patience=int(params["patience"]), seed=int(params["seed"]), augment=float(params["augment"]),
            label_smoothing=float(params["label_smoothing"]), threads=self.processor.threads,
            callback=self._on_epoch, checkpoint_dir=checkpoint_dir, init=init, cancel=self.token,
            device=self.processor.settings.device)
        # Training ended on its own; a cancel that arrived meanwhile still counts (a lost
        # lease or a cancel means the result is not wanted). Shutdown lets it finish.
        if self.stop_reason in ("server", "lost"):
            raise _Interrupted(self.stop_reason)

        history = _json_safe(model.history)
        evaluated_on = "test" if test is not None else "validation" if val is not None else "train"
        model.evaluate(test if test is not None else val if val is not None else train)
        metrics = _json_safe(model.metrics)
        fitness = validation_fitness(history)
        if fitness is None:
            fitness = metrics.get("accuracy")
        training_seconds = float(sum(e.get("seconds") or 0.0 for e in history))
        model.metadata = {**model.metadata, "dataset": name, "dataset_version": version, "job_id": self.id,
                          "fitness": fitness, "training_seconds": training_seconds,
                          "evaluated_on": evaluated_on}
        model_dir = model.save(workdir / "model")
        model_id = self._retrying(lambda: self.client.worker.upload_model(self.id, self.worker, model_dir))
        return {"model_id": model_id, "metrics": metrics, "fitness": fitness, "history": history,
                "training_seconds": training_seconds, "epochs": len(history)}

    def _warm_start(self, dataset: Dataset, genome: Genome) -> Model | None:
        """The model to start from: the job's ``init``, or (LOAD_BEST_WEIGHTS_ON_START) the
        dataset's best model when it has the same genome, categories and input shape."""
        init_id = self.payload.get("init")
        cache = self.processor.cache
        if init_id:
            if not isinstance(init_id, str):
                raise ValueError(f"payload.init: expected a model id, got {init_id!r}")
            model = Model.load(self._retrying(lambda: cache.model(self.client, init_id)))
            if model.categories != dataset.categories or model.input_shape != dataset.shape:
                raise ValueError(f"init: model {init_id} has categories {model.categories} and input "
                                 f"{list(model.input_shape)}, the dataset {dataset.categories} and "
                                 f"{list(dataset.shape)}")
            log.info("job %s: warm start from model %s", self.id, init_id)
            return model
        if not self.processor.settings.load_best_weights_on_start:
            return None
        name = self.payload["dataset"]
        try:
            best = self._retrying(lambda: self.client.models.get("best", dataset=name))
        except NotFound:
            return None
        if (Genome.coerce(best.get("genome")) != genome or best.get("categories") != dataset.categories
                or tuple(best.get("input_shape") or ()) != dataset.shape):
            log.info("job %s: the best model of %r has another genome or categories; no warm start",
                     self.id, name)
            return None
        model_id = best["id"]
        log.info("job %s: warm start from the best model of %r, %s", self.id, name, model_id)
        return Model.load(self._retrying(lambda: cache.model(self.client, model_id)))

    def _on_epoch(self, record: dict[str, Any]) -> bool:
        """After every epoch, on the training thread (the checkpoint is already written):
        store the checkpoint, then report the epoch. False stops the training."""
        epoch = _json_safe(record)
        progress = min(1.0, max(0.0, epoch["epoch"] / self.epochs))
        crash_point("processor.checkpoint_written")
        try:
            if (self.checkpoint_path is not None and self.checkpoint_path.is_file()
                    and not self.checkpoint_refused):
                self.client.worker.put_checkpoint(self.id, self.worker, self.checkpoint_path)
                crash_point("processor.checkpoint_uploaded")
        except (Conflict, NotFound):
            self.interrupt("lost")
            return False
        except TooLarge as exc:
            self.checkpoint_refused = True
            log.warning("job %s: the server refuses checkpoints this large (%s); this run cannot be "
                        "resumed elsewhere", self.id, exc.message)
        except ServiceError as exc:
            # Keep training: the next epoch's checkpoint is tried again.
            log.warning("job %s: could not store the epoch %s checkpoint: %s", self.id, epoch["epoch"], exc.message)
        try:
            keep = self.client.worker.heartbeat(self.id, self.worker, progress=progress, epoch=epoch,
                                                samples_per_second=epoch.get("samples_per_second"))
        except (Conflict, NotFound):
            self.interrupt("lost")
            return False
        except ServiceError as exc:
            log.warning("job %s: could not report epoch %s: %s", self.id, epoch["epoch"], exc.message)
            keep = True
        if not keep:
            self.interrupt("server")
        log.info("job %s: epoch %s/%s loss %.4f val_accuracy %s", self.id, epoch["epoch"], self.epochs,
                 epoch["loss"] if epoch.get("loss") is not None else float("nan"), epoch.get("val_accuracy"))
        return self.stop_reason is None


def split(dataset: Dataset, validation: float, test: float,
          seed: int) -> tuple[Dataset, Dataset | None, Dataset | None]:
    """(train, validation or None, test or None): ``dataset.split([1 - v - t, v, t], seed)``
    without the empty parts."""
    for label, value in (("params.validation", validation), ("params.test", test)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{label} must be in [0, 1), got {value}")
    if validation + test >= 1.0:
        raise ValueError(f"params.validation + params.test must be < 1, got {validation} + {test}")
    fractions = [1.0 - validation - test] + [f for f in (validation, test) if f > 0]
    if len(fractions) == 1:
        return dataset, None, None
    parts = list(dataset.split(fractions, seed=seed))
    train = parts.pop(0)
    val = parts.pop(0) if validation > 0 else None
    tst = parts.pop(0) if test > 0 else None
    return train, val, tst


class Processor:
    """``concurrency`` loops that claim train jobs from the server and run them.

    ``name`` defaults to ``host:pid``; loop ``n`` is the worker ``name:n`` (the lease owner
    shown in job records). ``cache_dir`` defaults to ``settings.home/cache``. ``start``
    returns at once; ``stop`` asks everything to end (running jobs are handed back);
    ``join`` waits for the running jobs to finish doing so.
    """

    def __init__(self, settings: Settings, concurrency: int = 1, name: str | None = None,
                 cache_dir: str | os.PathLike | None = None, claim_wait: float = CLAIM_WAIT,
                 client_factory: Callable[[], Client] | None = None) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or not 1 <= concurrency <= 256:
            raise ValueError(f"concurrency must be an integer in 1..256, got {concurrency!r}")
        if name is not None and (not name.strip() or len(name) > 200):
            raise ValueError(f"name must be a non-empty string of at most 200 characters, got {name!r}")
        if not 0 <= claim_wait <= 30:
            raise ValueError(f"claim_wait must be in [0, 30] seconds, got {claim_wait}")
        self.settings = settings
        self.concurrency = concurrency
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.cache = DiskCache(cache_dir if cache_dir is not None else settings.home / "cache")
        self.claim_wait = claim_wait
        # Cores are shared between the loops unless a thread count is configured.
        self.threads = settings.threads or max(1, default_threads() // concurrency)
        self._client_factory = client_factory or (lambda: Client.from_settings(settings))
        self.stopping = threading.Event()
        self._runs: set[JobRun] = set()
        self._idle = threading.Condition()
        self._threads: list[threading.Thread] = []

    @property
    def workers(self) -> list[str]:
        return [f"{self.name}:{n}" for n in range(self.concurrency)]

    @property
    def running(self) -> list[str]:
        """Ids of the jobs being run now."""
        with self._idle:
            return [run.id for run in self._runs]

    def start(self) -> None:
        self.cache.sweep_work()
        for worker in self.workers:
            thread = threading.Thread(target=self._loop, args=(worker,), name=f"processor-{worker}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("processor %s: %d loop(s) taking jobs from %s (%d training threads each)",
                 self.name, self.concurrency, self.settings.server_url, self.threads)

    def stop(self) -> None:
        """Stop claiming and cancel the running jobs (each hands its job back). Thread-safe;
        safe to call from a signal handler."""
        self.stopping.set()
        with self._idle:
            runs = list(self._runs)
        for run in runs:
            run.interrupt("shutdown")

    def join(self, timeout: float | None = None) -> bool:
        """Wait until no job is running (after ``stop``); True if none is left. Loops that
        are only waiting for a job are not waited for (their threads are daemons)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self._runs:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(remaining if remaining is not None else 1.0)
        return True

    def _loop(self, worker: str) -> None:
        client = self._client_factory()
        delay = BACKOFF_FIRST
        try:
            while not self.stopping.is_set():
                try:
                    claim = client.worker.claim(worker, wait=self.claim_wait)
                except ServiceError as exc:
                    level = logging.WARNING if isinstance(exc, ServerUnavailable) else logging.ERROR
                    log.log(level, "%s: cannot claim jobs from %s: %s; retrying in %.1f s",
                            worker, self.settings.server_url, exc.message, delay)
                    self.stopping.wait(delay)
                    delay = min(delay * 2, BACKOFF_MAX)
                    continue
                except Exception:
                    log.exception("%s: claim failed; retrying in %.1f s", worker, delay)
                    self.stopping.wait(delay)
                    delay = min(delay * 2, BACKOFF_MAX)
                    continue
                delay = BACKOFF_FIRST
                if claim is None:
                    continue
                run = JobRun(self, client, worker, claim)
                with self._idle:
                    self._runs.add(run)
                try:
                    if self.stopping.is_set():
                        run.interrupt("shutdown")
                    run.run()
                except Exception:  # run() reports its own errors; never let the loop die
                    log.exception("%s: unexpected error around job %s", worker, run.id)
                finally:
                    with self._idle:
                        self._runs.discard(run)
                        self._idle.notify_all()
        finally:
            client.close()


class BrokerProcessor(Processor):
    """A processor in RabbitMQ mode: jobs come as messages on ``dicebox.jobs`` (a
    :class:`dicebox.rabbitmq.JobConsumer` with one slot per concurrent job, prefetch 1 each)
    instead of claims; everything else (the lease, checkpoints, the model, complete) is the
    same :class:`JobRun` over HTTP.

    For each message a worker thread asks the server ``POST /v1/worker/jobs/{id}/start``:
    ``run`` -> run the job, then ack the message only once the end is stored (requeue it
    for a retry, dead-letter it when the job ended failed for good); ``wait`` (another
    processor's lease is alive) -> park the message for ``retry_after``; ``done`` -> ack (a
    duplicate); ``dead`` (attempts used up; the server ended the job failed) and unknown jobs
    -> dead-letter. Deliveries held for ``handoff_seconds`` are handed over by the consumer
    (see :mod:`dicebox.rabbitmq.jobs`), so jobs may run longer than the broker's
    ``consumer_timeout``.
    """

    def __init__(self, settings: Settings, concurrency: int = 1, name: str | None = None,
                 cache_dir: str | os.PathLike | None = None,
                 handoff_seconds: float = DEFAULT_HANDOFF_SECONDS, heartbeat: int | None = None,
                 client_factory: Callable[[], Client] | None = None) -> None:
        if not settings.broker_url:
            raise ValueError("broker_url: a BrokerProcessor needs an amqp:// URL (--broker or DICEBOX_BROKER_URL)")
        super().__init__(settings, concurrency=concurrency, name=name, cache_dir=cache_dir,
                         client_factory=client_factory)
        self.consumer = JobConsumer(settings.broker_url, self._handle, concurrency=concurrency,
                                    handoff_seconds=handoff_seconds, lease_seconds=settings.lease_seconds,
                                    heartbeat=heartbeat, name=f"dicebox-processor {self.name}")
        self._client: Client | None = None
        self._consumer_thread: threading.Thread | None = None
        # Set when the consumer ended by itself (a bug): main exits non-zero.
        self.failed = False

    def start(self) -> None:
        self.cache.sweep_work()
        self._client = self._client_factory()
        self._consumer_thread = threading.Thread(target=self._consume, name="processor-broker", daemon=True)
        self._consumer_thread.start()
        log.info("processor %s: %d slot(s) taking jobs from %s for %s (%d training threads each)",
                 self.name, self.concurrency, redact(self.settings.broker_url), self.settings.server_url,
                 self.threads)

    def stop(self) -> None:
        """Stop taking messages and hand the running jobs back (thread-safe, signal-safe):
        each run reports ``fail(retry)`` to the server, then its message is requeued."""
        super().stop()
        self.consumer.stop()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the consumer has ended (after ``stop``: once every running job was
        handed back and its message settled); True if it has."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not super().join(timeout):
            return False
        if self._consumer_thread is not None:
            self._consumer_thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if self._consumer_thread.is_alive():
                return False
        if self._client is not None:
            self._client.close()
        return True

    def _consume(self) -> None:
        try:
            self.consumer.run()
        except Exception:
            log.exception("processor %s: the broker consumer failed", self.name)
            self.failed = True
        finally:
            if not self.stopping.is_set():  # ended by itself: the processor ends with it
                self.failed = True
                self.stop()

    def _handle(self, delivery: Delivery) -> None:
        """One job message, on a consumer worker thread; always settles the delivery."""
        client = self._client
        assert client is not None, "start() creates the client"
        worker = f"{self.name}:{delivery.slot}"
        if self.stopping.is_set():
            delivery.requeue()
            return
        answer = self._start(client, worker, delivery)
        if answer is None:
            return  # settled by _start
        action = answer.get("action")
        job_id = delivery.job_id
        if action == "run":
            self._run(client, worker, delivery, answer)
        elif action == "wait":
            retry_after = answer.get("retry_after")
            seconds = float(retry_after) if isinstance(retry_after, (int, float)) and retry_after > 0 \
                else self.settings.lease_seconds
            log.info("job %s: runs elsewhere (lease alive); parking its message for %.1f s", job_id, seconds)
            if not delivery.park(seconds):
                # Not parked (broker trouble): give it back after a pause, not in a hot loop.
                self.stopping.wait(BACKOFF_FIRST)
                delivery.requeue()
        elif action == "done":
            log.info("job %s: already %s; message acknowledged", job_id, answer.get("status"))
            delivery.ack()
        elif action == "dead":
            log.error("job %s: dead-lettered: %s", job_id, answer.get("error"))
            delivery.reject()
        else:
            log.error("job %s: the server answered start with an unknown action %r; requeueing in %.0f s",
                      job_id, action, BACKOFF_MAX)
            self.stopping.wait(BACKOFF_MAX)
            delivery.requeue()

    def _start(self, client: Client, worker: str, delivery: Delivery) -> dict[str, Any] | None:
        """The server's answer to ``start``, retried while it is unreachable; None when the
        delivery was settled here instead (unknown job, stopping, a server error)."""
        delay = BACKOFF_FIRST
        while True:
            try:
                return client.worker.start(delivery.job_id, worker)
            except (NotFound, InvalidInput) as exc:
                log.error("job %s: the server does not know this job (%s); message dead-lettered",
                          delivery.job_id, exc.message)
                delivery.reject()
                return None
            except ServiceError as exc:
                if self.stopping.is_set():
                    delivery.requeue()
                    return None
                level = logging.WARNING if isinstance(exc, ServerUnavailable) else logging.ERROR
                log.log(level, "job %s: cannot start it on %s (%s); retrying in %.1f s",
                        delivery.job_id, self.settings.server_url, exc.message, delay)
                self.stopping.wait(delay)
                delay = min(delay * 2, BACKOFF_MAX)

    def _run(self, client: Client, worker: str, delivery: Delivery, answer: dict[str, Any]) -> None:
        run = JobRun(self, client, worker, {"job": answer["job"], "lease_seconds": answer.get("lease_seconds")})
        with self._idle:
            self._runs.add(run)
        try:
            if self.stopping.is_set():
                run.interrupt("shutdown")
            run.run()
        finally:
            with self._idle:
                self._runs.discard(run)
                self._idle.notify_all()
        settle = {"ack": delivery.ack, "reject": delivery.reject}.get(run.disposition, delivery.requeue)
        if not settle() and not delivery.handed_over:
            log.info("job %s: its message went with a broken broker connection; whoever receives it "
                     "next finds the job's state on the server", run.id)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dicebox.processor",
                                description="Take train jobs from a dicebox server and run them.")
    p.add_argument("--server", help="server URL (default DICEBOX_SERVER_URL or http://127.0.0.1:8000)")
    p.add_argument("--broker", help="RabbitMQ URL (amqp://...; default DICEBOX_BROKER_URL): take jobs from "
                                    "its dicebox.jobs queue instead of claiming them from the server")
    p.add_argument("--handoff-seconds", type=float,
                   help="broker mode: hand a delivery over (park a copy, ack it) after this long, so no "
                        "delivery outlives RabbitMQ's consumer_timeout (default "
                        f"DICEBOX_BROKER_HANDOFF_SECONDS or {DEFAULT_HANDOFF_SECONDS:.0f})")
    p.add_argument("--concurrency", type=int, default=1, help="jobs run at once (default 1)")
    p.add_argument("--name", help="processor name shown in job records (default host:pid)")
    p.add_argument("--cache", help="cache directory (default DICEBOX_HOME/cache)")
    p.add_argument("--threads", type=int, help="training threads per job (default: the CPUs shared "
                                                 "between the concurrent jobs, or DICEBOX_THREADS)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def main(argv: list[str] | None = None) -> int:
    """Run a processor until SIGTERM/SIGINT. Exit codes: 0 stopped, 2 bad usage."""
    args = _parser().parse_args(argv)
    pin_mmap_threshold()  # keeps the resident size flat (see dicebox.allocator)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One line per request would drown the processor's own story.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # dicebox logs each broker failure itself, in one line; pika would add a traceback per
    # failed connection attempt.
    logging.getLogger("pika").setLevel(logging.CRITICAL)
    flags = {"server_url": args.server, "broker_url": args.broker, "threads": args.threads}
    try:
        settings = Settings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ())) or "settings"
            print(f"dicebox.processor: {where}: {err.get('msg')}", file=sys.stderr)
        return 2
    try:
        processor: Processor
        if settings.embedded:
            processor = Processor(settings, concurrency=args.concurrency, name=args.name, cache_dir=args.cache)
        else:
            processor = BrokerProcessor(settings, concurrency=args.concurrency, name=args.name,
                                        cache_dir=args.cache, handoff_seconds=_handoff_seconds(args))
        Client.from_settings(settings).close()  # checks the URL now rather than in every loop
    except ValueError as exc:
        print(f"dicebox.processor: {exc}", file=sys.stderr)
        return 2

    signals = 0

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("second signal: exiting without handing jobs back")
            os._exit(1)
        log.info("%s: stopping (running jobs are handed back)", signal.Signals(signum).name)
        processor.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    processor.start()
    while not processor.stopping.wait(0.5):
        pass
    if not processor.join(STOP_GRACE):
        log.warning("jobs still running after %.0f s: %s", STOP_GRACE, processor.running)
    log.info("processor %s stopped", processor.name)
    return 1 if getattr(processor, "failed", False) else 0


def _handoff_seconds(args: argparse.Namespace) -> float:
    """--handoff-seconds, else DICEBOX_BROKER_HANDOFF_SECONDS, else the default; ValueError
    names the one that is bad."""
    if args.handoff_seconds is not None:
        value, where = args.handoff_seconds, "--handoff-seconds"
    elif os.environ.get("DICEBOX_BROKER_HANDOFF_SECONDS"):
        where = "DICEBOX_BROKER_HANDOFF_SECONDS"
        try:
            value = float(os.environ[where])
        except ValueError:
            raise ValueError(f"{where}: expected seconds, got {os.environ[where]!r}") from None
    else:
        return DEFAULT_HANDOFF_SECONDS
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: expected seconds > 0, got {value}")
    return value


if __name__ == "__main__":
    sys.exit(main())
