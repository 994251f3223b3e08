"""Tests for dicebox/dice.py: the synthetic dice image generator."""

from __future__ import annotations


import numpy as np
import pytest

from dicebox import dice


@pytest.mark.parametrize(
    ("count", "size", "channels"), [(1, 8, 1), (7, 16, 3), (12, 32, 1), (3, 97, 3), (2, 512, 1)]
)
def test_shapes_and_dtypes(count: int, size: int, channels: int) -> None:
    images, labels = dice.render_dice(count, size=size, seed=3, channels=channels)
    assert images.shape == (count, channels, size, size)
    assert images.dtype == np.uint8
    assert images.flags.c_contiguous
    assert labels.shape == (count,)
    assert labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() <= 5


def test_categories() -> None:
    assert dice.DICE_CATEGORIES == ["1", "2", "3", "4", "5", "6"]


def test_deterministic_for_a_seed() -> None:
    a = dice.render_dice(50, size=24, seed=11, channels=3)
    b = dice.render_dice(50, size=24, seed=11, channels=3)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_seeds_differ() -> None:
    a_img, a_lab = dice.render_dice(60, seed=0)
    b_img, b_lab = dice.render_dice(60, seed=1)
    assert not np.array_equal(a_lab, b_lab)
    # Not merely a relabelling: essentially every image differs.
    assert (a_img != b_img).any(axis=(1, 2, 3)).all()


@pytest.mark.parametrize("count", [1, 5, 6, 600, 601, 605])
def test_labels_balanced(count: int) -> None:
    _, labels = dice.render_dice(count, size=8, seed=count)
    counts = np.bincount(labels, minlength=6)
    assert counts.sum() == count
    assert set(counts.tolist()) <= {count // 6, count // 6 + 1}


def test_labels_shuffled() -> None:
    _, labels = dice.render_dice(600, size=8)
    assert not np.all(np.diff(labels) >= 0)
    # Neighbours share a face only about 1/6 of the time when shuffled.
    assert np.mean(labels[1:] == labels[:-1]) < 0.3


def test_pixels_use_the_range_and_are_noisy() -> None:
    images, _ = dice.render_dice(60, size=32, seed=5)
    spread = images.reshape(60, -1).max(axis=1).astype(int) - images.reshape(60, -1).min(axis=1)
    assert spread.min() > 80  # a light die on a dark background in every image
    # Gaussian noise: many distinct grey levels, not a few flat regions.
    assert min(len(np.unique(im)) for im in images) > 40


def test_pip_area_grows_with_face_value_when_unrotated() -> None:
    # Centred, unrotated dice of one size: the pip coverage is k pips * pi r^2.
    size, n = 32, 6
    labels = np.arange(n)
    zeros = np.zeros(n)
    side = np.full(n, 0.7 * size)
    centre = np.full(n, size / 2)
    die_cov, pip_cov = dice._coverage(labels, zeros, side, centre, centre, size)
    die_area = die_cov.sum(axis=(1, 2))
    pip_area = pip_cov.sum(axis=(1, 2))
    np.testing.assert_allclose(die_area, die_area[0], rtol=1e-4)  # same die every time
    assert np.all(np.diff(pip_area) > 0)
    one_pip = np.pi * (dice._PIP_RADIUS * side[0]) ** 2
    np.testing.assert_allclose(pip_area, (labels + 1) * one_pip, rtol=0.05)
    # Pips lie on the die (never on the background).
    assert np.all(pip_cov <= die_cov + 1e-5)


def _rotation_invariant_features(images: np.ndarray) -> np.ndarray:
    """Dark-pixel fractions in rings around the die centre, scaled by die size: [N, 4]."""
    x = images.astype(np.float64).mean(axis=1)  # [N, H, W], grey even for RGB
    n, h, w = x.shape
    flat = x.reshape(n, -1)
    lo = np.percentile(flat, 5, axis=1)[:, None, None]
    hi = np.percentile(flat, 95, axis=1)[:, None, None]
    bright = x > (lo + hi) / 2  # the die face
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    area = bright.sum(axis=(1, 2))
    cy = (bright * yy).sum(axis=(1, 2)) / area
    cx = (bright * xx).sum(axis=(1, 2)) / area
    r = np.hypot(yy - cy[:, None, None], xx - cx[:, None, None]) / np.sqrt(area)[:, None, None]
    edges = [0.0, 0.12, 0.24, 0.36, 0.48]
    rings = [
        (~bright & (r >= a) & (r < b)).sum(axis=(1, 2)) / area for a, b in zip(edges, edges[1:])
    ]
    return np.stack(rings, axis=1)


@pytest.mark.parametrize(
    ("size", "channels", "min_accuracy"), [(32, 1, 0.9), (32, 3, 0.9), (16, 1, 0.75)]
)
def test_faces_are_separable(size: int, channels: int, min_accuracy: float) -> None:
    # A nearest-centroid classifier on simple rotation-invariant features, trained on
    # 600 images and tested on 600 others, must beat chance (1/6) by far: the faces
    # differ in pip structure and the pips are resolvable even at 16 px.
    xa, ya = dice.render_dice(600, size=size, seed=1, channels=channels)
    xb, yb = dice.render_dice(600, size=size, seed=2, channels=channels)
    fa, fb = _rotation_invariant_features(xa), _rotation_invariant_features(xb)
    mu, sd = fa.mean(axis=0), fa.std(axis=0)
    fa, fb = (fa - mu) / sd, (fb - mu) / sd
    centroids = np.stack([fa[ya == k].mean(axis=0) for k in range(6)])
    predicted = np.argmin(((fb[:, None] - centroids[None]) ** 2).sum(axis=-1), axis=1)
    accuracy = float(np.mean(predicted == yb))
    assert accuracy >= min_accuracy


def test_rgb_has_tints() -> None:
    images, _ = dice.render_dice(40, size=32, seed=7, channels=3)
    x = images.astype(int)
    # Channels differ noticeably (tinted), unlike a grey image repeated three times.
    per_image = np.abs(x[:, 0] - x[:, 1]).mean(axis=(1, 2)) + np.abs(x[:, 1] - x[:, 2]).mean(
        axis=(1, 2)
    )
    assert np.median(per_image) > 5


def test_supports_numpy_integers() -> None:
    images, labels = dice.render_dice(np.int64(6), size=np.int32(16), seed=np.uint8(2))
    assert images.shape == (6, 1, 16, 16)
    assert sorted(labels.tolist()) == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"count": 0}, "count"),
        ({"count": -3}, "count"),
        ({"count": 2.0}, "count"),
        ({"count": True}, "count"),
        ({"count": 4, "size": 7}, "size"),
        ({"count": 4, "size": 513}, "size"),
        ({"count": 4, "size": 32.0}, "size"),
        ({"count": 4, "channels": 2}, "channels"),
        ({"count": 4, "channels": 0}, "channels"),
        ({"count": 4, "channels": 4}, "channels"),
        ({"count": 4, "seed": -1}, "seed"),
    ],
)
def test_argument_errors(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        dice.render_dice(**kwargs)
