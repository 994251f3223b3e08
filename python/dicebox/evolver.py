"""``dicebox.evolve``: evolve a network for a dataset on this machine.

Drives :class:`dicebox.evolution.Evolution` with a pool of threads, each training one
individual in the C++ core (the GIL is released while it trains). Fitness is validation
accuracy; early stopping watches the validation set; the test set is used once, to report
the best network. With ``checkpoint_dir`` the run survives being killed at any point.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicebox import _core, training
from dicebox.dataset import Dataset
from dicebox.evolution import Evolution, EvolutionParams, SearchSpace
from dicebox.genome import Genome
from dicebox.model import Model

STATE_FILE = "evolution.json"


@dataclass
class EvolutionResult:
    """What an evolution run found."""

    best: Model | None                      # the best network, trained (test metrics in best.metrics)
    best_genome: Genome | None
    best_fitness: float | None              # its validation accuracy
    leaderboard: list[dict[str, Any]]       # distinct genomes, best first: id, genome, fitness, epochs, ...
    generations: list[dict[str, Any]]       # one record per generation (individuals with lineage)
    trained: int                            # networks trained
    cache_hits: int                         # individuals scored from the cache instead
    elapsed: float                          # seconds
    stopped: str                            # "completed", "time_budget" or "callback"
    test_metrics: dict[str, Any] | None = field(default=None)


def default_workers() -> int:
    """Individuals trained at once by default: one, with every thread. Measured on 2 cores
    (bench/workers.py, docs/benchmarks.md): two at once with one thread each is no faster
    over many genomes (1.02-1.03x) and slower when a generation has a few large networks
    (0.80x), since the generation then waits for its straggler."""
    return 1


def _fitness_of(model: Model) -> float | None:
    """Validation accuracy of the weights the model kept (the epoch with the lowest val loss)."""
    scored = [h for h in model.history if h["val_loss"] is not None]
    if not scored:
        return None
    return min(scored, key=lambda h: h["val_loss"])["val_accuracy"]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def evolve(
    train: Dataset,
    val: Dataset,
    space: SearchSpace | dict[str, Any] | str | None = None,
    population: int = 20,
    generations: int = 10,
    retain: float = 0.4,
    random_select: float = 0.1,
    mutate_chance: float = 0.2,
    epochs: int = 10,
    seed: int = 0,
    workers: int | None = None,
    time_budget: float | None = None,
    callback: Callable[[dict[str, Any]], bool | None] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    *,
    test: Dataset | None = None,
    schedule: str | None = None,
    patience: int = 3,
    batch_size: int = 64,
    augment: float = 0.0,
    threads: int | None = None,
    cancel: _core.CancelToken | None = None,
) -> EvolutionResult:
    """Evolves networks for ``train`` over ``generations`` of ``population`` genomes.

    Each individual is trained for ``epochs`` (early stopping on ``val`` with ``patience``)
    and scored by validation accuracy; a genome already scored is never trained again.
    Generations are bred as in the original algorithm (keep the best ``retain`` share, keep
    others with ``random_select``, fill with mutated children of distinct parents).
    ``workers`` individuals train at once, sharing ``threads`` (default: one at a time with
    every thread, the faster choice on a 2-core machine).
    ``time_budget`` (seconds) stops cleanly with the best so far; ``schedule="halving"``
    trains everyone for a third of the epochs and only the best third for all of them.
    ``callback`` gets one dict per scored individual (generation, id, parents, genome,
    fitness, epochs, seconds, cached, elapsed) and may return False to stop. ``test``, if
    given, is evaluated once, on the best network. ``checkpoint_dir`` makes the run
    resumable: started again with the same arguments it continues where it stopped and ends
    with the same leaderboard. ``cancel`` (a CancelToken) stops it with dicebox.Cancelled.
    """
    started = time.monotonic()
    train_set = train
    for name, ds in (("train", train_set), ("val", val)):
        if not isinstance(ds, Dataset):
            raise ValueError(f"{name}: expected a dicebox.Dataset, got {type(ds).__name__}")
        if len(ds) == 0:
            raise ValueError(f"{name}: the dataset is empty (fitness is validation accuracy: val is required)")
    if val.shape != train_set.shape or val.categories != train_set.categories:
        raise ValueError("val: its image shape or categories differ from the training set's")
    if time_budget is not None and time_budget <= 0:
        raise ValueError(f"time_budget must be > 0 seconds, got {time_budget}")
    params = EvolutionParams(population=int(population), generations=int(generations), retain=float(retain),
                             random_select=float(random_select), mutate_chance=float(mutate_chance),
                             epochs=int(epochs), seed=int(seed), schedule=schedule)
    params.validate()
    space = SearchSpace.coerce(space)
    threads = int(threads) if threads is not None else training.default_threads()
    workers = int(workers) if workers is not None else default_workers()
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    per_worker = max(1, threads // workers)
    classes = len(train_set.categories)

    scratch = None
    if checkpoint_dir is None:
        scratch = tempfile.TemporaryDirectory(prefix="dicebox-evolve-")
        workdir = Path(scratch.name)
    else:
        workdir = Path(checkpoint_dir)
        workdir.mkdir(parents=True, exist_ok=True)
    state_path = workdir / STATE_FILE
    # What shapes each training but is not part of the evolution's own fingerprint.
    training_fingerprint = {"patience": patience, "batch_size": batch_size, "augment": augment}
    if state_path.exists():
        saved = json.loads(state_path.read_text())
        if saved.get("training") != training_fingerprint:
            raise ValueError("checkpoint_dir: it holds an evolution run trained with other patience, batch_size "
                             "or augment; use a new directory")
        evo = Evolution.from_dict(saved, params, space, train_set.shape, classes)
    else:
        evo = Evolution(params, space, train_set.shape, classes)

    def save_state() -> None:
        if checkpoint_dir is not None:
            _write_atomic(state_path, json.dumps({**evo.to_dict(), "training": training_fingerprint}))

    def genome_dir(genome_json: str) -> Path:
        # Keyed by the genome, not the individual: a genome continues where it left off
        # (halving), and an interrupted training resumes from its last epoch.
        return workdir / "genomes" / hashlib.sha256(genome_json.encode()).hexdigest()[:20]

    def train_one(genome_json: str, target_epochs: int, token: _core.CancelToken) -> tuple[Model, float]:
        t0 = time.monotonic()
        model = training.train(Genome(genome_json), train_set, val=val, epochs=target_epochs, batch_size=batch_size,
                      patience=patience, seed=seed, augment=augment, threads=per_worker,
                      checkpoint_dir=genome_dir(genome_json), cancel=token)
        return model, time.monotonic() - t0

    best: dict[str, Any] = {"model": None, "id": None}
    stopped = "completed"
    tokens: set[_core.CancelToken] = set()
    halt = threading.Event()

    def watchdog() -> None:
        # Budget and user cancellation reach trainings in flight through their tokens.
        while not halt.wait(0.05):
            over = time_budget is not None and time.monotonic() - started > time_budget
            if over or (cancel is not None and cancel.cancelled):
                for t in list(tokens):
                    t.cancel()

    emitted: set[tuple[int, int]] = set()

    def flush() -> bool:
        """Reports scored individuals in generation order (so the callback sees the same
        sequence whatever order parallel trainings finish in); False if told to stop."""
        keep_going = True
        for ind in evo.generation["individuals"]:
            if ind["budget"] == 0:
                break  # not scored yet: later ones wait for it
            key = (ind["id"], ind["budget"])
            if key in emitted:
                continue
            emitted.add(key)
            if callback is not None and keep_going:
                record = {"generation": evo.generation["generation"], "id": ind["id"], "parents": ind["parents"],
                          "genome": json.loads(ind["genome"]), "fitness": ind["fitness"], "epochs": ind["epochs"],
                          "seconds": ind["seconds"], "cached": ind["cached"],
                          "elapsed": time.monotonic() - started}
                keep_going = callback(record) is not False
        return keep_going

    def consider(ind: dict[str, Any], model: Model | None) -> None:
        board = evo.leaderboard()
        if board and board[0]["id"] == ind["id"] and model is not None:
            best.update(model=model, id=ind["id"])

    watcher = threading.Thread(target=watchdog, daemon=True)
    watcher.start()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dicebox-evolve")
    try:
        while stopped == "completed":
            if cancel is not None and cancel.cancelled:
                raise _core.Cancelled("evolution was cancelled")
            todo = evo.tasks()
            save_state()
            if not flush():
                stopped = "callback"
                break
            if not todo:
                if not evo.advance():
                    break
                save_state()
                continue
            running: dict[Future, tuple[dict[str, Any], int, _core.CancelToken]] = {}
            queue = list(todo)
            while queue or running:
                while queue and len(running) < workers and stopped == "completed":
                    if time_budget is not None and time.monotonic() - started > time_budget:
                        stopped = "time_budget"
                        break
                    ind, target = queue.pop(0)
                    token = _core.CancelToken()
                    tokens.add(token)
                    running[pool.submit(train_one, ind["genome"], target, token)] = (ind, target, token)
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    ind, target, token = running.pop(future)
                    tokens.discard(token)
                    try:
                        model, seconds = future.result()
                    except _core.Cancelled:
                        if cancel is not None and cancel.cancelled:
                            continue
                        stopped = "time_budget"
                        continue
                    evo.record(ind["id"], _fitness_of(model), len(model.history), seconds, target)
                    consider(ind, model)
                    save_state()
                    if stopped == "completed" and not flush():
                        stopped = "callback"
                if stopped != "completed":
                    for _, _, token in running.values():
                        token.cancel()
            if cancel is not None and cancel.cancelled:
                raise _core.Cancelled("evolution was cancelled")
    finally:
        halt.set()
        pool.shutdown(wait=True, cancel_futures=True)

    board = evo.leaderboard()
    result = EvolutionResult(best=None, best_genome=None, best_fitness=None, leaderboard=board,
                             generations=evo.generations(), trained=evo.state["trained"],
                             cache_hits=evo.state["cache_hits"], elapsed=0.0, stopped=stopped)
    if board:
        top = board[0]
        genome_json = Genome.from_dict(top["genome"]).to_json()
        model = best["model"] if best["id"] == top["id"] else None
        if model is None:  # resumed run: the genome's finished checkpoint gives it back at once
            model, _ = train_one(genome_json, top["budget"], _core.CancelToken())
        result.best, result.best_genome, result.best_fitness = model, Genome(genome_json), top["fitness"]
        meta = {**model.metadata, "fitness": top["fitness"], "individual": top["id"]}
        model.metadata = meta
        if test is not None:
            result.test_metrics = model.evaluate(test)
        if checkpoint_dir is not None:
            model.save(workdir / "best")
    if scratch is not None:
        scratch.cleanup()
    result.elapsed = time.monotonic() - started
    return result
