"""Load labelled images from a folder tree (one sub-folder per category) into numpy arrays.

``read_folder`` turns ``root/<category>/<image>.png|.jpg|.jpeg`` into a uint8 NCHW batch
plus int64 labels; ``decode_image`` is the single-image decoder it uses, shared with the
HTTP upload path so files and uploads are preprocessed identically. Errors are raised as
``ValueError`` / ``FileNotFoundError`` with messages that name the offending file or
folder and say what to do.

Pure numpy + Pillow; deliberately does not import torch or the compiled core.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["IMAGE_EXTENSIONS", "decode_image", "read_folder"]

#: File name suffixes read by ``read_folder`` (compared case-insensitively).
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg"})

# Only these decoders are tried: fewer code paths exposed to untrusted uploads, and a
# mislabelled file (a GIF named .png) gets a clear error instead of a surprise.
_FORMATS = ("PNG", "JPEG")

# Pillow modes holding 16/32-bit integer grey values; converting them with
# Image.convert("L") clips instead of scaling, so they are rescaled by hand.
_WIDE_GREY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})

# Resize first by an integer box reduction down to 3x the target, then bilinear: about
# as good as a full bilinear (Pillow's filters are antialiased) but much faster.
_REDUCING_GAP = 3.0


def decode_image(
    data: bytes, size: tuple[int, int], channels: int = 1, name: str = "<image>"
) -> np.ndarray:
    """Decode one PNG or JPEG into a fixed-size uint8 array.

    The image is decoded once, rotated upright per its EXIF orientation, converted to
    grey ("L", ITU-R 601 luma) or RGB with any alpha composited onto black, and resized
    (stretched, no crop) to ``size`` with antialiased bilinear filtering. An image that
    already has the target size is not resampled, so its pixels come back unchanged.

    Args:
        data: the encoded file contents.
        size: (width, height) of the output in pixels.
        channels: 1 (grey) or 3 (RGB).
        name: how to name the image in error messages (a file path or upload name).

    Returns:
        uint8 array [channels, height, width], 0 = black.

    Raises:
        ValueError: bad ``size``/``channels``; data that is not a readable PNG/JPEG
            (corrupt, truncated, other format); an image larger than
            ``PIL.Image.MAX_IMAGE_PIXELS`` (decompression-bomb guard).
    """
    width, height = _check_size(size)
    channels = _check_channels(channels)
    return _decode(data, width, height, channels, name)


def read_folder(
    path: str | os.PathLike[str],
    size: tuple[int, int],
    channels: int = 1,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read a labelled image folder: ``path/<category>/<image>``.

    Categories are the non-hidden sub-folders of ``path``, in sorted name order; label
    ``i`` means ``categories[i]``. In each category folder the files ending in .png,
    .jpg or .jpeg (any case) are read in sorted name order; other files, hidden entries
    (names starting with ".") and nested folders are ignored. Each image goes through
    ``decode_image``; decoding runs on a thread pool (Pillow releases the GIL).

    Args:
        path: the root folder.
        size: (width, height) of every output image in pixels.
        channels: 1 (grey) or 3 (RGB).
        threads: decoder threads; None = ThreadPoolExecutor's default
            (min(32, CPUs + 4), which also covers slow storage).

    Returns:
        images: uint8 array [N, channels, height, width] (NCHW), grouped by category.
        labels: int64 array [N], values in 0..len(categories) - 1.
        categories: the category (sub-folder) names.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a folder; it has no category sub-folders; a
            category folder has no images; an image cannot be read or decoded (the
            message names the file); bad ``size``, ``channels`` or ``threads``.
    """
    width, height = _check_size(size)
    channels = _check_channels(channels)
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
        threads = int(threads)

    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise ValueError(
            f"{str(root)!r} is not a folder; expected a folder with one sub-folder per "
            "category, e.g. root/cat/001.png, root/dog/001.png"
        )

    categories = sorted(e.name for e in root.iterdir() if not _hidden(e) and e.is_dir())
    if not categories:
        raise ValueError(
            f"image folder {str(root)!r} has no category sub-folders; put the images of "
            "each category in their own sub-folder, e.g. "
            f"{str(root / 'cat' / '001.png')!r}"
        )

    files: list[Path] = []
    labels: list[int] = []
    for label, category in enumerate(categories):
        folder = root / category
        found = sorted(
            (
                f
                for f in folder.iterdir()
                if not _hidden(f) and f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()
            ),
            key=lambda f: f.name,
        )
        if not found:
            raise ValueError(
                f"category folder {str(folder)!r} contains no images "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add some or remove the folder"
            )
        files.extend(found)
        labels.extend([label] * len(found))

    # Workers write straight into the preallocated batch: no per-image list + stack copy.
    images = np.empty((len(files), channels, height, width), dtype=np.uint8)

    def load(i: int) -> None:
        file = files[i]
        try:
            data = file.read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read image file {str(file)!r}: {e.strerror or e}") from e
        images[i] = _decode(data, width, height, channels, str(file))

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dicebox-decode") as pool:
        futures = [pool.submit(load, i) for i in range(len(files))]
        try:
            # Report the first failure in file order, so the message is reproducible.
            for future in futures:
                future.result()
        except BaseException:
            # Do not decode the rest of a big folder just to throw it away.
            pool.shutdown(wait=True, cancel_futures=True)
            raise

    return images, np.asarray(labels, dtype=np.int64), categories


def _decode(data: bytes, width: int, height: int, channels: int, name: str) -> np.ndarray:
    """``decode_image`` after argument checks: returns uint8 [channels, height, width]."""
    try:
        img = Image.open(io.BytesIO(data), formats=_FORMATS)
    except UnidentifiedImageError as e:
        # Pillow's own message only shows the repr of our BytesIO, so say it plainly.
        raise ValueError(
            f"cannot read image {name!r}: not a PNG or JPEG image (or its header is corrupt)"
        ) from e
    except Image.DecompressionBombError as e:
        raise ValueError(_bomb_message(name, e)) from e
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure means a bad file
        raise ValueError(f"cannot read image {name!r}: {_reason(e)}") from e

    with img:
        # Pillow only raises above 2x MAX_IMAGE_PIXELS (below that it just warns); for a
        # service reading untrusted files the documented limit itself is the limit.
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and img.width * img.height > limit:
            raise ValueError(
                _bomb_message(
                    name,
                    f"{img.width} x {img.height} = {img.width * img.height} pixels "
                    f"exceeds {limit}",
                )
            )
        target = "L" if channels == 1 else "RGB"
        try:
            # JPEG only: let the decoder downscale by 2/4/8 (DCT scaling) while staying
            # at least as large as the target, and decode just the luma plane for grey.
            # Ask for a square box so an EXIF rotation cannot make it too small.
            side = max(width, height)
            img.draft(target, (side, side))
            img.load()  # decode now, inside the try: truncation surfaces here
            img = ImageOps.exif_transpose(img)
            img = _to_mode(img, target)
            if img.size != (width, height):
                img = img.resize(
                    (width, height), Image.Resampling.BILINEAR, reducing_gap=_REDUCING_GAP
                )
            array = np.asarray(img, dtype=np.uint8)
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - any decoder failure means a bad file
            raise ValueError(f"cannot read image {name!r}: {_reason(e)}") from e

    if channels == 1:
        return array[None].copy()  # [H, W] -> [1, H, W]; copy: own, writable memory
    return np.ascontiguousarray(array.transpose(2, 0, 1))  # [H, W, 3] -> [3, H, W]


def _to_mode(img: Image.Image, target: str) -> Image.Image:
    """Convert to ``target`` ("L" or "RGB"), compositing any transparency onto black."""
    if img.mode == target:
        return img
    if img.mode in _WIDE_GREY_MODES:
        # 16-bit PNGs open as "I"/"I;16": scale 0..65535 to 0..255 (convert() would clip).
        wide = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(np.rint(wide), 0, 255).astype(np.uint8), "L")
        return img if target == "L" else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        black = Image.new("RGB", rgba.size, (0, 0, 0))
        black.paste(rgba, mask=rgba.getchannel("A"))  # = colour * alpha on black
        img = black
    return img.convert(target)


def _reason(e: BaseException) -> str:
    """Pillow's reason for a failure, e.g. "image file is truncated (3 bytes not processed)"."""
    text = str(e).strip()
    return text if text else type(e).__name__


def _bomb_message(name: str, detail: object) -> str:
    return (
        f"refusing to decode image {name!r}: it is too large ({detail}); this guards "
        "against decompression bombs. Shrink the image, or if you trust it raise "
        "PIL.Image.MAX_IMAGE_PIXELS"
    )


def _hidden(entry: Path) -> bool:
    return entry.name.startswith(".")


def _check_size(size: object) -> tuple[int, int]:
    """Return ``size`` as (width, height), or raise ValueError naming the argument."""
    ok = (
        isinstance(size, Sequence)
        and not isinstance(size, (str, bytes))
        and len(size) == 2
        and all(
            not isinstance(v, bool) and isinstance(v, (int, np.integer)) and v > 0 for v in size
        )
    )
    if not ok:
        raise ValueError(f"size must be (width, height), two positive integers, got {size!r}")
    return int(size[0]), int(size[1])  # type: ignore[index]


def _check_channels(channels: object) -> int:
    if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) or (
        channels not in (1, 3)
    ):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    return int(channels)  # type: ignore[arg-type]
