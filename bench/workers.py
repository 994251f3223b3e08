"""Two individuals at one thread each, or one at a time at two threads? Measures which way
of training a generation is faster on this machine (it sets dicebox.evolve's default).

    .venv/bin/python bench/workers.py [--data DIR] [--count 6] [--epochs 2]
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dicebox

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-dev"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--count", type=int, default=6, help="random genomes from the default space")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    ds = dicebox.Dataset.from_idx(args.data / "mnist-dev-images-idx3-ubyte.gz",
                                  args.data / "mnist-dev-labels-idx1-ubyte.gz")
    train, val, _ = ds.split([0.8, 0.1, 0.1], seed=0)
    genomes = [dicebox.Genome.random(seed=s, input_shape=train.shape, classes=10) for s in range(args.count)]

    def fit(genome, threads):
        return dicebox.train(genome, train, val=val, epochs=args.epochs, threads=threads, patience=0)

    fit(genomes[0], 2)  # warm-up
    for round_ in range(2):
        started = time.perf_counter()
        for g in genomes:
            fit(g, 2)
        sequential = time.perf_counter() - started
        started = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda g: fit(g, 1), genomes))
        parallel = time.perf_counter() - started
        print(f"round {round_ + 1}: one at a time, 2 threads: {sequential:6.1f} s   "
              f"two at once, 1 thread each: {parallel:6.1f} s   ratio {sequential / parallel:.2f}x", flush=True)


if __name__ == "__main__":
    main()
