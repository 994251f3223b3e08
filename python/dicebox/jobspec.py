"""Job submissions: the request schema of ``POST /v1/jobs`` and its checks against the
dataset and the service's budgets, turning a request into the queue payload that processors
and the evolution coordinator read.

The schema (pydantic) bounds every number; :func:`build_payload` then checks what needs the
dataset or the core (the genome against the image shape, the search space, the warm-start
model) and raises :class:`dicebox.errors.InvalidInput` naming the field.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dicebox.errors import InvalidInput, NotFound
from dicebox.evolution import EvolutionParams, SearchSpace
from dicebox.genome import Genome
from dicebox.settings import Settings

# A network the service agrees to train: bounded so one request cannot take the machine.
MAX_LAYERS = 64
MAX_PARAMETERS = 50_000_000
MAX_MACS = 5_000_000_000
MIN_IMAGES = 10
# Attempts of a job before it ends failed. Evolve jobs are run by the server's coordinator,
# whose "attempts" are server restarts; each resumes from the recorded state.
TRAIN_ATTEMPTS = 3
EVOLVE_ATTEMPTS = 100


class TrainParams(BaseModel):
    """Keyword arguments of ``dicebox.train`` plus the split of the dataset."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=64, ge=1, le=4096)
    patience: int = Field(default=5, ge=0, le=10_000)
    seed: int = Field(default=0, ge=0, le=2**62)
    augment: float = Field(default=0.0, ge=0.0, le=1.0)
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    validation: float = Field(default=0.1, ge=0.0, le=0.5)
    test: float = Field(default=0.1, ge=0.0, le=0.5)


class EvolutionSpec(BaseModel):
    """Keyword arguments of ``dicebox.evolve`` (epochs and seed come from ``params``)."""

    model_config = ConfigDict(extra="forbid")

    population: int = Field(default=20, ge=2)
    generations: int = Field(default=10, ge=1)
    retain: float = Field(default=0.4, ge=0.0, le=1.0)
    random_select: float = Field(default=0.1, ge=0.0, le=1.0)
    mutate_chance: float = Field(default=0.2, ge=0.0, le=1.0)
    space: dict[str, Any] | str | None = None
    schedule: Literal["halving"] | None = None
    time_budget: float | None = Field(default=None, gt=0)


class JobSubmission(BaseModel):
    """The body of ``POST /v1/jobs``."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["train", "evolve"]
    dataset: str = Field(min_length=1, max_length=64)
    genome: dict[str, Any] | None = None
    evolution: EvolutionSpec | None = None
    params: TrainParams = Field(default_factory=TrainParams)
    priority: int = Field(default=0, ge=-100, le=100)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=255)
    init: str | None = Field(default=None, min_length=1, max_length=64,
                                description="model id (or 'best') to warm-start a train job from")


def build_payload(sub: JobSubmission, sensory, registry, settings: Settings) -> dict[str, Any]:
    """The queue payload for ``sub`` (see the module docstring); InvalidInput/NotFound."""
    p = sub.params
    if p.epochs > settings.max_epochs:
        raise InvalidInput(f"params.epochs: at most {settings.max_epochs} (DICEBOX_MAX_EPOCHS), got {p.epochs}")
    if p.validation + p.test >= 0.9:
        raise InvalidInput(f"params.validation + params.test must leave data to train on, got "
                           f"{p.validation} + {p.test}")
    info = sensory.get(sub.dataset)  # NotFound for an unknown dataset
    version = int(info["count"])
    populated = [c for c in info["categories"] if c["count"] > 0]
    if version < MIN_IMAGES or len(populated) < 2:
        raise InvalidInput(f"dataset: {sub.dataset!r} has {version} images in {len(populated)} categories; "
                           f"training needs at least {MIN_IMAGES} images in 2 categories")
    shape = (int(info["channels"]), int(info["height"]), int(info["width"]))
    classes = len(info["categories"])
    payload: dict[str, Any] = {"dataset": sub.dataset, "version": version, "params": p.model_dump()}
    if sub.kind == "train":
        if sub.evolution is not None:
            raise InvalidInput("evolution: only evolve jobs take an evolution section")
        if sub.genome is None:
            raise InvalidInput("genome: a train job needs a genome")
        payload["genome"] = check_genome(sub.genome, shape, classes)
        payload["init"] = _resolve_init(sub.init, sub.dataset, shape, registry)
        payload["evolve"] = None
    else:
        if sub.genome is not None:
            raise InvalidInput("genome: evolve jobs draw their genomes from evolution.space")
        if sub.init is not None:
            raise InvalidInput("init: only train jobs can warm-start")
        evo = sub.evolution or EvolutionSpec()
        if evo.population > settings.max_population:
            raise InvalidInput(f"evolution.population: at most {settings.max_population} "
                               f"(DICEBOX_MAX_POPULATION), got {evo.population}")
        if evo.generations > settings.max_generations:
            raise InvalidInput(f"evolution.generations: at most {settings.max_generations} "
                               f"(DICEBOX_MAX_GENERATIONS), got {evo.generations}")
        try:
            space = SearchSpace.coerce(evo.space)
            EvolutionParams(population=evo.population, generations=evo.generations, retain=evo.retain,
                            random_select=evo.random_select, mutate_chance=evo.mutate_chance,
                            epochs=p.epochs, seed=p.seed, schedule=evo.schedule).validate()
        except ValueError as exc:
            raise InvalidInput(f"evolution: {exc}") from None
        if space.max_layers > MAX_LAYERS:
            raise InvalidInput(f"evolution.space.max_layers: at most {MAX_LAYERS}, got {space.max_layers}")
        payload["evolution"] = {**evo.model_dump(), "space": space.to_dict()}
    return payload


def check_genome(genome: dict[str, Any], shape: tuple[int, int, int], classes: int) -> dict[str, Any]:
    """The canonical genome dict if it builds a network for ``shape`` within the budgets."""
    try:
        g = Genome.from_dict(genome)
        g.plan(shape, classes)
        cost = g.cost(shape, classes)
    except ValueError as exc:
        message = str(exc)
        raise InvalidInput(message if message.startswith("genome") else f"genome: {message}") from None
    if len(g.layers) > MAX_LAYERS:
        raise InvalidInput(f"genome.layers: at most {MAX_LAYERS} layers, got {len(g.layers)}")
    if cost["parameters"] > MAX_PARAMETERS:
        raise InvalidInput(f"genome: the network has {cost['parameters']} parameters, more than the "
                           f"limit of {MAX_PARAMETERS}")
    if cost["macs"] > MAX_MACS:
        raise InvalidInput(f"genome: the network needs {cost['macs']} multiply-accumulates per image, "
                           f"more than the limit of {MAX_MACS}")
    return json.loads(g.to_json())


def _resolve_init(init: str | None, dataset: str, shape: tuple[int, int, int], registry) -> str | None:
    if init is None:
        return None
    try:
        model = registry.best(dataset) if init == "best" else registry.get(init)
    except (NotFound, KeyError, LookupError):
        raise InvalidInput(f"init: no model {init!r}" + (f" for dataset {dataset!r}" if init == "best" else ""))
    model_shape = tuple(model.get("input_shape") or ())
    if model_shape and model_shape != shape:
        raise InvalidInput(f"init: model {model['id']} takes images {list(model_shape)}, the dataset has "
                           f"{list(shape)}")
    return model["id"]
