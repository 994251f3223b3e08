"""Trained models: inference, evaluation, saving and loading, and export to PyTorch.

A model directory holds ``weights.safetensors`` (named as the equivalent PyTorch module's
state dict) and ``model.json`` (genome, categories, input shape, normalisation, history,
metrics). Inference runs in the C++ core without the GIL.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from dicebox import _core
from dicebox.dataset import Dataset
from dicebox.genome import Genome


def _as_images(images: np.ndarray | Dataset, shape: tuple[int, int, int]) -> np.ndarray:
    """uint8 [N, C, H, W] from a Dataset, [N, C, H, W], [N, H, W] or one [H, W] image."""
    if isinstance(images, Dataset):
        return images.images
    a = np.asarray(images)
    if a.dtype != np.uint8:
        raise ValueError(f"images: expected dtype uint8 (pixel values 0-255), got {a.dtype}")
    c, h, w = shape
    if a.ndim == 2 and c == 1:
        a = a[None, None]
    elif a.ndim == 3 and c == 1 and a.shape[1:] == (h, w):
        a = a[:, None]
    elif a.ndim == 3 and a.shape == (c, h, w):
        a = a[None]
    if a.ndim != 4 or a.shape[1:] != (c, h, w):
        raise ValueError(f"images: expected shape [N, {c}, {h}, {w}], got {list(a.shape)}")
    return a


class Model:
    """A trained network with its categories, input shape and normalisation."""

    def __init__(self, core: _core.Model) -> None:
        self._core = core

    @classmethod
    def load(cls, path: str | os.PathLike) -> Model:
        """Loads a directory written by :meth:`save`; OSError says what is missing or corrupt."""
        return cls(_core.Model.load(os.fspath(path)))

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the model directory (created if needed) and returns its path."""
        self._core.save(os.fspath(path))
        return Path(path)

    # -- description ---------------------------------------------------------------------
    @property
    def genome(self) -> Genome:
        return Genome(self._core.genome_json)

    @property
    def categories(self) -> list[str]:
        return list(self._core.categories)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the images the model takes."""
        return tuple(self._core.input_shape)

    @property
    def normalisation(self) -> dict[str, list[float]]:
        """Per-channel mean and std of pixels scaled to 0-1, applied before the network."""
        mean, std = self._core.normalisation
        return {"mean": list(mean), "std": list(std)}

    @property
    def history(self) -> list[dict[str, Any]]:
        """One dict per trained epoch: epoch, loss, accuracy, val_loss, val_accuracy,
        samples_per_second, seconds (val_* are None without a validation set)."""
        return list(self._core.history)

    @property
    def metadata(self) -> dict[str, Any]:
        """Free-form JSON saved with the model (metrics, dataset name, ...)."""
        return json.loads(self._core.extra_json)

    @metadata.setter
    def metadata(self, value: dict[str, Any]) -> None:
        self._core.extra_json = json.dumps(value)

    @property
    def metrics(self) -> dict[str, Any] | None:
        """The metrics of the last :meth:`evaluate` (saved with the model), if any."""
        return self.metadata.get("metrics")

    # -- inference -----------------------------------------------------------------------
    def predict(self, images: np.ndarray | Dataset, batch_size: int = 256) -> np.ndarray:
        """Class probabilities, float32 [N, classes], for uint8 images [N, C, H, W] or
        [N, H, W] (or a Dataset)."""
        return self._core.predict(_as_images(images, self.input_shape), batch_size)

    def classify(self, images: np.ndarray | Dataset) -> list[str]:
        """The most probable category name of each image."""
        categories = self.categories
        return [categories[i] for i in self.predict(images).argmax(axis=1)]

    def evaluate(self, dataset: Dataset, k: int = 5) -> dict[str, Any]:
        """accuracy, loss (cross-entropy), top_k (accuracy within the ``k`` best), macro
        precision, recall and f1, confusion (int64 [classes, classes], rows = true label).
        The result is also kept in :attr:`metrics` and saved with the model."""
        result = self._core.evaluate(dataset._core, k)
        stored = dict(result, confusion=result["confusion"].tolist())
        self.metadata = {**self.metadata, "metrics": stored}
        return result

    def state_dict(self) -> dict[str, np.ndarray]:
        """Weights as float32 arrays named like :meth:`to_torch`'s ``layers`` state dict."""
        return self._core.weights()

    def to_torch(self):  # -> torch.nn.Module (torch is imported only here)
        """A ``torch.nn.Module`` taking float32 pixel values 0-255 [N, C, H, W] and returning
        logits; normalisation is inside, so ``softmax(module(x))`` equals :meth:`predict`."""
        from dicebox.torch_export import build_module

        mean, std = self._core.normalisation
        return build_module(json.loads(self._core.plan_json), mean, std, self.state_dict())

    def __repr__(self) -> str:
        c, h, w = self.input_shape
        return f"Model({c}x{h}x{w} -> {len(self.categories)} categories, {len(self.history)} epochs)"
