"""The C++ batch loader as a Python iterable (for feeding other frameworks, and benchmarks).

Batches are numpy views of buffers the core filled on its own threads: images float32
[B, C, H, W] normalised per channel, labels int64 [B].
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from dicebox import _core
from dicebox.dataset import Dataset


class BatchLoader:
    """Iterates over one epoch per ``for`` loop; the epoch number advances each time, so
    every epoch has its own order and augmentation, reproducible from ``seed``."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int = 64,
        shuffle: bool = True,
        seed: int = 0,
        augment: float = 0.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        threads: int = 1,
        prefetch: int = 4,
        drop_last: bool = False,
    ) -> None:
        self._loader = _core.BatchLoader(
            dataset._core, batch_size, shuffle, seed, augment,
            list(mean or []), list(std or []), threads, prefetch, drop_last,
        )
        self.epoch = 0

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        self.epoch += 1
        self._loader.start_epoch(self.epoch)
        while (batch := self._loader.next()) is not None:
            yield batch
