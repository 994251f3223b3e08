"""Schemathesis against the server's own OpenAPI document, with a valid API key.

A real server (``dicebox serve`` on a loopback port) holding a dataset with images and a
trained model is fuzzed operation by operation (examples, coverage, fuzzing and stateful
phases, schemathesis' CLI in a subprocess). The test fails on any finding: a 5xx, a status
code, content type or body that the document does not describe.

The same run, longer, by hand (prints the figures):

    .venv/bin/python tests/test_openapi_fuzz.py --max-examples 200 --seed 7
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from servers import SIZE, Processor, Server, b64_png, upload_dice, wait_job

from dicebox import datasets
from dicebox.server import create_app
from dicebox.settings import Settings

API_KEY = "fuzz-0123456789-abcdefghijklmnopqrstuv"
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance")
# Operations left out, and why: neither answers within a bounded time for arbitrary input.
EXCLUDED_PATHS = {
    # Server-Sent Events: the stream stays open until its job ends, and fuzzed jobs never
    # run (no processor is left to take them).
    "/v1/jobs/{job_id}/events": "SSE stream open until the job ends",
    # A long poll: every case may wait up to 30 s for a job to claim.
    "/v1/worker/claim": "long poll of up to 30 s",
}
GENOME = {"optimizer": {"name": "adam", "learning_rate": 0.01},
          "layers": [{"type": "dense", "size": 8, "activation": "relu"}]}
# Small enough for CI (the run takes well under a minute on two cores), large enough to
# reach past the first validation error of every operation.
CI_MAX_EXAMPLES = 15
CI_SEED = 1


def prepared_server(home: Path) -> tuple[Server, dict[str, str]]:
    """A server with dataset ``dice`` (60 images in 6 categories), the compatibility API's
    default dataset (12 images in 2 categories) and one trained model; the processor that
    trained it is stopped again, so jobs the fuzzer submits stay queued. Also answers the
    path parameters that name what exists: ``{"name", "model_id", "job_id"}``."""
    server = Server(home, api_key=API_KEY)
    with server.client() as client:
        upload_dice(client, "dice", 60)
        dice = datasets.make_dice(count=12, size=SIZE, seed=1)
        for pixels, label in zip(dice.images, dice.labels):
            r = client.post("/api/sensory/store", json={
                "name": "dicebox", "width": SIZE, "height": SIZE,
                "category": dice.categories[label], "data": b64_png(pixels)})
            assert r.status_code == 200, r.text
        job = client.post("/v1/jobs", json={"kind": "train", "dataset": "dice", "genome": GENOME,
                                            "params": {"epochs": 1}}).json()
        processor = Processor(server, "fuzz-trainer")
        try:
            done = wait_job(client, job["id"])
        finally:
            processor.stop()
        assert done["status"] == "succeeded", done
    return server, {"name": "dice", "model_id": done["result"]["model_id"], "job_id": job["id"]}


def schemathesis_command(url: str, max_examples: int, seed: int | None, report: Path,
                         config: Path) -> list[str]:
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
               f"{url}/openapi.json", "--header", f"Authorization: Bearer {API_KEY}",
               "--checks", ",".join(CHECKS), "--max-examples", str(max_examples),
               "--workers", "2", "--request-timeout", "60", "--no-color",
               "--report", "json", "--report-json-path", str(report)]
    for path in EXCLUDED_PATHS:
        command += ["--exclude-path", path]
    if seed is not None:
        command += ["--seed", str(seed)]
    return command


def write_config(path: Path, pinned: dict[str, str] | None) -> Path:
    """A schemathesis.toml; with ``pinned``, every path parameter of that name takes that
    value, so bodies and queries are fuzzed against a dataset, model and job that exist
    (without, path parameters are fuzzed too and mostly name nothing)."""
    lines = ["[parameters]", *(f'"path.{k}" = "{v}"' for k, v in (pinned or {}).items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_schemathesis(server: Server, pinned: dict[str, str] | None, max_examples: int,
                     seed: int | None, folder: Path, capture: bool = True):
    report = folder / "report.json"
    config = write_config(folder / "schemathesis.toml", pinned)
    run = subprocess.run(schemathesis_command(server.url, max_examples, seed, report, config),
                         check=False, capture_output=capture, text=True, timeout=900,
                         cwd=folder)  # schemathesis keeps its cache in the working directory
    return run, figures(report) if report.exists() else None


def figures(report: Path) -> dict[str, int]:
    """Operations tested, cases generated and failures found, from the JSON report."""
    data = json.loads(report.read_text())
    return {"operations": data["operations"]["tested"], "cases": data["test_cases"]["generated"],
            "failures": data["test_cases"]["unique_failures"], "errors": len(data["errors"])}


def test_the_document_describes_the_error_body_the_server_sends(tmp_path):
    document = create_app(Settings(home=tmp_path)).openapi()
    assert "HTTPValidationError" not in document["components"]["schemas"]
    assert set(document["components"]["schemas"]["ErrorBody"]["required"]) == {"error"}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            errors = {code: answer for code, answer in operation["responses"].items() if code >= "400"}
            # Every route can meet the body limit (413), a bad Content-Length (400) and the
            # read deadline (408) before it runs.
            assert {"400", "408", "413"} <= set(errors), (method, path)
            for code, answer in errors.items():
                schema = answer["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, code)
    assert "text/plain" in document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    server, existing = prepared_server(tmp_path_factory.mktemp("fuzz"))
    yield server, existing
    server.stop()


@pytest.mark.parametrize("path_parameters", ["fuzzed", "existing"])
def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(prepared, path_parameters,
                                                                       tmp_path):
    server, existing = prepared
    run, _ = run_schemathesis(server, existing if path_parameters == "existing" else None,
                              CI_MAX_EXAMPLES, CI_SEED, tmp_path)
    output = run.stdout[-20_000:] + run.stderr[-5_000:]
    assert run.returncode == 0, f"schemathesis found problems:\n{output}\n--- server log:\n" \
                                f"{server.output()[-5_000:]}"
    assert "Traceback" not in server.output(), server.output()[-5_000:]


def main() -> int:
    parser = argparse.ArgumentParser(description="Fuzz a prepared dicebox server with schemathesis.")
    parser.add_argument("--max-examples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        server, existing = prepared_server(Path(home))
        code = 0
        try:
            for name, pinned in (("fuzzed", None), ("existing", existing)):
                folder = Path(home) / name
                folder.mkdir()
                run, found = run_schemathesis(server, pinned, args.max_examples, args.seed, folder,
                                              capture=False)
                print(f"path parameters {name}: exit code {run.returncode}, {found}")
                code = code or run.returncode
        finally:
            server.stop()
        return code


if __name__ == "__main__":
    raise SystemExit(main())
