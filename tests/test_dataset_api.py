"""dicebox.Dataset: builders, views, packed files, splits, and clear errors."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

import dicebox
from conftest import bands


def test_from_arrays_adds_the_channel_axis_and_keeps_the_pixels():
    images = np.arange(2 * 4 * 5, dtype=np.uint8).reshape(2, 4, 5)
    ds = dicebox.Dataset.from_arrays(images, [0, 1], ["a", "b"])
    assert len(ds) == 2 and ds.shape == (1, 4, 5)
    assert ds.images.dtype == np.uint8 and ds.images.shape == (2, 1, 4, 5)
    np.testing.assert_array_equal(ds.images[:, 0], images)
    assert ds.labels.dtype == np.int64 and ds.labels.tolist() == [0, 1]
    assert ds.counts() == {"a": 1, "b": 1}


def test_views_are_read_only():
    ds = bands(6, 0)
    with pytest.raises(ValueError):
        ds.images[0, 0, 0, 0] = 1
    with pytest.raises(ValueError):
        ds.labels[0] = 2


def test_default_categories_are_label_numbers():
    ds = dicebox.Dataset.from_arrays(np.zeros((3, 2, 2), np.uint8), [0, 2, 1])
    assert ds.categories == ["0", "1", "2"]


@pytest.mark.parametrize(
    "images, labels, categories, message",
    [
        (np.zeros((2, 4, 4), np.float32), [0, 1], ["a", "b"], "uint8"),
        (np.zeros((2, 4), np.uint8), [0, 1], ["a", "b"], "[N, H, W]"),
        (np.zeros((2, 4, 4), np.uint8), [0], ["a", "b"], "labels"),
        (np.zeros((2, 4, 4), np.uint8), [0, 5], ["a", "b"], "labels[1]"),
        (np.zeros((2, 4, 4), np.uint8), [0, -1], ["a", "b"], "labels[1]"),
        (np.zeros((2, 4, 4), np.uint8), [0, 1], ["a", "a"], "categor"),
        (np.zeros((2, 4, 4), np.uint8), [0.5, 1], ["a", "b"], "labels"),
    ],
)
def test_bad_arrays_are_refused_clearly(images, labels, categories, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        dicebox.Dataset.from_arrays(images, labels, categories)


def test_save_and_load_round_trip(tmp_path):
    ds = bands(30, 3)
    path = tmp_path / "sub" / "bands.dbx"
    ds.save(path)
    back = dicebox.Dataset.load(path)
    assert back.categories == ds.categories and back.shape == ds.shape
    np.testing.assert_array_equal(back.images, ds.images)
    np.testing.assert_array_equal(back.labels, ds.labels)


def test_load_of_a_corrupt_file_names_it(tmp_path):
    path = tmp_path / "broken.dbx"
    bands(10, 0).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="broken.dbx"):
        dicebox.Dataset.load(path)
    with pytest.raises(OSError, match="missing.dbx"):
        dicebox.Dataset.load(tmp_path / "missing.dbx")


def _idx(path, magic, dims, payload, compress):
    raw = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims) + payload
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


@pytest.mark.parametrize("compress", [True, False])
def test_from_idx_reads_gzip_and_plain(tmp_path, compress):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(5, 3, 4), dtype=np.uint8)
    labels = np.array([0, 3, 1, 3, 2], np.uint8)
    _idx(tmp_path / "img", 2051, [5, 3, 4], pixels.tobytes(), compress)
    _idx(tmp_path / "lbl", 2049, [5], labels.tobytes(), compress)
    ds = dicebox.Dataset.from_idx(tmp_path / "img", tmp_path / "lbl")
    assert ds.shape == (1, 3, 4) and ds.categories == ["0", "1", "2", "3"]
    np.testing.assert_array_equal(ds.images[:, 0], pixels)
    np.testing.assert_array_equal(ds.labels, labels)


def test_from_idx_with_mismatched_counts_names_the_problem(tmp_path):
    _idx(tmp_path / "img", 2051, [2, 2, 2], bytes(8), False)
    _idx(tmp_path / "lbl", 2049, [3], bytes(3), False)
    with pytest.raises((OSError, ValueError), match="count|match"):
        dicebox.Dataset.from_idx(tmp_path / "img", tmp_path / "lbl")


def test_split_is_stratified_disjoint_and_seeded():
    ds = bands(300, 0)
    train, val, test = ds.split([0.8, 0.1, 0.1], seed=4)
    assert len(train) + len(val) + len(test) == 300
    for part, share in ((train, 0.8), (val, 0.1), (test, 0.1)):
        for count in part.counts().values():
            assert abs(count - 100 * share) <= 1
    rows = lambda d: {d.images[i].tobytes() + bytes([d.labels[i]]) for i in range(len(d))}  # noqa: E731
    assert not rows(train) & rows(val) and not rows(val) & rows(test)
    again = ds.split([0.8, 0.1, 0.1], seed=4)
    np.testing.assert_array_equal(again[1].images, val.images)
    other = ds.split([0.8, 0.1, 0.1], seed=5)
    assert not np.array_equal(other[1].images, val.images)


@pytest.mark.parametrize("fractions", [[0.8, 0.4], [0.0, 0.5], [-0.1]])
def test_bad_split_fractions_are_refused(fractions):
    with pytest.raises(ValueError, match="fraction"):
        bands(30, 0).split(fractions)


def test_make_dice_gives_six_balanced_faces():
    dice = dicebox.datasets.make_dice(count=120, size=24, seed=3)
    assert dice.categories == ["1", "2", "3", "4", "5", "6"]
    assert dice.shape == (1, 24, 24)
    assert set(dice.counts().values()) == {20}
    same = dicebox.datasets.make_dice(count=120, size=24, seed=3)
    np.testing.assert_array_equal(same.images, dice.images)


def test_from_folder_reads_one_folder_per_category(tmp_path):
    from PIL import Image

    for name, value in (("dark", 10), ("light", 240)):
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("L", (12, 9), value).save(tmp_path / name / f"{i}.png")
    ds = dicebox.Dataset.from_folder(tmp_path, size=(6, 4))
    assert ds.categories == ["dark", "light"] and ds.shape == (1, 4, 6) and len(ds) == 6
    assert ds.images[ds.labels == 0].max() <= 12 and ds.images[ds.labels == 1].min() >= 238


def test_from_folder_names_a_corrupt_file(tmp_path):
    from PIL import Image

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.new("L", (4, 4)).save(tmp_path / "a" / "ok.png")
    (tmp_path / "b" / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="bad.png"):
        dicebox.Dataset.from_folder(tmp_path, size=(4, 4))
