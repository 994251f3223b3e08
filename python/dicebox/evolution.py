"""The evolution state machine: generations of genomes, their scores, the cache of scored
genomes, lineage, and breeding through the core's operators.

It does no training itself. ``dicebox.evolve`` drives it with local threads; the service
drives the same machine with train jobs fanned out to processors. Its whole state is a
JSON-able dict, so a run can be checkpointed and resumed anywhere.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from dicebox import _core

_DEFAULT_SPACE: dict[str, Any] = json.loads(_core.space_preset("default"))


def derive_seed(*keys: int) -> int:
    """An independent 63-bit seed for the stream named by ``keys`` (seed, generation, ...)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass
class SearchSpace:
    """The taxonomy evolution draws genomes from. Dense sizes and learning rates are drawn
    log-uniformly between their bounds; the default is sized for a 2-core CPU (at most 1M
    parameters and 20M multiply-accumulates per image), and
    ``SearchSpace.preset("original")`` is the first dicebox's (dense layers of 1-1597
    neurons, 1-21 layers, every activation and optimizer)."""

    layer_types: list[str] = field(default_factory=lambda: list(_DEFAULT_SPACE["layer_types"]))
    min_layers: int = _DEFAULT_SPACE["min_layers"]
    max_layers: int = _DEFAULT_SPACE["max_layers"]
    min_size: int = _DEFAULT_SPACE["min_size"]
    max_size: int = _DEFAULT_SPACE["max_size"]
    filters: list[int] = field(default_factory=lambda: list(_DEFAULT_SPACE["filters"]))
    kernels: list[int] = field(default_factory=lambda: list(_DEFAULT_SPACE["kernels"]))
    pool: int = _DEFAULT_SPACE["pool"]
    min_dropout: float = _DEFAULT_SPACE["min_dropout"]
    max_dropout: float = _DEFAULT_SPACE["max_dropout"]
    activations: list[str] = field(default_factory=lambda: list(_DEFAULT_SPACE["activations"]))
    optimizers: list[str] = field(default_factory=lambda: list(_DEFAULT_SPACE["optimizers"]))
    min_learning_rate: float = _DEFAULT_SPACE["min_learning_rate"]
    max_learning_rate: float = _DEFAULT_SPACE["max_learning_rate"]
    # Compute budget per network (0 = unbounded): genomes over it are shrunk when drawn or bred,
    # so one oversized network cannot eat a run's time.
    max_parameters: int = _DEFAULT_SPACE["max_parameters"]
    max_macs: int = _DEFAULT_SPACE["max_macs"]  # multiply-accumulates per image, forward pass

    def __post_init__(self) -> None:
        self.to_json()  # validates: a ValueError names the field

    @classmethod
    def preset(cls, name: str) -> SearchSpace:
        """``"default"`` or ``"original"``."""
        return cls.from_dict(json.loads(_core.space_preset(name)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchSpace:
        if not isinstance(d, dict):
            raise ValueError(f"space: expected a dict, got {type(d).__name__}")
        canonical = json.loads(_core.canonical_space(json.dumps(d)))  # refuses unknown fields by name
        return cls(**canonical)

    @classmethod
    def coerce(cls, value: SearchSpace | dict[str, Any] | str | None) -> SearchSpace:
        if value is None:
            return cls()
        if isinstance(value, SearchSpace):
            return value
        if isinstance(value, str):
            return cls.preset(value)
        return cls.from_dict(value)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.to_json())

    def to_json(self) -> str:
        """Canonical JSON, as the core reads it."""
        return _core.canonical_space(json.dumps(asdict(self)))


@dataclass(frozen=True)
class EvolutionParams:
    """Everything that shapes a run's trajectory (and so must match to resume it)."""

    population: int = 20
    generations: int = 10
    retain: float = 0.4
    random_select: float = 0.1
    mutate_chance: float = 0.2
    epochs: int = 10
    seed: int = 0
    schedule: str | None = None  # None or "halving"

    def validate(self) -> None:
        def bad(message: str) -> None:
            raise ValueError(message)

        if not 2 <= self.population <= 10_000:
            bad(f"population must be in 2..10000, got {self.population}")
        if not 1 <= self.generations <= 10_000:
            bad(f"generations must be in 1..10000, got {self.generations}")
        for name in ("retain", "random_select", "mutate_chance"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                bad(f"{name} must be in [0, 1], got {value}")
        if not 1 <= self.epochs <= 100_000:
            bad(f"epochs must be in 1..100000, got {self.epochs}")
        if self.seed < 0:
            bad(f"seed must be >= 0, got {self.seed}")
        if self.schedule not in (None, "halving"):
            bad(f"schedule must be None or 'halving', got {self.schedule!r}")

    @property
    def short_epochs(self) -> int:
        """Epochs every individual gets first under the halving schedule."""
        return max(1, self.epochs // 3)


HALVING_KEEP = 1 / 3  # under "halving", the best third of a generation gets the full epochs


class Evolution:
    """Generations, scores and lineage. Call :meth:`tasks` for what to train next, report
    each result with :meth:`record`, and :meth:`advance` when :meth:`tasks` is empty."""

    def __init__(self, params: EvolutionParams, space: SearchSpace, shape: tuple[int, int, int],
                 classes: int, state: dict[str, Any] | None = None) -> None:
        params.validate()
        self.params = params
        self.space = space
        self.space_json = space.to_json()
        self.shape = tuple(int(v) for v in shape)
        self.classes = int(classes)
        if state is None:
            state = {"generations": [], "scores": {}, "next_id": 0, "trained": 0, "cache_hits": 0}
        self.state = state
        if not self.state["generations"]:
            self._first_generation()

    # -- persistence -------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        return {"params": asdict(self.params), "space": json.loads(self.space_json),
                "shape": list(self.shape), "classes": self.classes}

    def to_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint(), "state": self.state}

    @classmethod
    def from_dict(cls, d: dict[str, Any], params: EvolutionParams, space: SearchSpace,
                  shape: tuple[int, int, int], classes: int) -> Evolution:
        evo = cls(params, space, shape, classes, state=d["state"])
        if d["fingerprint"] != evo.fingerprint():
            raise ValueError("checkpoint_dir: it holds another evolution run (parameters, search space or data "
                             "differ); use a new directory")
        return evo

    # -- generations -------------------------------------------------------------------------
    @property
    def generation(self) -> dict[str, Any]:
        return self.state["generations"][-1]

    @property
    def finished(self) -> bool:
        return len(self.state["generations"]) >= self.params.generations and not self.tasks()

    def _new_individual(self, genome: str, parents: list[int]) -> dict[str, Any]:
        ident = self.state["next_id"]
        self.state["next_id"] += 1
        # "epochs" is what the training ran (early stopping may end it sooner); "budget" is
        # what it was asked for, which decides whether it is done.
        return {"id": ident, "genome": genome, "parents": parents, "fitness": None, "epochs": 0,
                "budget": 0, "seconds": 0.0, "cached": False}

    def _first_generation(self) -> None:
        seen: set[str] = set()
        individuals = []
        for i in range(self.params.population):
            for attempt in range(10):  # a few redraws keep the first generation free of duplicates
                genome = _core.random_genome(self.space_json, self.shape, self.classes,
                                             derive_seed(self.params.seed, 0, i, attempt))
                if genome not in seen:
                    break
            seen.add(genome)
            individuals.append(self._new_individual(genome, []))
        self.state["generations"].append({"generation": 0, "individuals": individuals, "promoted": False})

    def advance(self) -> bool:
        """Breeds the next generation from the current one; False when the run is complete."""
        if self.tasks():
            raise RuntimeError("advance() before every individual of the generation was scored")
        if len(self.state["generations"]) >= self.params.generations:
            return False
        g = len(self.state["generations"])
        scored = [(ind["id"], ind["genome"], _fitness(ind)) for ind in self.generation["individuals"]]
        children = _core.breed(scored, self.params.population, self.params.retain, self.params.random_select,
                               self.params.mutate_chance, self.space_json, self.shape, self.classes,
                               derive_seed(self.params.seed, g))
        individuals = [self._new_individual(genome, list(parents)) for genome, parents in children]
        self.state["generations"].append({"generation": g, "individuals": individuals, "promoted": False})
        return True

    # -- scoring -----------------------------------------------------------------------------
    def _target_epochs(self, ind: dict[str, Any], promoted: bool) -> int:
        if self.params.schedule != "halving" or promoted:
            return self.params.epochs
        return self.params.short_epochs

    def tasks(self) -> list[tuple[dict[str, Any], int]]:
        """(individual, epochs) pairs still to train in the current generation. Individuals
        whose genome was already scored for enough epochs take that score (a cache hit)."""
        gen = self.generation
        scores = self.state["scores"]
        todo = []
        queued: set[str] = set()
        for ind in gen["individuals"]:
            target = self._target_epochs(ind, ind.get("promoted", False))
            if ind["budget"] >= target:
                continue
            if ind["genome"] in queued:
                continue  # a twin is being trained: its score arrives as a cache hit
            known = scores.get(ind["genome"])
            if known is not None and known["budget"] >= target:
                ind.update(fitness=known["fitness"], epochs=known["epochs"], budget=known["budget"], seconds=0.0,
                           cached=True)
                self.state["cache_hits"] += 1
                continue
            todo.append((ind, target))
            queued.add(ind["genome"])
        if not todo and self.params.schedule == "halving" and not gen["promoted"]:
            gen["promoted"] = True
            ranked = sorted(gen["individuals"], key=lambda i: (-_rank_value(i), i["id"]))
            for ind in ranked[: max(1, math.ceil(len(ranked) * HALVING_KEEP))]:
                ind["promoted"] = True
            return self.tasks()
        return todo

    def record(self, ident: int, fitness: float | None, epochs: int, seconds: float, budget: int) -> dict[str, Any]:
        """Stores the score of individual ``ident``: its validation accuracy after training
        that was asked for ``budget`` epochs and ran ``epochs`` (fewer if it stopped early)."""
        ind = next(i for i in self.generation["individuals"] if i["id"] == ident)
        value = None if fitness is None or not math.isfinite(fitness) else float(fitness)
        ind.update(fitness=value, epochs=int(epochs), budget=int(budget), seconds=float(seconds), cached=False)
        self.state["trained"] += 1
        self.state["scores"][ind["genome"]] = {"fitness": value, "epochs": int(epochs), "budget": int(budget),
                                               "id": ident}
        return ind

    # -- reports -----------------------------------------------------------------------------
    def leaderboard(self) -> list[dict[str, Any]]:
        """Every distinct genome scored so far, best first (ties: earlier id first)."""
        best: dict[str, dict[str, Any]] = {}
        for gen in self.state["generations"]:
            for ind in gen["individuals"]:
                if ind["budget"] == 0:
                    continue
                entry = {"id": ind["id"], "generation": gen["generation"], "genome": json.loads(ind["genome"]),
                         "fitness": ind["fitness"], "epochs": ind["epochs"], "budget": ind["budget"],
                         "parents": ind["parents"]}
                current = best.get(ind["genome"])
                if current is None or entry["budget"] > current["budget"]:
                    best[ind["genome"]] = entry
        return sorted(best.values(), key=lambda e: (-_rank_value(e), e["id"]))

    def generations(self) -> list[dict[str, Any]]:
        """One record per generation: each individual's id, parents, genome, fitness, epochs,
        seconds and whether its score came from the cache; best and mean fitness."""
        out = []
        for gen in self.state["generations"]:
            individuals = [dict(ind, genome=json.loads(ind["genome"])) for ind in gen["individuals"]]
            scores = [i["fitness"] for i in individuals if i["fitness"] is not None]
            out.append({"generation": gen["generation"], "individuals": individuals,
                        "best_fitness": max(scores) if scores else None,
                        "mean_fitness": sum(scores) / len(scores) if scores else None})
        return out


def _fitness(ind: dict[str, Any]) -> float:
    return float("nan") if ind["fitness"] is None else float(ind["fitness"])


def _rank_value(ind: dict[str, Any]) -> float:
    return -math.inf if ind["fitness"] is None else ind["fitness"]
