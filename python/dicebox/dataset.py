"""Labelled image datasets: packed uint8 pixels [N, C, H, W] with int64 labels.

A thin wrapper over the core's packed dataset: the pixels live in one contiguous block
(memory-mapped when loaded from a file) and ``images``/``labels`` are read-only numpy views.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dicebox import _core


class Dataset:
    """Images [N, C, H, W] uint8 with labels [N] int64 indexing ``categories``."""

    def __init__(self, core: _core.Dataset) -> None:
        self._core = core

    # -- builders -------------------------------------------------------------------------
    @classmethod
    def from_arrays(
        cls,
        images: np.ndarray,
        labels: Sequence[int] | np.ndarray,
        categories: Sequence[str] | None = None,
    ) -> Dataset:
        """From uint8 images [N, H, W] (one channel) or [N, C, H, W] and labels [N].

        ``categories`` names each label value; by default "0".."max label".
        """
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise ValueError(
                f"images: expected dtype uint8 (pixel values 0-255), got {images.dtype}; "
                "convert with np.clip(x, 0, 255).astype(np.uint8) if that is what you mean"
            )
        if images.ndim == 3:
            images = images[:, None, :, :]
        if images.ndim != 4:
            raise ValueError(f"images: expected [N, H, W] or [N, C, H, W], got shape {images.shape}")
        labels_array = np.asarray(labels)
        if labels_array.ndim != 1 or not np.issubdtype(labels_array.dtype, np.integer):
            if labels_array.size == 0 and labels_array.ndim == 1:
                labels_array = labels_array.astype(np.int64)
            else:
                raise ValueError(
                    f"labels: expected a 1-D integer array, got shape {labels_array.shape} "
                    f"dtype {labels_array.dtype}"
                )
        if categories is None:
            top = int(labels_array.max()) if labels_array.size else 0
            categories = [str(i) for i in range(max(top + 1, 1))]
        return cls(_core.Dataset.from_arrays(images, labels_array.astype(np.int64), list(categories)))

    @classmethod
    def from_idx(cls, images_path: str | os.PathLike, labels_path: str | os.PathLike) -> Dataset:
        """From MNIST IDX files (gzip-compressed or not); categories are "0".."9"."""
        return cls(_core.Dataset.from_idx(os.fspath(images_path), os.fspath(labels_path)))

    @classmethod
    def from_folder(
        cls,
        path: str | os.PathLike,
        size: tuple[int, int],
        channels: int = 1,
        threads: int | None = None,
    ) -> Dataset:
        """From a folder with one sub-folder of PNG/JPEG images per category.

        Every image is decoded once and resized to ``size`` = (width, height) with
        ``channels`` 1 (grayscale) or 3 (RGB). Categories are the sub-folder names, sorted.
        """
        from dicebox.imagefolder import read_folder

        images, labels, categories = read_folder(path, size=size, channels=channels, threads=threads)
        return cls.from_arrays(images, labels, categories)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Dataset:
        """Memory-maps a packed dataset file written by :meth:`save`."""
        return cls(_core.Dataset.load(os.fspath(path)))

    def save(self, path: str | os.PathLike) -> None:
        """Writes the packed file (atomically: a crash leaves the old file or the new one)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._core.save(os.fspath(path))

    # -- contents -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._core)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of every image."""
        return tuple(self._core.shape)

    @property
    def categories(self) -> list[str]:
        return list(self._core.categories)

    @property
    def images(self) -> np.ndarray:
        """Read-only uint8 view [N, C, H, W]."""
        return self._core.images

    @property
    def labels(self) -> np.ndarray:
        """Read-only int64 view [N]."""
        return self._core.labels

    def counts(self) -> dict[str, int]:
        """Images per category."""
        return dict(zip(self.categories, self._core.counts))

    def subset(self, indices: Sequence[int] | np.ndarray) -> Dataset:
        """A new dataset with copies of the given rows, in that order."""
        return Dataset(self._core.subset(np.asarray(indices, dtype=np.int64)))

    def split(self, fractions: Sequence[float], seed: int = 0) -> tuple[Dataset, ...]:
        """Stratified, disjoint parts holding ``fractions`` of every category (seeded)."""
        return tuple(Dataset(part) for part in self._core.split([float(f) for f in fractions], seed))

    def __repr__(self) -> str:
        c, h, w = self.shape
        return f"Dataset({len(self)} images, {c}x{h}x{w}, {len(self.categories)} categories)"
