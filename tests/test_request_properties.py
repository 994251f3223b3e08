"""Properties of request validation (hypothesis): every invalid input is refused with a clear
4xx (or ValueError) naming the problem and changes nothing; valid input is accepted.

Validation functions are called directly where the property is theirs (dataset names,
categories, genomes, job submissions, image headers); the HTTP properties (status codes,
error bodies, "nothing stored") go through the whole application: middleware, routing and
error mapping, in process (TestClient), with small limits so oversized input is cheap.
"""

from __future__ import annotations

import base64
import io
import re
import struct
import zlib
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import ValidationError
from sqlalchemy import text

import dicebox
from dicebox.errors import InvalidInput, NotFound, TooLarge
from dicebox.jobspec import JobSubmission, build_payload, check_genome
from dicebox.sensory import DATASET_NAME, check_category, check_dataset_name
from dicebox.server import create_app
from dicebox.settings import Settings

SIDE = 8  # the dataset's images are SIDE x SIDE grey
MAX_IMAGE_BYTES = 16384  # above any image valid_images() makes
MAX_IMAGE_PIXELS = 100_000
MAX_IMAGES = 6
MLP = {"optimizer": {"name": "adam", "learning_rate": 0.01},
       "layers": [{"type": "dense", "size": 8, "activation": "relu"}]}
CATEGORIES = ["1", "2", "3", "4", "5", "6"]

# Each example costs a request or two; a few dozen per property find the classes of bugs
# these look for (unhandled input types, shapes, sizes) without slowing the suite down.
EXAMPLES = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- the application -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app with dataset ``props`` (SIDE x SIDE grey, 12 images in 6 categories) and a model
    trained on such images, registered for it."""
    home = tmp_path_factory.mktemp("properties")
    config = Settings(home=home, max_image_bytes=MAX_IMAGE_BYTES, max_image_pixels=MAX_IMAGE_PIXELS,
                      max_images_per_request=MAX_IMAGES, threads=1)
    with TestClient(create_app(config)) as client:
        services = client.app.state.services
        assert client.post("/v1/datasets", json={"name": "props", "width": SIDE, "height": SIDE,
                                                 "categories": CATEGORIES}).status_code == 201
        dice = dicebox.datasets.make_dice(count=60, size=SIDE, seed=0)
        items = [{"category": dice.categories[label], "data": b64(png(pixels[0]))}
                 for pixels, label in zip(dice.images[:12], dice.labels[:12])]
        for start in range(0, len(items), MAX_IMAGES):
            r = client.post("/v1/datasets/props/images", json={"items": items[start:start + MAX_IMAGES]})
            assert r.status_code == 200, r.text
        model = dicebox.train(MLP, dice, epochs=1, batch_size=16, threads=1)
        record = services.registry.register(None, model.save(home / "trained"), dataset="props")
        client.model_id = record["id"]
        yield client


def snapshot(client: TestClient) -> tuple:
    """Everything a request could have changed: rows per table, committed image counts and
    the dataset and model files (with their sizes)."""
    services = client.app.state.services
    home: Path = services.settings.home
    with services.engine.connect() as connection:
        rows = tuple(connection.execute(text(f"SELECT COUNT(*) FROM {table}")).scalar_one()
                     for table in ("datasets", "jobs", "job_events", "models"))
        counts = tuple(connection.execute(text("SELECT name, count FROM datasets ORDER BY name")).all())
    files = tuple(sorted((str(p.relative_to(home)), p.stat().st_size)
                         for folder in ("datasets", "models") for p in (home / folder).rglob("*")
                         if p.is_file() and "exports" not in p.parts))
    return rows, counts, files


# -- encoded images --------------------------------------------------------------------------


def png(pixels: np.ndarray, mode: str | None = None) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels, mode).save(out, format="PNG")
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
    """A well-formed PNG declaring width x height (8-bit grey) with one tiny IDAT: what a
    decompression bomb looks like before it is decoded."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


@st.composite
def valid_images(draw) -> bytes:
    """A PNG or JPEG of any small size in grey, RGB or RGBA (the store converts each)."""
    width, height = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    mode = draw(st.sampled_from(["L", "RGB", "RGBA"]))
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    seed = draw(st.integers(0, 2**32 - 1))
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    picture = Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels, mode)
    out = io.BytesIO()
    if draw(st.booleans()) and mode != "RGBA":
        picture.save(out, format="JPEG", quality=draw(st.integers(10, 95)))
    else:
        picture.save(out, format="PNG")
    return out.getvalue()


@st.composite
def truncated_images(draw) -> bytes:
    """A valid image cut within its first half: never a whole picture."""
    whole = draw(valid_images())
    return whole[:draw(st.integers(0, len(whole) // 2))]


def huge_headers() -> st.SearchStrategy[bytes]:
    """PNG headers declaring more pixels than MAX_IMAGE_PIXELS (up to 2^31-1 on a side)."""
    side = st.integers(1, 2**31 - 1)
    return st.tuples(side, side).filter(lambda s: s[0] * s[1] > MAX_IMAGE_PIXELS) \
        .map(lambda s: png_header(*s))


# Bytes that are no image: random, or starting like one and then garbage.
garbage = (st.binary(min_size=1, max_size=2000)
           | st.binary(max_size=200).map(lambda b: b"\x89PNG\r\n\x1a\n" + b)
           | st.binary(max_size=200).map(lambda b: b"\xff\xd8\xff" + b))
invalid_images = st.one_of(garbage, truncated_images(), huge_headers(),
                           st.integers(1, 64).map(lambda n: bytes(MAX_IMAGE_BYTES + n)))


def assert_refused(response, words: tuple[str, ...], before: tuple, client: TestClient) -> dict:
    """A 4xx with the JSON error body, its message holding one of ``words``; nothing changed."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error", "detail"} and body["error"], body
    assert any(word in body["error"] for word in words), (words, body["error"])
    assert snapshot(client) == before
    return body


# -- names -----------------------------------------------------------------------------------


@given(st.text(max_size=80))
def test_a_dataset_name_is_a_safe_path_component_or_refused(name):
    try:
        checked = check_dataset_name(name)
    except InvalidInput as exc:
        assert "dataset name" in exc.message and exc.detail == {"field": "name"}
        return
    assert checked == name and 1 <= len(name) <= 64
    assert name[0].isascii() and name[0].isalnum()
    assert not {"/", "\\", "\x00"} & set(name) and ".." not in name


@given(st.from_regex(DATASET_NAME, fullmatch=True).filter(lambda n: ".." not in n))
def test_every_well_formed_dataset_name_is_accepted(name):
    assert check_dataset_name(name) == name


@given(st.one_of(st.text(max_size=80), st.integers(), st.none(), st.lists(st.text(), max_size=2)))
def test_a_category_is_printable_text_without_separators_or_refused(category):
    try:
        checked = check_category(category)
    except InvalidInput as exc:
        assert "category" in exc.message
        return
    assert checked == category and 1 <= len(category) <= 64 and category.isprintable()
    assert "/" not in category and "\\" not in category


@EXAMPLES
@given(name=st.text(max_size=80).filter(lambda n: not DATASET_NAME.fullmatch(n) or ".." in n),
       width=st.integers(-5, 5000) | st.text(max_size=3), channels=st.integers(-1, 5))
def test_creating_a_dataset_with_bad_fields_stores_nothing(app, name, width, channels):
    before = snapshot(app)
    r = app.post("/v1/datasets", json={"name": name, "width": width, "height": 8, "channels": channels})
    assert_refused(r, ("name", "width", "channels"), before, app)


# -- images ----------------------------------------------------------------------------------


@EXAMPLES
@given(images=st.lists(valid_images(), min_size=1, max_size=MAX_IMAGES), multipart=st.booleans())
def test_valid_images_are_all_stored(app, images, multipart):
    before = app.get("/v1/datasets/props").json()["count"]
    r = upload(app, "props", "3", images, multipart)
    assert r.status_code == 200, r.text
    assert r.json()["added"] == len(images) and r.json()["count"] == before + len(images)


@EXAMPLES
@given(data=st.data(), bad=invalid_images, multipart=st.booleans())
def test_one_bad_image_refuses_the_whole_upload_naming_it(app, data, bad, multipart):
    good = data.draw(st.lists(valid_images(), max_size=MAX_IMAGES - 1))
    position = data.draw(st.integers(0, len(good)))
    images = [*good[:position], bad, *good[position:]]
    before = snapshot(app)
    r = upload(app, "props", "4", images, multipart)
    label = f"files[{position}]" if multipart else f"items[{position}]"
    body = assert_refused(r, (label,), before, app)
    if len(bad) > MAX_IMAGE_BYTES:
        assert r.status_code == 413 and "DICEBOX_MAX_IMAGE_BYTES" in body["error"]
    elif bad.startswith(b"\x89PNG") and r.status_code == 413:
        assert "DICEBOX_MAX_IMAGE_PIXELS" in body["error"]
    else:
        assert r.status_code in (400, 413)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@EXAMPLES
@given(side=st.tuples(st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1)))
def test_a_huge_declared_size_is_refused_from_the_header_alone(app, side):
    header = png_header(*side)
    store = app.app.state.services.sensory
    classifier = app.app.state.services.classifier
    if side[0] * side[1] > MAX_IMAGE_PIXELS:
        with pytest.raises(TooLarge, match="DICEBOX_MAX_IMAGE_PIXELS"):
            store.check_image_header(header, "x")
        with pytest.raises(TooLarge, match="DICEBOX_MAX_IMAGE_PIXELS"):
            classifier.check_request([header])
    else:  # within the limit: nothing to say from the header (the decoder refuses the rest)
        store.check_image_header(header, "x")
        classifier.check_request([header])


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@EXAMPLES
@given(bomb=huge_headers(), multipart=st.booleans())
def test_an_image_declaring_too_many_pixels_is_refused_by_the_pixel_limit(app, bomb, multipart):
    before = snapshot(app)
    for r in (upload(app, "props", "5", [bomb], multipart), classify(app, [bomb], multipart)):
        assert r.status_code == 413, r.text
        assert_refused(r, ("DICEBOX_MAX_IMAGE_PIXELS",), before, app)


@EXAMPLES
@given(name=st.text(min_size=1, max_size=80).filter(lambda n: not DATASET_NAME.fullmatch(n) or ".." in n))
def test_a_bad_dataset_name_in_a_path_is_refused(app, name):
    before = snapshot(app)
    quoted = quote(name, safe="")
    for r in (app.get(f"/v1/datasets/{quoted}"),
              app.post(f"/v1/datasets/{quoted}/images", json={"items": [{"category": "1", "data": ""}]}),
              app.get(f"/v1/datasets/{quoted}/export")):
        # 404 when the router cannot match the path at all (an encoded "/" in it).
        assert r.status_code in (400, 404), (r.status_code, r.text)
        assert_refused(r, ("dataset name", "Not Found"), before, app)


@EXAMPLES
@given(entries=st.lists(st.one_of(
    st.fixed_dictionaries({"category": st.text(max_size=70), "data": st.just(b64(png(np.zeros((SIDE, SIDE), np.uint8))))}),
    st.fixed_dictionaries({"category": st.just("1"), "data": st.text(max_size=40)}),
    st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8), max_size=3)),
    min_size=1, max_size=MAX_IMAGES + 2))
def test_malformed_json_items_are_refused_naming_the_item(app, entries):
    def bad(entry) -> bool:
        data, category = entry.get("data"), entry.get("category")
        return (set(entry) != {"category", "data"} or not isinstance(data, str)
                or not re.fullmatch(r"[A-Za-z0-9+/]*={0,2}", data) or len(data) % 4
                or not isinstance(category, str) or not 1 <= len(category) <= 64
                or not category.isprintable() or "/" in category or "\\" in category)
    assume(len(entries) > MAX_IMAGES or any(bad(e) for e in entries))
    before = snapshot(app)
    r = app.post("/v1/datasets/props/images", json={"items": entries})
    assert_refused(r, ("items", "DICEBOX_MAX_IMAGES_PER_REQUEST"), before, app)


def upload(client: TestClient, dataset: str, category: str, images: list[bytes], multipart: bool):
    if multipart:
        files = [("files", (f"{i}.img", data, "application/octet-stream")) for i, data in enumerate(images)]
        return client.post(f"/v1/datasets/{dataset}/images", data={"category": category}, files=files)
    return client.post(f"/v1/datasets/{dataset}/images",
                       json={"items": [{"category": category, "data": b64(data)} for data in images]})


# -- classification --------------------------------------------------------------------------


def classify(client: TestClient, images: list[bytes], multipart: bool, top: int | None = None):
    path = f"/v1/models/{client.model_id}/classify" + ("" if top is None else f"?top={top}")
    if multipart:
        return client.post(path, files=[("files", (f"{i}.png", d, "image/png")) for i, d in enumerate(images)])
    return client.post(path, json={"items": [{"data": b64(d)} for d in images]})


@EXAMPLES
@given(images=st.lists(valid_images(), min_size=1, max_size=MAX_IMAGES), multipart=st.booleans(),
       top=st.none() | st.integers(1, 10))
def test_valid_images_are_classified_in_order(app, images, multipart, top):
    r = classify(app, images, multipart, top)
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    assert len(predictions) == len(images)
    for p in predictions:
        assert p["category"] in CATEGORIES and len(p["top"]) == min(top or 5, len(CATEGORIES))


@EXAMPLES
@given(data=st.data(), bad=invalid_images, multipart=st.booleans())
def test_one_bad_image_refuses_the_classification_naming_it(app, data, bad, multipart):
    good = data.draw(st.lists(valid_images(), max_size=MAX_IMAGES - 1))
    position = data.draw(st.integers(0, len(good)))
    before = snapshot(app)
    r = classify(app, [*good[:position], bad, *good[position:]], multipart)
    # The core's decoder names the image by its index; the checks before it say "image N".
    assert_refused(r, (f"image {position}", f"images[{position}]", f"[{position}]"), before, app)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@EXAMPLES
@given(body=json_values | st.binary(max_size=100), top=st.none() | st.text(max_size=5))
def test_any_other_classify_body_is_a_clear_4xx(app, body, top):
    before = snapshot(app)
    path = f"/v1/models/{app.model_id}/classify"
    params = {} if top is None else {"top": top}
    if isinstance(body, bytes):
        r = app.post(path, params=params, content=body, headers={"Content-Type": "application/json"})
    else:
        r = app.post(path, params=params, json=body)
    if r.status_code == 200:  # a well-formed request by chance: only a list of valid images
        return
    assert_refused(r, ("body", "items", "top", "image", "JSON"), before, app)


# -- genomes and job submissions -------------------------------------------------------------


layer = st.dictionaries(
    st.sampled_from(["type", "size", "activation", "filters", "kernel", "stride", "rate", "pool"]),
    st.sampled_from(["dense", "dropout", "conv2d", "maxpool2d", "relu", "tanh", 3, 0, -1, 0.5])
    | json_values, max_size=5)
genomes = st.one_of(
    json_values,
    st.fixed_dictionaries({}, optional={
        "optimizer": st.dictionaries(st.sampled_from(["name", "learning_rate", "momentum"]),
                                     st.sampled_from(["adam", "sgd", 0.01, -1]) | json_values, max_size=3),
        "layers": st.lists(layer, max_size=4) | json_values}))


@settings(max_examples=300, deadline=None)
@given(genomes)
def test_a_genome_builds_within_the_budgets_or_is_refused_naming_genome(genome):
    try:
        canonical = check_genome(genome, (1, SIDE, SIDE), len(CATEGORIES))
    except InvalidInput as exc:
        assert exc.message.startswith("genome"), exc.message
        return
    assert check_genome(canonical, (1, SIDE, SIDE), len(CATEGORIES)) == canonical


def valid_submissions() -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries(
        {"kind": st.just("train"), "dataset": st.just("props"), "genome": st.just(MLP)},
        optional={"params": st.fixed_dictionaries({}, optional={
            "epochs": st.integers(1, 20), "batch_size": st.integers(1, 256),
            "seed": st.integers(0, 1000), "augment": st.floats(0, 1),
            "validation": st.floats(0, 0.4), "test": st.floats(0, 0.4)}),
            "priority": st.integers(-100, 100)})


# A field of the submission replaced by something else, and the words its refusal must name.
MUTATIONS = {
    "kind": (json_values.filter(lambda v: v not in ("train", "evolve")), ("kind",)),
    "dataset": (json_values.filter(lambda v: v != "props"), ("dataset",)),
    "genome": (genomes.filter(lambda g: g is not None and g != MLP), ("genome",)),
    "params": (st.dictionaries(st.sampled_from(["epochs", "batch_size", "seed", "patience", "lr",
                                                "validation", "test", "augment"]),
                               st.integers(-10, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
                               | st.text(max_size=3),
                               min_size=1, max_size=3) | json_values, ("params",)),
    "priority": (json_values.filter(lambda v: not (isinstance(v, int) and -100 <= v <= 100)),
                 ("priority",)),
    "evolution": (json_values, ("evolution",)),
    "unknown": (json_values, ("unknown",)),
}


@EXAMPLES
@given(submission=valid_submissions())
def test_valid_submissions_are_queued(app, submission):
    before = snapshot(app)[0][1]
    r = app.post("/v1/jobs", json=submission)
    assert r.status_code == 202, r.text
    assert snapshot(app)[0][1] == before + 1


@EXAMPLES
@given(submission=valid_submissions(), field=st.sampled_from(sorted(MUTATIONS)), data=st.data())
def test_a_bad_field_refuses_the_submission_naming_it(app, submission, field, data):
    values, words = MUTATIONS[field]
    body = {**submission, field: data.draw(values)}
    direct = None
    try:
        direct = build_payload(JobSubmission.model_validate(body), app.app.state.services.sensory,
                               app.app.state.services.registry, app.app.state.services.settings)
    except (ValidationError, InvalidInput, NotFound):
        pass
    before = snapshot(app)
    r = app.post("/v1/jobs", json=body)
    if direct is not None:  # the replacement happened to be valid (e.g. other params)
        assert r.status_code == 202, r.text
        return
    assert_refused(r, words, before, app)
