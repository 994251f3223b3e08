"""The server side of evolution: runs evolve jobs by fanning their individuals out as train jobs.

An evolve job is claimed from the queue like any job, under a lease, by the server's
coordinator (kind "evolve" only; processors take kind "train"). The coordinator drives the
same :class:`dicebox.evolution.Evolution` state machine as ``dicebox.evolve``: every
(individual, epochs) task becomes a child train job, so as many individuals train at once as
there are processors; a child's result is recorded as that individual's score; when a
generation's children have all ended the next generation is bred. The whole working state
(the machine's dict and the child job ids) is saved in the job row after every change, so a
server that dies leaves the job to be claimed again, by the next coordinator, once its lease
has expired, and that one carries on from the recorded generation. Child submissions carry an
idempotency key (evolve job / individual / epochs), so a crash between submitting a child and
saving its id makes no second child.

Cancelling an evolve job cancels its unfinished children; so do a time budget running out and
a failure. A child that fails (after the queue's retries) or is cancelled by someone else
scores None, as a network that could not be trained; a generation in which every individual
failed fails the job rather than breeding from nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from dicebox.errors import ServiceError
from dicebox.evolution import Evolution, EvolutionParams, SearchSpace

if TYPE_CHECKING:
    from dicebox.dataset import Dataset
    from dicebox.jobqueue import JobQueue
    from dicebox.server.notify import Notifier
    from dicebox.settings import Settings

__all__ = ["Coordinator"]

log = logging.getLogger(__name__)

FINISHED = ("succeeded", "failed", "canceled")
POLL_SECONDS = 0.5  # the thread looks again this often when nothing wakes it
MAX_ERRORS = 3  # consecutive unexpected errors on one job before it is handed back to the queue
STATE_VERSION = 1


class DatasetSource(Protocol):
    """What the coordinator needs of the sensory store."""

    def dataset(self, name: str, version: int) -> Dataset: ...


class PayloadError(ValueError):
    """An evolve payload the coordinator cannot run (the job fails without retries)."""


@dataclass
class _Run:
    """One evolve job this coordinator holds: its payload and its working state."""

    job_id: str
    priority: int
    payload: dict[str, Any]
    evo: Evolution
    state: dict[str, Any]  # what is saved in the job row; state["evolution"]["state"] is evo.state
    time_budget: float | None
    errors: int = 0  # consecutive unexpected errors
    # Child results seen in this process, by task key: (job id, model id) for the events.
    seen: dict[str, tuple[str, Any]] = field(default_factory=dict)


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _task_key(individual_id: int, budget: int) -> str:
    return f"{individual_id}/{budget}"


# ---------------------------------------------------------------------------------------------
# payload -> evolution (every error names the field)

def _number(section: dict[str, Any], name: str, default: Any, kind: type, where: str) -> Any:
    value = section.get(name, default)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PayloadError(f"{where}.{name} must be an integer, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PayloadError(f"{where}.{name} must be a number, got {value!r}")
    return float(value)


def _section(payload: dict[str, Any], name: str) -> dict[str, Any]:
    value = payload.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PayloadError(f"{name} must be an object, got {type(value).__name__}")
    return value


def _read_payload(payload: Any) -> tuple[EvolutionParams, SearchSpace, float | None]:
    """The evolution's parameters, search space and time budget (seconds or None)."""
    if not isinstance(payload, dict):
        raise PayloadError(f"payload must be an object, got {type(payload).__name__}")
    for name in ("dataset", "version"):
        if name not in payload:
            raise PayloadError(f"{name} is required")
    evolution = _section(payload, "evolution")
    params = _section(payload, "params")
    defaults = EvolutionParams()
    schedule = evolution.get("schedule")
    if schedule is not None and not isinstance(schedule, str):
        raise PayloadError(f"evolution.schedule must be null or 'halving', got {schedule!r}")
    try:
        evolution_params = EvolutionParams(
            population=_number(evolution, "population", defaults.population, int, "evolution"),
            generations=_number(evolution, "generations", defaults.generations, int, "evolution"),
            retain=_number(evolution, "retain", defaults.retain, float, "evolution"),
            random_select=_number(evolution, "random_select", defaults.random_select, float,
                                  "evolution"),
            mutate_chance=_number(evolution, "mutate_chance", defaults.mutate_chance, float,
                                  "evolution"),
            epochs=_number(params, "epochs", defaults.epochs, int, "params"),
            seed=_number(params, "seed", defaults.seed, int, "params"),
            schedule=schedule)
        evolution_params.validate()
    except PayloadError:
        raise
    except ValueError as exc:  # validate() names the field first
        where = "params" if str(exc).split(" ", 1)[0] in ("epochs", "seed") else "evolution"
        raise PayloadError(f"{where}.{exc}") from None
    try:
        space = SearchSpace.coerce(evolution.get("space"))
    except (ValueError, TypeError) as exc:
        raise PayloadError(f"evolution.space: {exc}") from None
    time_budget = evolution.get("time_budget")
    if time_budget is not None:
        time_budget = _number(evolution, "time_budget", None, float, "evolution")
        if time_budget <= 0:
            raise PayloadError(f"evolution.time_budget must be > 0 seconds, got {time_budget}")
    return evolution_params, space, time_budget


class Coordinator:
    """Runs the evolve jobs of the queue (see the module docstring).

    ``start()`` runs :meth:`step` on a daemon thread about every 0.5 s (sooner after
    :meth:`poke`); tests call :meth:`step` directly instead. ``sensory.dataset(name, version)``
    gives the dataset (for its shape and categories); ``notifier.notify()`` wakes waiting
    processors after children are submitted. ``clock`` (wall-clock seconds) measures time
    budgets, which count from the job's first start, including time the server was down.
    """

    def __init__(self, queue: JobQueue, sensory: DatasetSource, registry: Any, settings: Settings,
                 notifier: Notifier, *, clock: Callable[[], float] = time.time) -> None:
        self.queue = queue
        self.sensory = sensory
        self.registry = registry  # children's results name their models; nothing to look up here
        self.settings = settings
        self.notifier = notifier
        self.clock = clock
        self.owner = f"coordinator:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()  # one step at a time (the thread and a test may both call)
        self._wake = threading.Event()
        if hasattr(notifier, "add_listener"):
            notifier.add_listener(self.poke)  # a child ending wakes the loop at once
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_claim = -math.inf

    # -- the thread ------------------------------------------------------------------------------

    def start(self) -> None:
        """Runs the coordinator on a daemon thread (no-op if it is running)."""
        if self.alive:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="dicebox-coordinator", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops the thread and waits for it (idempotent). Jobs in hand keep their leases: the
        next coordinator takes them up when the leases expire and continues them."""
        self._stopping.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def jobs(self) -> list[str]:
        """Ids of the evolve jobs this coordinator holds."""
        return list(self._runs)

    def poke(self) -> None:
        """Look again now (e.g. a child job just ended)."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            # Looking for new evolve jobs is paced (a poke comes with every report of every
            # job); the jobs held are looked at on every pass.
            claim = time.monotonic() - self._last_claim >= POLL_SECONDS
            if claim:
                self._last_claim = time.monotonic()
            try:
                changed = self.step(claim)
            except Exception:  # never let the thread die: the next pass tries again
                log.exception("coordinator pass failed")
                changed = False
            if not changed:
                self._wake.wait(POLL_SECONDS)
                self._wake.clear()

    # -- one pass --------------------------------------------------------------------------------

    def step(self, claim: bool = True) -> bool:
        """One claim attempt (unless ``claim`` is False), then one pass over every evolve job
        held; True if anything changed (a job taken, children submitted or scored, a
        generation bred, a job ended)."""
        with self._lock:
            changed = self._claim() if claim else False
            for run in list(self._runs.values()):
                try:
                    changed |= self._pass(run)
                    run.errors = 0
                except Exception as exc:  # noqa: BLE001 - logged there; one job never stops the others
                    changed |= self._unexpected(run, exc)
            return changed

    def _claim(self) -> bool:
        try:
            job = self.queue.claim(self.owner, self.settings.lease_seconds, kinds=("evolve",))
        except Exception:
            log.exception("claiming an evolve job failed")
            return False
        if job is None:
            return False
        try:
            self._runs[job["id"]] = self._open(job)
        except PayloadError as exc:
            log.warning("evolve job %s cannot run: %s", job["id"], exc)
            self.queue.fail(job["id"], self.owner, str(exc), retry=False)
        except Exception as exc:  # e.g. the dataset file could not be read: try again later
            log.exception("evolve job %s: starting it failed", job["id"])
            self._hand_back(job["id"], exc)
        return True

    def _open(self, job: dict[str, Any]) -> _Run:
        """The run of a claimed job: new, or continued from the state saved in its row."""
        params, space, time_budget = _read_payload(job["payload"])
        saved = job.get("state")
        if isinstance(saved, dict) and saved.get("version") == STATE_VERSION:
            # Shape and classes come from the run's own fingerprint: the run keeps the data it
            # started with even if the dataset gained categories since.
            fingerprint = saved["evolution"]["fingerprint"]
            try:
                evo = Evolution.from_dict(saved["evolution"], params, space,
                                          tuple(fingerprint["shape"]), fingerprint["classes"])
            except ValueError as exc:
                raise PayloadError(f"state: the saved evolution does not match the payload ({exc})"
                                   ) from None
            state = saved
            state["evolution"] = evo.to_dict()
            self.queue.progress(job["id"], self.owner, self._progress(evo))  # claim reset it
        else:
            dataset = self._dataset(job["payload"])
            evo = Evolution(params, space, dataset.shape, len(dataset.categories))
            state = {"version": STATE_VERSION, "evolution": evo.to_dict(), "children": {},
                     "started": self.clock(), "reported": [], "generations_reported": 0,
                     "last_error": None}
            self.queue.save_state(job["id"], self.owner, state, progress=0.0)
        log.info("evolve job %s: %s at generation %d (attempt %d)", job["id"],
                 "continuing" if state is saved else "starting", evo.generation["generation"],
                 job["attempts"])
        return _Run(job_id=job["id"], priority=job["priority"], payload=job["payload"], evo=evo,
                    state=state, time_budget=time_budget)

    def _dataset(self, payload: dict[str, Any]) -> Dataset:
        name, version = payload["dataset"], payload["version"]
        if not isinstance(name, str) or not name:
            raise PayloadError(f"dataset must be a dataset name, got {name!r}")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise PayloadError(f"version must be an image count >= 1, got {version!r}")
        try:
            return self.sensory.dataset(name, version)
        except (ServiceError, LookupError, ValueError) as exc:  # unknown, no such version, empty
            raise PayloadError(str(exc)) from None

    def _pass(self, run: _Run) -> bool:
        if not self.queue.renew(run.job_id, self.owner, self.settings.lease_seconds):
            return self._stopped_from_outside(run)
        evo, children = run.evo, run.state["children"]
        changed = submitted = False
        while True:
            # 1. Record the children that ended. (tasks() also scores twins from the cache and,
            # under "halving", promotes the best third once everyone has its short score.)
            for ind, budget in evo.tasks():
                child_id = children.get(_task_key(ind["id"], budget))
                if child_id is not None:
                    changed |= self._collect(run, ind, budget, child_id)
            changed |= self._report_individuals(run)
            failed = self._all_failed(run)
            if failed:
                self._fail(run, failed)
                return True
            todo = evo.tasks()
            changed |= self._report_individuals(run)
            if not todo:
                # 2. The generation is scored: report it, then breed the next one or finish.
                self._report_generation(run)
                if not evo.advance():
                    self._finish(run, "completed")
                    return True
                run.state["reported"] = []
                changed = True
                continue
            # 3. Out of time: stop with the best so far (as dicebox.evolve does, the budget is
            # checked before more training is started, never once everything is done).
            if run.time_budget is not None and self.clock() - run.state["started"] > run.time_budget:
                self._finish(run, "time_budget")
                return True
            # 4. A child for each task that has none.
            for ind, budget in todo:
                if _task_key(ind["id"], budget) not in children:
                    self._submit(run, ind, budget)
                    changed = submitted = True
            break
        if changed:
            self._save(run)
        if submitted:
            self.notifier.notify()  # wake processors waiting for work
        return changed

    def _collect(self, run: _Run, ind: dict[str, Any], budget: int, child_id: str) -> bool:
        """Scores ``ind`` if its child job ended; True if it did."""
        child = self.queue.get(child_id)
        if child["status"] not in FINISHED:
            return False
        result = child["result"] if isinstance(child["result"], dict) else {}
        if child["status"] == "succeeded":
            # The processor's result (see the contract); anything malformed in it counts as
            # missing rather than stopping the run.
            fitness = _finite(result.get("fitness"))
            epochs = result.get("epochs")
            if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
                epochs = budget
            run.evo.record(ind["id"], fitness, epochs, _finite(result.get("training_seconds")) or 0.0,
                           budget)
        else:
            # A child that failed (after the queue's retries) or that someone cancelled: a
            # network that could not be trained scores None, as a diverged one does.
            run.evo.record(ind["id"], None, 0, 0.0, budget)
            run.state["last_error"] = child["error"] or f"child job {child_id} was {child['status']}"
        run.seen[_task_key(ind["id"], budget)] = (child_id, result.get("model_id"))
        return True

    def _submit(self, run: _Run, ind: dict[str, Any], budget: int) -> str:
        key = _task_key(ind["id"], budget)
        payload = {"dataset": run.payload["dataset"], "version": run.payload["version"],
                   "genome": json.loads(ind["genome"]),
                   "params": {**_section(run.payload, "params"), "epochs": budget},
                   "init": None,
                   "evolve": {"job": run.job_id, "individual": ind["id"], "budget": budget}}
        # The key makes this safe to repeat: after a crash between this submit and the save of
        # the child's id, the next coordinator's submit returns the same child.
        child = self.queue.submit("train", payload, priority=run.priority,
                                  idempotency_key=f"{run.job_id}/{key}", parent_id=run.job_id)
        run.state["children"][key] = child["id"]
        return child["id"]

    # -- reports ---------------------------------------------------------------------------------

    def _report_individuals(self, run: _Run) -> bool:
        """An "individual" event for each newly scored individual of the current generation
        (trained or from the cache), in generation order."""
        reported = run.state["reported"]
        done = set(reported)
        generation = run.evo.generation
        any_new = False
        for ind in generation["individuals"]:
            key = _task_key(ind["id"], ind["budget"])
            if ind["budget"] == 0 or key in done:
                continue
            job_id, model_id = (None, None) if ind["cached"] else run.seen.get(
                key, (run.state["children"].get(key), None))
            self.queue.report(run.job_id, self.owner, "individual", {
                "id": ind["id"], "generation": generation["generation"], "parents": ind["parents"],
                "genome": json.loads(ind["genome"]), "fitness": ind["fitness"],
                "epochs": ind["epochs"], "budget": ind["budget"], "seconds": ind["seconds"],
                "cached": ind["cached"], "job_id": job_id, "model_id": model_id})
            reported.append(key)
            any_new = True
        return any_new

    def _report_generation(self, run: _Run) -> None:
        record = run.evo.generations()[-1]
        if run.state["generations_reported"] > record["generation"]:
            return
        self.queue.report(run.job_id, self.owner, "generation", {
            "generation": record["generation"], "best_fitness": record["best_fitness"],
            "mean_fitness": record["mean_fitness"]})
        run.state["generations_reported"] = record["generation"] + 1

    @staticmethod
    def _progress(evo: Evolution) -> float:
        """Individuals scored over population x generations: only ever grows."""
        params = evo.params
        scored = sum(1 for gen in evo.state["generations"] for ind in gen["individuals"]
                     if ind["budget"] > 0)
        return min(1.0, scored / (params.population * params.generations))

    def _save(self, run: _Run) -> None:
        if not self.queue.save_state(run.job_id, self.owner, run.state, progress=self._progress(run.evo)):
            # Lost the lease between renew and now: whoever has it continues.
            self._runs.pop(run.job_id, None)

    # -- endings ---------------------------------------------------------------------------------

    def _all_failed(self, run: _Run) -> str | None:
        """An error if every individual of the current generation has been scored and none has
        a fitness: there is nothing to breed from (or, last, nothing to return)."""
        generation = run.evo.generation
        individuals = generation["individuals"]
        if any(ind["budget"] == 0 or ind["fitness"] is not None for ind in individuals):
            return None
        return (f"generation {generation['generation']}: every individual failed to train "
                f"({len(individuals)} of {len(individuals)}); last error: "
                f"{run.state.get('last_error') or 'no fitness reported'}")

    def _cancel_children(self, run: _Run) -> None:
        for child in self.queue.children(run.job_id):
            if child["status"] not in FINISHED:
                self.queue.cancel(child["id"])

    def _finish(self, run: _Run, stopped: str) -> None:
        """Completes the job with the best individual so far ("completed": every generation
        scored; "time_budget": out of time, the children still queued or training cancelled)."""
        if stopped != "completed":
            self._cancel_children(run)
        evo = run.evo
        board = evo.leaderboard()
        top = next((entry for entry in board if entry["fitness"] is not None), None)
        if top is None:
            # Only a time budget can get here (a generation without any score fails the job
            # before), and a success without a model would only puzzle whoever asked.
            self._fail(run, f"evolution.time_budget: {run.time_budget} s ran out before any "
                            "individual was trained")
            return
        best = self._best_child(run, top)
        best_result = best["result"] if best is not None and isinstance(best["result"], dict) else {}
        result = {"model_id": best_result.get("model_id"), "metrics": best_result.get("metrics"),
                  "history": best_result.get("history"), "fitness": top["fitness"],
                  "genome": top["genome"], "individual": top["id"],
                  "job_id": best["id"] if best is not None else None,
                  "generations": evo.generations(), "leaderboard": board,
                  "trained": evo.state["trained"], "cache_hits": evo.state["cache_hits"],
                  "elapsed": max(0.0, self.clock() - run.state["started"]), "stopped": stopped}
        self.queue.complete(run.job_id, self.owner, result)
        self._runs.pop(run.job_id, None)
        log.info("evolve job %s finished (%s): best fitness %s", run.job_id, stopped, top["fitness"])

    def _best_child(self, run: _Run, top: dict[str, Any]) -> dict[str, Any] | None:
        """The child job that trained the best genome for its epochs (its model and metrics)."""
        genome_of = {ind["id"]: ind["genome"] for gen in run.evo.state["generations"]
                     for ind in gen["individuals"]}
        genome = genome_of[top["id"]]
        for key, child_id in run.state["children"].items():
            ident, budget = (int(part) for part in key.split("/"))
            if genome_of.get(ident) == genome and budget == top["budget"]:
                child = self.queue.get(child_id)
                if child["status"] == "succeeded":
                    return child
        return None

    def _fail(self, run: _Run, error: str) -> None:
        self._cancel_children(run)
        self.queue.fail(run.job_id, self.owner, error, retry=False)
        self._runs.pop(run.job_id, None)
        log.warning("evolve job %s failed: %s", run.job_id, error)

    def _stopped_from_outside(self, run: _Run) -> bool:
        """renew said stop. A cancel was requested: cancel the children and confirm. The job
        ended some other way (e.g. the queue gave up on it after its lease expired): its
        children are orphans, cancel them. Someone else holds it now: let go, they carry on."""
        self._runs.pop(run.job_id, None)
        job = self.queue.get(run.job_id)
        ours = job["status"] == "running" and job["lease_owner"] == self.owner
        if ours and job["cancel_requested"]:
            self._cancel_children(run)
            self.queue.acknowledge_cancel(run.job_id, self.owner)
            log.info("evolve job %s canceled", run.job_id)
        elif job["status"] in FINISHED:
            self._cancel_children(run)
            log.info("evolve job %s ended elsewhere (%s)", run.job_id, job["status"])
        else:
            log.info("evolve job %s is now held by %s", run.job_id, job["lease_owner"])
        return True

    def _unexpected(self, run: _Run, exc: Exception) -> bool:
        """A pass raised something unforeseen (a database hiccup, a bug). The job stays in hand
        and the next pass retries from the saved state; after a few failures in a row it goes
        back to the queue with the error, which uses up one of its attempts."""
        log.exception("evolve job %s: pass failed", run.job_id)
        self._runs.pop(run.job_id, None)
        if run.errors + 1 >= MAX_ERRORS:
            self._hand_back(run.job_id, exc)
            return True
        try:
            # Continue from what was last saved, not from a half-applied pass.
            job = self.queue.get(run.job_id)
            if job["status"] == "running" and job["lease_owner"] == self.owner:
                fresh = self._open(job)
                fresh.errors = run.errors + 1
                self._runs[run.job_id] = fresh
        except Exception:
            log.exception("evolve job %s: reloading its state failed; its lease will expire",
                          run.job_id)
        return False

    def _hand_back(self, job_id: str, exc: Exception) -> None:
        """Back to the queue (attempts permitting) with the error recorded on the job."""
        try:
            self.queue.fail(job_id, self.owner, f"coordinator: {type(exc).__name__}: {exc}",
                            retry=True)
        except Exception:
            log.exception("evolve job %s: handing it back failed; its lease will expire", job_id)
