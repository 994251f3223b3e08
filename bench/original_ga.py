"""The original dicebox genetic algorithm in plain Python and PyTorch: the peer that
bench/evolve_mnist.py measures ``dicebox.evolve`` against.

It is the well-known Keras genetic algorithm the first dicebox copied, done the way a
careful PyTorch user would write it today: a population of random networks; each
generation trains every network not yet scored, one at a time (fitness = validation
accuracy after Keras-style early stopping on the validation loss), keeps the best 40%,
keeps each other network with probability 0.1, and fills the population with children of
random distinct pairs of kept parents, each child mutated with probability 0.2. No cache:
a genome seen before is trained again. Genomes are dicebox's JSON genomes, drawn from the
same search space dicebox uses (``dicebox.SearchSpace().to_dict()``).

Run alone (a small run on ../shared/data/mnist-dev, printing each network and the throughput):

    .venv/bin/python bench/original_ga.py [--population 4] [--generations 2] [--epochs 1]
        [--space SPACE.json]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

BATCH = 64
RETAIN = 0.4
RANDOM_SELECT = 0.1
MUTATE_CHANCE = 0.2
# The genes crossover picks from either parent and mutation redraws one of.
GENES = ("optimizer", "learning_rate", "layers")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-dev"


class Exponential(nn.Module):
    """Keras's "exponential" activation: elementwise exp."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x)


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "elu": nn.ELU,
    "exponential": Exponential,
    "hard_sigmoid": nn.Hardsigmoid,
    "linear": nn.Identity,
    "relu": nn.ReLU,
    "selu": nn.SELU,
    "sigmoid": nn.Sigmoid,
    "softmax": lambda: nn.Softmax(dim=1),
    "softplus": nn.Softplus,
    "softsign": nn.Softsign,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
}

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adadelta": torch.optim.Adadelta,
    "adagrad": torch.optim.Adagrad,
    "adam": torch.optim.Adam,
    "adamax": torch.optim.Adamax,
    "nadam": torch.optim.NAdam,
    "rmsprop": torch.optim.RMSprop,
    "sgd": torch.optim.SGD,
}


# -- genomes ------------------------------------------------------------------------------
def log_uniform(rng: random.Random, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def random_layers(space: dict[str, Any], shape: tuple[int, int, int],
                  rng: random.Random) -> list[dict]:
    """A layer list valid for images of ``shape``: conv and pool only before the first
    dense layer and only while the feature map is at least the kernel's size."""
    _, h, w = shape
    side = min(h, w)
    layers: list[dict] = []
    dense_placed = False
    for _ in range(rng.randint(space["min_layers"], space["max_layers"])):
        kernels = [k for k in space["kernels"] if k <= side]
        allowed = [t for t in space["layer_types"]
                   if t in ("dense", "dropout")
                   or (not dense_placed and t == "conv2d" and kernels)
                   or (not dense_placed and t == "maxpool2d" and space["pool"] <= side)]
        if not allowed:  # only conv/pool in the space and the map is too small for either
            break
        kind = rng.choice(allowed)
        activation = rng.choice(space["activations"]) if kind in ("dense", "conv2d") else None
        if kind == "dense":
            size = round(log_uniform(rng, space["min_size"], space["max_size"]))
            layers.append({"type": "dense", "size": size, "activation": activation})
            dense_placed = True
        elif kind == "dropout":
            rate = rng.uniform(space["min_dropout"], space["max_dropout"])
            layers.append({"type": "dropout", "rate": rate})
        elif kind == "conv2d":
            k, filters = rng.choice(kernels), rng.choice(space["filters"])
            layers.append({"type": "conv2d", "filters": filters, "kernel": [k, k], "stride": [1, 1],
                           "padding": "same", "activation": activation})
        else:
            p = space["pool"]
            layers.append({"type": "maxpool2d", "kernel": [p, p]})
            side //= p
    return layers


def draw_gene(gene: str, space: dict[str, Any], shape: tuple[int, int, int],
              rng: random.Random) -> Any:
    if gene == "optimizer":
        return rng.choice(space["optimizers"])
    if gene == "learning_rate":
        return log_uniform(rng, space["min_learning_rate"], space["max_learning_rate"])
    return random_layers(space, shape, rng)


def to_genome(genes: dict[str, Any]) -> dict[str, Any]:
    """dicebox's JSON genome for a gene dict."""
    return {"optimizer": {"name": genes["optimizer"], "learning_rate": genes["learning_rate"]},
            "layers": genes["layers"]}


def breed(mother: dict[str, Any], father: dict[str, Any], space: dict[str, Any],
          shape: tuple[int, int, int], rng: random.Random) -> list[dict[str, Any]]:
    """Two children, as the original bred them: each gene from either parent, then a
    mutation (one gene redrawn) with probability MUTATE_CHANCE."""
    children = []
    for _ in range(2):
        child = {gene: rng.choice([mother[gene], father[gene]]) for gene in GENES}
        if MUTATE_CHANCE > rng.random():
            gene = rng.choice(GENES)
            child[gene] = draw_gene(gene, space, shape, rng)
        children.append(child)
    return children


def next_generation(scored: list[tuple[dict, float]], space: dict[str, Any],
                    shape: tuple[int, int, int],
                    rng: random.Random) -> list[tuple[dict, float | None]]:
    """The original ``evolve``: survivors keep their fitness; children have none yet."""
    graded = sorted(scored, key=lambda item: item[1], reverse=True)
    # The original kept int(n * retain) and looped forever when that left one parent
    # (populations below 5): at least two are kept so a distinct pair always exists.
    retain = max(2, int(len(graded) * RETAIN))
    parents = graded[:retain] + [item for item in graded[retain:] if RANDOM_SELECT > rng.random()]
    children: list[dict] = []
    while len(children) < len(scored) - len(parents):
        male, female = rng.randrange(len(parents)), rng.randrange(len(parents))
        if male != female:
            for baby in breed(parents[male][0], parents[female][0], space, shape, rng):
                if len(children) < len(scored) - len(parents):
                    children.append(baby)
    return parents + [(child, None) for child in children]


# -- training -----------------------------------------------------------------------------
class InMemory(Dataset):
    """uint8 images held in memory, normalised per item as torchvision's Normalize would."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: torch.Tensor,
                 std: torch.Tensor) -> None:
        # A copy: dicebox hands out read-only views, which torch.from_numpy warns about.
        self.images = torch.from_numpy(np.array(images, dtype=np.uint8))
        self.labels = torch.from_numpy(np.array(labels, dtype=np.int64))
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.images[i].float() / 255.0 - self.mean) / self.std, self.labels[i]


def build(genome: dict[str, Any], shape: tuple[int, int, int], classes: int) -> nn.Sequential:
    """The genome's network: the flatten before the first dense layer and the output layer
    are implied."""
    channels, h, w = shape
    features = None  # set once flattened
    modules: list[nn.Module] = []
    for layer in genome["layers"]:
        kind = layer["type"]
        if kind == "conv2d":
            conv = nn.Conv2d(channels, layer["filters"], tuple(layer["kernel"]), padding="same")
            modules += [conv, ACTIVATIONS[layer["activation"]]()]
            channels = layer["filters"]
        elif kind == "maxpool2d":
            kh, kw = layer["kernel"]
            modules.append(nn.MaxPool2d((kh, kw)))
            h, w = h // kh, w // kw
        elif kind == "dropout":
            modules.append(nn.Dropout(layer["rate"]))
        else:
            if features is None:
                modules.append(nn.Flatten())
                features = channels * h * w
            modules += [nn.Linear(features, layer["size"]), ACTIVATIONS[layer["activation"]]()]
            features = layer["size"]
    if features is None:
        modules.append(nn.Flatten())
        features = channels * h * w
    modules.append(nn.Linear(features, classes))
    return nn.Sequential(*modules)


def evaluate(model: nn.Module, loader: DataLoader) -> tuple[float, float]:
    """Mean cross-entropy and accuracy."""
    model.eval()
    loss, correct, seen = 0.0, 0, 0
    with torch.no_grad():
        for x, y in loader:
            out = model(x)
            loss += nn.functional.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
            seen += len(y)
    return loss / seen, correct / seen


def train_and_score(genome: dict[str, Any], train: DataLoader, val: DataLoader,
                    shape: tuple[int, int, int], classes: int, epochs: int, patience: int,
                    deadline: float) -> tuple[float, int] | None:
    """Validation accuracy after training with Keras's EarlyStopping(monitor="val_loss",
    patience, restore_best_weights=True), and the epochs run; None past the deadline.

    The accuracy measured at the best-loss epoch is what evaluating the restored weights
    gives (evaluation is deterministic), so it is kept instead of a copy of the weights.
    As in Keras, a run whose loss never improves (NaN from the first epoch) keeps its last
    weights, so its last accuracy counts."""
    model = build(genome, shape, classes)
    optimizer = OPTIMIZERS[genome["optimizer"]["name"]](model.parameters(),
                                                         lr=genome["optimizer"]["learning_rate"])
    best_loss, best_accuracy, wait = math.inf, None, 0
    for epoch in range(1, epochs + 1):
        if time.perf_counter() > deadline:
            return None
        model.train()
        for x, y in train:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        loss, accuracy = evaluate(model, val)
        if loss < best_loss:
            best_loss, best_accuracy, wait = loss, accuracy, 0
        else:
            wait += 1
            if wait >= patience:
                break
    return (accuracy if best_accuracy is None else best_accuracy), epoch


def network_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def run(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
        space: dict[str, Any], population: int, generations: int, epochs: int, patience: int,
        seed: int, time_budget: float, threads: int,
        on_trained: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Evolves for ``generations`` (or until ``time_budget`` seconds have passed: a network
    still training then is dropped) and returns one record per network trained, in order:
    {"generation", "fitness", "seconds", "elapsed", "genome", "epochs"}.

    ``train`` and ``val`` are (uint8 images [N, C, H, W], int64 labels). The same seed and
    data give the same records, timings aside."""
    started = time.perf_counter()
    deadline = started + time_budget
    torch.set_num_threads(threads)
    images, labels = train
    shape = tuple(images.shape[1:])
    classes = int(max(labels.max(), val[1].max())) + 1
    pixels = images.astype(np.float64) / 255.0
    mean = torch.tensor(pixels.mean(axis=(0, 2, 3)), dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(pixels.std(axis=(0, 2, 3)), dtype=torch.float32).view(-1, 1, 1)
    del pixels
    train_loader = DataLoader(InMemory(images, labels, mean, std), batch_size=BATCH, shuffle=True)
    val_loader = DataLoader(InMemory(val[0], val[1], mean, std), batch_size=BATCH)

    rng = random.Random(seed)
    pop: list[tuple[dict, float | None]] = [
        ({gene: draw_gene(gene, space, shape, rng) for gene in GENES}, None)
        for _ in range(population)]
    records: list[dict[str, Any]] = []
    for generation in range(generations):
        scored = []
        for genes, fitness in pop:
            if fitness is None:
                genome = to_genome(genes)
                # Weights, dropout masks and the shuffle all come from torch's global RNG.
                torch.manual_seed(network_seed(seed, len(records)))
                t0 = time.perf_counter()
                result = train_and_score(genome, train_loader, val_loader, shape, classes, epochs,
                                         patience, deadline)
                if result is None:
                    return records
                fitness, epochs_run = result
                now = time.perf_counter()
                record = {"generation": generation, "fitness": fitness, "seconds": now - t0,
                          "elapsed": now - started, "genome": genome, "epochs": epochs_run}
                records.append(record)
                if on_trained is not None:
                    on_trained(record)
            scored.append((genes, fitness))
        # As in the original, the last generation is trained but not bred.
        if generation < generations - 1:
            pop = next_generation(scored, space, shape, rng)
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--space", type=Path, help="search space JSON (default: dicebox's default)")
    parser.add_argument("--population", type=int, default=4)
    parser.add_argument("--generations", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-budget", type=float, default=600.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import dicebox

    space = json.loads(args.space.read_text()) if args.space else dicebox.SearchSpace().to_dict()
    ds = dicebox.Dataset.from_idx(args.data / "mnist-dev-images-idx3-ubyte.gz",
                                  args.data / "mnist-dev-labels-idx1-ubyte.gz")
    train, val, _ = ds.split([0.8, 0.1, 0.1], seed=0)

    def show(r: dict[str, Any]) -> None:
        print(f"  gen {r['generation']} fitness {r['fitness']:.4f} epochs {r['epochs']} "
              f"{r['seconds']:6.1f} s  {json.dumps(r['genome'])}", flush=True)

    records = run((train.images, train.labels), (val.images, val.labels), space, args.population,
                  args.generations, args.epochs, args.patience, args.seed, args.time_budget,
                  args.threads, show)
    epochs = sum(r["epochs"] for r in records)
    seconds = sum(r["seconds"] for r in records)
    print(f"{len(records)} networks, {epochs} epochs in {seconds:.1f} s: "
          f"{epochs * len(train) / seconds:.0f} training samples/s (validation passes included), "
          f"best validation accuracy {max(r['fitness'] for r in records):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
