"""The original dicebox services' API (dicebox.server.routes.compat): paths, bodies, answers,
the API-ACCESS-KEY check, datasets made on first store, batch orders, classification and
train requests, and bad input refused with a 4xx that changes nothing."""

from __future__ import annotations

import base64
import io
import json
import os
import uuid

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import dicebox
from dicebox.errors import NotFound
from dicebox.jobspec import TrainParams, check_genome
from dicebox.server import create_app
from dicebox.server.routes import compat
from dicebox.settings import Settings

KEY = "k"
# The original clients always sent an API-VERSION; its value no longer matters.
HEADERS = {"API-ACCESS-KEY": KEY, "API-VERSION": "0.2.2"}
MLP = {"optimizer": {"name": "adam", "learning_rate": 0.01},
       "layers": [{"type": "dense", "size": 16, "activation": "relu"}]}


def png(pixels: np.ndarray) -> bytes:
    """PNG bytes of uint8 [H, W] (grey) or [H, W, 3] (RGB) pixels."""
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(out, "PNG")
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def pattern(seed: int, height: int = 8, width: int = 8) -> np.ndarray:
    """A distinct grey image per seed, not symmetric (so a transposition shows)."""
    return np.random.default_rng(seed).integers(0, 256, size=(height, width), dtype=np.uint8)


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error", "detail"} and isinstance(body["error"], str) and body["error"]
    return body


@pytest.fixture
def make_client(tmp_path):
    started: list[TestClient] = []

    def make(**overrides) -> TestClient:
        settings = Settings(home=tmp_path / f"home{len(started)}", api_key=KEY, **overrides)
        client = TestClient(create_app(settings))
        client.__enter__()
        started.append(client)
        return client

    yield make
    for client in started:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()


def services(client: TestClient):
    return client.app.state.services


def count_of(client: TestClient, name: str = "dicebox") -> int:
    return services(client).sensory.get(name)["count"]


def store(client: TestClient, category, pixels: np.ndarray, name: str = "dicebox",
          width: int = 8, height: int = 8):
    body = {"name": name, "width": width, "height": height, "category": category,
            "data": b64(png(pixels))}
    return client.post("/api/sensory/store", json=body, headers=HEADERS)


def fill(client: TestClient, images: dict[str, np.ndarray]) -> None:
    """Store ``{category: pixels}`` in the default dataset, in that order."""
    for category, pixels in images.items():
        assert store(client, category, pixels).json() == {"sensory_store": True}


def orders_dir(client: TestClient):
    return services(client).settings.home / "compat" / "batches"


def order_files(client: TestClient) -> list[str]:
    folder = orders_dir(client)
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ---------------------------------------------------------------------------------------------
# open paths and the key

def test_health_plain_and_version_are_open(client):
    health = client.get("/health/plain")
    assert health.status_code == 200 and health.text == "true"
    assert health.headers["content-type"].startswith("text/plain")
    version = client.get("/api/version")
    assert version.status_code == 200 and version.json() == {"version": dicebox.__version__}


KEYED = [("POST", "/api/sensory/store"), ("GET", "/api/sensory/category"),
         ("POST", "/api/sensory/request"), ("POST", "/api/sensory/batch"),
         ("POST", "/api/sensory/poll"), ("POST", "/api/classify"), ("GET", "/api/category"),
         ("GET", "/api/train/request")]


@pytest.mark.parametrize(("method", "path"), KEYED)
def test_api_paths_need_the_key(client, method, path):
    wrong = {"API-ACCESS-KEY": "wrong", "API-VERSION": "0.2.2"}
    for headers in ({}, {"API-VERSION": "0.2.2"}, wrong):
        response = client.request(method, path, headers=headers, json={})
        assert response.status_code == 401, (headers, response.text)
        error_of(response)
    assert services(client).queue.list()["items"] == []
    assert order_files(client) == []


def test_any_api_version_is_accepted(client):
    for headers in (HEADERS, {"API-ACCESS-KEY": KEY}, {"API-ACCESS-KEY": KEY, "API-VERSION": "9.9"},
                    {"Authorization": f"Bearer {KEY}"}):
        response = client.get("/api/sensory/category", headers=headers)
        assert response.status_code == 200 and response.json() == {"category_map": {}}


# ---------------------------------------------------------------------------------------------
# store and the category maps

def test_store_creates_the_dataset_on_first_use(client):
    sensory = services(client).sensory
    with pytest.raises(NotFound):
        sensory.get("dicebox")
    first, second = pattern(1), pattern(2)
    response = store(client, "one", first)
    assert response.status_code == 200 and response.json() == {"sensory_store": True}
    info = sensory.get("dicebox")
    assert (info["width"], info["height"], info["channels"], info["count"]) == (8, 8, 1, 1)
    # A number as category is its decimal string; the base64 may be wrapped in lines, as
    # Python 2's str.encode('base64') did in the original clients.
    body = {"name": "dicebox", "width": 8, "height": 8, "category": 2,
            "data": base64.encodebytes(png(second)).decode()}
    assert "\n" in body["data"]
    response = client.post("/api/sensory/store", json=body, headers=HEADERS)
    assert response.json() == {"sensory_store": True}
    info = sensory.get("dicebox")
    assert info["count"] == 2 and info["counts"] == {"one": 1, "2": 1}
    ds = sensory.dataset("dicebox")
    np.testing.assert_array_equal(ds.images[:, 0], np.stack([first, second]))
    # An RGB image goes into the grey dataset as grey.
    rgb = np.stack([first] * 3, axis=-1)
    assert store(client, "one", rgb).status_code == 200
    np.testing.assert_array_equal(sensory.dataset("dicebox").images[2, 0], first)


def test_store_names_its_dataset_and_size(client):
    response = store(client, "a", pattern(1, 12, 16), name="other", width=16, height=12)
    assert response.status_code == 200
    info = services(client).sensory.get("other")
    assert (info["width"], info["height"], info["channels"], info["count"]) == (16, 12, 1, 1)
    # The default dataset is untouched; an image of another size is resized to the dataset's.
    with pytest.raises(NotFound):
        services(client).sensory.get("dicebox")
    response = store(client, "a", pattern(2, 30, 30), name="other", width=16, height=12)
    assert response.status_code == 200
    assert count_of(client, "other") == 2


def test_store_refuses_another_size_for_an_existing_dataset(client):
    fill(client, {"a": pattern(1)})
    response = store(client, "a", pattern(2, 16, 16), width=16, height=16)
    assert response.status_code == 409
    assert "8 x 8" in error_of(response)["error"]
    assert count_of(client) == 1


def gif() -> bytes:
    out = io.BytesIO()
    Image.fromarray(pattern(3)).save(out, "GIF")
    return out.getvalue()


GOOD = {"name": "dicebox", "width": 8, "height": 8, "category": "a"}
BAD_STORES = [
    ("no name", {k: v for k, v in GOOD.items() if k != "name"}, "name"),
    ("no width", {k: v for k, v in GOOD.items() if k != "width"}, "width"),
    ("no height", {k: v for k, v in GOOD.items() if k != "height"}, "height"),
    ("no category", {k: v for k, v in GOOD.items() if k != "category"}, "category"),
    ("path name", {**GOOD, "name": "../x"}, "name"),
    ("zero width", {**GOOD, "width": 0}, "width"),
    ("huge width", {**GOOD, "width": 100_000}, "width"),
    ("string height", {**GOOD, "height": "8"}, "height"),
    ("bool height", {**GOOD, "height": True}, "height"),
    ("slash category", {**GOOD, "category": "a/b"}, "category"),
    ("empty category", {**GOOD, "category": ""}, "category"),
    ("list category", {**GOOD, "category": ["a"]}, "category"),
]
BAD_DATA = [
    ("no data", None, "data"),
    ("number", 123, "data"),
    ("not base64", "@@@not base64@@@", "base64"),
    ("empty", "", "data"),
    ("text", b64(b"hello, not an image"), "PNG"),
    ("gif", b64(gif()), "PNG"),
    ("truncated png", b64(png(pattern(4))[:40]), "data"),
]


def _bad_store_bodies():
    for label, body, field in BAD_STORES:
        yield pytest.param({**body, "data": b64(png(pattern(9)))}, field, id=label)
    for label, data, field in BAD_DATA:
        body = dict(GOOD) if data is None else {**GOOD, "data": data}
        yield pytest.param(body, field, id=label)


@pytest.mark.parametrize(("body", "field"), list(_bad_store_bodies()))
def test_bad_store_is_refused_and_stores_nothing(make_client, body, field):
    fresh = make_client()
    response = fresh.post("/api/sensory/store", json=body, headers=HEADERS)
    assert response.status_code == 400, response.text
    assert field in error_of(response)["error"]
    with pytest.raises(NotFound):  # not even created
        services(fresh).sensory.get("dicebox")
    # The same into an existing dataset: nothing added.
    fill(fresh, {"a": pattern(1)})
    into_existing = body if field == "name" else {**body, "name": "dicebox"}
    response = fresh.post("/api/sensory/store", json=into_existing, headers=HEADERS)
    assert response.status_code == 400
    assert count_of(fresh) == 1


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b"", b"\xff\xfe"])
def test_store_needs_a_json_object(client, raw):
    response = client.post("/api/sensory/store", content=raw, headers=HEADERS)
    assert response.status_code == 400 and "body" in error_of(response)["error"]
    with pytest.raises(NotFound):
        services(client).sensory.get("dicebox")


def test_store_refuses_an_image_over_the_byte_limit(make_client):
    small = make_client(max_image_bytes=2048)
    noisy = png(pattern(5, 64, 64))
    assert len(noisy) > 2048
    response = store(small, "a", pattern(5, 64, 64))
    assert response.status_code == 413 and "DICEBOX_MAX_IMAGE_BYTES" in error_of(response)["error"]
    with pytest.raises(NotFound):
        services(small).sensory.get("dicebox")


def test_category_maps(client):
    assert client.get("/api/sensory/category", headers=HEADERS).json() == {"category_map": {}}
    assert client.get("/api/category", headers=HEADERS).json() == {"category_map": {}}
    fill(client, {"b": pattern(1), "a": pattern(2), "c": pattern(3)})
    sensory_map = client.get("/api/sensory/category", headers=HEADERS)
    assert sensory_map.status_code == 200
    assert sensory_map.json() == {"category_map": {"b": 0, "a": 1, "c": 2}}
    classification_map = client.get("/api/category", headers=HEADERS)
    assert classification_map.status_code == 200
    assert classification_map.json() == {"category_map": {"0": "b", "1": "a", "2": "c"}}


# ---------------------------------------------------------------------------------------------
# sensory requests

def sensory_request(client: TestClient, batch_size: int, noise: float = 0.0):
    return client.post("/api/sensory/request", json={"batch_size": batch_size, "noise": noise},
                       headers=HEADERS)

def decode_item(label: list[float], data: list[int], categories: list[str], height: int = 8,
                width: int = 8) -> tuple[str, np.ndarray]:
    """The category of a one-hot label and the [H, W] image of column-by-column pixels."""
    assert sorted(label) == [0.0] * (len(label) - 1) + [1.0] and len(label) == len(categories)
    assert all(isinstance(v, float) for v in label)
    assert len(data) == height * width and all(isinstance(v, int) and 0 <= v <= 255 for v in data)
    return categories[label.index(1.0)], np.array(data, dtype=np.uint8).reshape(width, height).T


def test_sensory_request_answers_one_hot_labels_and_flat_data(client):
    images = {"a": pattern(1), "b": pattern(2), "c": pattern(3)}
    fill(client, images)
    response = sensory_request(client, 3)
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"labels", "data"} and len(body["labels"]) == len(body["data"]) == 3
    seen = set()
    for label, data in zip(body["labels"], body["data"], strict=True):
        category, pixels = decode_item(label, data, ["a", "b", "c"])
        np.testing.assert_array_equal(pixels, images[category])
        seen.add(category)
    assert seen == {"a", "b", "c"}  # drawn without replacement


def test_sensory_request_pixel_order_is_the_originals(client):
    # The original listed pixels x outer, y inner: column by column.
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8)
    fill(client, {"a": pixels})
    data = client.post("/api/sensory/request", json={"batch_size": 1, "noise": 0.0},
                       headers=HEADERS).json()["data"][0]
    assert data[:9] == [0, 8, 16, 24, 32, 40, 48, 56, 1]
    assert data == pixels.T.reshape(-1).tolist()


def test_sensory_request_with_noise_keeps_the_shape(client):
    fill(client, {"a": pattern(1), "b": pattern(2)})
    body = client.post("/api/sensory/request", json={"batch_size": 2, "noise": 1.0},
                       headers=HEADERS).json()
    for label, data in zip(body["labels"], body["data"], strict=True):
        decode_item(label, data, ["a", "b"])
    # noise may be left out (the original required it): no distortion then.
    body = client.post("/api/sensory/request", json={"batch_size": 1}, headers=HEADERS)
    assert body.status_code == 201


def test_distort():
    rng = np.random.default_rng(0)
    image = pattern(1, 10, 12)[None]
    assert compat._distort(image, 0.0, rng) is image
    for _ in range(10):
        out = compat._distort(image, 1.0, rng)
        assert out.shape == image.shape and out.dtype == np.uint8
    assert not np.array_equal(compat._distort(image, 1.0, rng), image)
    rgb = np.stack([pattern(i, 10, 12) for i in range(3)])
    assert compat._distort(rgb, 1.0, rng).shape == (3, 10, 12)


@pytest.mark.parametrize(("body", "field"), [
    ({"noise": 0}, "batch_size"),
    ({"batch_size": 0, "noise": 0}, "batch_size"),
    ({"batch_size": compat.MAX_REQUEST_BATCH + 1, "noise": 0}, "batch_size"),
    ({"batch_size": "2", "noise": 0}, "batch_size"),
    ({"batch_size": 1.5, "noise": 0}, "batch_size"),
    ({"batch_size": 3, "noise": 0}, "batch_size"),  # more than the 2 images there are
    ({"batch_size": 1, "noise": 2}, "noise"),
    ({"batch_size": 1, "noise": "lots"}, "noise"),
    ({"batch_size": 1, "noise": -0.1}, "noise"),
])
def test_bad_sensory_request(client, body, field):
    fill(client, {"a": pattern(1), "b": pattern(2)})
    response = client.post("/api/sensory/request", json=body, headers=HEADERS)
    assert response.status_code == 400
    assert field in error_of(response)["error"]


def test_sensory_request_bounds_the_answer(client, monkeypatch):
    fill(client, {"a": pattern(1), "b": pattern(2)})
    monkeypatch.setattr(compat, "MAX_REQUEST_VALUES", 100)  # 2 images of 8 x 8 are 128
    response = sensory_request(client, 2)
    assert response.status_code == 400 and "batch_size" in error_of(response)["error"]


def test_sensory_paths_without_the_default_dataset(client):
    for path, body in (("/api/sensory/request", {"batch_size": 1, "noise": 0}),
                       ("/api/sensory/batch", {"batch_size": 1, "noise": 0})):
        response = client.post(path, json=body, headers=HEADERS)
        assert response.status_code == 404
        assert "DICEBOX_DEFAULT_DATASET" in error_of(response)["error"]
    assert order_files(client) == []


# ---------------------------------------------------------------------------------------------
# batch orders

def batch(client: TestClient, size: int, noise: float = 0.0) -> str:
    response = client.post("/api/sensory/batch", json={"batch_size": size, "noise": noise},
                           headers=HEADERS)
    assert response.status_code == 202, response.text
    body = response.json()
    assert set(body) == {"batch_id"}
    uuid.UUID(body["batch_id"])
    return body["batch_id"]


def poll(client: TestClient, batch_id) -> dict:
    response = client.post("/api/sensory/poll", json={"batch_id": batch_id}, headers=HEADERS)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"label", "data"}
    return body


EMPTY = {"label": None, "data": None}


def test_batch_then_one_item_per_poll_until_empty(client):
    images = {str(i): pattern(i) for i in range(5)}
    fill(client, images)
    batch_id = batch(client, 5)
    seen = []
    for _ in range(5):
        item = poll(client, batch_id)
        category, pixels = decode_item(item["label"], item["data"], list(images))
        np.testing.assert_array_equal(pixels, images[category])
        seen.append(category)
    assert sorted(seen) == sorted(images)  # every image once
    assert poll(client, batch_id) == EMPTY
    assert poll(client, batch_id) == EMPTY
    assert order_files(client) == []  # the used-up order is gone


def test_batch_orders_are_independent_and_keep_their_version(client):
    fill(client, {"a": pattern(1), "b": pattern(2)})
    first, second = batch(client, 2), batch(client, 1, noise=0.5)
    assert first != second
    # An image of a new category arrives after the orders: they keep the version they drew.
    fill(client, {"c": pattern(3)})
    a = poll(client, first)
    b = poll(client, second)
    c = poll(client, first)
    for item in (a, b, c):
        assert len(item["label"]) == 2 and len(item["data"]) == 64
    assert {decode_item(a["label"], a["data"], ["a", "b"])[0],
            decode_item(c["label"], c["data"], ["a", "b"])[0]} == {"a", "b"}
    assert poll(client, first) == EMPTY and poll(client, second) == EMPTY


def test_poll_of_unknown_orders(client):
    fill(client, {"a": pattern(1)})
    batch_id = batch(client, 1)
    for unknown in (str(uuid.uuid4()), "not-a-uuid", "../../../etc/passwd", ""):
        assert poll(client, unknown) == EMPTY
    assert order_files(client) == [f"{batch_id}.order"]  # untouched
    assert poll(client, batch_id.upper())["data"] is not None  # the same uuid
    assert poll(client, batch_id) == EMPTY


@pytest.mark.parametrize("body", [{}, {"batch_id": 5}, {"batch_id": ["x"]}, {"batch_id": None}])
def test_bad_poll(client, body):
    response = client.post("/api/sensory/poll", json=body, headers=HEADERS)
    assert response.status_code == 400 and "batch_id" in error_of(response)["error"]


@pytest.mark.parametrize(("body", "field"), [
    ({"noise": 0}, "batch_size"),
    ({"batch_size": compat.MAX_ORDER_BATCH + 1, "noise": 0}, "batch_size"),
    ({"batch_size": 3, "noise": 0}, "batch_size"),  # more than the 2 images there are
    ({"batch_size": 1, "noise": 1.5}, "noise"),
])
def test_bad_batch_orders_nothing(client, body, field):
    fill(client, {"a": pattern(1), "b": pattern(2)})
    response = client.post("/api/sensory/batch", json=body, headers=HEADERS)
    assert response.status_code == 400 and field in error_of(response)["error"]
    assert order_files(client) == []


def test_unused_orders_expire(client):
    fill(client, {"a": pattern(1), "b": pattern(2)})
    batch_id = batch(client, 2)
    path = orders_dir(client) / f"{batch_id}.order"
    old = path.stat().st_mtime - compat.ORDER_TTL_SECONDS - 1
    os.utime(path, (old, old))
    assert poll(client, batch_id) == EMPTY
    assert not path.exists()


def test_pending_orders_are_bounded(client, monkeypatch):
    fill(client, {"a": pattern(1)})
    monkeypatch.setattr(compat, "MAX_PENDING_ORDERS", 2)
    batch(client, 1)
    kept = batch(client, 1)
    response = client.post("/api/sensory/batch", json={"batch_size": 1, "noise": 0},
                           headers=HEADERS)
    assert response.status_code == 429 and "poll" in error_of(response)["error"]
    assert len(order_files(client)) == 2
    poll(client, kept)  # used up: room for one more
    batch(client, 1)


# ---------------------------------------------------------------------------------------------
# classification

@pytest.fixture(scope="module")
def dice_model(tmp_path_factory):
    """A small model trained on dice (16 x 16 grey), saved to a directory, with its data."""
    dice = dicebox.datasets.make_dice(count=300, size=16, seed=0)
    model = dicebox.train(MLP, dice, epochs=2, batch_size=32, patience=0, seed=0, threads=1)
    folder = tmp_path_factory.mktemp("model")
    model.save(folder)
    return dice, model, folder


def install_dice(client: TestClient, dice: dicebox.Dataset) -> None:
    sensory = services(client).sensory
    sensory.create("dicebox", 16, 16, 1, categories=list(dice.categories))
    names = [dice.categories[i] for i in dice.labels]
    sensory.add_arrays("dicebox", np.asarray(dice.images), names)


def test_classify_answers_the_category_index(client, dice_model):
    dice, model, folder = dice_model
    install_dice(client, dice)
    image = {"data": b64(png(dice.images[0, 0]))}
    response = client.post("/api/classify", json=image, headers=HEADERS)
    assert response.status_code == 404 and "model" in error_of(response)["error"]

    services(client).registry.register(None, folder, dataset="dicebox", dataset_version=len(dice))
    category_map = client.get("/api/category", headers=HEADERS).json()["category_map"]
    for i in range(5):
        response = client.post("/api/classify", json={"data": b64(png(dice.images[i, 0]))},
                               headers=HEADERS)
        assert response.status_code == 200
        body = response.json()
        assert set(body) == {"classification"} and isinstance(body["classification"], int)
        expected = model.classify(np.asarray(dice.images[i:i + 1]))[0]
        assert category_map[str(body["classification"])] == expected


def test_classify_without_the_default_dataset(client):
    response = client.post("/api/classify", json={"data": b64(png(pattern(1)))}, headers=HEADERS)
    assert response.status_code == 404 and "model" in error_of(response)["error"]


@pytest.mark.parametrize(("body", "field"), [
    ({}, "data"),
    ({"data": 7}, "data"),
    ({"data": "%%%"}, "base64"),
    ({"data": b64(b"plain text")}, "PNG"),
    ({"data": b64(gif())}, "PNG"),
])
def test_bad_classify(client, dice_model, body, field):
    dice, _, folder = dice_model
    install_dice(client, dice)
    services(client).registry.register(None, folder, dataset="dicebox", dataset_version=len(dice))
    response = client.post("/api/classify", json=body, headers=HEADERS)
    assert response.status_code == 400 and field in error_of(response)["error"]


# ---------------------------------------------------------------------------------------------
# train requests

def test_train_request_queues_the_default_genome_on_the_default_dataset(client):
    response = client.get("/api/train/request", headers=HEADERS)
    assert response.status_code == 404 and "DICEBOX_DEFAULT_DATASET" in error_of(response)["error"]
    dice = dicebox.datasets.make_dice(count=60, size=16, seed=1)
    install_dice(client, dice)
    response = client.get("/api/train/request", headers=HEADERS)
    assert response.status_code == 202
    body = response.json()
    assert set(body) == {"training_request_id"}
    job = services(client).queue.get(body["training_request_id"])
    assert (job["kind"], job["status"]) == ("train", "queued")
    payload = job["payload"]
    assert payload["dataset"] == "dicebox" and payload["version"] == 60
    assert payload["genome"] == dicebox.Genome.from_dict(compat.DEFAULT_GENOME).to_dict()
    assert payload["params"] == TrainParams().model_dump()
    assert payload["init"] is None and payload["evolve"] is None
    # Like the original, every request is a new one; its first versions took a POST.
    again = client.post("/api/train/request", headers=HEADERS)
    assert again.status_code == 202
    assert again.json()["training_request_id"] != body["training_request_id"]
    assert len(services(client).queue.list()["items"]) == 2


def test_configured_default_dataset_and_genome(make_client):
    custom = make_client(default_dataset="dice", default_genome=json.dumps(MLP))
    dice = dicebox.datasets.make_dice(count=30, size=16, seed=2)
    sensory = services(custom).sensory
    sensory.create("dice", 16, 16, 1)
    sensory.add_arrays("dice", np.asarray(dice.images), [dice.categories[i] for i in dice.labels])
    job_id = custom.get("/api/train/request", headers=HEADERS).json()["training_request_id"]
    payload = services(custom).queue.get(job_id)["payload"]
    assert payload["dataset"] == "dice" and payload["version"] == 30
    assert payload["genome"] == dicebox.Genome.from_dict(MLP).to_dict()
    category_map = custom.get("/api/category", headers=HEADERS).json()["category_map"]
    assert sorted(category_map.values()) == sorted({dice.categories[i] for i in dice.labels})
    response = sensory_request(custom, 30)
    assert response.status_code == 201 and len(response.json()["data"][0]) == 16 * 16


def test_train_request_on_too_small_a_dataset_queues_nothing(client):
    fill(client, {"a": pattern(1), "b": pattern(2)})
    response = client.get("/api/train/request", headers=HEADERS)
    assert response.status_code == 400 and "dataset" in error_of(response)["error"]
    assert services(client).queue.list()["items"] == []


def test_train_request_with_a_broken_configured_genome(make_client):
    broken = make_client(default_genome='{"layers": [{"type": "dense"}]}')
    install_dice(broken, dicebox.datasets.make_dice(count=30, size=16, seed=3))
    response = broken.get("/api/train/request", headers=HEADERS)
    assert response.status_code == 500 and "DICEBOX_DEFAULT_GENOME" in error_of(response)["error"]
    assert services(broken).queue.list()["items"] == []


def test_default_genome_suits_the_originals_dataset():
    # The original's dataset: 100 x 100 grey dice in 19 categories; also small images.
    for shape, classes in (((1, 100, 100), 19), ((1, 16, 16), 6), ((1, 6, 6), 2)):
        assert check_genome(compat.DEFAULT_GENOME, shape, classes)


def test_train_request_on_images_too_small_for_the_default_genome(client):
    for i in range(12):
        assert store(client, "ab"[i % 2], pattern(i, 5, 5), width=5, height=5).status_code == 200
    response = client.get("/api/train/request", headers=HEADERS)
    assert response.status_code == 400 and "genome: layers[2]" in error_of(response)["error"]
    assert services(client).queue.list()["items"] == []
