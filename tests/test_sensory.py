"""The sensory store (dicebox.sensory) on SQLite (a file) and PostgreSQL, with real files.

PostgreSQL: DICEBOX_TEST_POSTGRES_URL or postgresql+psycopg://postgres@127.0.0.1:5432/test; each
test gets a fresh schema. Unreachable -> skipped locally, failed when CI=true.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dicebox
from dicebox.db import migrate
from dicebox.errors import Conflict, InvalidInput, NotFound, TooLarge
from dicebox.imagefolder import decode_image
from dicebox.sensory import KEEP_EXPORTS, LABELS_FILE, PIXELS_FILE, SensoryStore
from dicebox.settings import Settings

PG_URL = os.environ.get("DICEBOX_TEST_POSTGRES_URL",
                        "postgresql+psycopg://postgres@127.0.0.1:5432/test")

LIMITS = {"max_image_bytes": 16 * 1024, "max_image_pixels": 100_000, "max_images_per_request": 20,
              "max_categories": 5, "max_dataset_side": 64}


# ---------------------------------------------------------------------------------------------
# images

def encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    """``pixels`` uint8 [H, W] or [H, W, 3] encoded as ``fmt``."""
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def noise(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    shape = (h, w) if channels == 1 else (h, w, 3)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with (almost) no pixel data: what a
    decompression bomb looks like to a reader of the header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def corrupt_png() -> bytes:
    data = bytearray(encode(noise(32, 32, 7)))
    middle = len(data) // 2
    data[middle:middle + 50] = b"\x00" * 50
    return bytes(data)


def truncated_jpeg() -> bytes:
    data = encode(noise(32, 32, 8), "JPEG")
    return data[: len(data) // 2]


# ---------------------------------------------------------------------------------------------
# backends

@pytest.fixture
def backend(new_engine, tmp_path):
    """(store, make_store): make_store(**limits) opens another SensoryStore on a new engine over
    the same database and folder, like a second process would."""
    root = tmp_path / "datasets"

    def make_store(**limits) -> SensoryStore:
        settings = Settings(home=tmp_path, **{**LIMITS, **limits})
        return SensoryStore(new_engine(), root, settings)

    store = make_store()
    migrate(store.engine)
    return store, make_store


@pytest.fixture
def store(backend):
    return backend[0]


def state(store: SensoryStore, name: str) -> tuple[dict, dict]:
    """What must not change when a request is refused: the row and the files' sizes."""
    folder = store.root / name
    sizes = {f.name: f.stat().st_size for f in sorted(folder.rglob("*")) if f.is_file()}
    return store.get(name), sizes


def uniform(n: int, value0: int, shape=(1, 4, 6)) -> np.ndarray:
    """n images [n, C, H, W], image i filled with value0 + i."""
    return np.stack([np.full(shape, value0 + i, dtype=np.uint8) for i in range(n)])


# ---------------------------------------------------------------------------------------------
# creating and reading

def test_create_is_idempotent_for_the_same_shape(store):
    created, fresh = store.create("dice", 6, 4, 1, ["one", "two"])
    assert fresh is True
    assert created["name"] == "dice" and created["shape"] == [1, 4, 6]
    assert (created["width"], created["height"], created["channels"]) == (6, 4, 1)
    assert created["count"] == 0 and created["version"] == 0
    assert created["categories"] == [{"name": "one", "count": 0}, {"name": "two", "count": 0}]
    assert created["counts"] == {"one": 0, "two": 0}
    assert created["created_at"].endswith("+00:00")
    again, fresh = store.create("dice", 6, 4, 1)
    assert fresh is False and again == created
    assert store.create("dice", 6, 4, 1, ["one", "two"]) == (created, False)
    assert (store.root / "dice" / PIXELS_FILE).exists()


def test_create_with_another_shape_or_categories_conflicts(store):
    store.create("dice", 6, 4, 1, ["one"])
    before = state(store, "dice")
    with pytest.raises(Conflict, match="exists with width 6, height 4, channels 1"):
        store.create("dice", 6, 4, 3)
    with pytest.raises(Conflict, match="exists with width 6"):
        store.create("dice", 8, 4, 1)
    with pytest.raises(Conflict, match="declared categories"):
        store.create("dice", 6, 4, 1, ["two"])
    assert state(store, "dice") == before


def test_append_and_reload_round_trip(backend, tmp_path):
    store, make_store = backend
    store.create("rgb", 5, 3, 3)
    images = np.random.default_rng(0).integers(0, 256, (7, 3, 3, 5), dtype=np.uint8)
    names = ["cat", "dog", "cat", "eel", "dog", "dog", "cat"]
    answer = store.add_arrays("rgb", images[:4], names[:4])
    assert answer == {"added": 4, "count": 4, "counts": {"cat": 2, "dog": 1, "eel": 1}}
    answer = store.add_arrays("rgb", images[4:], names[4:])
    assert answer == {"added": 3, "count": 7, "counts": {"cat": 3, "dog": 3, "eel": 1}}

    reopened = make_store()  # a new engine: nothing cached in memory
    info = reopened.get("rgb")
    assert info["count"] == 7
    assert info["categories"] == [{"name": "cat", "count": 3}, {"name": "dog", "count": 3},
                                  {"name": "eel", "count": 1}]
    ds = reopened.dataset("rgb")
    assert isinstance(ds, dicebox.Dataset)
    assert len(ds) == 7 and ds.shape == (3, 3, 5) and ds.categories == ["cat", "dog", "eel"]
    np.testing.assert_array_equal(ds.images, images)
    assert [ds.categories[i] for i in ds.labels] == names
    assert ds.counts() == {"cat": 3, "dog": 3, "eel": 1}
    # The packed files hold exactly the committed images.
    assert (store.root / "rgb" / PIXELS_FILE).stat().st_size == 7 * 3 * 3 * 5
    assert (store.root / "rgb" / LABELS_FILE).stat().st_size == 7 * 8


def test_categories_declared_first_then_by_first_appearance(store):
    store.create("d", 6, 4, 1, ["zeta", "alpha"])
    store.add_arrays("d", uniform(4, 0), ["mid", "alpha", "new", "mid"])
    info = store.get("d")
    assert [c["name"] for c in info["categories"]] == ["zeta", "alpha", "mid", "new"]
    assert info["counts"] == {"zeta": 0, "alpha": 1, "mid": 2, "new": 1}
    ds = store.dataset("d")
    assert ds.labels.tolist() == [2, 1, 3, 2]


def test_add_encoded_decodes_to_the_dataset_shape(store):
    store.create("grey", 8, 6, 1)
    colour = noise(30, 40, 1)
    png, jpeg = encode(colour), encode(noise(12, 16, 2), "JPEG")
    answer = store.add_encoded("grey", [("a", png, "first"), ("b", jpeg, "second")])
    assert answer == {"added": 2, "count": 2, "counts": {"a": 1, "b": 1}}
    ds = store.dataset("grey")
    np.testing.assert_array_equal(ds.images[0], decode_image(png, (8, 6), 1))
    np.testing.assert_array_equal(ds.images[1], decode_image(jpeg, (8, 6), 1))


def test_list_pages_by_name(store):
    for name in ["b", "a", "c"]:
        store.create(name, 4, 4, 1)
    first = store.list(limit=2)
    assert [d["name"] for d in first["items"]] == ["a", "b"] and first["next"]
    second = store.list(limit=2, cursor=first["next"])
    assert [d["name"] for d in second["items"]] == ["c"] and second["next"] is None
    with pytest.raises(InvalidInput, match="cursor"):
        store.list(cursor="not a cursor!")
    with pytest.raises(InvalidInput, match="limit"):
        store.list(limit=0)


# ---------------------------------------------------------------------------------------------
# concurrency and crashes

def test_concurrent_appends_lose_and_tear_nothing(backend):
    store, make_store = backend
    other = make_store()  # a second "process": its own engine and in-process locks
    store.create("c", 6, 4, 1)
    threads, rounds, per = 5, 10, 3  # 5 categories: the limit
    errors = []

    def work(t: int) -> None:
        target = store if t % 2 else other
        try:
            for r in range(rounds):
                first = (t * rounds + r) * per  # every image gets its own fill value
                target.add_arrays("c", uniform(per, first), [f"t{t}"] * per)
        except Exception as exc:  # noqa: BLE001 - reported below, not lost in the thread
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == []
    total = threads * rounds * per
    info = store.get("c")
    assert info["count"] == total
    assert info["counts"] == {f"t{t}": rounds * per for t in range(threads)}
    ds = store.dataset("c")
    values = ds.images.reshape(total, -1)
    assert (values == values[:, :1]).all(), "an image mixes pixels of two appends"
    assert sorted(values[:, 0].tolist()) == list(range(total)), "an image was lost or doubled"
    for value, label in zip(values[:, 0], ds.labels):
        assert ds.categories[label] == f"t{value // (rounds * per)}"


def test_torn_write_is_ignored_then_overwritten(backend):
    store, make_store = backend
    store.create("t", 6, 4, 1)
    store.add_arrays("t", uniform(2, 10), ["a", "b"])
    pixels, labels = store.root / "t" / PIXELS_FILE, store.root / "t" / LABELS_FILE
    # A crash while appending: half an image and part of a label past the committed count.
    with open(pixels, "ab") as f:
        f.write(b"\xee" * 36)
    with open(labels, "ab") as f:
        f.write(b"\x07\x00\x00")
    reopened = make_store()
    assert reopened.get("t")["count"] == 2
    ds = reopened.dataset("t")
    assert len(ds) == 2 and ds.images[:, 0, 0, 0].tolist() == [10, 11]
    reopened.add_arrays("t", uniform(1, 50), ["c"])
    ds = reopened.dataset("t")
    assert ds.images[:, 0, 0, 0].tolist() == [10, 11, 50]
    assert (ds.images[2] == 50).all() and ds.categories[ds.labels[2]] == "c"
    assert pixels.stat().st_size == 3 * 24 and labels.stat().st_size == 3 * 8


def test_crash_between_write_and_commit_keeps_the_old_count(store, monkeypatch):
    store.create("k", 6, 4, 1)
    store.add_arrays("k", uniform(1, 1), ["a"])
    write_files = store._write_files

    def write_then_die(*args):
        write_files(*args)  # the bytes reach the disk ...
        raise RuntimeError("power cut")  # ... but the count is never committed

    monkeypatch.setattr(store, "_write_files", write_then_die)
    with pytest.raises(RuntimeError, match="power cut"):
        store.add_arrays("k", uniform(3, 100), ["b", "b", "b"])
    monkeypatch.undo()
    info = store.get("k")
    assert info["count"] == 1 and info["counts"] == {"a": 1}
    assert (store.root / "k" / PIXELS_FILE).stat().st_size == 4 * 24  # trailing, uncommitted
    store.add_arrays("k", uniform(1, 7), ["c"])
    ds = store.dataset("k")
    assert ds.images[:, 0, 0, 0].tolist() == [1, 7] and ds.categories == ["a", "c"]


# ---------------------------------------------------------------------------------------------
# versions and exports

def test_versions_are_prefixes_with_stable_etags(store):
    store.create("v", 6, 4, 1, ["declared"])
    assert store.export_info("v", 0)["categories"] == ["declared"]
    store.add_arrays("v", uniform(3, 0), ["a", "declared", "a"])
    store.add_arrays("v", uniform(2, 3), ["b", "a"])
    three = store.export_info("v", 3)
    assert three["version"] == 3 and three["categories"] == ["declared", "a"]
    assert three["shape"] == [1, 4, 6]
    etag = three["etag"]
    assert etag.startswith('"') and etag.endswith('"') and not etag.startswith('W/')
    newest = store.export_info("v")
    assert newest["version"] == 5 and newest["categories"] == ["declared", "a", "b"]
    assert newest["etag"] != etag
    old = store.dataset("v", 3)
    assert len(old) == 3 and old.categories == ["declared", "a"]
    assert old.images[:, 0, 0, 0].tolist() == [0, 1, 2] and old.labels.tolist() == [1, 0, 1]
    store.add_arrays("v", uniform(1, 9), ["c"])
    assert store.export_info("v", 3)["etag"] == etag  # a version never changes
    assert store.export_info("v", 5) == newest


def test_export_is_built_once_and_reused(store):
    store.create("e", 6, 4, 1)
    store.add_arrays("e", uniform(4, 0), ["a", "b", "a", "b"])
    first = store.export("e")
    inode = os.stat(first["path"]).st_ino
    again = store.export("e")
    assert again == first and os.stat(again["path"]).st_ino == inode
    assert first["size"] == Path(first["path"]).stat().st_size
    loaded = dicebox.Dataset.load(first["path"])
    assert len(loaded) == 4 and loaded.categories == ["a", "b"]


def test_old_exports_are_pruned_and_rebuilt_identically(store):
    store.create("p", 6, 4, 1)
    store.add_arrays("p", uniform(8, 0), list("abababab"))
    first = store.export("p", 1)
    original = Path(first["path"]).read_bytes()
    for version in range(2, 3 + KEEP_EXPORTS):
        store.export("p", version)
    kept = sorted((store.root / "p" / "exports").glob("*.dbx"))
    assert len(kept) == KEEP_EXPORTS
    assert not Path(first["path"]).exists()
    rebuilt = store.export("p", 1)
    assert rebuilt["etag"] == first["etag"]
    assert Path(rebuilt["path"]).read_bytes() == original  # strong ETag: same bytes


def test_bad_versions(store):
    store.create("b", 6, 4, 1)
    with pytest.raises(Conflict, match="no categories at version 0"):
        store.export("b")
    store.add_arrays("b", uniform(2, 0), ["a", "a"])
    with pytest.raises(NotFound, match="has no version 3: it holds 2 images"):
        store.export_info("b", 3)
    with pytest.raises(NotFound, match="has no version 3"):
        store.dataset("b", 3)
    with pytest.raises(InvalidInput, match="version must be an integer"):
        store.export("b", -1)
    with pytest.raises(NotFound, match="'nope' does not exist"):
        store.export("nope")
    assert not (store.root / "b" / "exports").exists()


# ---------------------------------------------------------------------------------------------
# bad input: a clear error, and nothing changed

@pytest.mark.parametrize("name", ["", "-dash", ".hidden", "a/b", "a..b", "x" * 65, "sp ace",
                                  "new\nline", "..", "a\\b", 7, None])
def test_bad_dataset_names(store, name):
    with pytest.raises(InvalidInput, match="dataset name must be 1-64 letters"):
        store.create(name, 4, 4, 1)
    with pytest.raises(InvalidInput, match="dataset name"):
        store.get(name)
    assert store.list()["items"] == []
    assert not store.root.exists() or not any(store.root.iterdir())


@pytest.mark.parametrize("kwargs, message", [
    ({"width": 0}, "width must be an integer in 1..64, got 0"),
    ({"width": 65}, "width must be an integer in 1..64, got 65"),
    ({"height": -1}, "height must be an integer in 1..64"),
    ({"height": True}, "height must be an integer"),
    ({"width": 4.0}, "width must be an integer"),
    ({"channels": 2}, "channels must be 1 \\(grey\\) or 3 \\(RGB\\), got 2"),
    ({"categories": ["a", "a"]}, "'a' is listed twice"),
    ({"categories": ["a", "b/c"]}, "categories\\[1\\] must be 1-64 printable"),
    ({"categories": list("abcdef")}, "6 given, more than the limit of 5"),
    ({"categories": "abc"}, "categories must be a list"),
])
def test_bad_shapes(store, kwargs, message):
    args = {"name": "s", "width": 4, "height": 4, "channels": 1} | kwargs
    with pytest.raises(InvalidInput, match=message):
        store.create(**args)
    assert store.list()["items"] == []


@pytest.mark.parametrize("category", ["", "x" * 65, "a/b", "a\\b", "tab\there", "nul\x00",
                                      "bell\x07", 5, None])
def test_bad_category_names(store, category):
    store.create("c", 6, 4, 1)
    store.add_arrays("c", uniform(1, 0), ["ok"])
    before = state(store, "c")
    with pytest.raises(InvalidInput, match="must be 1-64 printable characters"):
        store.add_arrays("c", uniform(2, 0), ["fine", category])
    with pytest.raises(InvalidInput, match="category of item 0 must be 1-64 printable"):
        store.add_encoded("c", [(category, encode(noise(4, 6, 1, 1)), "item 0")])
    assert state(store, "c") == before


def test_bad_arrays(store):
    store.create("a", 6, 4, 1)
    before = state(store, "a")
    with pytest.raises(InvalidInput, match="uint8 numpy array"):
        store.add_arrays("a", uniform(1, 0).astype(np.float32), ["x"])
    with pytest.raises(InvalidInput, match=r"expected shape \[N, 1, 4, 6\]"):
        store.add_arrays("a", uniform(1, 0, shape=(3, 4, 6)), ["x"])
    with pytest.raises(InvalidInput, match="one category per image"):
        store.add_arrays("a", uniform(2, 0), ["x"])
    with pytest.raises(NotFound, match="dataset 'b' does not exist"):
        store.add_arrays("b", uniform(1, 0), ["x"])
    assert state(store, "a") == before


def test_too_many_categories_is_refused_whole(store):
    store.create("m", 6, 4, 1, ["a", "b", "c"])
    before = state(store, "m")
    with pytest.raises(InvalidInput, match="would have 6 categories, more than the limit of 5"):
        store.add_arrays("m", uniform(3, 0), ["d", "e", "f"])
    with pytest.raises(InvalidInput, match="would have 6 categories"):
        store.add_encoded("m", [(c, encode(noise(4, 6, 1, 1)), c) for c in "def"])
    assert state(store, "m") == before
    store.add_arrays("m", uniform(2, 0), ["d", "e"])  # up to the limit is fine
    assert store.get("m")["count"] == 2


@pytest.mark.parametrize("bad, error, message", [
    (corrupt_png(), InvalidInput, "cannot read image 'bad.png': broken data stream"),
    (truncated_jpeg(), InvalidInput, "cannot read image 'bad.png': "),
    (encode(noise(8, 8, 3), "GIF"), InvalidInput, "'bad.png': not a PNG or JPEG image"),
    (encode(noise(8, 8, 3), "BMP"), InvalidInput, "'bad.png': not a PNG or JPEG image"),
    (b"", InvalidInput, "not a PNG or JPEG"),
    (b"hello, not an image", InvalidInput, "not a PNG or JPEG"),
    (encode(noise(96, 96, 4)), TooLarge, "'bad.png' is larger than the limit of 16384 bytes"),
    (encode(np.zeros((400, 400), np.uint8)), TooLarge,
     "'bad.png' is 400 x 400 = 160000 pixels, more than the limit of 100000"),
    (png_header_only(20000, 20000), TooLarge, "'bad.png' has more pixels than the limit"),
    (png_header_only(1000, 1000), TooLarge, "1000 x 1000 = 1000000 pixels"),
])
def test_bad_images_store_nothing(store, bad, error, message):
    store.create("i", 6, 4, 1)
    store.add_arrays("i", uniform(1, 0), ["a"])
    before = state(store, "i")
    good = encode(noise(4, 6, 1, 1))
    items = [("a", good, "good.png"), ("b", bad, "bad.png"), ("a", good, "good2.png")]
    with pytest.raises(error, match=message) as caught:
        store.add_encoded("i", items)
    assert caught.value.detail["name"] == "bad.png"
    assert state(store, "i") == before
    assert store.get("i")["counts"] == {"a": 1}  # category "b" not added either


def test_too_many_or_no_items(store):
    store.create("n", 6, 4, 1)
    before = state(store, "n")
    good = encode(noise(4, 6, 1, 1))
    with pytest.raises(TooLarge, match="21 images in one request, more than the limit of 20"):
        store.add_encoded("n", [("a", good, str(i)) for i in range(21)])
    with pytest.raises(InvalidInput, match="no images given"):
        store.add_encoded("n", [])
    with pytest.raises(InvalidInput, match="expected encoded bytes, got str"):
        store.add_encoded("n", [("a", "aGVsbG8=", "text")])
    with pytest.raises(NotFound, match="'other' does not exist"):
        store.add_encoded("other", [("a", good, "x")])
    assert state(store, "n") == before
    assert store.add_encoded("n", [("a", good, str(i)) for i in range(20)])["count"] == 20
