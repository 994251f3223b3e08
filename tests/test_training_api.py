"""dicebox.train and dicebox.Model: training, callbacks, cancellation, resume, warm start,
evaluation, saving, to_torch, and clear errors."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import dicebox
from conftest import CNN, MLP, bands


def test_training_learns_and_records_history(trained, band_data):
    _, val = band_data
    assert len(trained.history) == 4
    first, last = trained.history[0], trained.history[-1]
    assert set(first) == {"epoch", "loss", "accuracy", "val_loss", "val_accuracy",
                          "samples_per_second", "seconds"}
    assert last["loss"] < first["loss"]
    metrics = trained.evaluate(val, k=2)
    assert metrics["accuracy"] > 0.9
    assert metrics["top_k"] >= metrics["accuracy"] and metrics["k"] == 2
    assert metrics["confusion"].shape == (3, 3) and metrics["confusion"].sum() == len(val)
    for key in ("precision", "recall", "f1"):
        assert 0.0 <= metrics[key] <= 1.0


def test_cnn_genome_trains(band_data):
    train, val = band_data
    model = dicebox.train(CNN, train, val=val, epochs=3, batch_size=32, threads=1)
    assert model.evaluate(val)["accuracy"] > 0.8


def test_predict_and_classify(trained, band_data):
    _, val = band_data
    probs = trained.predict(val.images[:7])
    assert probs.dtype == np.float32 and probs.shape == (7, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    names = trained.classify(val.images[:7])
    assert names == [trained.categories[i] for i in probs.argmax(axis=1)]
    # [N, H, W] for one-channel models, and one [H, W] image
    np.testing.assert_allclose(trained.predict(val.images[:7, 0]), probs)
    assert trained.predict(val.images[0, 0]).shape == (1, 3)


@pytest.mark.parametrize(
    "images, message",
    [
        (np.zeros((2, 1, 5, 5), np.uint8), r"\[N, 1, 8, 8\]"),
        (np.zeros((2, 3, 8, 8), np.uint8), r"\[N, 1, 8, 8\]"),
        (np.zeros((2, 1, 8, 8), np.float32), "uint8"),
    ],
)
def test_predict_refuses_wrong_images(trained, images, message):
    with pytest.raises(ValueError, match=message):
        trained.predict(images)


def test_save_load_and_metrics_persist(trained, band_data, tmp_path):
    _, val = band_data
    trained.evaluate(val)
    trained.save(tmp_path / "m")
    back = dicebox.Model.load(tmp_path / "m")
    assert back.genome == trained.genome and back.categories == trained.categories
    assert back.metrics["accuracy"] == trained.metrics["accuracy"]
    np.testing.assert_array_equal(back.predict(val.images), trained.predict(val.images))


def test_weights_file_is_standard_safetensors(trained, tmp_path):
    from safetensors.numpy import load_file

    trained.save(tmp_path / "m")
    tensors = load_file(str(tmp_path / "m" / "weights.safetensors"))
    assert set(tensors) == set(trained.state_dict())


def test_missing_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(OSError, match="does not exist"):
        dicebox.Model.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="model.json"):
        dicebox.Model.load(tmp_path / "empty")


@pytest.mark.parametrize("genome", [MLP, CNN])
def test_to_torch_matches_predict(band_data, genome):
    import torch

    train, val = band_data
    model = dicebox.train(genome, train, epochs=1, batch_size=32, threads=1)
    module = model.to_torch()
    with torch.no_grad():
        logits = module(torch.from_numpy(val.images.astype(np.float32)))
    np.testing.assert_allclose(torch.softmax(logits, 1).numpy(), model.predict(val.images), atol=1e-5)


def test_to_torch_covers_every_activation_and_uneven_padding():
    import torch

    data = bands(30, 0, size=9)
    for activation in dicebox.genome.ACTIVATIONS:
        genome = {"optimizer": "sgd", "layers": [
            {"type": "conv2d", "filters": 2, "kernel": [2, 4], "activation": activation},
            {"type": "conv2d", "filters": 2, "kernel": 3, "stride": 2, "activation": activation},
            {"type": "dense", "size": 5, "activation": activation}]}
        model = dicebox.train(genome, data, epochs=1, threads=1)
        with torch.no_grad():
            logits = model.to_torch()(torch.from_numpy(data.images.astype(np.float32)))
        np.testing.assert_allclose(torch.softmax(logits, 1).numpy(), model.predict(data.images),
                                   atol=1e-5, err_msg=activation)


def test_same_seed_same_model(band_data):
    train, _ = band_data
    a = dicebox.train(MLP, train, epochs=2, threads=1, seed=3)
    b = dicebox.train(MLP, train, epochs=2, threads=1, seed=3)
    for name, value in a.state_dict().items():
        np.testing.assert_array_equal(value, b.state_dict()[name])


def test_callback_sees_each_epoch_and_can_stop(band_data):
    train, _ = band_data
    seen = []

    def callback(record):
        seen.append(record["epoch"])
        return record["epoch"] < 2

    model = dicebox.train(MLP, train, epochs=10, patience=0, threads=1, callback=callback)
    assert seen == [1, 2] and len(model.history) == 2


def test_callback_exception_propagates(band_data):
    train, _ = band_data

    def callback(record):
        raise KeyError("from the callback")

    with pytest.raises(KeyError, match="from the callback"):
        dicebox.train(MLP, train, epochs=3, threads=1, callback=callback)


def test_cancel_from_another_thread():
    data = bands(3000, 0)
    token = dicebox.CancelToken()
    threading.Timer(0.3, token.cancel).start()
    started = time.monotonic()
    with pytest.raises(dicebox.Cancelled):
        dicebox.train(MLP, data, epochs=1000, patience=0, threads=1, cancel=token)
    assert time.monotonic() - started < 60


def test_training_releases_the_gil():
    """A Python thread keeps running while the core trains: it counts to 50 and then cancels
    the run. Were the GIL held, it would advance only at the core's twice-a-second interrupt
    checks and need 25 s."""
    token = dicebox.CancelToken()

    def ticker():
        for _ in range(50):
            time.sleep(0.001)
        token.cancel()

    started = time.monotonic()
    threading.Thread(target=ticker).start()
    with pytest.raises(dicebox.Cancelled):
        dicebox.train(MLP, bands(3000, 0), epochs=100000, patience=0, threads=1, cancel=token)
    assert time.monotonic() - started < 10


RESUME_SCRIPT = """
import sys, os, numpy as np, dicebox
sys.path.insert(0, {tests!r})
from conftest import bands, MLP
kill_after = int(sys.argv[1])
def callback(record):
    if record["epoch"] == kill_after:
        os._exit(9)  # dies like kill -9: no cleanup, no exception handling
model = dicebox.train(MLP, bands(240, 1), val=bands(60, 2), epochs=5, batch_size=16, augment=0.3,
                      threads=1, patience=0, checkpoint_dir=sys.argv[2], callback=callback)
np.save(sys.argv[3], np.concatenate([w.ravel() for _, w in sorted(model.state_dict().items())]))
"""


def test_killed_run_resumes_to_exactly_the_uninterrupted_result(tmp_path):
    import os

    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT.format(tests=os.path.dirname(__file__)))
    run = lambda kill, ckpt, out: subprocess.run(  # noqa: E731
        [sys.executable, str(script), str(kill), str(ckpt), str(out)], capture_output=True, text=True)
    full = run(0, tmp_path / "a", tmp_path / "full.npy")
    assert full.returncode == 0, full.stderr
    killed = run(3, tmp_path / "b", tmp_path / "never.npy")
    assert killed.returncode == 9 and not (tmp_path / "never.npy").exists()
    resumed = run(0, tmp_path / "b", tmp_path / "resumed.npy")
    assert resumed.returncode == 0, resumed.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "full.npy"), np.load(tmp_path / "resumed.npy"))


def test_warm_start_from_a_model_directory(trained, band_data, tmp_path):
    train, _ = band_data
    trained.save(tmp_path / "init")
    warm = dicebox.train(MLP, train, epochs=1, threads=1, init=tmp_path / "init")
    cold = dicebox.train(MLP, train, epochs=1, threads=1)
    assert warm.history[0]["loss"] < cold.history[0]["loss"]


@pytest.mark.parametrize(
    "genome, message",
    [
        ({"optimizer": "adam", "layers": [{"type": "dense", "size": -1}]}, r"layers\[0\].size"),
        ({"optimizer": "adam", "layers": [{"type": "banana"}]}, r"layers\[0\].type"),
        ({"optimizer": "adam", "layers": [{"type": "dense", "size": 4, "activation": "gelu"}]},
         r"layers\[0\].activation"),
        ({"optimizer": "adam", "layers": [{"type": "dense", "size": 4},
                                          {"type": "conv2d", "filters": 2, "kernel": 3}]},
         r"layers\[1\].type"),
        ({"optimizer": "adam", "layers": [{"type": "conv2d", "filters": 2, "kernel": 9}]},
         r"layers\[0\].kernel"),
        ({"optimizer": "lion", "layers": []}, "optimizer"),
    ],
)
def test_invalid_genomes_name_the_field(band_data, genome, message):
    train, _ = band_data
    with pytest.raises(ValueError, match=message):
        dicebox.train(genome, train, epochs=1, threads=1)


def test_bad_training_arguments_are_refused(band_data):
    train, val = band_data
    with pytest.raises(ValueError, match="empty"):
        dicebox.train(MLP, train.subset([]), epochs=1)
    with pytest.raises(ValueError, match="batch_size"):
        dicebox.train(MLP, train, epochs=1, batch_size=0)
    with pytest.raises(ValueError, match="epochs"):
        dicebox.train(MLP, train, epochs=0)
    with pytest.raises(ValueError, match="val"):
        dicebox.train(MLP, train, val=bands(9, 0, size=6), epochs=1)
    with pytest.raises(ValueError, match="train"):
        dicebox.train(MLP, train.images, epochs=1)
    with pytest.raises(ValueError, match="seed"):
        dicebox.train(MLP, train, epochs=1, seed=-1)
    with pytest.raises(ValueError, match="device"):
        dicebox.train(MLP, train, epochs=1, device="tpu")


def test_device_setting(band_data, monkeypatch):
    import torch

    train, _ = band_data
    assert dicebox.train(MLP, train, epochs=1, threads=1, device="cpu").history
    monkeypatch.setenv("DICEBOX_DEVICE", "auto")
    assert dicebox.train(MLP, train, epochs=1, threads=1).history  # auto falls back to the CPU
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            dicebox.train(MLP, train, epochs=1, device="cuda")


def test_genome_round_trips_and_compares():
    g = dicebox.Genome.from_dict(CNN)
    assert dicebox.Genome.from_json(g.to_json()) == g
    assert g.to_dict()["layers"][1]["stride"] == [2, 2]
    assert len(g.plan((1, 8, 8), 3)) > len(g.layers)
    assert len({g, dicebox.Genome.from_dict(g.to_dict())}) == 1


def test_import_does_not_pull_in_torch():
    code = "import sys, dicebox; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
