"""Genomes: the JSON description of a network (layers, activations, optimizer).

Parsing and validation happen in the core, so Python and C++ accept exactly the same
genomes; a Genome holds the canonical form (defaults written out, fixed key order).
"""

from __future__ import annotations

import json
from typing import Any

from dicebox import _core

ACTIVATIONS: tuple[str, ...] = tuple(_core.activations())
OPTIMIZERS: tuple[str, ...] = tuple(_core.optimizers())
LAYER_TYPES: tuple[str, ...] = ("dense", "dropout", "conv2d", "maxpool2d")


class Genome:
    """A validated network description. Equal genomes build the same network."""

    __slots__ = ("_json",)

    def __init__(self, canonical_json: str) -> None:
        self._json = canonical_json

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Genome:
        """Validates ``d``; a ValueError names the offending field (e.g. ``layers[2].size``)."""
        if not isinstance(d, dict):
            raise ValueError(f"genome: expected a dict, got {type(d).__name__}")
        return cls(_core.canonical_genome(json.dumps(d)))

    @classmethod
    def from_json(cls, text: str | bytes) -> Genome:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return cls(_core.canonical_genome(text))

    @classmethod
    def coerce(cls, value: Genome | dict[str, Any] | str) -> Genome:
        """A Genome from a Genome, a dict or a JSON string."""
        if isinstance(value, Genome):
            return value
        if isinstance(value, dict):
            return cls.from_dict(value)
        if isinstance(value, (str, bytes)):
            return cls.from_json(value)
        raise ValueError(f"genome: expected a Genome, dict or JSON string, got {type(value).__name__}")

    @classmethod
    def random(cls, space: Any = None, seed: int = 0, input_shape: tuple[int, int, int] = (1, 28, 28),
               classes: int = 10) -> Genome:
        """A random genome from ``space`` (a :class:`dicebox.SearchSpace`, its dict, a preset
        name, or None for the default), valid for images of ``input_shape`` (C, H, W)."""
        from dicebox.evolution import SearchSpace

        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        space = SearchSpace.coerce(space)
        return cls(_core.random_genome(space.to_json(), tuple(input_shape), int(classes), int(seed)))

    def to_json(self) -> str:
        """Canonical JSON (compact, fixed key order)."""
        return self._json

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self._json)

    @property
    def layers(self) -> list[dict[str, Any]]:
        return self.to_dict()["layers"]

    @property
    def optimizer(self) -> dict[str, Any]:
        return self.to_dict()["optimizer"]

    def plan(self, shape: tuple[int, int, int], classes: int) -> list[dict[str, Any]]:
        """The modules this genome builds for images of ``shape`` (C, H, W) and ``classes``
        outputs, with the implied flatten and output layer; raises ValueError naming the
        layer whose kernel does not fit the feature map that reaches it."""
        return json.loads(_core.plan_network(self._json, tuple(shape), int(classes)))

    def cost(self, shape: tuple[int, int, int], classes: int) -> dict[str, int]:
        """Parameters and multiply-accumulates per image (forward pass) of the network this
        genome builds for images of ``shape`` (C, H, W) and ``classes`` outputs."""
        parameters, macs = _core.network_cost(self._json, tuple(shape), int(classes))
        return {"parameters": parameters, "macs": macs}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Genome) and other._json == self._json

    def __hash__(self) -> int:
        return hash(self._json)

    def __repr__(self) -> str:
        return f"Genome({self._json})"
