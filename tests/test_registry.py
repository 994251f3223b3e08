"""The model registry (dicebox.registry) on SQLite (a file) and PostgreSQL.

Models come from training tiny networks on synthetic dice (a module-scoped fixture). PostgreSQL:
DICEBOX_TEST_POSTGRES_URL or postgresql+psycopg://postgres@127.0.0.1:5432/test; each test gets
a fresh schema. Unreachable -> skipped locally, failed when CI=true.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

import dicebox
from dicebox.db import migrate
from dicebox.errors import InvalidInput, NotFound
from dicebox.registry import (
    MODEL_FILE,
    WEIGHTS_FILE,
    ModelRecord,
    ModelRegistry,
    validation_accuracy,
)

PG_URL = os.environ.get("DICEBOX_TEST_POSTGRES_URL",
                        "postgresql+psycopg://postgres@127.0.0.1:5432/test")
MLP = {"optimizer": {"name": "adam", "learning_rate": 0.01},
       "layers": [{"type": "dense", "size": 16, "activation": "relu"}]}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Saved model directories: "a" and "b" (dice 16x16, different seeds, evaluated) and
    "wide" (dice 12x12, another input shape)."""
    root = tmp_path_factory.mktemp("trained")
    dice = dicebox.datasets.make_dice(count=300, size=16, seed=0)
    train, val = dice.split([0.8, 0.2], seed=0)
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        model = dicebox.train(MLP, train, val=val, epochs=2, batch_size=32, seed=seed, threads=1)
        model.evaluate(val)
        out[name] = model.save(root / name)
    small = dicebox.datasets.make_dice(count=120, size=12, seed=2)
    out["wide"] = dicebox.train(MLP, small, epochs=1, batch_size=32, threads=1).save(root / "wide")
    return out


@pytest.fixture
def engine(new_engine):
    engine = new_engine()
    migrate(engine)
    return engine


@pytest.fixture
def registry(engine, tmp_path) -> ModelRegistry:
    return ModelRegistry(engine, tmp_path / "models")


def stored(registry: ModelRegistry) -> tuple[list[str], int]:
    """What the registry holds: directory entries under its root, rows in its table."""
    with registry.engine.connect() as conn:
        rows = conn.execute(select(func.count()).select_from(ModelRecord)).scalar_one()
    return sorted(os.listdir(registry.root)), rows


def upload_parts(model_dir: Path) -> tuple[bytes, bytes]:
    return (model_dir / WEIGHTS_FILE).read_bytes(), (model_dir / MODEL_FILE).read_bytes()


# -- registration ------------------------------------------------------------------------------

def test_register_stores_files_and_record(registry, model_dirs):
    source = model_dirs["a"]
    record = registry.register("job-1", source, dataset="dice", dataset_version=300,
                               training_seconds=1.5)
    model = dicebox.Model.load(source)
    assert len(record["id"]) == 32 and int(record["id"], 16) >= 0
    assert record["job_id"] == "job-1"
    assert (record["dataset"], record["dataset_version"]) == ("dice", 300)
    assert record["categories"] == ["1", "2", "3", "4", "5", "6"]
    assert record["input_shape"] == [1, 16, 16]
    assert record["genome"] == model.genome.to_dict()
    assert record["history"] == model.history
    assert record["epochs"] == 2
    assert record["training_seconds"] == 1.5
    # Fitness defaults to the validation accuracy of the kept weights; metrics to the saved ones.
    assert record["fitness"] == record["val_accuracy"] == validation_accuracy(model.history)
    assert record["metrics"]["accuracy"] == model.metrics["accuracy"]
    weights = (source / WEIGHTS_FILE).read_bytes()
    assert record["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert record["weights_bytes"] == len(weights)
    assert record["created_at"].endswith("+00:00")

    directory = registry.path(record["id"])
    assert directory == registry.root / record["id"]
    assert sorted(os.listdir(directory)) == [MODEL_FILE, WEIGHTS_FILE]
    assert (directory / WEIGHTS_FILE).read_bytes() == weights
    assert registry.get(record["id"]) == record
    loaded = registry.load(record["id"])
    images = dicebox.datasets.make_dice(count=8, size=16, seed=9).images
    np.testing.assert_array_equal(loaded.predict(images), model.predict(images))
    # Registering copies: the source directory is left as it was.
    assert sorted(os.listdir(source)) == [MODEL_FILE, WEIGHTS_FILE]


def test_explicit_fitness_and_metrics_win(registry, model_dirs):
    record = registry.register("job-1", model_dirs["a"], dataset="dice", fitness=0.75,
                               metrics={"accuracy": 0.5, "confusion": [[1, 0], [0, 1]]})
    assert record["fitness"] == 0.75
    assert record["val_accuracy"] != 0.75
    assert record["metrics"] == {"accuracy": 0.5, "confusion": [[1, 0], [0, 1]]}


def test_validation_accuracy_is_that_of_the_lowest_val_loss():
    history = [{"val_loss": 1.0, "val_accuracy": 0.5}, {"val_loss": 0.5, "val_accuracy": 0.7},
               {"val_loss": 0.6, "val_accuracy": 0.8}]
    assert validation_accuracy(history) == 0.7
    assert validation_accuracy([{"val_loss": None, "val_accuracy": None}]) is None
    assert validation_accuracy([]) is None


def test_register_is_idempotent_per_job(registry, model_dirs):
    first = registry.register("job-1", model_dirs["a"], dataset="dice")
    before = stored(registry)
    again = registry.register("job-1", model_dirs["b"], dataset="other", fitness=1.0)
    assert again == first
    weights, model_json = upload_parts(model_dirs["b"])
    assert registry.register_upload("job-1", weights, model_json, dataset="dice") == first
    assert stored(registry) == before == ([first["id"]], 1)
    # Models without a job are never merged.
    one = registry.register(None, model_dirs["a"], dataset="dice")
    two = registry.register(None, model_dirs["a"], dataset="dice")
    assert one["id"] != two["id"] and one["job_id"] is None
    assert stored(registry)[1] == 3


def test_concurrent_registrations_of_one_job_make_one_model(registry, model_dirs):
    weights, model_json = upload_parts(model_dirs["a"])
    barrier = threading.Barrier(6)
    results, errors = [], []

    def upload() -> None:
        barrier.wait()
        try:
            record = registry.register_upload("job-race", weights, model_json, dataset="dice")
            results.append(record)
        except Exception as exc:  # noqa: BLE001 - any failure is reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=upload) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len({r["id"] for r in results}) == 1
    assert stored(registry) == ([results[0]["id"]], 1)


def test_register_upload_takes_bytes_or_a_file(registry, model_dirs):
    weights, model_json = upload_parts(model_dirs["a"])
    from_bytes = registry.register_upload("job-1", weights, model_json, dataset="dice",
                                          dataset_version=240, fitness=0.5)
    from_file = registry.register_upload("job-2", io.BytesIO(weights), model_json, dataset="dice")
    for record in (from_bytes, from_file):
        assert (registry.path(record["id"]) / WEIGHTS_FILE).read_bytes() == weights
        assert (registry.path(record["id"]) / MODEL_FILE).read_bytes() == model_json
        assert record["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert from_bytes["dataset_version"] == 240 and from_bytes["fitness"] == 0.5


def _corrupt_uploads(model_dirs) -> dict[str, tuple[bytes, bytes]]:
    weights, model_json = upload_parts(model_dirs["a"])
    wide_weights, _ = upload_parts(model_dirs["wide"])
    description = json.loads(model_json)
    return {
        "garbage weights": (b"not a safetensors file at all", model_json),
        "truncated weights": (weights[:-64], model_json),
        "empty weights": (b"", model_json),
        "weights of another shape": (wide_weights, model_json),
        "model.json not JSON": (weights, b"{not json"),
        "model.json a list": (weights, b"[1, 2, 3]"),
        "model.json without genome": (weights, json.dumps({k: v for k, v in description.items()
                                                           if k != "genome"}).encode()),
        "model.json names other weights": (weights, json.dumps(
            dict(description, weights="../../etc/passwd")).encode()),
        "model.json with a bad genome": (weights, json.dumps(
            dict(description, genome={"layers": [{"type": "warp"}]})).encode()),
    }


CORRUPT_CASES = ["garbage weights", "truncated weights", "empty weights",
                 "weights of another shape", "model.json not JSON", "model.json a list",
                 "model.json without genome", "model.json names other weights",
                 "model.json with a bad genome"]


@pytest.mark.parametrize("case", CORRUPT_CASES)
def test_corrupt_upload_is_refused_and_nothing_stored(registry, model_dirs, case):
    registry.register("job-0", model_dirs["b"], dataset="dice")
    before = stored(registry)
    weights, model_json = _corrupt_uploads(model_dirs)[case]
    with pytest.raises(InvalidInput) as info:
        registry.register_upload("job-1", weights, model_json, dataset="dice")
    # The message says what is wrong without the server's paths.
    assert str(registry.root) not in info.value.message
    assert stored(registry) == before
    # The job can still deliver a good model afterwards.
    good = registry.register_upload("job-1", *upload_parts(model_dirs["a"]), dataset="dice")
    assert registry.get(good["id"])["job_id"] == "job-1"


def test_register_refuses_a_directory_without_a_model(registry, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidInput, match="must hold model.json and weights.safetensors"):
        registry.register("job-1", empty, dataset="dice")
    assert stored(registry) == ([], 0)


@pytest.mark.parametrize("field, kwargs", [
    ("dataset", {"dataset": ""}),
    ("dataset", {"dataset": "x" * 256}),
    ("dataset_version", {"dataset": "dice", "dataset_version": -1}),
    ("dataset_version", {"dataset": "dice", "dataset_version": 1.5}),
    ("fitness", {"dataset": "dice", "fitness": 1.5}),
    ("fitness", {"dataset": "dice", "fitness": float("nan")}),
    ("training_seconds", {"dataset": "dice", "training_seconds": -1}),
    ("metrics", {"dataset": "dice", "metrics": [1, 2]}),
    ("metrics", {"dataset": "dice", "metrics": {"loss": float("inf")}}),
])
def test_bad_arguments_are_refused_and_nothing_stored(registry, model_dirs, field, kwargs):
    with pytest.raises(InvalidInput, match=field):
        registry.register("job-1", model_dirs["a"], **kwargs)
    with pytest.raises(InvalidInput, match="job_id"):
        registry.register("j" * 65, model_dirs["a"], dataset="dice")
    assert stored(registry) == ([], 0)


def test_failed_insert_leaves_no_files(registry, model_dirs, monkeypatch):
    def broken_write():
        raise RuntimeError("database went away")

    monkeypatch.setattr(registry._tx, "write", broken_write)
    with pytest.raises(RuntimeError, match="database went away"):
        registry.register(None, model_dirs["a"], dataset="dice")
    monkeypatch.undo()
    assert stored(registry) == ([], 0)


def test_cleanup_removes_orphans_only(registry, model_dirs):
    kept = registry.register("job-1", model_dirs["a"], dataset="dice")
    orphan = registry.root / uuid.uuid4().hex        # renamed into place, row never inserted
    temp = registry.root / f".tmp-{uuid.uuid4().hex}"  # crashed while writing
    fresh = registry.root / uuid.uuid4().hex         # another process between rename and insert
    unrelated = registry.root / "notes"
    for directory in (orphan, temp, fresh, unrelated):
        directory.mkdir()
        (directory / WEIGHTS_FILE).write_bytes(b"x")
    old = time.time() - 3600
    for path in (orphan, temp, unrelated, registry.root / kept["id"]):
        os.utime(path, (old, old))
    removed = registry.cleanup()
    assert sorted(removed) == sorted([orphan.name, temp.name])
    assert sorted(os.listdir(registry.root)) == sorted([kept["id"], fresh.name, "notes"])
    # A new registry (server start-up) cleans up with the same grace period.
    ModelRegistry(registry.engine, registry.root)
    assert registry.cleanup(older_than=0) == [fresh.name]
    assert registry.load(kept["id"]).categories == ["1", "2", "3", "4", "5", "6"]


# -- reading -------------------------------------------------------------------------------------

def test_best_per_dataset_by_fitness_newest_wins_ties(registry, model_dirs):
    a = model_dirs["a"]
    low = registry.register("j1", a, dataset="dice", fitness=0.5)
    high = registry.register("j2", a, dataset="dice", fitness=0.9)
    tie = registry.register("j3", a, dataset="dice", fitness=0.9)
    other = registry.register("j4", a, dataset="digits", fitness=0.99)
    assert registry.best("dice")["id"] == tie["id"] != high["id"]
    assert registry.best("digits")["id"] == other["id"]
    assert registry.resolve("best", "dice")["id"] == tie["id"]
    assert low["id"] not in {registry.best(d)["id"] for d in ("dice", "digits")}
    with pytest.raises(NotFound, match="no model"):
        registry.best("faces")
    with pytest.raises(InvalidInput, match="needs a dataset"):
        registry.resolve("best")


def test_models_without_fitness_rank_last(registry, model_dirs):
    wide = model_dirs["wide"]  # trained without validation: no fitness
    scored = registry.register("j1", model_dirs["a"], dataset="dice", fitness=0.1)
    unscored = registry.register("j2", wide, dataset="dice")
    assert unscored["fitness"] is None
    assert registry.best("dice")["id"] == scored["id"]
    alone = registry.register("j3", wide, dataset="shapes")
    assert registry.best("shapes")["id"] == alone["id"]


def test_list_pages_newest_first_and_filters_by_dataset(registry, model_dirs):
    ids = [registry.register(f"j{i}", model_dirs["a"], dataset="dice" if i % 2 else "digits")["id"]
           for i in range(5)]
    seen, cursor = [], None
    while True:
        page = registry.list(limit=2, cursor=cursor)
        assert len(page["items"]) <= 2
        seen += [item["id"] for item in page["items"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    dice = registry.list(dataset="dice")
    assert [item["id"] for item in dice["items"]] == [ids[3], ids[1]] and dice["next"] is None
    assert registry.list(dataset="nothing") == {"items": [], "next": None}
    item = registry.list(limit=1)["items"][0]
    assert "history" not in item and "confusion" not in item["metrics"]
    assert "confusion" in registry.get(item["id"])["metrics"]


@pytest.mark.parametrize("kwargs, field", [
    ({"limit": 0}, "limit"), ({"limit": 1001}, "limit"), ({"limit": "5"}, "limit"),
    ({"cursor": "garbage"}, "cursor"), ({"cursor": "MjAyNnxub3QtYW4taWQ="}, "cursor"),
])
def test_list_refuses_bad_arguments(registry, kwargs, field):
    with pytest.raises(InvalidInput, match=field):
        registry.list(**kwargs)


@pytest.mark.parametrize("bad", ["", "best", "../../etc/passwd", "ABCDEF" * 6, "0" * 31,
                                 "0" * 33, "g" * 32, None, 7])
def test_malformed_ids_are_refused_before_any_lookup(registry, bad):
    for call in (registry.get, registry.path, registry.load):
        with pytest.raises(InvalidInput, match="model id"):
            call(bad)


def test_unknown_id_is_not_found(registry):
    missing = uuid.uuid4().hex
    for call in (registry.get, registry.path, registry.load):
        with pytest.raises(NotFound, match=missing):
            call(missing)
    with pytest.raises(InvalidInput, match="file must be"):
        registry.file(missing, "../model.json")
