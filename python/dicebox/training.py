"""``dicebox.train``: fit a genome's network to a dataset in the C++ core."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from dicebox import _core
from dicebox.dataset import Dataset
from dicebox.genome import Genome
from dicebox.model import Model


def default_threads() -> int:
    """``DICEBOX_THREADS`` if set, else the number of CPUs this process may use."""
    value = os.environ.get("DICEBOX_THREADS", "").strip()
    if value:
        try:
            threads = int(value)
        except ValueError:
            raise ValueError(f"DICEBOX_THREADS: expected a whole number, got {value!r}") from None
        if threads < 1:
            raise ValueError(f"DICEBOX_THREADS: must be >= 1, got {threads}")
        return threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def train(
    genome: Genome | dict[str, Any] | str,
    train: Dataset,
    val: Dataset | None = None,
    epochs: int = 20,
    batch_size: int = 64,
    patience: int = 5,
    seed: int = 0,
    augment: float = 0.0,
    label_smoothing: float = 0.0,
    threads: int | None = None,
    callback: Callable[[dict[str, Any]], bool | None] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    init: Model | str | os.PathLike | None = None,
    cancel: _core.CancelToken | None = None,
    device: str | None = None,
) -> Model:
    """Trains ``genome``'s network on ``train`` and returns the model with the best weights.

    Early stopping watches ``val``'s loss (the training loss without ``val``) and stops after
    ``patience`` epochs without improvement (0 = never). ``augment`` is the probability that
    an image is rotated (±10°), scaled (0.7-1.5) and shifted. ``callback`` gets one dict per
    epoch (see :attr:`Model.history`) and may return False to stop. With ``checkpoint_dir`` a
    checkpoint is written after every epoch and a later call with the same arguments resumes
    from it, ending exactly as an uninterrupted run. ``init`` warm-starts from a model (or
    its directory). ``cancel`` (a :class:`dicebox.CancelToken`) stops the run from another
    thread with :class:`dicebox.Cancelled`. ``device`` is "cpu", "cuda" or "auto" (default:
    ``DICEBOX_DEVICE``, else "auto": CUDA when the LibTorch build has it and a GPU is visible).
    """
    if not isinstance(train, Dataset):
        raise ValueError(f"train: expected a dicebox.Dataset, got {type(train).__name__}")
    if val is not None and not isinstance(val, Dataset):
        raise ValueError(f"val: expected a dicebox.Dataset or None, got {type(val).__name__}")
    if len(train) == 0:
        raise ValueError("train: the dataset is empty")
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    genome = Genome.coerce(genome)
    if isinstance(init, (str, os.PathLike)):
        init = Model.load(init)
    if init is not None and not isinstance(init, Model):
        raise ValueError(f"init: expected a Model or a model directory, got {type(init).__name__}")
    core = _core.train(
        genome.to_json(),
        train._core,
        val._core if val is not None else None,
        int(epochs),
        int(batch_size),
        int(patience),
        int(seed),
        float(augment),
        float(label_smoothing),
        int(threads) if threads is not None else default_threads(),
        os.fspath(checkpoint_dir) if checkpoint_dir is not None else "",
        init._core if init is not None else None,
        cancel,
        callback,
        device if device is not None else os.environ.get("DICEBOX_DEVICE", "auto") or "auto",
    )
    return Model(core)
