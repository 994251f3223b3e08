"""Classification (dicebox.classifier) and the models REST routes (/v1/models).

The classifier is tested directly against a registry on SQLite; the routes through FastAPI's
TestClient over ``create_app``. Models come from training tiny networks on synthetic dice
(module-scoped). Every refused request is checked for its status and message and for leaving
the registry, the model cache and the counters as they were.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import threading
import time
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import dicebox
from dicebox.classifier import Classifier, declared_size, image_size
from dicebox.db import make_engine, migrate
from dicebox.errors import InvalidInput, NotFound, TooLarge
from dicebox.imagefolder import decode_image
from dicebox.registry import MODEL_FILE, WEIGHTS_FILE, ModelRegistry
from dicebox.settings import Settings

MLP = {"optimizer": {"name": "adam", "learning_rate": 0.01},
       "layers": [{"type": "dense", "size": 16, "activation": "relu"}]}
CATEGORIES = ["1", "2", "3", "4", "5", "6"]
LIMIT_BYTES = 65536  # max_image_bytes of the limited classifiers and servers below


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Saved models: "a", "b", "c" (grey 16x16 dice, different seeds) and "rgb" (3 channels,
    12x12)."""
    root = tmp_path_factory.mktemp("trained")
    dice = dicebox.datasets.make_dice(count=300, size=16, seed=0)
    train, val = dice.split([0.8, 0.2], seed=0)
    out = {}
    for name, seed in (("a", 0), ("b", 1), ("c", 2)):
        model = dicebox.train(MLP, train, val=val, epochs=2, batch_size=32, seed=seed, threads=1)
        out[name] = model.save(root / name)
    rgb = dicebox.datasets.make_dice(count=120, size=12, seed=3, channels=3)
    out["rgb"] = dicebox.train(MLP, rgb, epochs=1, batch_size=32, threads=1).save(root / "rgb")
    return out


@pytest.fixture(scope="module")
def samples() -> np.ndarray:
    """uint8 [8, 1, 16, 16] dice images to classify."""
    return dicebox.datasets.make_dice(count=8, size=16, seed=7).images


def encode(pixels: np.ndarray, fmt: str = "PNG", **options) -> bytes:
    """PNG/JPEG bytes of uint8 [C, H, W] or [H, W] pixels."""
    a = pixels[0] if pixels.ndim == 3 and pixels.shape[0] == 1 else pixels
    if a.ndim == 3:
        a = a.transpose(1, 2, 0)
    out = io.BytesIO()
    Image.fromarray(a).save(out, format=fmt, **options)
    return out.getvalue()


def noise(height: int, width: int, channels: int = 1, seed: int = 3) -> np.ndarray:
    """Random uint8 pixels [channels, height, width]: they compress badly, so files are big."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, size=(channels, height, width), dtype=np.uint8)


def huge_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid 1-bit grey PNG of width x height black pixels, a few tens of kilobytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    row = b"\x00" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def big_png() -> bytes:
    data = huge_png()
    assert len(data) < LIMIT_BYTES  # refused for its pixels, not its bytes
    return data


def expected_answers(model_dir: Path, images: list[bytes], top: int = 5) -> list[dict]:
    """What classify must answer, computed independently: decode_image + Model.predict."""
    model = dicebox.Model.load(model_dir)
    c, h, w = model.input_shape
    batch = np.stack([decode_image(data, (w, h), c) for data in images])
    probabilities = model.predict(batch)
    answers = []
    for row in probabilities:
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))[:top]
        ranked = [{"category": model.categories[i], "probability": float(row[i])} for i in order]
        answers.append({"category": ranked[0]["category"], "probability": ranked[0]["probability"],
                        "top": ranked})
    return answers


@pytest.fixture
def registry(tmp_path) -> ModelRegistry:
    engine = make_engine(f"sqlite:///{tmp_path / 'dicebox.db'}")
    migrate(engine)
    yield ModelRegistry(engine, tmp_path / "models")
    engine.dispose()


@pytest.fixture
def models(registry, model_dirs) -> dict[str, str]:
    """Ids of the registered models: a, b (dataset dice, b the best), rgb (dataset colour)."""
    return {"a": registry.register("job-a", model_dirs["a"], dataset="dice", fitness=0.5)["id"],
            "b": registry.register("job-b", model_dirs["b"], dataset="dice", fitness=0.8)["id"],
            "rgb": registry.register("job-rgb", model_dirs["rgb"], dataset="colour")["id"]}


# -- image headers -------------------------------------------------------------------------------

def test_image_size_reads_png_and_jpeg_headers(samples, big_png):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, size=(3, 37, 53), dtype=np.uint8)
    cases = [encode(pixels, "PNG"), encode(pixels, "JPEG"),
             encode(pixels, "JPEG", progressive=True), encode(pixels[:1], "PNG"),
             encode(pixels[:1], "JPEG", quality=20)]
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotated, still 53 x 37 in the frame header
    cases.append(encode(pixels, "JPEG", exif=exif.tobytes()))
    for data in cases:
        assert image_size(data) == (53, 37) == declared_size(data)
    assert image_size(big_png) == (20000, 20000)
    for garbage in (b"", b"GIF89a....", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff",
                    b"\xff\xd8" + b"\x00" * 40):
        assert image_size(garbage) is None


# -- the classifier ------------------------------------------------------------------------------

def test_classify_answers_in_input_order_as_predict(registry, models, model_dirs, samples):
    classifier = Classifier(registry, capacity=2)
    images = [encode(samples[i]) for i in range(len(samples))]
    images[3] = encode(samples[3], "JPEG", quality=95)
    answers = classifier.classify(models["a"], images)
    assert answers == expected_answers(model_dirs["a"], images)
    assert [a["top"][0] for a in answers] == [
        {"category": a["category"], "probability": a["probability"]} for a in answers]
    # Reversed input, reversed answers: each answer belongs to its image.
    reversed_answers = classifier.classify(models["a"], images[::-1])
    assert reversed_answers == expected_answers(model_dirs["a"], images[::-1])
    assert all(len(a["top"]) == 5 and {x["category"] for x in a["top"]} <= set(CATEGORIES)
               for a in answers)


def test_classify_resizes_and_converts_to_the_model_input(registry, models, model_dirs, samples):
    classifier = Classifier(registry)
    rgb = np.random.default_rng(1).integers(0, 255, size=(3, 40, 24), dtype=np.uint8)
    images = [encode(samples[0]), encode(rgb), encode(rgb, "JPEG")]
    for name in ("a", "rgb"):
        assert classifier.classify(models[name], images, top=6) == \
            expected_answers(model_dirs[name], images, top=6)


def test_top_is_bounded_by_the_categories(registry, models, samples):
    classifier = Classifier(registry)
    image = [encode(samples[0])]
    assert len(classifier.classify(models["a"], image, top=1)[0]["top"]) == 1
    ranked = classifier.classify(models["a"], image, top=100)[0]["top"]
    assert sorted(x["category"] for x in ranked) == CATEGORIES
    probabilities = [x["probability"] for x in ranked]
    assert probabilities == sorted(probabilities, reverse=True)
    assert abs(sum(probabilities) - 1) < 1e-5
    for bad in (0, 101, -1, 2.5, "3", True):
        with pytest.raises(InvalidInput, match="top must be"):
            classifier.classify(models["a"], image, top=bad)


def test_best_resolves_to_the_best_model_of_the_dataset(registry, models, model_dirs, samples):
    classifier = Classifier(registry)
    images = [encode(samples[i]) for i in range(3)]
    best = classifier.classify("best", images, dataset="dice")
    assert best == expected_answers(model_dirs["b"], images)
    assert classifier.cached() == [models["b"]]
    # A better model registered here is used by the next request.
    better = registry.register("job-c", model_dirs["c"], dataset="dice", fitness=0.9)["id"]
    best = classifier.classify("best", images, dataset="dice")
    assert best == expected_answers(model_dirs["c"], images)
    assert classifier.cached() == [models["b"], better]
    assert classifier.peek("best", "dice").id == better
    with pytest.raises(InvalidInput, match="needs a dataset"):
        classifier.classify("best", images)
    with pytest.raises(NotFound, match="no model"):
        classifier.classify("best", images, dataset="faces")


def test_lru_evicts_least_recently_used_and_reloads(registry, models, samples):
    classifier = Classifier(registry, capacity=2)
    image = [encode(samples[0])]
    first = classifier.classify(models["a"], image)
    classifier.classify(models["b"], image)
    assert classifier.cached() == [models["a"], models["b"]] and classifier.loads == 2
    classifier.classify(models["a"], image)  # a becomes most recent
    assert classifier.cached() == [models["b"], models["a"]] and classifier.loads == 2
    classifier.classify(models["rgb"], image)  # evicts b, the least recent
    assert classifier.cached() == [models["a"], models["rgb"]] and classifier.loads == 3
    assert classifier.peek(models["b"]) is None
    classifier.classify(models["b"], image)  # reloaded from disk, evicting a
    assert classifier.cached() == [models["rgb"], models["b"]] and classifier.loads == 4
    assert classifier.classify(models["a"], image) == first
    assert classifier.loads == 5
    with pytest.raises(ValueError, match="capacity"):
        Classifier(registry, capacity=0)


def test_a_cold_model_is_loaded_once_for_concurrent_requests(registry, models, samples,
                                                              monkeypatch):
    classifier = Classifier(registry, capacity=2)
    calls = []
    load = registry.load

    def slow_load(model_id):
        calls.append(model_id)
        time.sleep(0.2)  # widen the window in which the other requests arrive
        return load(model_id)

    monkeypatch.setattr(registry, "load", slow_load)
    image = [encode(samples[0])]
    barrier = threading.Barrier(8)
    answers, errors = [], []

    def request() -> None:
        barrier.wait()
        try:
            answers.append(classifier.classify(models["a"], image))
        except Exception as exc:  # noqa: BLE001 - any failure is reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=request) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(answers) == 8
    assert calls == [models["a"]] and classifier.loads == 1
    assert all(a == answers[0] for a in answers)


def test_a_failed_load_is_reported_and_retried(registry, models, samples, monkeypatch):
    classifier = Classifier(registry)
    image = [encode(samples[0])]

    def broken(model_id):
        raise OSError("disk on fire")

    monkeypatch.setattr(registry, "load", broken)
    with pytest.raises(OSError, match="disk on fire"):
        classifier.classify(models["a"], image)
    monkeypatch.undo()
    assert classifier.cached() == [] and classifier.loads == 0
    assert classifier.classify(models["a"], image)[0]["category"] in CATEGORIES


def truncated_jpeg(samples) -> bytes:
    noise = np.random.default_rng(2).integers(0, 255, size=(1, 64, 64), dtype=np.uint8)
    data = encode(noise, "JPEG")
    return data[: len(data) // 2]


def bad_requests(samples, big_png) -> dict[str, tuple[type, str, list[bytes]]]:
    good = encode(samples[0])
    gif = io.BytesIO()
    Image.fromarray(samples[0, 0]).save(gif, format="GIF")
    return {
        "corrupt png": (InvalidInput, "image 1", [good, good[:20] + b"\x00" * 40 + good[60:]]),
        "truncated jpeg": (InvalidInput, "image 1", [good, truncated_jpeg(samples)]),
        "gif": (InvalidInput, "image 0", [gif.getvalue()]),
        "not an image": (InvalidInput, "image 2", [good, good, b"hello world"]),
        "empty file": (InvalidInput, "image 1: empty", [good, b""]),
        "no images": (InvalidInput, "no images", []),
        "too many images": (TooLarge, "4 images in one request exceed the limit of 3", [good] * 4),
        "20000 x 20000 png": (TooLarge, "20000 x 20000 = 400000000 pixels", [good, big_png]),
        "too many bytes": (TooLarge, r"image 0: \d+ bytes exceed the limit of 65536",
                           [encode(noise(300, 300))]),
    }


BAD_CASES = ["corrupt png", "truncated jpeg", "gif", "not an image", "empty file", "no images",
             "too many images", "20000 x 20000 png", "too many bytes"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_images_are_refused_without_side_effects(registry, models, samples, big_png, case):
    settings = Settings(home=registry.root.parent, max_images_per_request=3,
                        max_image_bytes=LIMIT_BYTES, max_image_pixels=1_000_000)
    classifier = Classifier(registry, capacity=2, settings=settings)
    error, message, images = bad_requests(samples, big_png)[case]
    classifier.classify(models["b"], [encode(samples[0])])  # loaded: a refusal must not change that
    before = (classifier.cached(), classifier.loads, registry.list())
    with pytest.raises(error, match=message):
        classifier.classify(models["b"], images)
    assert (classifier.cached(), classifier.loads, registry.list()) == before


def test_unknown_and_malformed_models(registry, models, samples):
    classifier = Classifier(registry)
    image = [encode(samples[0])]
    missing = uuid.uuid4().hex
    with pytest.raises(NotFound, match=missing):
        classifier.classify(missing, image)
    for bad in ("../models", "A" * 32, "", "best/../x"):
        with pytest.raises(InvalidInput, match="model id"):
            classifier.classify(bad, image)
    assert classifier.cached() == [] and classifier.loads == 0


def test_batch_thread_answers_concurrent_requests_each_their_own(registry, models, model_dirs,
                                                                  samples, monkeypatch):
    classifier = Classifier(registry)
    grey, rgb = classifier.model(models["a"]), classifier.model(models["rgb"])
    requests = [(grey, [encode(samples[0])]), (rgb, [encode(samples[1]), encode(samples[2])]),
                (grey, [encode(samples[3]), b"garbage"]),
                (grey, [encode(samples[i]) for i in range(4, 8)]),
                (rgb, [encode(samples[5])])]
    # Hold the thread in its first round so that the other requests wait and share the next.
    first_round, release = threading.Event(), threading.Event()
    decode = classifier.decode

    def held_decode(entry, images):
        if not first_round.is_set():
            first_round.set()
            release.wait()
        return decode(entry, images)

    monkeypatch.setattr(classifier, "decode", held_decode)

    async def scenario():
        first = asyncio.ensure_future(classifier.batches.classify(grey, [encode(samples[7])], 3))
        await asyncio.get_running_loop().run_in_executor(None, first_round.wait)
        rest = [asyncio.ensure_future(classifier.batches.classify(entry, images, 3))
                for entry, images in requests]
        await asyncio.sleep(0)  # let them all queue up behind the held round
        release.set()
        return await first, await asyncio.gather(*rest, return_exceptions=True)

    first, answers = asyncio.run(scenario())
    assert classifier.batches.rounds == 2  # the held one, then all five together
    assert first == expected_answers(model_dirs["a"], [encode(samples[7])], top=3)
    for (entry, images), answer in zip(requests, answers):
        if b"garbage" in images:
            assert isinstance(answer, InvalidInput) and "image 1" in answer.message
            continue
        name = "a" if entry is grey else "rgb"
        expected = expected_answers(model_dirs[name], images, top=3)
        # Shared batches may change the last bits of a float32 probability, nothing more.
        assert [a["category"] for a in answer] == [e["category"] for e in expected]
        for got, want in zip(answer, expected):
            assert got["probability"] == pytest.approx(want["probability"], abs=1e-6)
            assert [t["category"] for t in got["top"]] == [t["category"] for t in want["top"]]
    classifier.batches.stop()
    # A stopped batch thread comes back with the next request.
    assert asyncio.run(classifier.batches.classify(grey, [encode(samples[7])], 3)) == first
    classifier.batches.stop()


# -- the REST routes -----------------------------------------------------------------------------

@pytest.fixture
def server(tmp_path, model_dirs):
    """(client, services, ids) over a fresh app with models a, b (dataset dice) and rgb."""
    from dicebox.server import create_app

    settings = Settings(home=tmp_path / "home", max_images_per_request=3,
                        max_image_bytes=LIMIT_BYTES, max_image_pixels=1_000_000)
    app = create_app(settings)
    with TestClient(app) as client:
        services = app.state.services
        registry = services.registry
        ids = {"a": registry.register("job-a", model_dirs["a"], dataset="dice", fitness=0.5)["id"],
               "b": registry.register("job-b", model_dirs["b"], dataset="dice", fitness=0.8)["id"],
               "rgb": registry.register("job-rgb", model_dirs["rgb"], dataset="colour")["id"]}
        yield client, app, ids


def counters(app) -> tuple[float, float]:
    metrics = app.state.metrics
    return (metrics.registry.get_sample_value("dicebox_classified_images_total") or 0.0,
            metrics.registry.get_sample_value("dicebox_classify_latency_seconds_count") or 0.0)


def test_routes_list_and_describe_models(server, model_dirs):
    client, _app, ids = server
    page = client.get("/v1/models", params={"limit": 2}).json()
    assert [m["id"] for m in page["items"]] == [ids["rgb"], ids["b"]]
    rest = client.get("/v1/models", params={"limit": 2, "cursor": page["next"]}).json()
    assert [m["id"] for m in rest["items"]] == [ids["a"]] and rest["next"] is None
    dice = client.get("/v1/models", params={"dataset": "dice"}).json()
    assert [m["id"] for m in dice["items"]] == [ids["b"], ids["a"]]
    one = client.get(f"/v1/models/{ids['a']}").json()
    model = dicebox.Model.load(model_dirs["a"])
    assert one["genome"] == model.genome.to_dict() and one["history"] == model.history
    described = [one[key] for key in ("dataset", "categories", "input_shape", "job_id", "fitness")]
    assert described == ["dice", CATEGORIES, [1, 16, 16], "job-a", 0.5]
    assert {"metrics", "val_accuracy", "created_at", "dataset_version"} <= one.keys()
    assert client.get("/v1/models/best", params={"dataset": "dice"}).json()["id"] == ids["b"]
    # The classify route reads its query by hand; the OpenAPI document still describes it.
    spec = client.get("/openapi.json").json()["paths"]["/v1/models/{model_id}/classify"]["post"]
    assert [(p["name"], p["in"]) for p in spec["parameters"]] == \
        [("model_id", "path"), ("dataset", "query"), ("top", "query")]
    assert set(spec["requestBody"]["content"]) == {"multipart/form-data", "application/json"}

    cases = [("/v1/models/best", {}, 400, "needs a dataset"),
             ("/v1/models/best", {"dataset": "faces"}, 404, "no model"),
             (f"/v1/models/{uuid.uuid4().hex}", {}, 404, "not found"),
             ("/v1/models/NOT-AN-ID", {}, 400, "model id"),
             ("/v1/models", {"cursor": "garbage"}, 400, "cursor"),
             ("/v1/models", {"limit": 0}, 422, "limit")]
    for path, params, status, message in cases:
        response = client.get(path, params=params)
        assert response.status_code == status, (path, response.text)
        assert message in response.json()["error"]


def test_routes_serve_model_files_for_a_warm_start(server, model_dirs, tmp_path, samples):
    client, app, ids = server
    record = app.state.services.registry.get(ids["a"])
    weights = client.get(f"/v1/models/{ids['a']}/weights")
    assert weights.status_code == 200
    assert weights.content == (model_dirs["a"] / WEIGHTS_FILE).read_bytes()
    assert weights.headers["etag"] == f'"{record["weights_sha256"]}"'
    assert weights.headers["content-type"] == "application/octet-stream"
    unchanged = client.get(f"/v1/models/{ids['a']}/weights",
                           headers={"If-None-Match": weights.headers["etag"]})
    assert unchanged.status_code == 304 and unchanged.content == b""
    changed = client.get(f"/v1/models/{ids['a']}/weights", headers={"If-None-Match": '"other"'})
    assert changed.status_code == 200 and changed.content == weights.content
    description = client.get(f"/v1/models/{ids['a']}/model.json")
    assert description.status_code == 200 and description.headers["etag"] != weights.headers["etag"]
    assert description.content == (model_dirs["a"] / MODEL_FILE).read_bytes()
    # The two downloads make a model directory that loads and predicts like the original.
    rebuilt = tmp_path / "rebuilt"
    rebuilt.mkdir()
    (rebuilt / WEIGHTS_FILE).write_bytes(weights.content)
    (rebuilt / MODEL_FILE).write_bytes(description.content)
    np.testing.assert_array_equal(dicebox.Model.load(rebuilt).predict(samples),
                                  dicebox.Model.load(model_dirs["a"]).predict(samples))
    best = client.get("/v1/models/best/weights", params={"dataset": "dice"})
    assert best.content == (model_dirs["b"] / WEIGHTS_FILE).read_bytes()
    assert client.get(f"/v1/models/{uuid.uuid4().hex}/weights").status_code == 404
    assert client.get("/v1/models/..%2F..%2Fdicebox.db/weights").status_code in (400, 404)


def test_route_classifies_multipart_and_json_in_input_order(server, model_dirs, samples):
    client, app, ids = server
    images = [encode(samples[i]) for i in range(3)]
    expected = expected_answers(model_dirs["a"], images)
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    response = client.post(f"/v1/models/{ids['a']}/classify", files=files)
    assert response.status_code == 200, response.text
    assert response.json() == {"predictions": expected, "model_id": ids["a"]}
    body = {"items": [{"data": base64.b64encode(data).decode()} for data in images]}
    answer = client.post(f"/v1/models/{ids['a']}/classify", json=body).json()
    assert answer == {"predictions": expected, "model_id": ids["a"]}
    # A data URL works too; top bounds the ranked list. (Expected from a batch of one: the
    # core's arithmetic, and so the last bits of a probability, may depend on the batch size.)
    body = {"items": [{"data": "data:image/png;base64," + base64.b64encode(images[2]).decode()}]}
    answer = client.post(f"/v1/models/{ids['a']}/classify", params={"top": 2}, json=body).json()
    assert answer["predictions"] == expected_answers(model_dirs["a"], images[2:], top=2)
    # best of a dataset, and an RGB model fed grey images (decoded to its size and channels).
    best = client.post("/v1/models/best/classify", params={"dataset": "dice"}, files=files).json()
    assert best == {"predictions": expected_answers(model_dirs["b"], images), "model_id": ids["b"]}
    rgb = client.post(f"/v1/models/{ids['rgb']}/classify", files=files).json()
    assert rgb["predictions"] == expected_answers(model_dirs["rgb"], images)
    assert counters(app) == (13.0, 5.0)
    assert "dicebox_classified_images_total 13.0" in client.get("/metrics").text


def test_route_batches_small_requests_and_not_large_ones(server, model_dirs, samples):
    client, app, ids = server
    batches = app.state.services.classifier.batches
    url = f"/v1/models/{ids['a']}/classify"
    small = [("files", ("x.png", encode(samples[0])))]
    client.post(url, files=small)  # a cold model is loaded in the thread pool
    rounds = batches.rounds
    assert client.post(url, files=small).json()["predictions"] == \
        expected_answers(model_dirs["a"], [encode(samples[0])])
    assert batches.rounds == rounds + 1
    # More pixels than a batch round takes: a thread-pool call of its own, same answer.
    image = encode(noise(300, 300, seed=5), "JPEG", quality=10)
    assert len(image) <= LIMIT_BYTES
    response = client.post(url, files=[("files", ("x.jpg", image))])
    assert response.json()["predictions"] == expected_answers(model_dirs["a"], [image])
    assert batches.rounds == rounds + 1


def route_bad_requests(samples, big_png, ids) -> dict[str, tuple[str, dict, int, str]]:
    """name -> (path, request keyword arguments, status, part of the error)."""
    good = encode(samples[0])
    a = f"/v1/models/{ids['b']}/classify"  # loaded by the test before these requests
    b64 = base64.b64encode(good).decode()
    noise_png = encode(noise(300, 300))

    def items(*images):
        return {"json": {"items": [{"data": base64.b64encode(data).decode()} for data in images]}}

    def files(*images):
        return {"files": [("files", (f"{i}.png", data, "image/png"))
                          for i, data in enumerate(images)]}

    return {
        "corrupt png": (a, files(good, good[:30] + b"\x00" * 30 + good[60:]), 400, "image 1"),
        "truncated jpeg": (a, files(truncated_jpeg(samples)), 400, "image 0"),
        "wrong content type": (a, {"content": good, "headers": {"content-type": "image/png"}}, 415,
                               "multipart/form-data"),
        "no content type": (a, {"content": good}, 415, "is not accepted"),
        "too many images": (a, files(good, good, good, good), 413, "limit of 3"),
        "far too many images": (a, files(*[good] * 10), 413, "limit of 3"),
        "too many json items": (a, {"json": {"items": [{"data": b64}] * 4}}, 413, "limit of 3"),
        "20000 x 20000 png": (a, files(big_png), 413, "20000 x 20000"),
        "20000 x 20000 png in json": (a, items(big_png), 413, "20000 x 20000"),
        "too many bytes": (a, files(noise_png), 413, "the limit of 65536"),
        "too many bytes in json": (a, items(noise_png), 413, "the limit of 65536"),
        "bad base64": (a, {"json": {"items": [{"data": b64}, {"data": "not base64!"}]}}, 400,
                       "items[1].data: not valid base64"),
        "data not a string": (a, {"json": {"items": [{"data": 5}]}}, 400, "items[0].data"),
        "json not an object": (a, {"json": [1, 2]}, 400, '{"items"'),
        "invalid json": (a, {"content": b"{", "headers": {"content-type": "application/json"}}, 400,
                         "not valid JSON"),
        "no items": (a, {"json": {"items": []}}, 400, "no images"),
        "no files field": (a, {"files": {"other": ("x.png", good)}}, 400, "'files'"),
        "text instead of file": (a, {"data": {"files": "hello"}, "files": {"x": ("x.png", good)}},
                                 400, "files[0]"),
        "multipart without boundary": (a, {"content": b"--x\r\n", "headers": {
            "content-type": "multipart/form-data"}}, 400, "without a boundary"),
        "malformed multipart": (a, {"content": b"this is not multipart at all", "headers": {
            "content-type": "multipart/form-data; boundary=xyz"}}, 400, "multipart"),
        "truncated multipart": (a, {"content": b"--xyz\r\nContent-Disposition: form-data; "
                                            b'name="files"; filename="a.png"\r\n\r\n' + good,
                                 "headers": {"content-type": "multipart/form-data; boundary=xyz"}},
                                400, "closing boundary"),
        "unknown model": (f"/v1/models/{uuid.uuid4().hex}/classify", files(good), 404, "not found"),
        "malformed id": ("/v1/models/ABC/classify", files(good), 400, "model id"),
        "best without dataset": ("/v1/models/best/classify", files(good), 400, "needs a dataset"),
        "best of unknown dataset": ("/v1/models/best/classify?dataset=faces", files(good), 404,
                                    "no model"),
        "top out of range": (a + "?top=0", files(good), 400, "top must be"),
        "top not a number": (a + "?top=all", files(good), 400, "top must be"),
    }


ROUTE_BAD_CASES = [
    "corrupt png", "truncated jpeg", "wrong content type", "no content type", "too many images",
    "far too many images", "too many json items", "20000 x 20000 png", "20000 x 20000 png in json",
    "too many bytes", "too many bytes in json", "bad base64", "data not a string",
    "json not an object", "invalid json", "no items", "no files field", "text instead of file",
    "multipart without boundary", "malformed multipart", "truncated multipart", "unknown model",
    "malformed id", "best without dataset", "best of unknown dataset", "top out of range",
    "top not a number"]


def test_route_bad_requests_get_a_clear_4xx_and_change_nothing(server, samples, big_png):
    client, app, ids = server
    classifier = app.state.services.classifier
    registry = app.state.services.registry
    client.post(f"/v1/models/{ids['b']}/classify", files=[("files", ("x.png", encode(samples[0])))])
    before = (classifier.cached(), classifier.loads, registry.list(), counters(app))
    cases = route_bad_requests(samples, big_png, ids)
    assert sorted(cases) == sorted(ROUTE_BAD_CASES)
    for name, (path, kwargs, status, message) in cases.items():
        response = client.post(path, **kwargs)
        assert response.status_code == status, (name, response.text)
        body = response.json()
        assert message in body["error"], (name, body)
        assert set(body) == {"error", "detail"}
        after = (classifier.cached(), classifier.loads, registry.list(), counters(app))
        assert after == before, name


def test_routes_need_the_api_key_when_one_is_set(tmp_path, model_dirs, samples):
    from dicebox.server import create_app

    app = create_app(Settings(home=tmp_path / "home", api_key="s3cret"))
    with TestClient(app) as client:
        model_id = app.state.services.registry.register("j", model_dirs["a"], dataset="dice")["id"]
        files = [("files", ("x.png", encode(samples[0])))]
        for method, path in (("get", "/v1/models"), ("get", f"/v1/models/{model_id}"),
                             ("get", f"/v1/models/{model_id}/weights"),
                             ("post", f"/v1/models/{model_id}/classify")):
            response = getattr(client, method)(path, files=files) if method == "post" else \
                getattr(client, method)(path)
            assert response.status_code == 401, path
        ok = client.post(f"/v1/models/{model_id}/classify", files=files,
                         headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert json.loads(ok.content)["predictions"][0]["category"] in CATEGORIES
        assert app.state.services.classifier.loads == 1
