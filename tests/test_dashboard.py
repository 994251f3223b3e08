"""The web dashboard: its files served with a strict Content-Security-Policy (in-process), the
dataset image route its sample grid reads, and the whole dashboard driven in a real headless
Chromium against a real server and processor: the API key prompt (a wrong key refused, the
right one kept), a dataset created and filled by drag and drop, a train job submitted from
the form and followed live to its curves, the model page with its confusion heat map and a
weights download, classification of dropped images, an evolve job with its fitness chart and
lineage. Screenshots of every page go to ``test-artifacts/dashboard/`` at the repository root.

The browser test needs Debian's ``chromium`` (``/usr/bin/chromium``, or $DICEBOX_CHROMIUM) and
the ``playwright`` Python package (which drives that browser; it never downloads one). Without
them it is skipped locally and fails in CI (CI=true).
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from servers import Processor, Server, png_bytes

import dicebox
from dicebox.server import create_app
from dicebox.server.routes import dashboard
from dicebox.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "dashboard"
STATIC = ROOT / "python" / "dicebox" / "server" / "static"
KEY = "dashboard-test-key"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
# Generous upper bounds for things to appear in the page (waits, not timing assertions).
WAIT_MS = 120_000
IN_CI = os.environ.get("CI", "").lower() == "true"


# ---------------------------------------------------------------------------------------------
# in-process: the dashboard's files and headers

@pytest.fixture
def client(tmp_path):
    with TestClient(create_app(Settings(home=tmp_path, api_key="k"))) as c:
        yield c


def test_index_is_served_with_a_strict_csp_and_no_key(client):
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    csp = r.headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    for name in ("default-src", "script-src", "style-src", "img-src", "connect-src"):
        assert directives[name] == "'self'", name
    assert directives["object-src"] == "'none'" and directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in csp and "blob:" not in csp and "data:" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert '<script type="module" src="/static/js/app.js"></script>' in r.text
    # The page needs no key; the API behind it does.
    assert client.get("/v1/datasets").status_code == 401


def test_no_inline_script_or_style_in_any_file():
    """The CSP forbids inline code: every script must come from a file, no style attributes,
    no event-handler attributes, no <style> elements, no innerHTML."""
    html = (STATIC / "index.html").read_text()
    for tag in re.findall(r"<script\b[^>]*>", html):
        assert "src=" in tag, tag
    assert re.search(r"<script\b[^>]*>\s*[^<\s]", html) is None
    assert "<style" not in html and re.search(r"\sstyle=", html) is None
    assert re.search(r"\son[a-z]+=", html) is None
    for js in STATIC.rglob("*.js"):
        text = js.read_text()
        assert "innerHTML" not in text and "eval(" not in text, js
        assert 'setAttribute("style"' not in text, js


def test_static_files_have_their_content_types_and_etags(client):
    expected = {"/static/js/app.js": "text/javascript; charset=utf-8",
                "/static/js/views/job.js": "text/javascript; charset=utf-8",
                "/static/style.css": "text/css; charset=utf-8",
                "/static/favicon.svg": "image/svg+xml"}
    for path, media_type in expected.items():
        r = client.get(path)
        assert r.status_code == 200, path
        assert r.headers["content-type"] == media_type, path
        assert r.headers["content-security-policy"] == dashboard.CONTENT_SECURITY_POLICY
        assert r.content == (STATIC / path.removeprefix("/static/")).read_bytes()
        again = client.get(path, headers={"If-None-Match": r.headers["etag"]})
        assert again.status_code == 304 and again.content == b""


def test_every_module_import_resolves_to_a_served_file():
    served = set(dashboard.FILES)
    assert {"index.html", "style.css", "js/app.js"} <= served
    for name in [n for n in served if n.endswith(".js")]:
        folder = Path(name).parent
        for target in re.findall(r'from\s+"(\.[^"]+)"', (STATIC / name).read_text()):
            resolved = os.path.normpath(folder / target)
            assert resolved in served, f"{name} imports {target} ({resolved}), which is not served"


@pytest.mark.parametrize("path", [
    "/static/nothing.js", "/static/js/%2e%2e/%2e%2e/routes/dashboard.py", "/static/..%2fapp.py",
    "/static/%2fetc/passwd", "/static/", "/static/js",
])
def test_unknown_and_outside_files_are_404(client, path):
    r = client.get(path)
    assert r.status_code == 404
    assert r.json()["error"].startswith("no dashboard file")


def test_only_files_under_static_are_listed():
    assert dashboard.FILES, "the static folder is missing from the package"
    for name, entry in dashboard.FILES.items():
        assert entry.path.resolve().is_relative_to(dashboard.STATIC_DIR)
        assert not any(part.startswith(".") or part == ".." for part in Path(name).parts)


def test_the_wheel_ships_the_static_files():
    """The wheel takes every file of ``wheel.packages`` that git does not ignore: ask
    scikit-build-core (the build backend) which files it would put in, without building."""
    import tomllib
    from scikit_build_core.build._pathutil import iter_package_files

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["scikit-build"]
    wheel = config.get("wheel", {})
    packages = {Path(p).name: p for p in wheel["packages"]}
    cwd = os.getcwd()
    os.chdir(ROOT)  # scikit-build-core walks from the project root
    try:
        shipped = {t.as_posix() for _, t in iter_package_files(
            packages=packages, include=[], src_exclude=config.get("sdist", {}).get("exclude", []),
            target_exclude=wheel.get("exclude", []), build_dir=config.get("build-dir", ""),
            mode="default")}
    finally:
        os.chdir(cwd)
    for name in dashboard.FILES:
        assert f"dicebox/server/static/{name}" in shipped, name


# ---------------------------------------------------------------------------------------------
# in-process: GET /v1/datasets/{name}/images/{index}

def _png(pixels: np.ndarray) -> bytes:
    return png_bytes(pixels)


@pytest.fixture
def filled(client):
    """Dataset "g" (grey 6x4) with two categories, "c" (RGB 5x3) with a non-ASCII one."""
    headers = {"Authorization": "Bearer k"}
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, size=(3, 1, 4, 6), dtype=np.uint8)
    rgb = rng.integers(0, 256, size=(2, 3, 3, 5), dtype=np.uint8)
    assert client.post("/v1/datasets", json={"name": "g", "width": 6, "height": 4, "channels": 1},
                       headers=headers).status_code == 201
    assert client.post("/v1/datasets", json={"name": "c", "width": 5, "height": 3, "channels": 3},
                       headers=headers).status_code == 201
    for index, category in enumerate(["one", "two", "one"]):
        r = client.post("/v1/datasets/g/images", headers=headers, data={"category": category},
                        files=[("files", (f"{index}.png", _png(grey[index]), "image/png"))])
        assert r.status_code == 200, r.text
    r = client.post("/v1/datasets/c/images", headers=headers, data={"category": "chat noir é"},
                    files=[("files", (f"{i}.png", _png(rgb[i]), "image/png")) for i in range(2)])
    assert r.status_code == 200, r.text
    return {"headers": headers, "grey": grey, "rgb": rgb}


def test_image_route_answers_the_stored_pixels(client, filled):
    headers = filled["headers"]
    for index, category in enumerate(["one", "two", "one"]):
        r = client.get(f"/v1/datasets/g/images/{index}", headers=headers)
        assert r.status_code == 200
        assert r.headers["content-type"] == "image/png"
        assert r.headers["x-dicebox-category"] == category
        assert r.headers["x-dicebox-label"] == str(["one", "two"].index(category))
        picture = Image.open(io.BytesIO(r.content))
        assert picture.mode == "L" and picture.size == (6, 4)
        np.testing.assert_array_equal(np.asarray(picture), filled["grey"][index][0])
    r = client.get("/v1/datasets/c/images/1", headers=headers)
    picture = Image.open(io.BytesIO(r.content))
    assert picture.mode == "RGB" and picture.size == (5, 3)
    np.testing.assert_array_equal(np.asarray(picture).transpose(2, 0, 1), filled["rgb"][1])
    assert r.headers["x-dicebox-category"] == quote("chat noir é", safe="")
    assert unquote(r.headers["x-dicebox-category"]) == "chat noir é"


@pytest.mark.parametrize("path, status, words", [
    ("/v1/datasets/g/images/3", 404, "dataset 'g' has no image 3: it holds 3 images (indices 0..2)"),
    ("/v1/datasets/g/images/-1", 400, "index must be >= 0, got -1"),
    ("/v1/datasets/g/images/x", 422, "index"),
    ("/v1/datasets/nope/images/0", 404, "nope"),
    ("/v1/datasets/bad..name/images/0", 400, "bad..name"),
    ("/v1/datasets/empty/images/0", 404, "dataset 'empty' has no image 0: it holds no images"),
])
def test_bad_image_requests(client, filled, path, status, words):
    headers = filled["headers"]
    client.post("/v1/datasets", json={"name": "empty", "width": 2, "height": 2}, headers=headers)
    before = client.get("/v1/datasets", headers=headers).json()
    r = client.get(path, headers=headers)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]
    assert client.get("/v1/datasets", headers=headers).json() == before


def test_image_route_needs_the_key(client, filled):
    r = client.get("/v1/datasets/g/images/0")
    assert r.status_code == 401 and "API key" in r.json()["error"]
    assert client.get("/v1/datasets/g/images/0",
                      headers={"Authorization": "Bearer wrong"}).status_code == 401


# ---------------------------------------------------------------------------------------------
# the dashboard in a real browser

def _chromium() -> str:
    path = os.environ.get("DICEBOX_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(path):
        message = "Debian's chromium is not installed (apt-get install chromium)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def browser():
    path = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if IN_CI:
            pytest.fail("the playwright Python package is missing (pip install -r requirements-dev.txt)")
        pytest.skip("the playwright Python package is not installed")
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()


@pytest.fixture(scope="module")
def artifacts():
    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
    ARTIFACTS.mkdir(parents=True)
    return ARTIFACTS


@pytest.fixture
def service(tmp_path):
    server = Server(tmp_path, api_key=KEY)
    processor = Processor(server, "browser-test")
    try:
        yield server
    finally:
        processor.stop()
        server.stop()


def _dice_files(count: int, seed: int) -> dict[str, list[dict[str, str]]]:
    """PNG files of dice faces by category: {category: [{"name", "data" (base64)}]}."""
    dice = dicebox.datasets.make_dice(count=count, size=24, seed=seed)
    files: dict[str, list[dict[str, str]]] = {}
    for index, (image, label) in enumerate(zip(dice.images, dice.labels)):
        category = dice.categories[int(label)]
        files.setdefault(category, []).append(
            {"name": f"die-{category}-{index}.png", "data": base64.b64encode(png_bytes(image)).decode()})
    return files


DROP_FILES = """([selector, files]) => {
  const transfer = new DataTransfer();
  for (const file of files) {
    const bytes = Uint8Array.from(atob(file.data), (c) => c.charCodeAt(0));
    transfer.items.add(new File([bytes], file.name, {type: "image/png"}));
  }
  const zone = document.querySelector(selector);
  for (const type of ["dragenter", "dragover", "drop"]) {
    zone.dispatchEvent(new DragEvent(type, {dataTransfer: transfer, bubbles: true, cancelable: true}));
  }
}"""


def test_dashboard_end_to_end(browser, artifacts, service, tmp_path):
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    expect.set_options(timeout=WAIT_MS)
    console_errors: list[tuple[str, bool]] = []  # (text, after the right key was entered)
    key_accepted = False
    urls: list[str] = []
    page.on("console", lambda m: m.type == "error" and console_errors.append((m.text, key_accepted)))
    page.on("pageerror", lambda e: console_errors.append((f"uncaught: {e}", key_accepted)))
    page.on("request", lambda r: urls.append(r.url))

    def shot(name: str) -> None:
        page.wait_for_load_state("networkidle")
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(artifacts / f"{name}.png"), full_page=True)

    try:
        # -- the key: asked at once, a wrong one refused with the server's reason -----------------
        response = page.goto(service.url + "/")
        assert response.status == 200
        assert response.headers["content-security-policy"] == dashboard.CONTENT_SECURITY_POLICY
        expect(page.locator("#key-panel")).to_be_visible()
        expect(page.locator("#key-message")).to_have_text("This server needs an API key.")
        shot("01-api-key")
        page.fill("#api-key", "not-the-key")
        page.click("#key-form button[type=submit]")
        expect(page.locator("#key-message")).to_contain_text("The server refused the key: invalid API key")
        expect(page.locator("#key-panel")).to_be_visible()
        key_accepted = True
        page.fill("#api-key", KEY)
        page.click("#key-form button[type=submit]")
        expect(page.locator("#key-panel")).to_be_hidden()
        expect(page.locator("#key-status")).to_have_text("API key set")
        expect(page.locator("main")).to_contain_text("No datasets yet")
        assert page.evaluate("sessionStorage.getItem('dicebox.apiKey')") == KEY

        # -- a dataset, filled by drag and drop --------------------------------------------------
        page.fill("#create-dataset input[name=name]", "dice")
        page.fill("#create-dataset input[name=width]", "24")
        page.fill("#create-dataset input[name=height]", "24")
        page.click("#create-dataset button[type=submit]")
        page.wait_for_url("**/#/datasets/dice")
        expect(page.locator("h1")).to_have_text("dice")
        files = _dice_files(count=120, seed=1)
        categories = sorted(files)
        for category in categories[:-1]:
            page.fill("#upload-category", category)
            page.evaluate(DROP_FILES, ["#upload-zone", files[category]])
            expect(page.locator("#upload-status")).to_have_text(
                f"Added {len(files[category])} images to “{category}”.")
        # The zone's file chooser takes the same path (a click opens it).
        last = categories[-1]
        chosen = []
        for item in files[last]:
            path = tmp_path / item["name"]
            path.write_bytes(base64.b64decode(item["data"]))
            chosen.append(str(path))
        page.fill("#upload-category", last)
        with page.expect_file_chooser() as chooser:
            page.click("#upload-zone")
        chooser.value.set_files(chosen)
        expect(page.locator("#upload-status")).to_have_text(f"Added {len(chosen)} images to “{last}”.")
        expect(page.locator(".bar-chart rect.bar")).to_have_count(len(categories))
        expect(page.locator("#samples canvas.thumb")).to_have_count(32)
        captions = set(page.locator("#samples figcaption").all_inner_texts())
        assert captions == set(categories)
        with service.client() as api:
            info = api.get("/v1/datasets/dice").json()
        assert info["count"] == 120 and info["counts"] == {c: len(files[c]) for c in categories}
        shot("02-dataset")

        # -- a train job from the form, followed live ---------------------------------------------
        page.click("text=Train on this dataset")
        page.wait_for_url("**/#/jobs?dataset=dice")
        expect(page.locator("#job-dataset")).to_have_value("dice")
        shot("03-job-form")
        page.fill("#job-epochs", "3")
        page.click("#job-submit")
        page.wait_for_url(re.compile(r".*#/jobs/[0-9a-f]{32}$"))
        job_id = page.url.rsplit("/", 1)[1]
        expect(page.locator("#job-status .badge")).to_have_text("succeeded")
        expect(page.locator('#loss-chart .series[data-series="training loss"]')).to_have_attribute(
            "data-points", "3")
        expect(page.locator('#accuracy-chart .series[data-series="validation accuracy"] path')).to_have_count(1)
        expect(page.locator("#epochs-table tbody tr")).to_have_count(3)
        expect(page.locator("#result-model")).to_be_visible()
        shot("04-train-job")
        with service.client() as api:
            job = api.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "succeeded" and job["spec"]["params"]["epochs"] == 3
        model_id = job["result"]["model_id"]
        expect(page.locator("#result-model")).to_have_text(model_id)

        # -- the model: metrics, confusion heat map, weights download ------------------------------
        page.click("#result-model")
        page.wait_for_url(f"**/#/models/{model_id}")
        expect(page.locator("#confusion svg.heatmap rect.cell")).to_have_count(len(categories) ** 2)
        expect(page.locator('#metrics [data-metric="accuracy"]')).to_be_visible()
        expect(page.locator(".genome table.layers tbody tr")).to_have_count(6)
        cells = [int(c) for c in page.locator("#confusion rect.cell").evaluate_all(
            "cells => cells.map(c => c.getAttribute('data-count'))")]
        with service.client() as api:
            model = api.get(f"/v1/models/{model_id}").json()
            weights = api.get(f"/v1/models/{model_id}/weights").content
        assert cells == [n for row in model["metrics"]["confusion"] for n in row]
        with page.expect_download() as download:
            page.click("#download-weights")
        saved = tmp_path / "downloaded.safetensors"
        download.value.save_as(saved)
        assert download.value.suggested_filename == f"{model_id}.safetensors"
        assert saved.read_bytes() == weights
        shot("05-model")

        # -- classify dropped images ------------------------------------------------------------
        page.click("text=Classify with it")
        page.wait_for_url(f"**/#/classify?model={model_id}")
        expect(page.locator("#classify-model")).to_have_value(f"model:{model_id}")
        new = _dice_files(count=12, seed=99)
        dropped = [new[categories[0]][0], new[categories[3]][0]]
        page.evaluate(DROP_FILES, ["#classify-zone", dropped])
        expect(page.locator("#predictions .prediction")).to_have_count(2)
        expect(page.locator("#predictions .prediction canvas.preview")).to_have_count(2)
        for card in page.locator("#predictions .prediction").all():
            entries = card.locator(".top-list li")
            expect(entries).to_have_count(5)
            labels = entries.locator(".label").all_inner_texts()
            assert set(labels) <= set(categories) and len(set(labels)) == 5
            values = [float(v.rstrip("%")) for v in entries.locator(".value").all_inner_texts()]
            assert values == sorted(values, reverse=True) and sum(values) <= 100.5
            assert card.get_attribute("data-category") == labels[0]
        shot("06-classify")

        # -- an evolve job: fitness by generation and the lineage of the best ------------------------
        page.click("nav >> text=Jobs")
        page.wait_for_url("**/#/jobs")
        expect(page.locator(f'#jobs-table tr[data-job="{job_id}"] .badge')).to_have_text("succeeded")
        page.click("text=Evolve networks")
        expect(page.locator("#evolve-part")).to_be_visible()
        page.fill("#evolve-part input[name=population]", "3")
        page.fill("#evolve-part input[name=generations]", "2")
        page.fill("#job-epochs", "1")
        page.click("#job-submit")
        page.wait_for_url(re.compile(r".*#/jobs/[0-9a-f]{32}$"))
        expect(page.locator("#job-status .badge")).to_have_text("succeeded")
        expect(page.locator('#fitness-chart .series[data-series="best"]')).to_have_attribute("data-points", "2")
        expect(page.locator("#lineage .node.best")).to_have_count(1)
        expect(page.locator("#individuals-table tbody tr")).to_have_count(6)
        expect(page.locator("#leaderboard tbody tr").first).to_be_visible()
        shot("07-evolve-job")
        page.click("nav >> text=Jobs")
        expect(page.locator("#jobs-table tbody tr")).to_have_count(2)
        page.check("#show-children")
        expect(page.locator("#jobs-table tbody tr").nth(2)).to_be_visible()
        shot("08-jobs")
        page.click("nav >> text=Models")
        expect(page.locator("#models-table tbody tr").first).to_be_visible()
        shot("09-models")
        page.click("nav >> text=Datasets")
        expect(page.locator("#datasets-table tbody tr")).to_have_count(1)
        shot("10-datasets")

        # -- forgetting the key asks for it again ----------------------------------------------
        page.click("#key-button")
        expect(page.locator("#key-panel")).to_be_visible()
        assert page.evaluate("sessionStorage.getItem('dicebox.apiKey')") is None
    finally:
        context.close()

    # The key travels in a header only, never in a URL.
    assert urls and not [u for u in urls if KEY in u]
    # The only console errors are the two refused requests before the right key (the first
    # visit's and the wrong key's): nothing failed after it, and no script error at all.
    unexpected = [text for text, after in console_errors if after or "401" not in text]
    assert not unexpected, unexpected
    assert os.listdir(artifacts)
