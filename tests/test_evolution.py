"""Evolution: search spaces, operators through the API, the state machine (cache, lineage,
halving) and dicebox.evolve end to end: budgets, callbacks, cancellation, no test-set leak,
and resume after kill -9."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import dicebox
from conftest import bands
from dicebox.evolution import Evolution, EvolutionParams

SMALL = dict(min_layers=1, max_layers=3, min_size=4, max_size=24, filters=[2, 4], kernels=[3])


@pytest.fixture(scope="module")
def data():
    return bands(150, 1), bands(60, 2), bands(60, 3)


def test_default_and_original_spaces():
    default = dicebox.SearchSpace()
    assert "conv2d" in default.layer_types and default.max_layers <= 8
    original = dicebox.SearchSpace.preset("original")
    assert (original.min_size, original.max_size) == (1, 1597)
    assert (original.min_layers, original.max_layers) == (1, 21)
    assert len(original.activations) == 12 and len(original.optimizers) == 7
    assert dicebox.SearchSpace.from_dict(original.to_dict()) == original


@pytest.mark.parametrize("change, field", [
    ({"min_layers": 0}, "min_layers"),
    ({"max_size": 10, "min_size": 20}, "size"),
    ({"activations": ["gelu"]}, "activations"),
    ({"optimizers": []}, "optimizers"),
    ({"min_learning_rate": -1.0}, "learning_rate"),
])
def test_bad_spaces_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        dicebox.SearchSpace(**change)


def test_unknown_space_field_is_refused():
    with pytest.raises(ValueError, match="neurons"):
        dicebox.SearchSpace.from_dict({"neurons": [1, 2]})
    with pytest.raises(ValueError, match="preset"):
        dicebox.SearchSpace.preset("huge")


def test_default_space_keeps_networks_within_its_compute_budget():
    space = dicebox.SearchSpace()
    for seed in range(40):
        cost = dicebox.Genome.random(space, seed=seed, input_shape=(1, 28, 28), classes=10).cost((1, 28, 28), 10)
        assert cost["parameters"] <= space.max_parameters and cost["macs"] <= space.max_macs
    cnn = dicebox.Genome.from_dict({"optimizer": "adam", "layers": [
        {"type": "conv2d", "filters": 32, "kernel": 3}, {"type": "maxpool2d", "kernel": 2},
        {"type": "conv2d", "filters": 64, "kernel": 3}, {"type": "maxpool2d", "kernel": 2},
        {"type": "dense", "size": 128}]})
    assert cnn.cost((1, 28, 28), 10) == {"parameters": 421_642, "macs": 4_241_152}
    assert dicebox.SearchSpace.preset("original").max_parameters == 0  # unbounded


def test_random_genomes_are_valid_and_seeded():
    space = dicebox.SearchSpace()
    genomes = [dicebox.Genome.random(space, seed=s, input_shape=(1, 12, 12), classes=3) for s in range(60)]
    for g in genomes:
        g.plan((1, 12, 12), 3)  # raises if invalid
        assert space.min_layers <= len(g.layers) <= space.max_layers
    assert genomes[5] == dicebox.Genome.random(space, seed=5, input_shape=(1, 12, 12), classes=3)
    assert len(set(genomes)) > 50


def _drive(evo, score):
    """Runs the state machine to the end; ``score(ind, budget)`` records each training."""
    while True:
        todo = evo.tasks()
        if not todo:
            if not evo.advance():
                return evo
            continue
        for ind, budget in todo:
            score(ind, budget)


def _run_machine(params, space, fitness_of):
    """Drives the state machine with a synthetic fitness (no training)."""
    evo = Evolution(params, space, (1, 8, 8), 3)
    return _drive(evo, lambda ind, budget: evo.record(ind["id"], fitness_of(json.loads(ind["genome"])), budget,
                                                      0.0, budget))


def _layer_count_fitness(genome):
    return 1.0 / (1 + len(genome["layers"])) + genome["optimizer"]["learning_rate"]


def test_state_machine_breeds_records_lineage_and_caches():
    params = EvolutionParams(population=8, generations=5, epochs=3, seed=1)
    evo = _run_machine(params, dicebox.SearchSpace(**SMALL), _layer_count_fitness)
    gens = evo.generations()
    assert len(gens) == 5 and all(len(g["individuals"]) == 8 for g in gens)
    ids = {i["id"] for g in gens for i in g["individuals"]}
    for g in gens[1:]:
        for ind in g["individuals"]:
            assert 1 <= len(ind["parents"]) <= 2 and set(ind["parents"]) <= ids
            if len(ind["parents"]) == 2:
                assert ind["parents"][0] != ind["parents"][1]
    # survivors keep their score without being trained again
    assert evo.state["cache_hits"] > 0
    assert evo.state["trained"] + evo.state["cache_hits"] == 40
    board = evo.leaderboard()
    assert len({json.dumps(e["genome"], sort_keys=True) for e in board}) == len(board)
    assert [e["fitness"] for e in board] == sorted((e["fitness"] for e in board), reverse=True)
    # the best never gets worse from one generation to the next (elitism through retain)
    bests = [g["best_fitness"] for g in gens]
    assert bests == sorted(bests)


def test_state_machine_is_deterministic_and_resumable_from_its_dict():
    params = EvolutionParams(population=6, generations=4, seed=7)
    space = dicebox.SearchSpace(**SMALL)
    a = _run_machine(params, space, _layer_count_fitness)
    b = _run_machine(params, space, _layer_count_fitness)
    assert a.to_dict() == b.to_dict()
    # stop half way, serialise, restore, finish: the same run
    evo = Evolution(params, space, (1, 8, 8), 3)
    todo = evo.tasks()
    for ind, epochs in todo[:3]:
        evo.record(ind["id"], _layer_count_fitness(json.loads(ind["genome"])), epochs, 0.0, epochs)
    restored = Evolution.from_dict(json.loads(json.dumps(evo.to_dict())), params, space, (1, 8, 8), 3)
    _drive(restored, lambda ind, budget: restored.record(
        ind["id"], _layer_count_fitness(json.loads(ind["genome"])), budget, 0.0, budget))
    assert restored.leaderboard() == a.leaderboard()
    other = EvolutionParams(population=6, generations=4, seed=8)
    with pytest.raises(ValueError, match="another evolution run"):
        Evolution.from_dict(evo.to_dict(), other, space, (1, 8, 8), 3)


def test_an_early_stopped_individual_is_done():
    """Training that stops early (fewer epochs than asked) counts as done: it is neither
    trained again nor asked for more."""
    params = EvolutionParams(population=4, generations=3, epochs=6, seed=0)
    evo = Evolution(params, dicebox.SearchSpace(**SMALL), (1, 8, 8), 3)
    trainings = []

    def stop_after_two_epochs(ind, budget):
        trainings.append(ind["id"])
        evo.record(ind["id"], 0.5 + ind["id"] / 100, 2, 0.0, budget)

    _drive(evo, stop_after_two_epochs)
    assert len(trainings) == evo.state["trained"] <= 12


def test_halving_gives_full_epochs_to_the_best_third_only():
    params = EvolutionParams(population=9, generations=1, epochs=6, seed=0, schedule="halving")
    evo = _run_machine(params, dicebox.SearchSpace(**SMALL), _layer_count_fitness)
    budgets = sorted(i["budget"] for i in evo.generation["individuals"])
    assert budgets.count(6) == 3 and budgets.count(2) == 6


@pytest.mark.parametrize("kwargs, message", [
    ({"population": 1}, "population"),
    ({"retain": 1.5}, "retain"),
    ({"schedule": "fast"}, "schedule"),
    ({"time_budget": 0}, "time_budget"),
    ({"workers": 0}, "workers"),
])
def test_bad_evolve_arguments(data, kwargs, message):
    train, val, _ = data
    with pytest.raises(ValueError, match=message):
        dicebox.evolve(train, val, **kwargs)


def test_evolve_end_to_end(data):
    train, val, test = data
    seen = []
    # patience 1 over 4 epochs: some trainings stop early, and must still count as done
    result = dicebox.evolve(train, val, space=dicebox.SearchSpace(**SMALL), population=4, generations=3,
                            epochs=4, patience=1, seed=0, threads=2, test=test, callback=seen.append)
    assert result.stopped == "completed"
    assert len(result.generations) == 3
    assert result.trained + result.cache_hits == len(seen) == 12
    assert result.cache_hits >= 1
    assert isinstance(result.best, dicebox.Model)
    assert result.best_fitness == result.leaderboard[0]["fitness"] == max(r["fitness"] for r in seen)
    assert result.test_metrics["accuracy"] == result.best.metrics["accuracy"]
    assert set(seen[0]) >= {"generation", "id", "parents", "genome", "fitness", "epochs", "seconds", "cached",
                            "elapsed"}
    # same seed and data: the same genomes in the same order, with two workers or one
    again = []
    dicebox.evolve(train, val, space=dicebox.SearchSpace(**SMALL), population=4, generations=3, epochs=4,
                   patience=1, seed=0, threads=2, workers=2, callback=again.append)
    assert [r["genome"] for r in again] == [r["genome"] for r in seen]


def test_test_set_never_influences_the_search(data):
    train, val, test = data
    wrong = dicebox.Dataset.from_arrays(test.images, (test.labels + 1) % 3, test.categories)
    kwargs = dict(space=dicebox.SearchSpace(**SMALL), population=3, generations=2, epochs=1, seed=2, threads=1)
    a = dicebox.evolve(train, val, test=test, **kwargs)
    b = dicebox.evolve(train, val, test=wrong, **kwargs)
    assert a.leaderboard == b.leaderboard
    assert a.test_metrics["accuracy"] != b.test_metrics["accuracy"]


def test_callback_can_stop_and_budget_returns_best_so_far(data):
    train, val, _ = data
    kwargs = dict(space=dicebox.SearchSpace(**SMALL), population=4, generations=5000, epochs=1, seed=0, threads=1)
    calls = []
    result = dicebox.evolve(train, val, callback=lambda r: calls.append(r) or len(calls) < 3, **kwargs)
    assert result.stopped == "callback" and len(calls) == 3 and result.best is not None
    budget = dicebox.evolve(train, val, time_budget=1.5, **kwargs)
    assert budget.stopped == "time_budget" and budget.best is not None
    assert len(budget.generations) < 5000


def test_checkpoint_of_another_run_is_refused(data, tmp_path):
    train, val, _ = data
    kwargs = dict(space=dicebox.SearchSpace(**SMALL), population=3, generations=1, epochs=1, threads=1,
                  checkpoint_dir=tmp_path)
    dicebox.evolve(train, val, **kwargs)
    with pytest.raises(ValueError, match="patience"):
        dicebox.evolve(train, val, patience=1, **kwargs)
    with pytest.raises(ValueError, match="another evolution run"):
        dicebox.evolve(train, val, seed=9, **kwargs)


def test_cancel_from_another_thread(data):
    train, val, _ = data
    token = dicebox.CancelToken()
    threading.Timer(0.5, token.cancel).start()
    with pytest.raises(dicebox.Cancelled):
        dicebox.evolve(train, val, space=dicebox.SearchSpace(**SMALL), population=4, generations=500, epochs=1,
                       threads=1, cancel=token)


EVOLVE_SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests!r})
import dicebox
from conftest import bands
kill_at = int(sys.argv[1])
count = [0]
def callback(record):
    count[0] += 1
    if count[0] == kill_at:
        os._exit(9)  # like kill -9, in the middle of a generation
result = dicebox.evolve(bands(150, 1), bands(60, 2), space=dicebox.SearchSpace(**{small!r}), population=4,
                        generations=3, epochs=2, seed=5, threads=2, checkpoint_dir=sys.argv[2], callback=callback)
json.dump({{"leaderboard": result.leaderboard, "trained": result.trained}}, open(sys.argv[3], "w"))
"""


def test_killed_evolution_resumes_to_the_same_leaderboard(tmp_path):
    script = tmp_path / "evolve.py"
    script.write_text(EVOLVE_SCRIPT.format(tests=os.path.dirname(__file__), small=SMALL))

    def run(kill_at, ckpt, out):
        return subprocess.run([sys.executable, str(script), str(kill_at), str(ckpt), str(out)],
                              capture_output=True, text=True)

    full = run(0, tmp_path / "a", tmp_path / "full.json")
    assert full.returncode == 0, full.stderr
    killed = run(6, tmp_path / "b", tmp_path / "never.json")
    assert killed.returncode == 9
    resumed = run(0, tmp_path / "b", tmp_path / "resumed.json")
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((tmp_path / "full.json").read_text())
    b = json.loads((tmp_path / "resumed.json").read_text())
    assert a["leaderboard"] == b["leaderboard"]
    assert b["trained"] == a["trained"]  # nothing scored before the kill was trained twice
    best = dicebox.Model.load(tmp_path / "b" / "best")
    assert best.genome.to_dict() == a["leaderboard"][0]["genome"]
    np.testing.assert_array_equal(best.predict(bands(5, 9).images).shape, (5, 3))
