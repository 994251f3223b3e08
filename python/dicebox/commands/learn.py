"""``dicebox train`` and ``dicebox evolve``: in this process, or queued on the server.

``--dataset NAME`` names a dataset on the server; a value with a ``/`` in it (``./dice.dbx``)
is a packed dataset file written by ``Dataset.save`` or ``dicebox dataset export``, which
in-process runs read without any server. In process, the dataset is split exactly as the
server's processors split it (``[1 - validation - test, validation, test]``, stratified,
seeded), trained or evolved with :func:`dicebox.train` / :func:`dicebox.evolve`, evaluated on
the test part, and the model is saved to ``--out DIR`` (``dicebox.Model.load`` reads it).

With ``--submit`` the same parameters go to ``POST /v1/jobs``; the command then follows the
job (``--detach`` prints its id and returns at once) and, with ``--out``, downloads the model.
Parameters are checked here with the server's own rules before anything runs or is sent;
defaults are the service's, so a run gives the same model either way.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dicebox.commands.common import (
    EXIT_OK,
    Output,
    UsageError,
    WorkFailed,
    add_output_options,
    connect,
    describe_genome,
    fmt_float,
    fmt_pct,
    fraction,
    non_negative_int,
    positive_float,
    positive_int,
)
from dicebox.processor import split  # the same split as the server's processors

TRAIN_PARAMS = ("epochs", "batch_size", "patience", "seed", "augment", "label_smoothing", "validation", "test")
EVOLUTION_FIELDS = ("population", "generations", "retain", "random_select", "mutate_chance", "space",
                    "schedule", "time_budget")


def _add_train_params(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training (defaults are the service's)")
    group.add_argument("--epochs", type=positive_int, help="epochs at most (default 10)")
    group.add_argument("--batch-size", type=positive_int, metavar="N", help="images per step (default 64)")
    group.add_argument("--patience", type=non_negative_int, metavar="N",
                       help="stop after N epochs without a better validation loss; 0 = never (default 5)")
    group.add_argument("--seed", type=non_negative_int, help="random seed of the split and training (default 0)")
    group.add_argument("--augment", type=fraction, metavar="P",
                       help="chance that an image is rotated, scaled and shifted (default 0)")
    group.add_argument("--label-smoothing", type=fraction, metavar="F", help="label smoothing (default 0)")
    group.add_argument("--validation", type=fraction, metavar="F",
                       help="share of the dataset held out for validation (default 0.1)")
    group.add_argument("--test", type=fraction, metavar="F",
                       help="share of the dataset held out for the final test (default 0.1)")


def _add_run_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--dataset", required=True, metavar="NAME",
                        help="dataset on the server; a path with a '/' (./dice.dbx) is a packed "
                             "dataset file, read in process without a server")
    parser.add_argument("--out", metavar="DIR",
                        help=f"save the {what} model here (a new or empty folder; in process the "
                             f"default is ./{what}-DATASET-TIME; with --submit only when given)")
    where = parser.add_argument_group("where it runs")
    where.add_argument("--submit", action="store_true",
                       help="queue it on the server as a job and follow it (default: run here)")
    where.add_argument("--detach", action="store_true",
                       help="with --submit: print the job id and return without following it")
    where.add_argument("--priority", type=int, help="with --submit: job priority, -100..100 (default 0)")
    where.add_argument("--threads", type=positive_int, metavar="N",
                       help="in process: CPU threads (default DICEBOX_THREADS or every CPU)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser(
        "train", help="train a genome's network on a dataset (here, or on the server with --submit)",
        description="Train the network a genome describes (a JSON file, example below) "
                    "on a dataset split into train/validation/test parts. Without --submit it runs "
                    "here with a progress bar and saves the model to --out; with --submit it is "
                    "queued on the server and followed until it ends (exit 1 if it fails).",
        epilog="examples:\n  dicebox train --dataset dice --genome cnn.json --epochs 20\n"
               "  dicebox train --dataset dice --genome cnn.json --submit --out ./model\n"
               "a genome (cnn.json; the flatten and the output layer are implied):\n"
               '  {"optimizer": {"name": "adam", "learning_rate": 0.001},\n'
               '   "layers": [{"type": "conv2d", "filters": 16, "kernel": [3, 3], "activation": "relu"},\n'
               '              {"type": "maxpool2d", "kernel": [2, 2]}, {"type": "dropout", "rate": 0.25},\n'
               '              {"type": "dense", "size": 64, "activation": "relu"}]}')
    train.add_argument("--genome", required=True, metavar="FILE",
                       help="the genome as a JSON file ('-' reads standard input)")
    train.add_argument("--init", metavar="MODEL",
                       help="warm start: a model id or 'best' (of the dataset) on the server, or "
                            "in process also a model folder (with a '/')")
    _add_run_options(train, "trained")
    _add_train_params(train)
    add_output_options(train)
    train.set_defaults(func=cmd_train)

    evolve = sub.add_parser(
        "evolve", help="evolve networks for a dataset (here, or on the server with --submit)",
        description="Evolve a population of networks over generations; each individual is trained "
                    "for --epochs and scored by validation accuracy. Without --submit it runs here "
                    "(resumable with --checkpoint) and saves the best model to --out; with --submit "
                    "the server's processors train the individuals in parallel.",
        epilog="examples:\n  dicebox evolve --dataset dice --population 8 --generations 3 --epochs 4\n"
               "  dicebox evolve --dataset dice --population 8 --generations 3 --submit")
    _add_run_options(evolve, "evolved")
    group = evolve.add_argument_group("evolution")
    group.add_argument("--population", type=positive_int, help="individuals per generation (default 20)")
    group.add_argument("--generations", type=positive_int, help="generations (default 10)")
    group.add_argument("--retain", type=fraction, metavar="F", help="share of the best kept (default 0.4)")
    group.add_argument("--random-select", type=fraction, metavar="F",
                       help="chance to keep one of the others (default 0.1)")
    group.add_argument("--mutate-chance", type=fraction, metavar="F", help="mutation chance (default 0.2)")
    group.add_argument("--space", metavar="FILE|PRESET",
                       help="search space: a JSON file (a path with '/' or ending in .json), or "
                            "the preset 'default' or 'original'")
    group.add_argument("--schedule", choices=["halving"],
                       help="'halving': everyone gets a third of the epochs, the best third all")
    group.add_argument("--time-budget", type=positive_float, metavar="SECONDS",
                       help="stop with the best so far after this long")
    group.add_argument("--workers", type=positive_int, metavar="N",
                       help="in process: individuals trained at once (default 1)")
    group.add_argument("--checkpoint", metavar="DIR",
                       help="in process: keep the run's state here; run again to resume")
    _add_train_params(evolve)
    add_output_options(evolve)
    evolve.set_defaults(func=cmd_evolve)


# -- parameters ----------------------------------------------------------------------------------

def _given(args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def _pydantic_message(exc, prefix: str) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"--{where.replace('_', '-')}: {err.get('msg')}" if where else str(err.get("msg")))
    return f"{prefix}: " + "; ".join(parts) if prefix else "; ".join(parts)


def _train_params(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the flags given, the full parameters with the service's defaults), checked by the
    service's own model; UsageError naming the flag."""
    from pydantic import ValidationError

    from dicebox.jobspec import TrainParams

    given = _given(args, TRAIN_PARAMS)
    try:
        full = TrainParams(**given).model_dump()
    except ValidationError as exc:
        raise UsageError(_pydantic_message(exc, "")) from None
    if full["validation"] + full["test"] >= 0.9:
        raise UsageError(f"--validation + --test must leave data to train on, got "
                         f"{full['validation']} + {full['test']}")
    return given, full


def _check_where(args: argparse.Namespace, local_only: tuple[str, ...]) -> None:
    if args.submit:
        for name in local_only:
            if getattr(args, name, None) is not None:
                raise UsageError(f"--{name.replace('_', '-')} applies only to runs in this process "
                                 "(without --submit)")
        return
    for name in ("detach", "priority"):
        if getattr(args, name) not in (None, False):
            raise UsageError(f"--{name} applies only with --submit")


def _read_json(path: str, what: str) -> Any:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"{what} {path!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{what} {path!r} is not a text (JSON) file") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{what} {path!r} is not valid JSON: {exc}") from None


def _read_genome(path: str) -> dict[str, Any]:
    from dicebox.genome import Genome

    data = _read_json(path, "--genome")
    try:
        return Genome.from_dict(data).to_dict()
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--genome {path!r}: {exc}") from None


def _read_space(value: str | None) -> dict[str, Any] | str | None:
    from dicebox.evolution import SearchSpace

    if value is None:
        return None
    if "/" in value or value.endswith(".json"):
        space: Any = _read_json(value, "--space")
    else:
        space = value
    try:
        return SearchSpace.coerce(space).to_dict()
    except (ValueError, TypeError, RuntimeError) as exc:
        raise UsageError(f"--space {value!r}: {exc}") from None


def _out_dir(args: argparse.Namespace, what: str) -> Path | None:
    """The folder for the model, checked before any work: new, or empty."""
    if args.submit and args.detach and args.out is not None:
        raise UsageError("--out with --detach: the command returns before the model exists; "
                         "download it later with dicebox models export")
    if args.out is None:
        if args.submit:
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dataset = Path(args.dataset).stem if "/" in args.dataset else args.dataset
        return Path(f"{what}-{dataset}-{stamp}")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out: {str(out)!r} exists and is not an empty folder; choose a new one")
    return out


def _is_path(dataset: str) -> bool:
    return "/" in dataset


# -- in-process runs -----------------------------------------------------------------------------

@contextmanager
def _local_dataset(args: argparse.Namespace, out: Output):
    """(dataset, version or None, name) for an in-process run: the packed file given, or the
    server dataset's export downloaded into a temporary folder (removed afterwards)."""
    import dicebox

    if _is_path(args.dataset):
        path = Path(args.dataset)
        if not path.is_file():
            raise UsageError(f"--dataset: {str(path)!r} is not a file")
        try:
            data = dicebox.Dataset.load(path)
        except (OSError, ValueError, RuntimeError) as exc:
            raise UsageError(f"--dataset {str(path)!r}: not a packed dataset file ({exc})") from None
        yield data, None, path.stem
        return
    with connect(args) as client, tempfile.TemporaryDirectory(prefix="dicebox-") as scratch:
        info = client.datasets.get(args.dataset)
        out.say(f"downloading dataset {args.dataset} ({info['count']} images)")
        target = Path(scratch) / "dataset.dbx"
        client.datasets.export(args.dataset, target, version=info["count"])
        yield dicebox.Dataset.load(target), info["count"], args.dataset


@contextmanager
def _cancel_on_ctrl_c():
    """A CancelToken set by Ctrl-C, so training stops cleanly (dicebox.Cancelled) instead of
    being torn down inside the core."""
    import dicebox

    token = dicebox.CancelToken()
    previous = signal.getsignal(signal.SIGINT)

    def on_interrupt(_signum: int, _frame: Any) -> None:
        token.cancel()

    signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield token
    finally:
        signal.signal(signal.SIGINT, previous)


def _check_data(data, validation_needed: bool, val) -> None:
    if len(data) < 10 or sum(1 for n in data.counts().values() if n > 0) < 2:
        raise UsageError(f"--dataset: {len(data)} images in {sum(1 for n in data.counts().values() if n)} "
                         "categories; training needs at least 10 images in 2 categories")
    if validation_needed and (val is None or len(val) == 0):
        raise UsageError("--validation: evolution scores networks on a validation part; it must be > 0 "
                         "and leave at least one image per category")


def _init_model(args: argparse.Namespace):
    import dicebox

    if args.init is None:
        return None, None
    if _is_path(args.init):
        try:
            return dicebox.Model.load(args.init), None
        except (OSError, ValueError, RuntimeError) as exc:
            raise UsageError(f"--init {args.init!r}: not a model folder ({exc})") from None
    scratch = tempfile.TemporaryDirectory(prefix="dicebox-init-")
    with connect(args) as client:
        record = client.models.get(args.init, dataset=args.dataset if args.init == "best" else None)
        client.models.download(record["id"], scratch.name)
    return dicebox.Model.load(scratch.name), scratch


def _train_here(args: argparse.Namespace, out: Output, genome: dict[str, Any], params: dict[str, Any],
                target: Path) -> int:
    import dicebox

    init, scratch = _init_model(args)
    try:
        with _local_dataset(args, out) as (data, version, name):
            train, val, test = split(data, params["validation"], params["test"], params["seed"])
            _check_data(data, False, val)
            started = time.monotonic()
            with out.progress(f"training on {name}", params["epochs"], "epochs") as bar, \
                    _cancel_on_ctrl_c() as token:
                def on_epoch(epoch: dict[str, Any]) -> None:
                    from dicebox.commands.jobs import _epoch_status

                    bar.update(epoch["epoch"], _epoch_status(epoch))

                try:
                    model = dicebox.train(genome, train, val=val, epochs=params["epochs"],
                                          batch_size=params["batch_size"], patience=params["patience"],
                                          seed=params["seed"], augment=params["augment"],
                                          label_smoothing=params["label_smoothing"], threads=args.threads,
                                          callback=on_epoch, init=init, cancel=token)
                except dicebox.Cancelled:
                    raise KeyboardInterrupt from None
                except ValueError as exc:
                    raise UsageError(f"--genome: {exc}") from None
            evaluated_on = "test" if test is not None else "validation" if val is not None else "train"
            metrics = model.evaluate(test if test is not None else val if val is not None else train)
            history = model.history
            fitness = _validation_fitness(history)
            training_seconds = float(sum(e.get("seconds") or 0.0 for e in history))
            model.metadata = {**model.metadata, "dataset": name, "dataset_version": version,
                              "fitness": fitness, "training_seconds": training_seconds,
                              "evaluated_on": evaluated_on}
            model.save(target)
    finally:
        if scratch is not None:
            scratch.cleanup()
    document = {"model_dir": str(target), "dataset": name, "version": version, "genome": genome,
                "params": params, "epochs": len(history), "history": history, "fitness": fitness,
                "metrics": metrics, "evaluated_on": evaluated_on, "training_seconds": training_seconds,
                "elapsed": time.monotonic() - started}
    if out.json:
        out.result(document)
    else:
        out.say(f"trained {len(history)} epochs in {document['elapsed']:.1f} s: {evaluated_on} accuracy "
                f"{fmt_pct(metrics.get('accuracy'))} (macro F1 {fmt_float(metrics.get('f1'))}), validation "
                f"accuracy {fmt_pct(fitness)}")
        out.say(f"model saved to {target} (dicebox.Model.load({str(target)!r}))")
    return EXIT_OK


def _validation_fitness(history: list[dict[str, Any]]) -> float | None:
    """``val_accuracy`` of the epoch with the lowest ``val_loss`` (the weights kept)."""
    scored = [e for e in history if e.get("val_loss") is not None and e.get("val_accuracy") is not None]
    return float(min(scored, key=lambda e: e["val_loss"])["val_accuracy"]) if scored else None


def _evolve_here(args: argparse.Namespace, out: Output, evolution: dict[str, Any], params: dict[str, Any],
                 target: Path) -> int:
    import dicebox

    if params["label_smoothing"]:
        raise UsageError("--label-smoothing applies to evolution only with --submit")
    with _local_dataset(args, out) as (data, version, name):
        train, val, test = split(data, params["validation"], params["test"], params["seed"])
        _check_data(data, True, val)
        total = evolution["population"] * evolution["generations"]
        scored = {"count": 0, "generation": None, "fitness": []}
        with out.progress(f"evolving on {name}", total, "individuals") as bar, _cancel_on_ctrl_c() as token:
            def on_individual(record: dict[str, Any]) -> None:
                if scored["generation"] is not None and record["generation"] != scored["generation"]:
                    _generation_note(bar, scored["generation"], scored["fitness"])
                    scored["fitness"] = []
                scored["generation"] = record["generation"]
                scored["fitness"].append(record["fitness"])
                scored["count"] += 1
                line = (f"generation {record['generation']} individual {record['id']}: fitness "
                        f"{fmt_float(record['fitness'])} after {record['epochs']} epochs"
                        + (" (seen before)" if record.get("cached") else ""))
                if out.rich:
                    bar.note(line)
                    bar.update(scored["count"], f"last fitness {fmt_float(record['fitness'])}")
                else:
                    bar.update(scored["count"], line)

            try:
                result = dicebox.evolve(
                    train, val, test=test, space=evolution["space"], population=evolution["population"],
                    generations=evolution["generations"], retain=evolution["retain"],
                    random_select=evolution["random_select"], mutate_chance=evolution["mutate_chance"],
                    schedule=evolution["schedule"], time_budget=evolution["time_budget"],
                    epochs=params["epochs"], seed=params["seed"], patience=params["patience"],
                    batch_size=params["batch_size"], augment=params["augment"], workers=args.workers,
                    threads=args.threads, callback=on_individual, checkpoint_dir=args.checkpoint,
                    cancel=token)
            except dicebox.Cancelled:
                raise KeyboardInterrupt from None
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            if scored["generation"] is not None:
                _generation_note(bar, scored["generation"], scored["fitness"])
        if result.best is None:
            raise WorkFailed(f"evolution ended ({result.stopped}) before any network was trained")
        model = result.best
        model.metadata = {**model.metadata, "dataset": name, "dataset_version": version}
        model.save(target)
    document = {"model_dir": str(target), "dataset": name, "version": version, "fitness": result.best_fitness,
                "genome": result.best_genome.to_dict(), "metrics": result.test_metrics,
                "leaderboard": result.leaderboard, "generations": result.generations,
                "trained": result.trained, "cache_hits": result.cache_hits, "elapsed": result.elapsed,
                "stopped": result.stopped, "evolution": evolution, "params": params}
    if out.json:
        out.result(document)
        return EXIT_OK
    from dicebox.commands.jobs import _leaderboard

    _leaderboard(out, result.leaderboard)
    out.say(f"best genome: {describe_genome(document['genome'])}")
    metrics = result.test_metrics or {}
    out.say(f"{result.trained} networks trained ({result.cache_hits} seen before) in {result.elapsed:.1f} s, "
            f"{result.stopped}; best: validation accuracy {fmt_pct(result.best_fitness)}, test accuracy "
            f"{fmt_pct(metrics.get('accuracy'))}")
    out.say(f"model saved to {target} (dicebox.Model.load({str(target)!r}))")
    return EXIT_OK


def _generation_note(bar, generation: int, fitness: list[float | None]) -> None:
    scores = [f for f in fitness if f is not None]
    best = max(scores) if scores else None
    mean = sum(scores) / len(scores) if scores else None
    bar.note(f"generation {generation} done: best fitness {fmt_float(best)}, mean {fmt_float(mean)}")


# -- on the server -------------------------------------------------------------------------------

def _submit(args: argparse.Namespace, out: Output, target: Path | None, **job: Any) -> int:
    from dicebox.commands.jobs import exit_code, watch

    if _is_path(args.dataset):
        raise UsageError(f"--dataset {args.dataset!r}: --submit needs a dataset on the server "
                         "(a name, not a file)")
    with connect(args) as client:
        answer = client.jobs.submit(job.pop("kind"), args.dataset, priority=args.priority, **job)
        if args.detach:
            if out.json:
                out.result(answer)
            else:
                out.say(f"job {answer['id']} {answer['status']}; follow it with: dicebox jobs watch {answer['id']}")
            return EXIT_OK
        if not out.json:
            out.say(f"job {answer['id']} queued")
        final = watch(client, out, answer["id"])
        if final["status"] == "succeeded" and target is not None:
            model_id = (final.get("result") or {}).get("model_id")
            _download_model(client, model_id, target)
            if not out.json:
                out.say(f"model {model_id} saved to {target}")
            final = {**final, "model_dir": str(target)}
        if out.json:
            out.result(final)
        return exit_code(out, final)


def _download_model(client, model_id: str, target: Path) -> None:
    """Both files into ``target`` through a temporary folder beside it, renamed into place, so
    an interrupted download leaves no half model."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        client.models.download(model_id, temp)
        if target.exists():
            target.rmdir()  # checked empty before the work started
        os.replace(temp, target)
    except BaseException:
        import shutil

        shutil.rmtree(temp, ignore_errors=True)
        raise


# -- commands ------------------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace, out: Output) -> int:
    _check_where(args, ("threads",))
    given, params = _train_params(args)
    genome = _read_genome(args.genome)
    target = _out_dir(args, "trained")
    if args.submit:
        if args.init is not None and _is_path(args.init):
            raise UsageError("--init: with --submit, name a model on the server (an id or 'best')")
        return _submit(args, out, target, kind="train", genome=genome, params=given or None, init=args.init)
    return _train_here(args, out, genome, params, target)


def cmd_evolve(args: argparse.Namespace, out: Output) -> int:
    from pydantic import ValidationError

    from dicebox.jobspec import EvolutionSpec

    _check_where(args, ("threads", "workers", "checkpoint"))
    given, params = _train_params(args)
    evolution_given = _given(args, EVOLUTION_FIELDS)
    if "space" in evolution_given:
        evolution_given["space"] = _read_space(evolution_given["space"])
    try:
        evolution = EvolutionSpec(**evolution_given).model_dump()
    except ValidationError as exc:
        raise UsageError(_pydantic_message(exc, "")) from None
    from dicebox.evolution import EvolutionParams

    try:
        EvolutionParams(population=evolution["population"], generations=evolution["generations"],
                        retain=evolution["retain"], random_select=evolution["random_select"],
                        mutate_chance=evolution["mutate_chance"], epochs=params["epochs"],
                        seed=params["seed"], schedule=evolution["schedule"]).validate()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    target = _out_dir(args, "evolved")
    if args.submit:
        return _submit(args, out, target, kind="evolve", evolution=evolution_given or None,
                       params=given or None)
    return _evolve_here(args, out, evolution, params, target)
