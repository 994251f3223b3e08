"""The ``dicebox`` command end to end: the real command (``python -m dicebox``) as a subprocess
against a real server process (uvicorn on a loopback port) and a real processor.

Every command of INTERFACE section 4 is run: dataset make-dice/import/import-idx/list/show/
export, train and evolve in process and with --submit, jobs list/show/watch/cancel, models
list/show/export (the export loaded with dicebox.Model.load), classify. Also: --json output
parses and holds the expected fields; exit codes (1 failed or canceled job, 2 bad usage or input
or an unknown name, 3 unreachable server); every refused input leaves the server unchanged;
output in a pipe has no escape codes, and on a terminal (a pty) the rich display works.

Each command's work is done by the real command in its own process. The refusals (dozens of
bad inputs, each checked for its message and for leaving the server unchanged) call the same
``dicebox.cli.main`` in this process instead, with the same environment, which saves starting an
interpreter (and LibTorch) for each.
"""

from __future__ import annotations

import gzip
import json
import os
import pty
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from servers import Processor, Server, base_env, free_port, png_bytes

import dicebox
from dicebox import cli

KEY = "cli-test-key"
SIZE = 12
COUNT = 240
MLP = {"optimizer": {"name": "adam", "learning_rate": 0.01},
       "layers": [{"type": "dense", "size": 16, "activation": "relu"}]}
# Long enough (1000 epochs) that only a cancel ends it; each epoch is short.
ENDLESS = {"optimizer": {"name": "adam", "learning_rate": 0.001},
           "layers": [{"type": "conv2d", "filters": 8, "kernel": [3, 3], "padding": "same", "activation": "relu"},
                      {"type": "dense", "size": 16, "activation": "relu"}]}
ESC = "\x1b"


# -- running the command --------------------------------------------------------------------------

def command_env(server: Server, **extra: str) -> dict[str, str]:
    env = base_env(server.home, KEY)
    env["DICEBOX_SERVER_URL"] = server.url
    env["DICEBOX_THREADS"] = "1"
    env.update(extra)
    return env


def start(server: Server, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
          **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dicebox", *map(str, args)], env=env or command_env(server),
                            cwd=cwd, text=True, **popen)


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=300)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    # Not a terminal: plain lines, never an escape code.
    assert ESC not in stdout and ESC not in stderr, (stdout, stderr)
    return result


def run(server: Server, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
        stdin: str | None = None) -> subprocess.CompletedProcess:
    proc = start(server, *args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                 stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL)
    if stdin is not None:
        stdout, stderr = proc.communicate(stdin, timeout=300)
        assert ESC not in stdout and ESC not in stderr
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return finish(proc)


def run_all(server: Server, *commands: tuple[str, ...], **kwargs) -> list[subprocess.CompletedProcess]:
    """Several commands at once (each is a separate process; they only read or are refused)."""
    procs = [start(server, *c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, **kwargs)
             for c in commands]
    return [finish(p) for p in procs]


def ok_json(server: Server, *args: str, **kwargs) -> dict:
    result = run(server, *args, "--json", **kwargs)
    assert result.returncode == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def refused(result: subprocess.CompletedProcess, *words: str, code: int = 2) -> None:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    for word in words:
        assert word in result.stderr, (word, result.stderr)


@pytest.fixture
def call(server, monkeypatch, capsys):
    """``call(*argv, **env) -> CompletedProcess``: ``dicebox.cli.main(argv)`` in this process with
    the environment a command run by :func:`run` gets."""
    def call(*argv, **env: str) -> subprocess.CompletedProcess:
        for name in [n for n in os.environ if n.startswith(("DICEBOX_", "API_ACCESS_KEY"))]:
            monkeypatch.delenv(name)
        for name, value in command_env(server, **env).items():
            if name.startswith("DICEBOX_"):
                monkeypatch.setenv(name, value)
        capsys.readouterr()
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as exc:  # argparse
            code = exc.code
        out, err = capsys.readouterr()
        assert ESC not in out and ESC not in err
        return subprocess.CompletedProcess(argv, code, out, err)
    return call


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("cli-server"), api_key=KEY)
    server.http = server.client()
    yield server
    server.http.close()
    server.stop()


@pytest.fixture(scope="module")
def processor(server):
    proc = Processor(server, "cli", threads=1)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def dice(server):
    """Dataset 'dice' made with `dataset make-dice` (its --json answer)."""
    answer = ok_json(server, "dataset", "make-dice", "--name", "dice", "--count", COUNT, "--size", SIZE,
                     "--batch", 100)
    return answer


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("cli-work")


@pytest.fixture(scope="module")
def genome_file(work):
    path = work / "mlp.json"
    path.write_text(json.dumps(MLP))
    return path


@pytest.fixture(scope="module")
def trained(server, processor, dice, genome_file, work):
    """A train job run with `train --submit --out`: (the final job, the model folder)."""
    out = work / "submitted-model"
    job = ok_json(server, "train", "--dataset", "dice", "--genome", genome_file, "--epochs", 2,
                  "--batch-size", 32, "--submit", "--out", out)
    return job, out


def jobs_count(server: Server) -> int:
    return len(server.http.get("/v1/jobs", params={"limit": 1000}).json()["items"])


def dataset_names(server: Server) -> list[str]:
    return [d["name"] for d in server.http.get("/v1/datasets").json()["items"]]


def write_folder(root: Path, size=(10, 8), per_category=5, corrupt: str | None = None) -> Path:
    """root/<category>/<n>.png for three categories; ``corrupt`` names a file to spoil."""
    rng = np.random.default_rng(0)
    for category in ("circle", "cross", "square"):
        folder = root / category
        folder.mkdir(parents=True)
        for n in range(per_category):
            pixels = rng.integers(0, 256, size=(size[1], size[0]), dtype=np.uint8)
            (folder / f"{n}.png").write_bytes(png_bytes(pixels))
    if corrupt:
        (root / corrupt).write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def write_idx(path: Path, magic: int, dims: list[int], payload: bytes, compress: bool = False) -> Path:
    raw = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims) + payload
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)
    return path


# -- help and usage -------------------------------------------------------------------------------

def test_help_names_every_command_and_explains_each():
    top = subprocess.run([sys.executable, "-m", "dicebox", "--help"], capture_output=True, text=True,
                         check=False)
    assert top.returncode == 0
    for command in ("demo", "serve", "worker", "dataset", "train", "evolve", "classify", "jobs", "models"):
        assert command in top.stdout
    assert "Exit codes" in top.stdout
    # Every leaf command's help, from the same parser the command uses.
    parser = cli.parser()
    leaves = {"dataset": ["import", "import-idx", "make-dice", "list", "show", "export"],
              "jobs": ["list", "show", "watch", "cancel"], "models": ["list", "show", "export"]}
    groups = {a.dest: a for a in parser._subparsers._group_actions}["command"].choices
    for name, sub in groups.items():
        text = sub.format_help()
        assert sub.description, name
        for action in leaves.get(name, []):
            leaf = {a.dest: a for a in sub._subparsers._group_actions}["action"].choices[action]
            assert leaf.description and "--json" in leaf.format_help(), (name, action)
        if name in ("train", "evolve"):
            for flag in ("--dataset", "--submit", "--detach", "--epochs", "--out", "--json"):
                assert flag in text, (name, flag)


def test_bad_usage_exits_2(server, call):
    for result in run_all(server, (), ("dataset", "list", "--bogus")):
        refused(result, "usage: dicebox")
    results = [call(*argv) for argv in [
        ("nonsense",), ("dataset",), ("dataset", "make-dice", "--name", "x", "--count", "0"),
        ("dataset", "import", "d", "--name", "x", "--size", "8by8"),
        ("dataset", "import", "d", "--name", "x", "--channels", "2"),
        ("train", "--dataset", "dice"), ("jobs", "list", "--status", "sleeping"),
        ("worker", "--server", "ftp://example.org"),
        ("serve", "--workers", "-1"), ("serve", "--broker", "http://not-amqp")]]
    for result in results:
        assert result.returncode == 2, (result.args, result.stderr)
        assert result.stderr.strip(), result.args
    assert "8by8" in results[3].stderr
    assert "--workers" in results[-2].stderr and "amqp" in results[-1].stderr


def test_unreachable_server_exits_3_and_a_bad_key_exits_2(server, call):
    unreachable = run(server, "dataset", "list", "--server", f"http://127.0.0.1:{free_port()}")
    refused(unreachable, "could not be reached", code=3)
    refused(call("jobs", "list", DICEBOX_API_KEY="wrong"), "DICEBOX_API_KEY")
    refused(call("models", "list", "--server", "ftp://example.org"), "http://")
    refused(call("dataset", "list", DICEBOX_SERVER_URL="ftp://example.org"), "DICEBOX_SERVER_URL")


# -- datasets -------------------------------------------------------------------------------------

def test_make_dice_list_and_show(server, dice, call):
    assert dice["added"] == COUNT
    assert dice["dataset"]["name"] == "dice" and dice["dataset"]["count"] == COUNT
    assert dice["dataset"]["shape"] == [1, SIZE, SIZE]
    listing, show, plain = run_all(server, ("dataset", "list", "--json"), ("dataset", "show", "dice", "--json"),
                                   ("dataset", "show", "dice"))
    assert "dice" in [d["name"] for d in json.loads(listing.stdout)["items"]]
    shown = json.loads(show.stdout)
    assert shown["counts"] == {str(face): COUNT // 6 for face in range(1, 7)}
    assert plain.returncode == 0 and "dataset dice: 12x12 pixels" in plain.stdout
    # Options before the command work as well as after it.
    before = call("--json", "--server", server.url, "dataset", "show", "dice")
    assert json.loads(before.stdout)["count"] == COUNT
    # The images are the dice drawn with that seed, stored unchanged (sent as lossless PNGs).
    stored = server.http.get("/v1/datasets/dice/export")
    path = Path(server.home) / "dice-export.dbx"
    path.write_bytes(stored.content)
    expected = dicebox.datasets.make_dice(count=COUNT, size=SIZE, seed=0)
    order = np.concatenate([np.flatnonzero(expected.labels == c) for c in range(6)])
    np.testing.assert_array_equal(dicebox.Dataset.load(path).images, expected.images[order])


def test_make_dice_refusals_change_nothing(server, dice, call):
    before = dataset_names(server)
    refused(call("dataset", "make-dice", "--name", "../up", "--count", "10"), "--name")
    refused(call("dataset", "make-dice", "--name", "dice", "--count", "12", "--size", "9"), "dice")
    refused(call("dataset", "show", "no-such-set"), "no-such-set")
    assert server.http.get("/v1/datasets/dice").json()["count"] == COUNT
    assert dataset_names(server) == before


def test_import_folder(server, work):
    root = write_folder(work / "shapes", size=(10, 8))
    result = run(server, "dataset", "import", root, "--name", "shapes")  # size from the first image
    assert result.returncode == 0, result.stderr
    assert "added 15 images" in result.stdout and "uploading to shapes: 15/15" in result.stdout
    shown = server.http.get("/v1/datasets/shapes").json()
    assert (shown["width"], shown["height"], shown["channels"]) == (10, 8, 1)
    assert shown["counts"] == {"circle": 5, "cross": 5, "square": 5}


def test_import_folder_refusals_change_nothing(server, work, call):
    broken = write_folder(work / "broken", corrupt="cross/2.png")
    empty = work / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no category folders here")
    big = work / "big"
    (big / "a").mkdir(parents=True)
    (big / "a" / "0.png").write_bytes(png_bytes(np.zeros((600, 700), np.uint8)))
    shapes = write_folder(work / "other-shapes")
    before = dataset_names(server)
    refused(call("dataset", "import", broken, "--name", "broken", "--size", "8x8"), "2.png")
    refused(call("dataset", "import", work / "missing", "--name", "missing"), "does not exist")
    refused(call("dataset", "import", empty, "--name", "empty"), "sub-folder")
    refused(call("dataset", "import", big, "--name", "big"), "--size", "700x600")
    refused(call("dataset", "import", broken, "--name", "bad/name"), "--name")
    # Into an existing dataset of another shape (dice is 12x12 grey): 409, nothing added.
    refused(call("dataset", "import", shapes, "--name", "dice", "--size", "16x16", "--channels", "3"), "dice")
    assert dataset_names(server) == before
    assert server.http.get("/v1/datasets/dice").json()["count"] == COUNT


def test_import_idx(server, work):
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, size=(20, 5, 7), dtype=np.uint8)
    labels = (np.arange(20) % 4).astype(np.uint8)
    images = write_idx(work / "images-idx3-ubyte.gz", 2051, [20, 5, 7], pixels.tobytes(), compress=True)
    label_file = write_idx(work / "labels-idx1-ubyte", 2049, [20], labels.tobytes())
    answer = ok_json(server, "dataset", "import-idx", images, label_file, "--name", "digits")
    assert answer["added"] == 20
    assert answer["dataset"]["shape"] == [1, 5, 7]
    assert answer["dataset"]["counts"] == {"0": 5, "1": 5, "2": 5, "3": 5}
    # `dataset export` gives the stored images back, exactly, grouped by category.
    target = work / "digits.dbx"
    exported = ok_json(server, "dataset", "export", "digits", target)
    assert exported["count"] == 20 and exported["categories"] == ["0", "1", "2", "3"]
    order = np.concatenate([np.flatnonzero(labels == c) for c in range(4)])
    np.testing.assert_array_equal(dicebox.Dataset.load(target).images[:, 0], pixels[order])


def test_import_idx_and_export_refusals_change_nothing(server, work, call):
    images = write_idx(work / "few-images", 2051, [2, 2, 2], bytes(8))
    labels = write_idx(work / "three-labels", 2049, [3], bytes(3))
    existing = work / "exists.dbx"
    existing.write_bytes(b"mine")
    before = dataset_names(server)
    refused(call("dataset", "import-idx", images, labels, "--name", "mismatch"), "few-images")
    refused(call("dataset", "import-idx", work / "nope", labels, "--name", "missing"), "IMAGES")
    refused(call("dataset", "export", "dice", existing), "exists already")
    refused(call("dataset", "export", "no-such-set", work / "x.dbx"), "no-such-set")
    assert dataset_names(server) == before
    assert existing.read_bytes() == b"mine" and not (work / "x.dbx").exists()


# -- train and evolve -----------------------------------------------------------------------------

def test_train_in_process_on_a_server_dataset(server, dice, genome_file, work):
    out = work / "local-model"
    answer = ok_json(server, "train", "--dataset", "dice", "--genome", genome_file, "--epochs", 2,
                     "--batch-size", 32, "--out", out)
    assert answer["model_dir"] == str(out) and answer["version"] == COUNT
    assert answer["epochs"] == len(answer["history"]) == 2
    assert 0.0 <= answer["metrics"]["accuracy"] <= 1.0 and answer["evaluated_on"] == "test"
    model = dicebox.Model.load(out)
    assert model.categories == [str(face) for face in range(1, 7)]
    assert model.metadata["dataset"] == "dice"


def test_train_in_process_on_a_file_needs_no_server(server, dice, genome_file, work):
    packed = work / "dice-file.dbx"
    packed.write_bytes(server.http.get("/v1/datasets/dice/export").content)
    env = command_env(server, DICEBOX_SERVER_URL=f"http://127.0.0.1:{free_port()}")
    genome = json.dumps(MLP)
    result = run(server, "train", "--dataset", f"./{packed.name}", "--genome", "-", "--epochs", 1,
                 "--out", "from-file", env=env, cwd=work, stdin=genome)
    assert result.returncode == 0, result.stderr
    assert "training on dice-file: 1/1 epochs" in result.stdout and "model saved to from-file" in result.stdout
    assert dicebox.Model.load(work / "from-file").input_shape == (1, SIZE, SIZE)


def test_train_refusals_change_nothing(server, dice, genome_file, work, call):
    bad_genome = work / "bad-genome.json"
    bad_genome.write_text(json.dumps({"optimizer": {"name": "adam", "learning_rate": 0.01},
                                      "layers": [{"type": "dense", "size": 8, "activation": "sparkle"}]}))
    not_json = work / "not-json.json"
    not_json.write_text("{layers: ")
    bad_space = work / "space.json"
    bad_space.write_text(json.dumps({"max_layers": 3, "sparkle": True}))
    occupied = work / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("keep")
    jobs_before = jobs_count(server)
    results = [call(*argv) for argv in [
        ("train", "--dataset", "dice", "--genome", bad_genome, "--submit"),
        ("train", "--dataset", "dice", "--genome", not_json),
        ("train", "--dataset", "dice", "--genome", work / "missing.json"),
        ("train", "--dataset", "dice", "--genome", genome_file, "--out", occupied),
        ("train", "--dataset", "no-such-set", "--genome", genome_file, "--submit"),
        ("train", "--dataset", "no-such-set", "--genome", genome_file, "--out", work / "never"),
        ("train", "--dataset", "dice", "--genome", genome_file, "--detach"),
        ("train", "--dataset", "dice", "--genome", genome_file, "--submit", "--threads", "2"),
        ("train", "--dataset", "dice", "--genome", genome_file, "--validation", "0.5", "--test", "0.45"),
        ("train", "--dataset", "dice", "--genome", genome_file, "--epochs", "0"),
        ("train", "--dataset", "./nowhere.dbx", "--genome", genome_file),
        ("evolve", "--dataset", "dice", "--population", "1", "--submit"),
        ("evolve", "--dataset", "dice", "--space", "nonexistent-preset"),
        ("train", "--dataset", "dice", "--genome", genome_file, "--submit", "--detach", "--out", work / "never"),
        ("train", "--dataset", "dice", "--genome", genome_file, "--submit", "--init", "./some/model"),
        ("evolve", "--dataset", "dice", "--validation", "0", "--out", work / "never"),
        ("evolve", "--dataset", "dice", "--space", bad_space, "--submit")]]
    messages = ["activation", "not valid JSON", "missing.json", "not an empty folder", "no-such-set",
                "no-such-set", "--detach", "--threads", "--validation + --test", "--epochs", "nowhere.dbx",
                "--population", "--space", "--detach", "--init", "--validation", "sparkle"]
    for result, message in zip(results, messages, strict=True):
        refused(result, message)
    assert jobs_count(server) == jobs_before
    assert sorted(p.name for p in occupied.iterdir()) == ["keep.txt"]
    assert not (work / "never").exists()


def test_train_submit_follows_the_job_and_downloads_the_model(server, trained):
    job, out = trained
    assert job["status"] == "succeeded" and job["kind"] == "train"
    assert job["model_dir"] == str(out)
    model = dicebox.Model.load(out)
    assert len(model.history) == 2
    assert job["result"]["model_id"] and len(job["result"]["history"]) == 2


def test_evolve_in_process(server, dice, work):
    out = work / "evolved-here"
    answer = ok_json(server, "evolve", "--dataset", "dice", "--population", 2, "--generations", 1,
                     "--epochs", 1, "--batch-size", 32, "--out", out)
    assert answer["stopped"] == "completed" and answer["trained"] >= 1
    assert answer["leaderboard"] and answer["leaderboard"][0]["fitness"] == answer["fitness"]
    assert len(answer["generations"]) == 1 and 0.0 <= answer["metrics"]["accuracy"] <= 1.0
    assert dicebox.Model.load(out).genome.to_dict() == answer["genome"]


def test_evolve_submit(server, processor, dice):
    result = run(server, "evolve", "--dataset", "dice", "--population", 2, "--generations", 1,
                 "--epochs", 1, "--batch-size", 32, "--submit")
    assert result.returncode == 0, result.stderr
    assert "generation 0 individual" in result.stdout and "leaderboard" in result.stdout
    job_id = result.stdout.split()[1]  # "job ID queued"
    job = server.http.get(f"/v1/jobs/{job_id}").json()
    assert job["kind"] == "evolve" and job["status"] == "succeeded"
    assert job["result"]["leaderboard"] and job["result"]["model_id"]


def test_a_failed_job_exits_1(server, dice):
    # A time budget that runs out before the first individual: the coordinator fails the job.
    result = run(server, "evolve", "--dataset", "dice", "--population", 2, "--generations", 1,
                 "--time-budget", "1e-9", "--submit", "--json")
    refused(result, "failed", "time_budget", code=1)
    job = json.loads(result.stdout)
    assert job["status"] == "failed" and "time_budget" in job["error"]


# -- jobs -----------------------------------------------------------------------------------------

def test_jobs_watch_and_cancel(server, processor, dice, work, call):
    genome = work / "endless.json"
    genome.write_text(json.dumps(ENDLESS))
    submitted = ok_json(server, "train", "--dataset", "dice", "--genome", genome, "--epochs", 1000,
                        "--patience", 0, "--batch-size", 32, "--submit", "--detach")
    job_id = submitted["id"]
    watcher = start(server, "jobs", "watch", job_id, "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = []
    for line in watcher.stdout:  # until the job reports its first epoch
        lines.append(json.loads(line))
        if lines[-1]["event"] == "epoch":
            break
    assert lines and lines[-1]["event"] == "epoch", lines
    canceled = ok_json(server, "jobs", "cancel", job_id, "--wait")
    assert canceled["status"] == "canceled"
    rest, errors = watcher.communicate(timeout=300)
    assert watcher.returncode == 1 and "canceled" in errors
    lines += [json.loads(line) for line in rest.splitlines()]
    assert lines[0]["event"] == "status" and lines[0]["data"]["status"] == "queued"
    assert lines[-1]["event"] == "end" and lines[-1]["data"]["status"] == "canceled"
    # A finished job is replayed whole, and still exits 1; list and show agree.
    replay, listing, show, plain = run_all(server, ("jobs", "watch", job_id), ("jobs", "list", "--json"),
                                           ("jobs", "show", job_id, "--json"), ("jobs", "show", job_id))
    assert replay.returncode == 1 and f"train {job_id[:8]}: 1/1000 epochs" in replay.stdout
    assert job_id in [j["id"] for j in json.loads(listing.stdout)["items"]]
    assert json.loads(show.stdout)["status"] == "canceled" and json.loads(show.stdout)["history"]
    assert "canceled" in plain.stdout and "EPOCH" in plain.stdout
    again = call("jobs", "cancel", job_id)  # an ended job is left as it is
    assert again.returncode == 0 and "is canceled" in again.stdout


def test_unknown_jobs_exit_2(call):
    for action in ("show", "watch", "cancel"):
        refused(call("jobs", action, "no-such-job"), "no-such-job")


# -- models and classify --------------------------------------------------------------------------

def test_models_list_show_export(server, trained, work):
    job, _ = trained
    model_id = job["result"]["model_id"]
    listing, shown, plain = run_all(server, ("models", "list", "--dataset", "dice", "--json"),
                                    ("models", "show", model_id, "--json"), ("models", "show", model_id))
    assert model_id in [m["id"] for m in json.loads(listing.stdout)["items"]]
    shown = json.loads(shown.stdout)
    assert shown["genome"]["layers"] == MLP["layers"] and shown["metrics"]["confusion"]
    assert "confusion matrix" in plain.stdout and "dense 16 relu" in plain.stdout
    target = work / "exported"
    exported = ok_json(server, "models", "export", model_id, target)
    assert exported["files"] == ["model.json", "weights.safetensors"]
    model = dicebox.Model.load(target)
    assert model.categories == shown["categories"]
    best = ok_json(server, "models", "export", "best", work / "best", "--dataset", "dice")
    assert dicebox.Model.load(work / "best").categories == model.categories and best["model_id"]
    # What the server holds is what was exported: the same predictions.
    probe = dicebox.datasets.make_dice(count=6, size=SIZE, seed=99)
    files = [("files", (f"{i}.png", png_bytes(probe.images[i]), "image/png")) for i in range(6)]
    remote = server.http.post(f"/v1/models/{model_id}/classify", files=files).json()["predictions"]
    np.testing.assert_allclose([max(p) for p in model.predict(probe.images)],
                               [p["probability"] for p in remote], rtol=1e-4)


def test_model_refusals_change_nothing(server, trained, work, call):
    job, _ = trained
    occupied = work / "occupied-model"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("keep")
    refused(call("models", "show", "0" * 32), "0" * 32)
    refused(call("models", "export", "nope", work / "never-model"), "32 lowercase hex")
    refused(call("models", "export", "best", work / "never-model", "--dataset", "no-such-set"), "no-such-set")
    refused(call("models", "show", "best"), "--dataset")
    refused(call("models", "export", job["result"]["model_id"], occupied), "not an empty folder")
    assert not (work / "never-model").exists()
    assert sorted(p.name for p in occupied.iterdir()) == ["keep.txt"]


def test_classify(server, trained, work, call):
    job, _ = trained
    model_id = job["result"]["model_id"]
    probe = dicebox.datasets.make_dice(count=3, size=SIZE, seed=7)
    paths = []
    for i in range(3):
        paths.append(work / f"probe{i}.png")
        paths[-1].write_bytes(png_bytes(probe.images[i]))
    bad = work / "not-an-image.png"
    bad.write_bytes(b"plain text")
    answer, best = run_all(server, ("classify", "--model", model_id, *paths, "--top", "2", "--json"),
                           ("classify", "--dataset", "dice", paths[0]))
    answer = json.loads(answer.stdout)
    assert answer["model_id"] == model_id
    assert [p["image"] for p in answer["predictions"]] == [str(p) for p in paths]
    for prediction in answer["predictions"]:
        assert prediction["category"] in {str(face) for face in range(1, 7)}
        assert len(prediction["top"]) == 2 and prediction["top"][0]["category"] == prediction["category"]
    assert best.returncode == 0 and "probe0.png" in best.stdout and "model " in best.stdout
    refused(call("classify", "--model", model_id, work / "nowhere.png"), "nowhere.png")
    refused(call("classify", "--model", model_id, paths[0], bad), "not-an-image.png")
    refused(call("classify", "--model", "f" * 32, paths[0]), "f" * 32)
    refused(call("classify", paths[0]), "--model")


# -- on a terminal --------------------------------------------------------------------------------

def run_in_terminal(server: Server, *args: str) -> tuple[int, str]:
    """The command with a pseudo-terminal as stdout and stderr: (exit code, what it drew)."""
    master, slave = pty.openpty()
    env = command_env(server, TERM="xterm-256color", COLUMNS="120")
    proc = subprocess.Popen([sys.executable, "-m", "dicebox", *map(str, args)], env=env,
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other side closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return proc.wait(timeout=300), b"".join(chunks).decode(errors="replace")


def test_terminal_gets_rich_progress_and_tables(server, dice):
    code, drawn = run_in_terminal(server, "dataset", "make-dice", "--name", "tty-dice", "--count", 30,
                                  "--size", 8, "--batch", 10)
    assert code == 0, drawn
    assert ESC in drawn and "uploading to tty-dice" in drawn and "30/30" in drawn
    assert server.http.get("/v1/datasets/tty-dice").json()["count"] == 30
