"""The embedded demo (``make demo``, ``dicebox demo``): the whole service on this machine.

It makes a dataset of synthetic dice, starts a server with two processors in a temporary
home (no broker, nothing configured), uploads the dice over REST, submits an evolve job sized
to finish in about three minutes on 2 cores, shows its progress live (each individual's
accuracy as its training ends, each generation's best), then prints the leaderboard, the
best network, its test accuracy and its answers for new dice, and stops everything.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import dicebox
from dicebox.client import Client

SIZE = 24
COUNT = 2400
EVOLUTION = {"population": 8, "generations": 4,
             "space": {"max_layers": 4, "max_size": 128, "min_learning_rate": 0.001, "max_learning_rate": 0.006}}
PARAMS = {"epochs": 12, "patience": 3, "seed": 0, "validation": 0.15, "test": 0.15}
READY_TIMEOUT = 60.0

# Kept for callers of the earlier, in-process demo: a small CNN that suits the dice.
DEMO_GENOME = {
    "optimizer": {"name": "adam", "learning_rate": 0.002},
    "layers": [
        {"type": "conv2d", "filters": 16, "kernel": [3, 3], "padding": "same", "activation": "relu"},
        {"type": "maxpool2d", "kernel": [2, 2]},
        {"type": "conv2d", "filters": 32, "kernel": [3, 3], "padding": "same", "activation": "relu"},
        {"type": "maxpool2d", "kernel": [2, 2]},
        {"type": "dropout", "rate": 0.25},
        {"type": "dense", "size": 64, "activation": "relu"},
    ],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels[0]).save(out, format="PNG")
    return out.getvalue()


def _describe(genome: dict) -> str:
    parts = []
    for layer in genome["layers"]:
        kind = layer["type"]
        if kind == "conv2d":
            parts.append(f"conv {layer['filters']}x{layer['kernel'][0]}x{layer['kernel'][1]} {layer['activation']}")
        elif kind == "maxpool2d":
            parts.append(f"maxpool {layer['kernel'][0]}x{layer['kernel'][1]}")
        elif kind == "dropout":
            parts.append(f"dropout {layer['rate']:.2f}")
        else:
            parts.append(f"dense {layer['size']} {layer['activation']}")
    optimizer = genome["optimizer"]
    return " -> ".join(parts) + f"; {optimizer['name']} lr {optimizer['learning_rate']:.4g}"


def _start_server(home: Path, port: int, log) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICEBOX_")}
    env["DICEBOX_HOME"] = str(home)
    cmd = [sys.executable, "-m", "dicebox", "serve", "--port", str(port), "--workers", "2",
           "--log-level", "warning"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)


def _wait_ready(client: Client, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}")
        try:
            client.send("GET", "/readyz")
            return
        except Exception:  # noqa: BLE001 - not listening yet
            time.sleep(0.2)
    raise RuntimeError("the server did not become ready")


def main() -> int:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dicebox-demo-") as tmp:
        home = Path(tmp)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        log = open(home / "server.log", "wb")  # noqa: SIM115 - closed below, after the server
        server = _start_server(home, port, log)
        try:
            with Client(url) as client:
                _wait_ready(client, server)
                print(f"server with 2 processors at {url} (dashboard: {url}/, API: {url}/docs)")
                return _run(client, started)
        finally:
            server.terminate()
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            log.close()


def _run(client: Client, started: float) -> int:
    dice = dicebox.datasets.make_dice(count=COUNT, size=SIZE, seed=0)
    client.datasets.create("dice", SIZE, SIZE, 1)
    order = np.random.default_rng(0).permutation(len(dice))
    for start in range(0, len(order), 400):
        items = [{"category": dice.categories[dice.labels[i]], "data": base64.b64encode(_png(dice.images[i])).decode()}
                 for i in order[start:start + 400]]
        client.datasets.add_items("dice", items)
    info = client.datasets.get("dice")
    print(f"dataset 'dice': {info['count']} images {SIZE}x{SIZE}, "
          + ", ".join(f"{c['name']}: {c['count']}" for c in info["categories"]))

    job = client.jobs.submit("evolve", "dice", evolution=EVOLUTION, params=PARAMS)
    print(f"evolve job {job['id']}: population {EVOLUTION['population']}, {EVOLUTION['generations']} generations,"
          f" {PARAMS['epochs']} epochs per network, trained by both processors")
    for event in client.jobs.events(job["id"]):
        kind, data = event.get("event"), event.get("data")
        if kind == "individual":
            fitness = "failed" if data.get("fitness") is None else f"{data['fitness']:.3f}"
            cached = " (scored before)" if data.get("cached") else ""
            print(f"  generation {data.get('generation')} individual {data.get('id'):3d}: "
                  f"validation accuracy {fitness}{cached}")
        elif kind == "generation" and data.get("best_fitness") is not None:
            print(f"generation {data['generation']}: best {data['best_fitness']:.3f}, mean {data['mean_fitness']:.3f}")
    final = client.jobs.get(job["id"])
    if final["status"] != "succeeded":
        print(f"the evolve job ended {final['status']}: {final['error']}", file=sys.stderr)
        return 1
    result = final["result"]
    print("leaderboard:")
    for rank, entry in enumerate(result["leaderboard"][:5], 1):
        print(f"  {rank}. {entry['fitness']:.3f}  {_describe(entry['genome'])}")
    print(f"best network: {_describe(result['genome'])}")
    metrics = result["metrics"]
    print(f"its test accuracy: {metrics['accuracy']:.4f} (macro F1 {metrics['f1']:.4f}), model {result['model_id']}")

    new = dicebox.datasets.make_dice(count=8, size=SIZE, seed=12345)
    files = [(f"new{i}.png", _png(img)) for i, img in enumerate(new.images)]
    answers = client.models.classify(result["model_id"], files)["predictions"]
    truth = [new.categories[i] for i in new.labels]
    print("new dice (true -> classified): "
          + ", ".join(f"{t}->{a['category']} ({a['probability']:.2f})" for t, a in zip(truth, answers)))
    print(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
