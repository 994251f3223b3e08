"""Shared fixtures: small synthetic datasets that need no download."""

from __future__ import annotations

import numpy as np
import pytest

import dicebox


def bands(count: int, seed: int, size: int = 8) -> dicebox.Dataset:
    """Three classes: a bright horizontal band at the top, middle or bottom, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 3
    images = rng.integers(0, 60, size=(count, 1, size, size)).astype(np.uint8)
    third = size // 3
    for i, label in enumerate(labels):
        images[i, 0, label * third:(label + 1) * third, :] += 150
    return dicebox.Dataset.from_arrays(images, labels, ["top", "middle", "bottom"])


MLP = {"optimizer": {"name": "adam", "learning_rate": 0.01},
       "layers": [{"type": "dense", "size": 16, "activation": "relu"},
                  {"type": "dropout", "rate": 0.2}]}

CNN = {"optimizer": {"name": "adam", "learning_rate": 0.005},
       "layers": [{"type": "conv2d", "filters": 4, "kernel": [3, 3], "padding": "same", "activation": "relu"},
                  {"type": "maxpool2d", "kernel": [2, 2]},
                  {"type": "dropout", "rate": 0.1},
                  {"type": "dense", "size": 8, "activation": "tanh"}]}


@pytest.fixture(scope="session")
def band_data() -> tuple[dicebox.Dataset, dicebox.Dataset]:
    return bands(240, 1), bands(90, 2)


@pytest.fixture(scope="session")
def trained(band_data) -> dicebox.Model:
    train, val = band_data
    return dicebox.train(MLP, train, val=val, epochs=4, batch_size=16, patience=0, threads=1)
