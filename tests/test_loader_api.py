"""dicebox.BatchLoader: the C++ batch loader as a Python iterable."""

from __future__ import annotations

import numpy as np
import pytest

import dicebox
from conftest import bands


def test_each_epoch_yields_every_sample_once_in_a_new_order():
    ds = bands(50, 0)
    loader = dicebox.BatchLoader(ds, batch_size=16, seed=3, threads=2)
    assert len(loader) == 4
    orders = []
    for _ in range(2):
        batches = list(loader)
        assert [len(y) for _, y in batches] == [16, 16, 16, 2]
        images = np.concatenate([x for x, _ in batches])
        assert images.dtype == np.float32 and images.shape == (50, 1, 8, 8)
        # pixels / 255 without mean and std: the multiset of images is the dataset's
        assert sorted(map(bytes, np.rint(images * 255).astype(np.uint8))) == sorted(map(bytes, ds.images))
        orders.append(images)
    assert not np.array_equal(orders[0], orders[1])  # epoch 2 is shuffled differently
    first = np.concatenate([x for x, _ in dicebox.BatchLoader(ds, batch_size=16, seed=3)])
    again = np.concatenate([x for x, _ in dicebox.BatchLoader(ds, batch_size=16, seed=3)])
    np.testing.assert_array_equal(first, again)


def test_normalisation_and_augmentation():
    ds = bands(20, 0)
    plain = next(iter(dicebox.BatchLoader(ds, batch_size=20, shuffle=False, mean=[0.5], std=[0.25])))[0]
    np.testing.assert_allclose(plain, (ds.images / 255.0 - 0.5) / 0.25, atol=1e-5)
    augmented = next(iter(dicebox.BatchLoader(ds, batch_size=20, shuffle=False, augment=1.0)))[0]
    assert not np.allclose(augmented, ds.images / 255.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch_size"),
    ({"augment": 1.5}, "augment"),
    ({"mean": [0.1, 0.2]}, "mean"),
    ({"std": [0.0]}, "std"),
])
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dicebox.BatchLoader(bands(4, 0), **kwargs)
