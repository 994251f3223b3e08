"""The datasets routes in-process (FastAPI TestClient over create_app): create, list, read,
uploads as multipart and base64 JSON, every refused upload (status, message, nothing stored),
and the export with its ETag and 304."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from fastapi.testclient import TestClient
from test_sensory import corrupt_png, encode, noise, png_header_only, truncated_jpeg

import dicebox
from dicebox.imagefolder import decode_image
from dicebox.server import create_app
from dicebox.settings import Settings

LIMITS = {"max_image_bytes": 16 * 1024, "max_image_pixels": 100_000, "max_images_per_request": 5,
              "max_categories": 5, "max_dataset_side": 64}


@pytest.fixture
def client(tmp_path):
    settings = Settings(home=tmp_path, api_key="k", **LIMITS)
    with TestClient(create_app(settings), headers={"Authorization": "Bearer k"}) as c:
        assert c.post("/v1/datasets", json={"name": "d", "width": 6, "height": 4,
                                            "channels": 1}).status_code == 201
        yield c


def grey(seed: int) -> bytes:
    return encode(noise(4, 6, seed, channels=1))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def snapshot(client: TestClient, name: str = "d"):
    """What a refused upload must leave alone: the dataset and its files."""
    sensory = client.app.state.services.sensory
    folder = sensory.root / name
    files = {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file()}
    return client.get(f"/v1/datasets/{name}").json(), files


def ingested(client: TestClient) -> float:
    metrics = client.app.state.metrics
    return metrics.registry.get_sample_value("dicebox_ingested_images_total")


# ---------------------------------------------------------------------------------------------
# create, list, read

def test_create_list_and_get(client):
    r = client.post("/v1/datasets", json={"name": "rgb", "width": 8, "height": 8, "channels": 3,
                                          "categories": ["cat", "dog"]})
    assert r.status_code == 201
    created = r.json()
    assert created["shape"] == [3, 8, 8] and created["count"] == 0
    assert created["categories"] == [{"name": "cat", "count": 0}, {"name": "dog", "count": 0}]
    again = client.post("/v1/datasets", json={"name": "rgb", "width": 8, "height": 8,
                                              "channels": 3})
    assert again.status_code == 200 and again.json() == created
    listed = client.get("/v1/datasets").json()
    assert [d["name"] for d in listed["items"]] == ["d", "rgb"] and listed["next"] is None
    page = client.get("/v1/datasets", params={"limit": 1}).json()
    assert [d["name"] for d in page["items"]] == ["d"]
    rest = client.get("/v1/datasets", params={"limit": 1, "cursor": page["next"]}).json()
    assert [d["name"] for d in rest["items"]] == ["rgb"] and rest["next"] is None
    assert client.get("/v1/datasets/rgb").json() == created


@pytest.mark.parametrize("body, status, words", [
    ({"name": "d", "width": 6, "height": 4, "channels": 3}, 409, "exists with width 6, height 4"),
    ({"name": "d", "width": 7, "height": 4}, 409, "exists with width 6"),
    ({"name": "e", "width": 0, "height": 4}, 400, "width must be an integer in 1..64, got 0"),
    ({"name": "e", "width": 4, "height": 65}, 400, "height must be an integer in 1..64, got 65"),
    ({"name": "e", "width": 4, "height": 4, "channels": 2}, 400, "channels must be 1"),
    ({"name": "../etc", "width": 4, "height": 4}, 400, "dataset name must be"),
    ({"name": "a b", "width": 4, "height": 4}, 400, "dataset name must be"),
    ({"name": "e", "width": 4, "height": 4, "categories": ["x/y"]}, 400,
     "categories[0] must be 1-64 printable"),
    ({"name": "e", "width": 4, "height": 4, "categories": list("abcdef")}, 400,
     "more than the limit of 5"),
    ({"name": "e", "width": "4", "height": 4}, 422, "width"),
    ({"name": "e", "width": 4}, 422, "height"),
    ({"name": "e", "width": 4, "height": 4, "colour": True}, 422, "colour"),
])
def test_bad_creates(client, body, status, words):
    before = client.get("/v1/datasets").json()
    r = client.post("/v1/datasets", json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]
    assert client.get("/v1/datasets").json() == before


def test_unknown_and_invalid_names(client):
    r = client.get("/v1/datasets/nope")
    assert r.status_code == 404 and "'nope' does not exist" in r.json()["error"]
    r = client.get("/v1/datasets/a..b")
    assert r.status_code == 400 and "dataset name must be" in r.json()["error"]
    r = client.get("/v1/datasets", params={"cursor": "@@"})
    assert r.status_code == 400 and "cursor" in r.json()["error"]


def test_api_key_is_required(client):
    r = client.get("/v1/datasets", headers={"Authorization": ""})
    assert r.status_code == 401
    r = client.post("/v1/datasets/d/images", headers={"Authorization": "Bearer wrong"},
                    json={"items": [{"category": "a", "data": b64(grey(1))}]})
    assert r.status_code == 401
    assert client.get("/v1/datasets/d").json()["count"] == 0


# ---------------------------------------------------------------------------------------------
# adding images

def test_multipart_upload(client):
    images = [grey(1), grey(2), encode(noise(20, 30, 3), "JPEG")]
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    r = client.post("/v1/datasets/d/images", data={"category": "one"}, files=files)
    assert r.status_code == 200, r.text
    assert r.json() == {"added": 3, "count": 3, "counts": {"one": 3}}
    assert ingested(client) == 3
    ds = client.app.state.services.sensory.dataset("d")
    for stored, data in zip(ds.images, images):
        np.testing.assert_array_equal(stored, decode_image(data, (6, 4), 1))


def test_json_upload(client):
    items = [{"category": "a", "data": b64(grey(1))}, {"category": "b", "data": b64(grey(2))},
             # line-wrapped base64, as some encoders write it
             {"category": "a", "data": "\n".join(b64(grey(3))[i:i + 20]
                                                 for i in range(0, len(b64(grey(3))), 20))}]
    r = client.post("/v1/datasets/d/images", json={"items": items})
    assert r.status_code == 200, r.text
    assert r.json() == {"added": 3, "count": 3, "counts": {"a": 2, "b": 1}}
    got = client.get("/v1/datasets/d").json()
    assert got["count"] == 3
    assert got["categories"] == [{"name": "a", "count": 2}, {"name": "b", "count": 1}]
    assert ingested(client) == 3


def _multipart(bad: bytes, name: str = "bad.png"):
    return {"data": {"category": "x"},
            "files": [("files", ("good.png", grey(1), "image/png")),
                      ("files", (name, bad, "application/octet-stream"))]}


def _json(bad: bytes):
    return {"json": {"items": [{"category": "x", "data": b64(grey(1))},
                               {"category": "x", "data": b64(bad)}]}}


BAD_IMAGES = [
    (corrupt_png(), 400, "broken data stream"),
    (truncated_jpeg(), 400, "cannot read image"),
    (encode(noise(8, 8, 3), "GIF"), 400, "not a PNG or JPEG image"),
    (encode(noise(8, 8, 3), "BMP"), 400, "not a PNG or JPEG image"),
    (b"", 400, "not a PNG or JPEG image"),
    (encode(noise(96, 96, 4)), 413, "is larger than the limit of 16384 bytes"),
    (encode(np.zeros((400, 400), np.uint8)), 413, "160000 pixels, more than the limit of 100000"),
    (png_header_only(20000, 20000), 413, "has more pixels than the limit of 100000"),
]


@pytest.mark.parametrize("bad, status, words", BAD_IMAGES)
def test_bad_multipart_image_stores_nothing(client, bad, status, words):
    before = snapshot(client)
    r = client.post("/v1/datasets/d/images", **_multipart(bad))
    assert r.status_code == status, r.text
    assert words in r.json()["error"] and "files[1] (bad.png)" in r.json()["error"]
    assert r.json()["detail"]["name"] == "files[1] (bad.png)"
    assert snapshot(client) == before
    assert ingested(client) == 0


@pytest.mark.parametrize("bad, status, words", BAD_IMAGES)
def test_bad_json_image_stores_nothing(client, bad, status, words):
    before = snapshot(client)
    r = client.post("/v1/datasets/d/images", **_json(bad))
    assert r.status_code == status, r.text
    assert words in r.json()["error"] and "items[1]" in r.json()["error"]
    assert snapshot(client) == before


def _too_many_files():
    return {"data": {"category": "x"},
            "files": [("files", (f"{i}.png", grey(i), "image/png")) for i in range(6)]}


def _too_many_items():
    return {"json": {"items": [{"category": "x", "data": b64(grey(i))} for i in range(6)]}}


@pytest.mark.parametrize("request_kwargs, status, words", [
    ({"content": b"hello", "headers": {"Content-Type": "text/plain"}}, 415,
     "Content-Type must be multipart/form-data or application/json, got 'text/plain'"),
    ({"content": grey(1), "headers": {"Content-Type": "image/png"}}, 415, "got 'image/png'"),
    ({"content": b"{}"}, 415, "got 'none'"),
    ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 400,
     "body is not valid JSON"),
    ({"json": {"items": [{"category": "x", "data": "@@not base64@@"}]}}, 400,
     "items[0].data is not valid base64"),
    ({"json": {"items": [{"category": "x", "data": "aGVsbG8"}]}}, 400, "not valid base64"),
    ({"json": {"items": [{"category": "x"}]}}, 400, 'items[0] must be {"category"'),
    ({"json": {"items": [{"category": "x", "data": b64(grey(1)), "label": 3}]}}, 400,
     "items[0]: unexpected field(s) ['label']"),
    ({"json": {"items": [{"category": "a/b", "data": b64(grey(1))}]}}, 400,
     "category of items[0] must be 1-64 printable characters"),
    ({"json": {"items": [{"data": b64(grey(1))}]}}, 400, "category of items[0]"),
    ({"json": {"items": []}}, 400, "no images given"),
    ({"json": {"images": []}}, 400, 'body must be {"items"'),
    ({"json": [1, 2]}, 400, 'body must be {"items"'),
    ({"json": {"items": [{"category": "x", "data": "A" * 30000}]}}, 413,
     "'items[0]' is larger than the limit of 16384 bytes"),
    (_too_many_items(), 413, "more than 5 images in one request (DICEBOX_MAX_IMAGES_PER_REQUEST)"),
    (_too_many_files(), 413, "more than 5 images in one request (DICEBOX_MAX_IMAGES_PER_REQUEST)"),
    ({"files": [("files", ("a.png", grey(1), "image/png"))]}, 400,
     "needs exactly one 'category' text field, got 0"),
    ({"data": {"category": ["a", "b"]}, "files": [("files", ("a.png", grey(1), "image/png"))]},
     400, "exactly one 'category' text field, got 2"),
    ({"data": {"category": "a"}, "files": [("file", ("a.png", grey(1), "image/png"))]}, 400,
     "unexpected form field(s) ['file']"),
    ({"data": {"category": "a", "files": "text"},
          "files": [("files", ("a.png", grey(1), "image/png"))]}, 400,
     "files[0] must be a file upload"),
    ({"data": {"category": "a", "files": "text"}}, 415,
     "got 'application/x-www-form-urlencoded'"),
    ({"data": {"category": "a"}, "files": [("other", ("a.png", b"", "image/png"))]}, 400,
     "unexpected form field(s) ['other']"),
    ({"content": b"--x\r\nbroken", "headers": {"Content-Type": "multipart/form-data"}}, 400,
     "multipart body"),
])
def test_bad_uploads(client, request_kwargs, status, words):
    before = snapshot(client)
    r = client.post("/v1/datasets/d/images", **request_kwargs)
    assert r.status_code == status, r.text
    assert words in r.json()["error"], r.json()
    assert snapshot(client) == before
    assert ingested(client) == 0


def test_upload_to_unknown_or_invalid_dataset(client):
    r = client.post("/v1/datasets/nope/images", json={"items": [{"category": "a",
                                                                 "data": b64(grey(1))}]})
    assert r.status_code == 404 and "'nope' does not exist" in r.json()["error"]
    r = client.post("/v1/datasets/.x/images", json={"items": []})
    assert r.status_code == 400 and "dataset name must be" in r.json()["error"]
    assert not (client.app.state.services.sensory.root / "nope").exists()


def test_too_many_categories(client):
    client.post("/v1/datasets/d/images", json={"items": [
        {"category": c, "data": b64(grey(i))} for i, c in enumerate("abcd")]})
    before = snapshot(client)
    r = client.post("/v1/datasets/d/images", json={"items": [
        {"category": c, "data": b64(grey(1))} for c in "ef"]})
    assert r.status_code == 400 and "would have 6 categories" in r.json()["error"]
    assert snapshot(client) == before


def test_body_limit(tmp_path):
    settings = Settings(home=tmp_path, max_body_bytes=4096)
    with TestClient(create_app(settings)) as c:
        c.post("/v1/datasets", json={"name": "d", "width": 4, "height": 4})
        r = c.post("/v1/datasets/d/images", data={"category": "a"},
                   files=[("files", ("big.png", encode(noise(64, 64, 1)), "image/png"))])
        assert r.status_code == 413 and "DICEBOX_MAX_BODY_BYTES" in r.json()["error"]
        assert c.get("/v1/datasets/d").json()["count"] == 0


# ---------------------------------------------------------------------------------------------
# export

def test_export_with_etag_and_versions(client):
    client.post("/v1/datasets/d/images", json={"items": [
        {"category": c, "data": b64(grey(i))} for i, c in enumerate("abab")]})
    r = client.get("/v1/datasets/d/export")
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    etag = r.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"')
    assert r.headers["x-dicebox-dataset-version"] == "4"
    assert int(r.headers["content-length"]) == len(r.content)
    path = client.app.state.services.sensory.root / "downloaded.dbx"
    path.write_bytes(r.content)
    ds = dicebox.Dataset.load(path)
    assert len(ds) == 4 and ds.categories == ["a", "b"] and ds.shape == (1, 4, 6)
    np.testing.assert_array_equal(ds.images, client.app.state.services.sensory.dataset("d").images)

    # The worker's cached copy is current: 304, no body.
    for header in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        cached = client.get("/v1/datasets/d/export", headers={"If-None-Match": header})
        assert cached.status_code == 304 and cached.content == b""
        assert cached.headers["etag"] == etag
    assert client.get("/v1/datasets/d/export",
                      headers={"If-None-Match": '"stale"'}).status_code == 200

    # New images: the newest export changes, version 4 stays what it was.
    client.post("/v1/datasets/d/images", json={"items": [{"category": "c",
                                                          "data": b64(grey(9))}]})
    newest = client.get("/v1/datasets/d/export", headers={"If-None-Match": etag})
    assert newest.status_code == 200 and newest.headers["etag"] != etag
    assert newest.headers["x-dicebox-dataset-version"] == "5"
    old = client.get("/v1/datasets/d/export", params={"version": 4},
                     headers={"If-None-Match": etag})
    assert old.status_code == 304
    again = client.get("/v1/datasets/d/export", params={"version": 4})
    assert again.content == r.content and again.headers["etag"] == etag
    prefix = client.get("/v1/datasets/d/export", params={"version": 2})
    path.write_bytes(prefix.content)
    two = dicebox.Dataset.load(path)
    assert len(two) == 2 and two.categories == ["a", "b"]
    np.testing.assert_array_equal(two.images, ds.images[:2])


def test_bad_exports(client):
    r = client.get("/v1/datasets/d/export")
    assert r.status_code == 409 and "no categories at version 0" in r.json()["error"]
    client.post("/v1/datasets/d/images", json={"items": [{"category": "a",
                                                          "data": b64(grey(1))}]})
    r = client.get("/v1/datasets/d/export", params={"version": 2})
    assert r.status_code == 404 and "has no version 2: it holds 1 images" in r.json()["error"]
    r = client.get("/v1/datasets/d/export", params={"version": -1})
    assert r.status_code == 400 and "version must be an integer" in r.json()["error"]
    r = client.get("/v1/datasets/d/export", params={"version": "x"})
    assert r.status_code == 422 and "version" in r.json()["error"]
    r = client.get("/v1/datasets/nope/export")
    assert r.status_code == 404


def test_export_streams_a_pruned_file_after_rebuilding(client):
    client.post("/v1/datasets/d/images", json={"items": [
        {"category": c, "data": b64(grey(i))} for i, c in enumerate("abab")]})
    first = client.get("/v1/datasets/d/export", params={"version": 1})
    sensory = client.app.state.services.sensory
    for f in (sensory.root / "d" / "exports").glob("*.dbx"):
        f.unlink()  # as pruning would
    again = client.get("/v1/datasets/d/export", params={"version": 1})
    assert again.status_code == 200 and again.content == first.content
    assert again.headers["etag"] == first.headers["etag"]


def test_openapi_lists_the_routes(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/datasets", "/v1/datasets/{name}", "/v1/datasets/{name}/images",
            "/v1/datasets/{name}/export"} <= set(paths)

