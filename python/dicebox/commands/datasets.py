"""``dicebox dataset ...``: datasets on the server (import a folder or IDX files, make dice,
list, show, export).

Imports read and check everything locally first (with :class:`dicebox.Dataset`, so a folder
is decoded exactly as ``Dataset.from_folder`` does), so a bad file refuses the import before
the server is changed at all. Then the dataset is created (or reused when it exists with the
same shape) and the images are sent as PNGs already at the dataset's size (the server stores
them unchanged) in batches, with a progress bar. Importing into an existing dataset appends.
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from dicebox.commands.common import (
    Output,
    UsageError,
    add_output_options,
    connect,
    fmt_time,
    image_size,
    load_settings,
    non_negative_int,
    positive_int,
)

# One upload request carries at most this many images and about this many bytes: far below the
# server's default limits (1000 images, 64 MiB), and small enough for a smooth progress bar.
BATCH_IMAGES = 250
BATCH_BYTES = 8 << 20


def add_parser(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser(
        "dataset", help="datasets on the server: import, make-dice, list, show, export",
        description="Datasets live on the server (DICEBOX_SERVER_URL or --server). Imports read "
                    "and check the files here, then upload them in batches.")
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")

    imp = actions.add_parser(
        "import", help="import a folder with one sub-folder of PNG/JPEG images per category",
        description="Import DIR/<category>/<image>.png|.jpg into dataset NAME. Every image is "
                    "decoded here and resized (stretched) to the dataset size, then uploaded. "
                    "A file that cannot be read refuses the whole import before anything is sent.",
        epilog="example:\n  dicebox dataset import ./shapes --name shapes --size 28x28")
    imp.add_argument("directory", metavar="DIR", help="folder with one sub-folder per category")
    imp.add_argument("--name", required=True, help="dataset name (created if it does not exist)")
    imp.add_argument("--size", type=image_size, metavar="WxH",
                     help="image size in pixels (default: the existing dataset's size, else the "
                          "first image's size)")
    imp.add_argument("--channels", type=int, choices=[1, 3],
                     help="1 = grey, 3 = RGB (default: the existing dataset's, else 1)")
    imp.add_argument("--batch", type=positive_int, default=BATCH_IMAGES, metavar="N",
                     help=f"images per upload request (default {BATCH_IMAGES})")
    add_output_options(imp)
    imp.set_defaults(func=cmd_import)

    idx = actions.add_parser(
        "import-idx", help="import MNIST-style IDX files (.gz accepted)",
        description="Import an IDX image file and its IDX label file (as MNIST ships them; "
                    "gzip-compressed or not) into dataset NAME. Categories are the labels 0..9.",
        epilog="example:\n  dicebox dataset import-idx train-images-idx3-ubyte.gz "
               "train-labels-idx1-ubyte.gz --name mnist")
    idx.add_argument("images", metavar="IMAGES", help="IDX image file")
    idx.add_argument("labels", metavar="LABELS", help="IDX label file")
    idx.add_argument("--name", required=True, help="dataset name (created if it does not exist)")
    idx.add_argument("--batch", type=positive_int, default=BATCH_IMAGES, metavar="N",
                     help=f"images per upload request (default {BATCH_IMAGES})")
    add_output_options(idx)
    idx.set_defaults(func=cmd_import_idx)

    dice = actions.add_parser(
        "make-dice", help="make a dataset of synthetic die faces (categories 1..6)",
        description="Draw COUNT synthetic die faces (random rotation, scale, position, "
                    "brightness and noise; the same seed gives the same images) and upload "
                    "them as dataset NAME.",
        epilog="example:\n  dicebox dataset make-dice --name dice --count 3000 --size 32")
    dice.add_argument("--name", required=True, help="dataset name (created if it does not exist)")
    dice.add_argument("--count", type=positive_int, default=3000, help="number of images (default 3000)")
    dice.add_argument("--size", type=positive_int, default=32, metavar="S",
                      help="side in pixels (default 32)")
    dice.add_argument("--channels", type=int, choices=[1, 3], default=1, help="1 = grey (default), 3 = RGB")
    dice.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default 0)")
    dice.add_argument("--batch", type=positive_int, default=BATCH_IMAGES, metavar="N",
                      help=f"images per upload request (default {BATCH_IMAGES})")
    add_output_options(dice)
    dice.set_defaults(func=cmd_make_dice)

    lst = actions.add_parser("list", help="list the datasets",
                             description="The datasets on the server, by name.")
    lst.add_argument("--limit", type=positive_int, default=100, help="at most this many (default 100)")
    lst.add_argument("--cursor", help="continue after a previous page (its 'next')")
    add_output_options(lst)
    lst.set_defaults(func=cmd_list)

    show = actions.add_parser("show", help="one dataset with its counts per category",
                              description="A dataset's size, image count (its newest version) "
                                          "and images per category.")
    show.add_argument("name", metavar="NAME")
    add_output_options(show)
    show.set_defaults(func=cmd_show)

    export = actions.add_parser(
        "export", help="download a dataset as a packed file (dicebox.Dataset.load reads it)",
        description="Download dataset NAME (the newest version, or --version N = its first N "
                    "images) as the packed file dicebox.Dataset.load reads; `dicebox train "
                    "--dataset ./FILE` trains on it without a server.")
    export.add_argument("name", metavar="NAME")
    export.add_argument("file", metavar="FILE", help="where to write it (must not exist)")
    export.add_argument("--version", type=positive_int, metavar="N", help="the first N images")
    add_output_options(export)
    export.set_defaults(func=cmd_export)


# -- commands ------------------------------------------------------------------------------------

def cmd_import(args: argparse.Namespace, out: Output) -> int:
    import dicebox

    _check_name(args.name)
    root = Path(args.directory)
    if not root.is_dir():
        raise UsageError(f"DIR: {str(root)!r} is not a folder" if root.exists()
                         else f"DIR: {str(root)!r} does not exist")
    with connect(args) as client:
        existing = _existing(client, args.name)
        size, channels = args.size, args.channels
        if existing is not None:
            size = size or (existing["width"], existing["height"])
            channels = channels or existing["channels"]
        if size is None:
            size = _first_image_size(root, load_settings().max_dataset_side)
        channels = channels or 1
        out.say(f"reading {root} at {size[0]}x{size[1]}, {channels} channel{'s' if channels > 1 else ''}")
        try:
            data = dicebox.Dataset.from_folder(root, size=size, channels=channels)
        except (OSError, ValueError) as exc:
            raise UsageError(str(exc)) from None
        return _store(client, out, args.name, data, args.batch, source=str(root))


def cmd_import_idx(args: argparse.Namespace, out: Output) -> int:
    import dicebox

    _check_name(args.name)
    for label, path in (("IMAGES", args.images), ("LABELS", args.labels)):
        if not Path(path).is_file():
            raise UsageError(f"{label}: {path!r} is not a file")
    try:
        data = dicebox.Dataset.from_idx(args.images, args.labels)
    except (OSError, ValueError) as exc:
        raise UsageError(f"IDX files {args.images!r}, {args.labels!r}: {exc}") from None
    with connect(args) as client:
        return _store(client, out, args.name, data, args.batch, source=os.path.basename(args.images))


def cmd_make_dice(args: argparse.Namespace, out: Output) -> int:
    import dicebox

    _check_name(args.name)
    with connect(args) as client:
        client.datasets.list(limit=1)  # reachable and authorised before drawing thousands of dice
        try:
            data = dicebox.datasets.make_dice(count=args.count, size=args.size, seed=args.seed,
                                              channels=args.channels)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        return _store(client, out, args.name, data, args.batch, source="dice")


def cmd_list(args: argparse.Namespace, out: Output) -> int:
    with connect(args) as client:
        page = client.datasets.list(limit=args.limit, **({"cursor": args.cursor} if args.cursor else {}))
    if out.json:
        out.result(page)
        return 0
    items = page["items"]
    if not items:
        out.say("no datasets yet: dicebox dataset import DIR --name NAME (or make-dice)")
        return 0
    out.table(["NAME", "SIZE", "CHANNELS", "IMAGES", "CATEGORIES", "UPDATED"],
              [[d["name"], f"{d['width']}x{d['height']}", d["channels"], d["count"],
                len(d["categories"]), fmt_time(d.get("updated_at"))] for d in items],
              right=["CHANNELS", "IMAGES", "CATEGORIES"])
    if page.get("next"):
        out.say(f"more: dicebox dataset list --cursor {page['next']}")
    return 0


def cmd_show(args: argparse.Namespace, out: Output) -> int:
    with connect(args) as client:
        info = client.datasets.get(args.name)
    if out.json:
        out.result(info)
        return 0
    show_dataset(out, info)
    return 0


def cmd_export(args: argparse.Namespace, out: Output) -> int:
    target = Path(args.file)
    if target.exists():
        raise UsageError(f"FILE: {str(target)!r} exists already; choose a new file name")
    if not target.parent.is_dir():
        raise UsageError(f"FILE: the folder {str(target.parent)!r} does not exist")
    with connect(args) as client:
        client.datasets.export(args.name, target, version=args.version)
    import dicebox

    data = dicebox.Dataset.load(target)
    c, h, w = data.shape
    document = {"name": args.name, "file": str(target), "count": len(data), "shape": [c, h, w],
                "categories": data.categories, "bytes": target.stat().st_size}
    if out.json:
        out.result(document)
    else:
        out.say(f"wrote {target}: {len(data)} images {w}x{h}x{c}, categories {', '.join(data.categories)}")
    return 0


# -- helpers -------------------------------------------------------------------------------------

def show_dataset(out: Output, info: dict[str, Any]) -> None:
    channels = info["channels"]
    out.say(f"dataset {info['name']}: {info['width']}x{info['height']} pixels, {channels} "
            f"channel{'s' if channels > 1 else ''}, {info['count']} images (version {info['version']})")
    out.say(f"created {fmt_time(info.get('created_at'))}, updated {fmt_time(info.get('updated_at'))}")
    categories = info.get("categories") or []
    if categories:
        most = max(c["count"] for c in categories) or 1
        out.table(["CATEGORY", "IMAGES", ""],
                  [[c["name"], c["count"], "#" * max(0, round(30 * c["count"] / most))] for c in categories],
                  right=["IMAGES"])


def _check_name(name: str) -> None:
    """The server's own rule, checked before any file is read."""
    from dicebox.sensory import check_dataset_name

    try:
        check_dataset_name(name)
    except ValueError as exc:
        raise UsageError(f"--name: {exc}") from None


def _existing(client, name: str) -> dict[str, Any] | None:
    from dicebox.errors import NotFound

    try:
        return client.datasets.get(name)
    except NotFound:
        return None


def _first_image_size(root: Path, max_side: int) -> tuple[int, int]:
    """The size of the first image ``Dataset.from_folder`` would read (categories and files in
    name order). When there is none, or it cannot be read, a placeholder: from_folder then
    reports the problem with its own message."""
    from PIL import Image

    from dicebox.imagefolder import IMAGE_EXTENSIONS

    placeholder = (32, 32)
    for folder in sorted((e for e in root.iterdir() if e.is_dir() and not e.name.startswith(".")),
                         key=lambda e: e.name):
        files = sorted((f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")
                        and f.suffix.lower() in IMAGE_EXTENSIONS), key=lambda f: f.name)
        if not files:
            return placeholder
        try:
            with Image.open(files[0]) as image:
                width, height = image.size
        except Exception:  # noqa: BLE001 - from_folder names the unreadable file
            return placeholder
        if max(width, height) > max_side:
            raise UsageError(f"--size: the first image ({files[0]}) is {width}x{height}, larger "
                             f"than the dataset limit of {max_side} pixels a side "
                             "(DICEBOX_MAX_DATASET_SIDE); give the size to import at, e.g. --size 64x64")
        return width, height
    return placeholder


def png_bytes(pixels: np.ndarray) -> bytes:
    """A PNG of one uint8 image [C, H, W] (C = 1 grey or 3 RGB), losslessly."""
    from PIL import Image

    array = pixels[0] if pixels.shape[0] == 1 else np.ascontiguousarray(pixels.transpose(1, 2, 0))
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _batches(indices: np.ndarray, images: np.ndarray, batch: int):
    """Lists of (index, png) holding at most ``batch`` images and about BATCH_BYTES."""
    current: list[tuple[int, bytes]] = []
    size = 0
    for i in indices:
        data = png_bytes(images[i])
        if current and (len(current) >= batch or size + len(data) > BATCH_BYTES):
            yield current
            current, size = [], 0
        current.append((int(i), data))
        size += len(data)
    if current:
        yield current


def _store(client, out: Output, name: str, data, batch: int, source: str) -> int:
    """Create dataset ``name`` for ``data``'s shape (or reuse it) and upload every image."""
    from dicebox.errors import ServiceError

    if len(data) == 0:
        raise UsageError(f"{source}: no images to import")
    channels, height, width = data.shape
    client.datasets.create(name, width, height, channels)  # Conflict when the shape differs
    images, labels, categories = data.images, data.labels, data.categories
    sent = 0
    with out.progress(f"uploading to {name}", len(data), "images") as bar:
        for label, category in enumerate(categories):
            indices = np.flatnonzero(labels == label)
            for chunk in _batches(indices, images, batch):
                try:
                    client.datasets.add_images(name, category, [(f"{i}.png", png) for i, png in chunk])
                except ServiceError:
                    out.error(f"stopped after uploading {sent} of {len(data)} images to {name!r}; "
                              "the images sent so far stay in the dataset")
                    raise
                sent += len(chunk)
                bar.update(sent, f"category {category}")
    info = client.datasets.get(name)
    if out.json:
        out.result({"added": sent, "dataset": info})
    else:
        out.say(f"added {sent} images from {source} to {name}")
        show_dataset(out, info)
    return 0
