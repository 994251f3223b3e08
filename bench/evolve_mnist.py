"""Evolution benchmark: ``dicebox.evolve`` against a plain Python re-implementation of the
original algorithm (bench/original_ga.py: sequential, PyTorch, Keras-style early stopping).

Both sides get the same data (../shared/data/mnist-dev split 80/10/10 with seed 0), the
same search space, population, generations, epochs, patience, seed and time budget; they
run one after the other so neither competes with the other for the cores. Reports, for
each: best validation accuracy, wall time, networks trained (dicebox also: cache hits and
the best network's test accuracy), and the time each first reached the same validation
accuracy (the lower of the two bests) with the ratio peer / dicebox. Then runs a small
evolution twice with the same seed and checks both give the same genomes in the same order.

Checks (exit status 1 if one fails): dicebox's best network reaches 97% test accuracy
within 10 minutes; dicebox reaches the common validation accuracy at least 3x sooner than
the peer; the two small runs give the same genomes.

    .venv/bin/python bench/evolve_mnist.py [--population 12] [--generations 40] [--epochs 6]
        [--seed 0] [--time-budget 600] [--threads 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import original_ga

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-dev"
PATIENCE = 2
TEST_TARGET = 0.97      # test accuracy dicebox must reach ...
WITHIN_SECONDS = 600.0  # ... within this wall time
SPEEDUP_TARGET = 3.0    # peer time / dicebox time to the same validation accuracy
# The determinism check's budget: small, so the check costs well under a minute.
SMALL = {"population": 6, "generations": 2, "epochs": 1}


def load(data_dir: Path):
    import dicebox

    ds = dicebox.Dataset.from_idx(data_dir / "mnist-dev-images-idx3-ubyte.gz",
                                  data_dir / "mnist-dev-labels-idx1-ubyte.gz")
    return ds.split([0.8, 0.1, 0.1], seed=0)


def show(side: str, r: dict[str, Any]) -> None:
    cached = " (cached)" if r.get("cached") else ""
    fitness = "  n/a " if r["fitness"] is None else f"{r['fitness']:.4f}"
    print(f"  {side:7s} gen {r['generation']} val {fitness} {r['seconds']:6.1f} s "
          f"at {r['elapsed']:6.1f} s{cached}", flush=True)


def run_dicebox(train, val, test, population: int, generations: int, epochs: int, seed: int,
                time_budget: float, verbose: bool = True):
    """The result of dicebox.evolve and the callback's records, in order."""
    import dicebox

    records: list[dict[str, Any]] = []

    def callback(record: dict[str, Any]) -> None:
        records.append(record)
        if verbose:
            show("dicebox", record)

    result = dicebox.evolve(train, val, test=test, space=dicebox.SearchSpace(),
                            population=population, generations=generations, epochs=epochs,
                            patience=PATIENCE, seed=seed, workers=None, time_budget=time_budget,
                            callback=callback)
    return result, records


def run_peer(train, val, population: int, generations: int, epochs: int, seed: int,
             time_budget: float, threads: int):
    """The peer's records and its wall time."""
    import dicebox

    started = time.perf_counter()
    records = original_ga.run((train.images, train.labels), (val.images, val.labels),
                              dicebox.SearchSpace().to_dict(), population, generations, epochs,
                              PATIENCE, seed, time_budget, threads, lambda r: show("peer", r))
    return records, time.perf_counter() - started


def best(records: list[dict[str, Any]]) -> float:
    # dicebox scores a network whose loss went non-finite as None (the worst).
    return max((r["fitness"] for r in records if r["fitness"] is not None), default=0.0)


def first_reach(records: list[dict[str, Any]], target: float) -> float | None:
    """Seconds from the start until a network first scored ``target`` or better."""
    return next((r["elapsed"] for r in records
                 if r["fitness"] is not None and r["fitness"] >= target), None)


def genome_sequence(records: list[dict[str, Any]]) -> list[str]:
    return [json.dumps(r["genome"], sort_keys=True) for r in records]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--population", type=int, default=12)
    parser.add_argument("--generations", type=int, default=40, help="an upper bound: the time budget usually ends the run first")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-budget", type=float, default=600.0, help="seconds, per side")
    parser.add_argument("--threads", type=int, default=2, help="the peer's torch threads")
    parser.add_argument("--json", type=Path, help="also write the figures and records here")
    args = parser.parse_args()
    if not (args.data / "mnist-dev-images-idx3-ubyte.gz").exists():
        print(f"no mnist-dev data in {args.data}", file=sys.stderr)
        return 2
    train, val, test = load(args.data)
    budget = (args.population, args.generations, args.epochs, args.seed, args.time_budget)
    print(f"mnist-dev: train {len(train)}, val {len(val)}, test {len(test)}; population "
          f"{args.population}, generations {args.generations}, epochs {args.epochs}, patience "
          f"{PATIENCE}, seed {args.seed}, budget {args.time_budget:.0f} s per side")

    print("dicebox.evolve:", flush=True)
    result, ours = run_dicebox(train, val, test, *budget)
    print("original algorithm (plain PyTorch):", flush=True)
    theirs, peer_wall = run_peer(train, val, *budget, args.threads)

    print(f"determinism: dicebox.evolve twice with seed {args.seed} on {SMALL}", flush=True)
    small = (SMALL["population"], SMALL["generations"], SMALL["epochs"], args.seed,
             args.time_budget)
    first = genome_sequence(run_dicebox(train, val, test, *small, verbose=False)[1])
    second = genome_sequence(run_dicebox(train, val, test, *small, verbose=False)[1])
    same_genomes = bool(first) and first == second

    best_ours, best_theirs = best(ours), best(theirs)
    target = min(best_ours, best_theirs)
    t_ours, t_theirs = first_reach(ours, target), first_reach(theirs, target)
    ratio = t_theirs / t_ours if t_ours and t_theirs is not None else None
    test_accuracy = result.best.metrics["accuracy"]
    # When the winner was found: the run may go on (to its budget) without improving.
    found_at = first_reach(ours, best_ours)
    checks = {
        f"test accuracy >= {TEST_TARGET} within {WITHIN_SECONDS:.0f} s":
            test_accuracy >= TEST_TARGET and found_at is not None and found_at <= WITHIN_SECONDS,
        f">= {SPEEDUP_TARGET:.0f}x faster to the same validation accuracy":
            ratio is not None and ratio >= SPEEDUP_TARGET,
        "same seed, same genomes in the same order": same_genomes,
    }

    def cell(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    rows = [
        ("best validation accuracy", cell(best_ours, ".4f"), cell(best_theirs, ".4f")),
        ("best network's test accuracy", cell(test_accuracy, ".4f"), "-"),
        ("wall time (s)", cell(result.elapsed, ".1f"), cell(peer_wall, ".1f")),
        ("best found at (s)", cell(found_at, ".1f"), cell(first_reach(theirs, best_theirs), ".1f")),
        ("networks trained", str(result.trained), str(len(theirs))),
        ("cache hits", str(result.cache_hits), "-"),
        (f"time to val >= {target:.4f} (s)", cell(t_ours, ".1f"), cell(t_theirs, ".1f")),
    ]
    print()
    print(f"{'':34s} {'dicebox':>10s} {'peer':>10s}")
    for name, a, b in rows:
        print(f"{name:34s} {a:>10s} {b:>10s}")
    print(f"{'ratio peer / dicebox':34s} {cell(ratio, '.1f') + 'x':>10s}")
    if result.leaderboard:
        print(f"best genome: {json.dumps(result.leaderboard[0]['genome'])}")
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")

    if args.json:
        args.json.write_text(json.dumps({
            "settings": {**vars(args), "data": str(args.data), "json": str(args.json),
                         "patience": PATIENCE},
            "dicebox": {"best_fitness": result.best_fitness, "best_test_accuracy": test_accuracy,
                        "elapsed": result.elapsed, "trained": result.trained,
                        "cache_hits": result.cache_hits, "time_to_target": t_ours,
                        "leaderboard": result.leaderboard, "generations": result.generations,
                        "records": ours},
            "peer": {"best_fitness": best_theirs, "elapsed": peer_wall, "trained": len(theirs),
                     "time_to_target": t_theirs, "records": theirs},
            "target": target, "ratio": ratio,
            "determinism": {"same": same_genomes, "genomes": first},
            "checks": checks,
        }, indent=2, default=str))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
