"""Ready-made datasets that need no download."""

from __future__ import annotations

from dicebox.dataset import Dataset
from dicebox.dice import DICE_CATEGORIES, render_dice


def make_dice(count: int = 3000, size: int = 32, seed: int = 0, channels: int = 1) -> Dataset:
    """Synthetic die faces "1".."6": ``count`` images of ``size`` x ``size`` pixels, drawn
    with random rotation, scale, position, brightness and noise; the same seed gives the
    same images."""
    images, labels = render_dice(count, size=size, seed=seed, channels=channels)
    return Dataset.from_arrays(images, labels, DICE_CATEGORIES)


__all__ = ["make_dice"]
