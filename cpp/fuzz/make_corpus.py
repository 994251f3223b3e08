#!/usr/bin/env python3
"""Writes the seed corpus of every fuzz target into cpp/fuzz/corpus/<target>/ (see README.md).

Small valid inputs (and a few near misses) that reach deep into each parser, so fuzzing starts
from files that load instead of rediscovering the formats byte by byte. Standard library only;
the output is deterministic, so re-running it changes nothing.
"""
import gzip
import json
import struct
from pathlib import Path

CORPUS = Path(__file__).resolve().parent / "corpus"


def write(target: str, name: str, data: bytes) -> None:
    folder = CORPUS / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)


def compact(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def two_files(first: bytes, second: bytes) -> bytes:
    """The packing of fuzz_support.h's split_two_files: u32 length, first file, second file."""
    return struct.pack("<I", len(first)) + first + second


# ---- packed datasets (the layout documented in cpp/src/dataset.cpp) -------------------------
def packed_dataset(shape, categories, pixels: bytes, labels) -> bytes:
    channels, height, width = shape
    header = {"count": len(labels), "channels": channels, "height": height, "width": width,
              "categories": categories}
    pixels_offset = labels_offset = 0
    while True:  # the offsets are part of the header whose length moves them
        header["pixels_offset"], header["labels_offset"] = pixels_offset, labels_offset
        text = compact(header)
        pixels_at = -(-(16 + len(text)) // 64) * 64
        labels_at = -(-(pixels_at + len(pixels)) // 8) * 8
        if (pixels_at, labels_at) == (pixels_offset, labels_offset):
            break
        pixels_offset, labels_offset = pixels_at, labels_at
    out = bytearray(labels_offset + 8 * len(labels))
    out[0:16] = b"DICEBOX\0" + struct.pack("<II", 1, len(text))
    out[16:16 + len(text)] = text
    out[pixels_offset:pixels_offset + len(pixels)] = pixels
    out[labels_offset:] = struct.pack(f"<{len(labels)}q", *labels)
    return bytes(out)


def dataset_seeds() -> None:
    gray = packed_dataset((1, 2, 2), ["a", "b"], bytes(range(8)), [0, 1])
    write("dataset_file", "gray_2x2.bin", gray)
    write("dataset_file", "rgb_3x2.bin", packed_dataset((3, 3, 2), ["cat", "dog", "fish"], bytes(range(54)), [2, 0, 1]))
    write("dataset_file", "empty.bin", packed_dataset((1, 1, 1), ["only"], b"", []))
    write("dataset_file", "truncated.bin", gray[:-3])


# ---- IDX files ------------------------------------------------------------------------------
def idx_images(count: int, rows: int, cols: int) -> bytes:
    return struct.pack(">IIII", 2051, count, rows, cols) + bytes((i * 37) % 256 for i in range(count * rows * cols))


def idx_labels(labels) -> bytes:
    return struct.pack(">II", 2049, len(labels)) + bytes(labels)


def idx_seeds() -> None:
    images, labels = idx_images(3, 2, 2), idx_labels([0, 2, 1])
    write("idx", "plain.bin", b"\x00" + two_files(images, labels))
    write("idx", "gzip_both.bin", b"\x03" + two_files(images, labels))
    # Already compressed bytes with no flag: zlib reads them as given.
    write("idx", "gzip_raw.bin", b"\x00" + two_files(gzip.compress(images, mtime=0), gzip.compress(labels, mtime=0)))
    write("idx", "count_mismatch.bin", b"\x00" + two_files(images, idx_labels([0, 1])))


# ---- genomes --------------------------------------------------------------------------------
GENOMES = {
    "mlp": {"optimizer": {"name": "adam", "learning_rate": 0.001},
            "layers": [{"type": "dense", "size": 32, "activation": "relu"}, {"type": "dropout", "rate": 0.25},
                       {"type": "dense", "size": 8, "activation": "tanh"}]},
    "cnn": {"optimizer": "nadam",
            "layers": [{"type": "conv2d", "filters": 4, "kernel": 3, "activation": "elu"},
                       {"type": "maxpool2d", "kernel": 2},
                       {"type": "conv2d", "filters": 8, "kernel": [2, 3], "stride": [1, 2], "padding": "valid",
                        "activation": "swish"},
                       {"type": "dropout", "rate": 0.1}, {"type": "dense", "size": 16, "activation": "selu"}]},
    "same_odd_padding": {"optimizer": "sgd",
                         "layers": [{"type": "conv2d", "filters": 2, "kernel": [2, 4], "stride": 3},
                                    {"type": "maxpool2d", "kernel": [2, 1], "stride": [1, 1]}]},
    "bare": {"optimizer": {"name": "rmsprop"}, "layers": []},
}


def genome_seeds() -> None:
    prefix = bytes([0, 27, 27, 9])  # 1x28x28 images, 10 classes
    for name, genome in GENOMES.items():
        write("genome", f"{name}.json", prefix + compact(genome))
    write("genome", "rgb_small.json", bytes([2, 5, 7, 1]) + compact(GENOMES["cnn"]))


# ---- safetensors ----------------------------------------------------------------------------
def safetensors(tensors, metadata=None) -> bytes:
    """tensors: name -> (dtype, shape, raw bytes), laid out in name order."""
    header, data = {}, b""
    if metadata:
        header["__metadata__"] = metadata
    for name in sorted(tensors):
        dtype, shape, raw = tensors[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = compact(header)
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def floats(count: int) -> bytes:
    return struct.pack(f"<{count}f", *[(i % 7 - 3) / 10 for i in range(count)])


def safetensors_seeds() -> None:
    write("safetensors", "mixed.safetensors", safetensors({
        "weights": ("F32", [2, 3], floats(6)),
        "counts": ("I64", [2], struct.pack("<2q", 7, -1)),
        "bytes": ("U8", [4], b"\x00\x01\xfe\xff"),
        "scalar": ("F32", [], floats(1)),
        "empty": ("F32", [0, 5], b""),
    }, {"format": "pt", "note": "seed"}))
    write("safetensors", "empty_header.safetensors", safetensors({}))


# ---- model directories ----------------------------------------------------------------------
def model_json(genome, categories, shape, history) -> bytes:
    channels = shape[0]
    return json.dumps({
        "format": "dicebox-model", "version": 1, "genome": genome, "categories": categories,
        "input_shape": shape, "normalisation": {"mean": [0.5] * channels, "std": [0.25] * channels},
        "history": history, "weights": "weights.safetensors", "extra": {"note": "seed"},
    }, indent=2).encode()


EPOCH = {"epoch": 1, "loss": 0.7, "accuracy": 0.5, "val_loss": None, "val_accuracy": None,
         "samples_per_second": 1000.0, "seconds": 0.1}


def model_seeds() -> None:
    # 1x4x4 images, dense(3, relu), 2 classes: 0 Flatten, 1 Linear(16->3), 2 ReLU, 3 Linear(3->2).
    mlp = {"optimizer": "adam", "layers": [{"type": "dense", "size": 3, "activation": "relu"}]}
    mlp_weights = {"1.weight": ("F32", [3, 16], floats(48)), "1.bias": ("F32", [3], floats(3)),
                   "3.weight": ("F32", [2, 3], floats(6)), "3.bias": ("F32", [2], floats(2))}
    write("model_files", "mlp.bin", two_files(model_json(mlp, ["a", "b"], [1, 4, 4], [EPOCH]),
                                              safetensors(mlp_weights, {"format": "pt"})))
    # 2x4x4 images, conv(3 filters, 3x3, same), 3 classes: 0 Conv2d, 1 ReLU, 2 Flatten, 3 Linear(48->3).
    cnn = {"optimizer": "sgd", "layers": [{"type": "conv2d", "filters": 3, "kernel": 3}]}
    cnn_weights = {"0.weight": ("F32", [3, 2, 3, 3], floats(54)), "0.bias": ("F32", [3], floats(3)),
                   "3.weight": ("F32", [3, 48], floats(144)), "3.bias": ("F32", [3], floats(3))}
    write("model_files", "cnn.bin", two_files(model_json(cnn, ["x", "y", "z"], [2, 4, 4], []),
                                              safetensors(cnn_weights, {"format": "pt"})))
    wrong_shape = dict(mlp_weights, **{"3.weight": ("F32", [3, 2], floats(6))})
    write("model_files", "mlp_wrong_shape.bin", two_files(model_json(mlp, ["a", "b"], [1, 4, 4], []),
                                                          safetensors(wrong_shape)))


# ---- image buffers (the byte order of image_buffers.cpp) ------------------------------------
def image_buffer_input(shape, count, names, labels, batch_size, shuffle, seed, augment_tenths, normalisation,
                       per_channel, threads, prefetch, drop_last, warp, fractions, pixels: bytes) -> bytes:
    out = struct.pack("<IIII", *shape, count)
    out += struct.pack("<I", len(names)) + bytes(names) + bytes(labels)
    out += struct.pack("<IBQI", batch_size, shuffle, seed, augment_tenths + 1) + bytes([normalisation])
    for mean, std in per_channel:
        if normalisation & 1:
            out += struct.pack("<h", mean)
        if normalisation & 2:
            out += struct.pack("<h", std)
    out += struct.pack("<IIB", threads, prefetch, drop_last)
    out += struct.pack("<4d", *warp)
    out += struct.pack("<I", len(fractions)) + b"".join(struct.pack("<I", f) for f in fractions)
    out += struct.pack("<Q", 99) + pixels
    return out


def image_buffer_seeds() -> None:
    # Category name bytes: b % 3 letters of 'a' + (b >> 2) % 3; 1, 5 and 9 give "a", "b", "c".
    write("image_buffers", "gray_plain.bin", image_buffer_input(
        (1, 5, 4), 6, [1, 5], [0, 1, 0, 1, 1, 0], 4, 1, 7, 0, 3, [(50, 25)], 1, 2, 0,
        (0.0, 1.0, 0.0, 0.0), [50, 50], bytes(range(0, 240, 7))))
    write("image_buffers", "rgb_augmented.bin", image_buffer_input(
        (3, 6, 6), 5, [1, 5, 9], [0, 1, 2, 2, 1], 2, 1, 1234, 8, 2, [(0, 30), (0, 60), (0, 90)], 2, 2, 1,
        (7.5, 1.2, 0.05, -0.08), [30, 30, 30], bytes(range(255, 0, -3))))
    write("image_buffers", "duplicate_names.bin", image_buffer_input(
        (1, 2, 2), 2, [1, 1], [0, 1], 1, 0, 0, 0, 0, [], 1, 1, 0, (0.0, 1.0, 0.0, 0.0), [], b"\x10\x20"))


# ---- search spaces --------------------------------------------------------------------------
def search_space_seeds() -> None:
    prefix = bytes([0, 27, 27, 8])  # 1x28x28 images, 10 classes
    write("search_space", "default.json", prefix + b"{}")
    write("search_space", "dense_only.json", prefix + compact({
        "layer_types": ["dense", "dropout"], "min_layers": 1, "max_layers": 4, "min_size": 1, "max_size": 64,
        "activations": ["relu", "sigmoid", "softsign"], "optimizers": ["sgd", "adagrad"],
        "min_learning_rate": 0.01, "max_learning_rate": 0.1, "max_parameters": 0, "max_macs": 0}))
    write("search_space", "tight_budget.json", bytes([2, 15, 15, 0]) + compact({
        "filters": [2, 128], "kernels": [1, 7], "pool": 3, "min_dropout": 0.0, "max_dropout": 0.9,
        "max_parameters": 500, "max_macs": 2000}))


if __name__ == "__main__":
    dataset_seeds()
    idx_seeds()
    genome_seeds()
    safetensors_seeds()
    model_seeds()
    image_buffer_seeds()
    search_space_seeds()
