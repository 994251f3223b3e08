"""Training and loading throughput: dicebox's C++ core against an idiomatic PyTorch loop.

Same data (../shared/data/mnist-dev), same networks (an MLP 784-256-128-10 and a small
CNN), same batch size, same optimizer and the same thread count; runs alternate so both
see the same machine state. Prints samples/s for each side and the ratio, then the batch
loader alone against DataLoader (plain and with augmentation), the CNN's held-out accuracy
after six epochs, `import dicebox` time and peak memory while training the CNN.

    .venv/bin/python bench/train_vs_torch.py [--data DIR] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "mnist-dev"
BATCH = 64
LR = 0.001

MLP = {"optimizer": {"name": "adam", "learning_rate": LR},
       "layers": [{"type": "dense", "size": 256, "activation": "relu"},
                  {"type": "dense", "size": 128, "activation": "relu"}]}
CNN = {"optimizer": {"name": "adam", "learning_rate": LR},
       "layers": [{"type": "conv2d", "filters": 32, "kernel": [3, 3], "padding": "same", "activation": "relu"},
                  {"type": "maxpool2d", "kernel": [2, 2]},
                  {"type": "conv2d", "filters": 64, "kernel": [3, 3], "padding": "same", "activation": "relu"},
                  {"type": "maxpool2d", "kernel": [2, 2]},
                  {"type": "dropout", "rate": 0.25},
                  {"type": "dense", "size": 128, "activation": "relu"}]}


def load(data_dir: Path):
    import dicebox

    ds = dicebox.Dataset.from_idx(data_dir / "mnist-dev-images-idx3-ubyte.gz",
                                  data_dir / "mnist-dev-labels-idx1-ubyte.gz")
    return ds.split([0.8, 0.1, 0.1], seed=0)


# -- the PyTorch peer ---------------------------------------------------------------------
def torch_peer():
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Dataset

    class InMemory(Dataset):
        """Idiomatic in-memory dataset: uint8 tensors, normalised per item."""

        def __init__(self, images, labels, mean, std, augment=None):
            self.images = torch.from_numpy(np.array(images))
            self.labels = torch.from_numpy(np.array(labels))
            self.mean, self.std, self.augment = mean, std, augment

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            if self.augment is not None:
                x = self.augment(self.images[i])
            else:
                x = self.images[i].float()
            return (x / 255.0 - self.mean) / self.std, self.labels[i]

    def build(genome):
        if genome is MLP:
            return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                                 nn.Linear(128, 10))
        return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.25),
                             nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))

    def train_epoch(genome, train, mean, std, seed):
        torch.manual_seed(seed)
        model = build(genome)
        optimizer = torch.optim.Adam(model.parameters(), lr=LR)
        loader = DataLoader(InMemory(train.images, train.labels, mean, std), batch_size=BATCH, shuffle=True)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        started = time.perf_counter()
        seen = 0
        for x, y in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            seen += len(y)
        return seen / (time.perf_counter() - started)

    return torch, InMemory, DataLoader, train_epoch


def pil_augment(rng):
    """Random rotation (±10°), scale (0.7-1.5) and shift (±10%) with PIL's affine transform."""
    import torch
    from PIL import Image

    def apply(image_u8):
        c, h, w = image_u8.shape
        img = Image.fromarray(image_u8[0].numpy())
        angle = math.radians(rng.uniform(-10, 10))
        scale = rng.uniform(0.7, 1.5)
        tx, ty = rng.uniform(-0.1, 0.1) * w, rng.uniform(-0.1, 0.1) * h
        cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
        cx, cy = w / 2, h / 2
        # inverse map: output (x, y) -> input
        a, b = cos, sin
        d, e = -sin, cos
        coeffs = (a, b, cx - a * (cx + tx) - b * (cy + ty), d, e, cy - d * (cx + tx) - e * (cy + ty))
        out = img.transform((w, h), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(out, dtype=np.float32)).unsqueeze(0)

    return apply


def measure_training(train, rounds: int, threads: int):
    import dicebox

    torch, _, _, torch_epoch = torch_peer()
    torch.set_num_threads(threads)
    pixels = train.images.astype(np.float32) / 255.0
    mean, std = float(pixels.mean()), float(pixels.std())
    results = {}
    for name, genome in (("mlp", MLP), ("cnn", CNN)):
        # One untimed run each first: both sides pay one-off kernel and allocator warm-up.
        dicebox.train(genome, train.subset(range(1024)), epochs=1, batch_size=BATCH, threads=threads)
        torch_epoch(genome, train.subset(range(1024)), mean, std, 0)
        ours, theirs = [], []
        for r in range(rounds):
            model = dicebox.train(genome, train, epochs=1, batch_size=BATCH, seed=r, threads=threads)
            ours.append(model.history[0]["samples_per_second"])
            theirs.append(torch_epoch(genome, train, mean, std, r))
            print(f"  {name} round {r + 1}: dicebox {ours[-1]:8.0f}  torch {theirs[-1]:8.0f} samples/s",
                  flush=True)
        a, b = statistics.median(ours), statistics.median(theirs)
        results[name] = {"dicebox": a, "torch": b, "ratio": a / b}
    return results


def measure_loader(train, rounds: int, threads: int):
    import dicebox

    torch, InMemory, DataLoader, _ = torch_peer()
    torch.set_num_threads(threads)
    results = {}
    for augment in (0.0, 1.0):
        ours, theirs = [], []
        for r in range(rounds):
            loader = dicebox.BatchLoader(train, batch_size=BATCH, seed=r, augment=augment,
                                         mean=[0.13], std=[0.31], threads=1)
            started = time.perf_counter()
            seen = sum(len(y) for _, y in loader)
            ours.append(seen / (time.perf_counter() - started))
            aug = pil_augment(np.random.default_rng(r)) if augment else None
            peer = DataLoader(InMemory(train.images, train.labels, 0.13, 0.31, aug), batch_size=BATCH,
                              shuffle=True)
            started = time.perf_counter()
            seen = sum(len(y) for _, y in peer)
            theirs.append(seen / (time.perf_counter() - started))
        a, b = statistics.median(ours), statistics.median(theirs)
        results["augmented" if augment else "plain"] = {"dicebox": a, "torch": b, "ratio": a / b}
    return results


def measure_accuracy(train, val, test, threads: int):
    import dicebox

    model = dicebox.train(CNN, train, val=val, epochs=6, batch_size=BATCH, patience=0, seed=0, threads=threads)
    return model.evaluate(test)["accuracy"]


def measure_import() -> float:
    code = "import time; t = time.perf_counter(); import dicebox; print(time.perf_counter() - t)"
    return min(float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                    check=True).stdout) for _ in range(3))


def measure_peak_memory(data_dir: Path, threads: int) -> float:
    code = (
        "import resource, sys; sys.path.insert(0, %r); import train_vs_torch as b, dicebox; "
        "tr, va, te = b.load(b.Path(%r)); "
        "dicebox.train(b.CNN, tr, val=va, epochs=1, batch_size=b.BATCH, threads=%d); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)" % (str(HERE), str(data_dir), threads)
    )
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if not (args.data / "mnist-dev-images-idx3-ubyte.gz").exists():
        print(f"no mnist-dev data in {args.data}", file=sys.stderr)
        return 2
    train, val, test = load(args.data)
    print(f"mnist-dev: train {len(train)}, val {len(val)}, test {len(test)}; batch {BATCH}, "
          f"{args.threads} threads, {args.rounds} alternating rounds (medians)")
    figures = {"training": measure_training(train, args.rounds, args.threads)}
    figures["loader"] = measure_loader(train, args.rounds, args.threads)
    figures["cnn_test_accuracy_6_epochs"] = measure_accuracy(train, val, test, args.threads)
    figures["import_seconds"] = measure_import()
    figures["peak_memory_mib_cnn"] = measure_peak_memory(args.data, args.threads)
    print()
    for section in ("training", "loader"):
        for name, f in figures[section].items():
            print(f"{section:8s} {name:10s} dicebox {f['dicebox']:9.0f}/s  torch {f['torch']:9.0f}/s  "
                  f"ratio {f['ratio']:.2f}x")
    print(f"CNN test accuracy after 6 epochs: {figures['cnn_test_accuracy_6_epochs']:.4f}")
    print(f"import dicebox: {figures['import_seconds']:.3f} s")
    print(f"peak RSS training the CNN: {figures['peak_memory_mib_cnn']:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
