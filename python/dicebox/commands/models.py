"""``dicebox models ...`` (list, show, export) and ``dicebox classify``.

A model is named by its id or by ``best`` with ``--dataset NAME`` (the dataset's model with the
highest validation accuracy). ``models export ID DIR`` writes ``weights.safetensors`` and
``model.json`` into DIR, the folder :meth:`dicebox.Model.load` reads. ``classify`` sends image
files (PNG/JPEG) to the server in batches and prints each one's category and probabilities.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from dicebox.commands.common import (
    EXIT_OK,
    Output,
    UsageError,
    add_output_options,
    connect,
    describe_genome,
    describe_layer,
    fmt_float,
    fmt_pct,
    fmt_time,
    positive_int,
)

# One classify request carries at most this many images and about this many bytes.
CLASSIFY_BATCH = 100
CLASSIFY_BYTES = 16 << 20


def _add_model_ref(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_id", metavar="ID", help="model id, or 'best' with --dataset")
    parser.add_argument("--dataset", metavar="NAME", help="with ID 'best': whose best model")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("models", help="trained models on the server: list, show, export",
                           description="Models registered by finished train jobs.")
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")

    lst = actions.add_parser("list", help="list models, newest first",
                             description="Models, newest first, optionally of one dataset.")
    lst.add_argument("--dataset", metavar="NAME", help="only models of this dataset")
    lst.add_argument("--limit", type=positive_int, default=20, help="at most this many (default 20)")
    lst.add_argument("--cursor", help="continue after a previous page (its 'next')")
    add_output_options(lst)
    lst.set_defaults(func=cmd_list)

    show = actions.add_parser("show", help="one model: genome, metrics, confusion matrix",
                              description="A model's dataset, categories, genome, training history "
                                          "and test metrics with the confusion matrix.")
    _add_model_ref(show)
    add_output_options(show)
    show.set_defaults(func=cmd_show)

    export = actions.add_parser(
        "export", help="download a model into a folder (dicebox.Model.load reads it)",
        description="Write the model's weights.safetensors and model.json into DIR (a new or empty "
                    "folder); dicebox.Model.load(DIR) then gives the model, and model.to_torch() "
                    "a PyTorch module.")
    _add_model_ref(export)
    export.add_argument("directory", metavar="DIR", help="a new or empty folder")
    add_output_options(export)
    export.set_defaults(func=cmd_export)

    classify = sub.add_parser(
        "classify", help="classify image files with a model on the server",
        description="Classify PNG/JPEG files with a model on the server: the most probable "
                    "category of each, with its probability and the next ones.",
        epilog="examples:\n  dicebox classify --model 0c4e7f3a9d2b4e18a6f1c0d9e8b7a654 a.png b.png\n"
               "  dicebox classify --dataset dice photos/*.jpg        (the dataset's best model)")
    classify.add_argument("images", nargs="+", metavar="IMAGE", help="PNG or JPEG files")
    classify.add_argument("--model", metavar="ID", help="model id, or 'best' (the default with --dataset)")
    classify.add_argument("--dataset", metavar="NAME", help="with --model best (or no --model): whose best model")
    classify.add_argument("--top", type=positive_int, default=3,
                          help="how many of the most probable categories to list (default 3)")
    add_output_options(classify)
    classify.set_defaults(func=cmd_classify)


# -- commands ------------------------------------------------------------------------------------

def cmd_list(args: argparse.Namespace, out: Output) -> int:
    with connect(args) as client:
        page = client.models.list(dataset=args.dataset, limit=args.limit, cursor=args.cursor)
    if out.json:
        out.result(page)
        return EXIT_OK
    items = page["items"]
    if not items:
        out.say("no models yet" + (f" for dataset {args.dataset}" if args.dataset else ""))
        return EXIT_OK
    out.table(["ID", "DATASET", "VAL_ACCURACY", "TEST_ACCURACY", "EPOCHS", "LAYERS", "CREATED"],
              [[m["id"], m["dataset"], fmt_pct(m.get("fitness")), fmt_pct((m.get("metrics") or {}).get("accuracy")),
                m.get("epochs"), len((m.get("genome") or {}).get("layers") or []), fmt_time(m.get("created_at"))]
               for m in items], right=["VAL_ACCURACY", "TEST_ACCURACY", "EPOCHS", "LAYERS"])
    if page.get("next"):
        out.say(f"more: dicebox models list --cursor {page['next']}")
    return EXIT_OK


def cmd_show(args: argparse.Namespace, out: Output) -> int:
    _check_ref(args.model_id, args.dataset)
    with connect(args) as client:
        model = client.models.get(args.model_id, dataset=args.dataset)
    if out.json:
        out.result(model)
        return EXIT_OK
    show_model(out, model)
    return EXIT_OK


def cmd_export(args: argparse.Namespace, out: Output) -> int:
    from dicebox.commands.learn import _download_model

    _check_ref(args.model_id, args.dataset)
    target = Path(args.directory)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UsageError(f"DIR: {str(target)!r} exists and is not an empty folder; choose a new one")
    with connect(args) as client:
        # Resolve 'best' once, so both files come from the same model.
        record = client.models.get(args.model_id, dataset=args.dataset)
        _download_model(client, record["id"], target)
    import dicebox

    model = dicebox.Model.load(target)  # what the user will do next: prove it works
    document = {"model_id": record["id"], "directory": str(target), "dataset": record.get("dataset"),
                "categories": model.categories, "input_shape": list(model.input_shape),
                "files": sorted(p.name for p in target.iterdir())}
    if out.json:
        out.result(document)
    else:
        c, h, w = model.input_shape
        out.say(f"model {record['id']} exported to {target}: {w}x{h}x{c} images, categories "
                f"{', '.join(model.categories)}; load it with dicebox.Model.load({str(target)!r})")
    return EXIT_OK


def cmd_classify(args: argparse.Namespace, out: Output) -> int:
    model_id = args.model or ("best" if args.dataset else None)
    if model_id is None:
        raise UsageError("give --model ID, or --dataset NAME to use that dataset's best model")
    _check_ref(model_id, args.dataset, flag="--model")
    from dicebox.errors import ServiceError

    files = []
    for name in args.images:
        path = Path(name)
        try:
            files.append((name, path.read_bytes()))
        except IsADirectoryError:
            raise UsageError(f"IMAGE {name!r} is a folder, not an image file") from None
        except OSError as exc:
            raise UsageError(f"IMAGE {name!r}: {exc.strerror or exc}") from None
    batches = _classify_batches(files)
    predictions: list[dict[str, Any]] = []
    with connect(args) as client, out.progress("classifying", len(files), "images") as bar:
        for number, batch in enumerate(batches):
            params = {"top": args.top}
            if model_id == "best":
                params["dataset"] = args.dataset
            parts = [("files", (os.path.basename(name), data, "application/octet-stream")) for name, data in batch]
            try:
                answer = client.json("POST", f"/v1/models/{quote(model_id, safe='')}/classify",
                                     files=parts, params=params)
            except ServiceError as exc:
                if number:
                    out.error(f"stopped after classifying {len(predictions)} of {len(files)} images")
                index = exc.detail.get("index") if isinstance(exc.detail, dict) else None
                if isinstance(index, int) and 0 <= index < len(batch) and 400 <= exc.status < 500:
                    # The server counts the images of its request; name the file instead.
                    raise UsageError(f"IMAGE {batch[index][0]!r}: {exc.message}") from None
                raise
            model_id = answer.get("model_id") or model_id  # 'best' stays the same model throughout
            for (name, _), prediction in zip(batch, answer["predictions"]):
                predictions.append({"image": name, **prediction})
            if len(batches) > 1 or out.rich:  # one batch: no line in a pipe
                bar.update(len(predictions))
    document = {"model_id": model_id, "predictions": predictions}
    if out.json:
        out.result(document)
        return EXIT_OK
    out.table(["IMAGE", "CATEGORY", "PROBABILITY", "NEXT"],
              [[p["image"], p["category"], fmt_pct(p["probability"]),
                ", ".join(f"{t['category']} {fmt_pct(t['probability'])}" for t in (p.get("top") or [])[1:])]
               for p in predictions], right=["PROBABILITY"], title=f"model {model_id}")
    return EXIT_OK


# -- helpers -------------------------------------------------------------------------------------

def _check_ref(model_id: str, dataset: str | None, flag: str = "ID") -> None:
    if model_id == "best" and not dataset:
        raise UsageError(f"{flag} best: name the dataset whose best model to use with --dataset NAME")


def _classify_batches(files: list[tuple[str, bytes]]) -> list[list[tuple[str, bytes]]]:
    batches: list[list[tuple[str, bytes]]] = []
    current: list[tuple[str, bytes]] = []
    size = 0
    for item in files:
        if current and (len(current) >= CLASSIFY_BATCH or size + len(item[1]) > CLASSIFY_BYTES):
            batches.append(current)
            current, size = [], 0
        current.append(item)
        size += len(item[1])
    if current:
        batches.append(current)
    return batches


def show_model(out: Output, model: dict[str, Any]) -> None:
    c, h, w = (model.get("input_shape") or [None, None, None])[:3]
    out.say(f"model {model['id']}: dataset {model.get('dataset')} (version {model.get('dataset_version')}), "
            f"{w}x{h}x{c} images, {len(model.get('categories') or [])} categories")
    out.say(f"trained by job {model.get('job_id')} in {model.get('epochs')} epochs "
            f"({fmt_float(model.get('training_seconds'), 1)} s), created {fmt_time(model.get('created_at'))}, "
            f"weights {model.get('weights_bytes')} bytes")
    genome = model.get("genome") or {}
    out.say(f"genome: {describe_genome(genome)}")
    layers = genome.get("layers") or []
    if layers:
        out.table(["#", "LAYER"], [[i, describe_layer(layer)] for i, layer in enumerate(layers, 1)], right=["#"])
    metrics = model.get("metrics") or {}
    out.say(f"validation accuracy {fmt_pct(model.get('fitness'))}; test accuracy {fmt_pct(metrics.get('accuracy'))}, "
            f"loss {fmt_float(metrics.get('loss'))}, precision {fmt_float(metrics.get('precision'))}, "
            f"recall {fmt_float(metrics.get('recall'))}, F1 {fmt_float(metrics.get('f1'))} (macro)")
    confusion = metrics.get("confusion")
    categories = model.get("categories") or []
    if isinstance(confusion, list) and confusion and len(confusion) == len(categories):
        out.table(["TRUE \\ PREDICTED"] + list(categories),
                  [[category] + list(row) for category, row in zip(categories, confusion)],
                  title="confusion matrix (rows: true category)", right=list(categories))
