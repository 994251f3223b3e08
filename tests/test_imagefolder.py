"""Tests for dicebox/imagefolder.py: reading labelled image folders and decoding uploads."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicebox import imagefolder
read_folder = imagefolder.read_folder
decode_image = imagefolder.decode_image


def _save(path: Path, image: Image.Image | np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image.save(path, **kwargs)
    return path


def _solid(path: Path, colour, size=(40, 30), mode="RGB", **kwargs) -> Path:
    return _save(path, Image.new(mode, size, colour), **kwargs)


def _luma(rgb) -> np.ndarray:
    """Pillow's RGB -> L conversion (ITU-R 601, rounded)."""
    r, g, b = (np.asarray(c, dtype=np.float64) for c in rgb)
    return np.floor(r * 0.299 + g * 0.587 + b * 0.114 + 0.5)


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


# --- round trips and conversions ---------------------------------------------------------


def test_exact_round_trip_without_resize(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)  # H=6, W=9
    _save(tmp_path / "only" / "a.png", pixels)
    images, labels, categories = read_folder(tmp_path, size=(9, 6), channels=3)
    assert images.shape == (1, 3, 6, 9) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.tolist() == [0]
    assert categories == ["only"]
    np.testing.assert_array_equal(images[0], pixels.transpose(2, 0, 1))


@pytest.mark.parametrize("colour", [(200, 100, 50), (0, 0, 0), (255, 255, 255), (17, 240, 99)])
def test_solid_colour_png_resized_keeps_its_value(tmp_path: Path, colour) -> None:
    _solid(tmp_path / "c" / "x.png", colour, size=(40, 30))
    rgb, _, _ = read_folder(tmp_path, size=(10, 5), channels=3)
    assert rgb.shape == (1, 3, 5, 10)
    expected = np.asarray(colour, dtype=np.uint8)[:, None, None]
    np.testing.assert_array_equal(rgb[0], np.broadcast_to(expected, (3, 5, 10)))
    grey, _, _ = read_folder(tmp_path, size=(7, 13), channels=1)
    assert grey.shape == (1, 1, 13, 7)
    assert np.all(grey == _luma(colour))


def test_upscaling_works(tmp_path: Path) -> None:
    _solid(tmp_path / "c" / "x.png", (10, 20, 30), size=(3, 2))
    rgb, _, _ = read_folder(tmp_path, size=(64, 48), channels=3)
    assert rgb.shape == (1, 3, 48, 64)
    np.testing.assert_array_equal(rgb[0, :, 0, 0], [10, 20, 30])
    np.testing.assert_array_equal(rgb[0, :, -1, -1], [10, 20, 30])


def test_rgb_to_grey(tmp_path: Path) -> None:
    # One row of pure and mixed colours, read at its own size so no filtering happens.
    colours = np.array(
        [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [10, 200, 30]], dtype=np.uint8
    )
    _save(tmp_path / "c" / "x.png", colours[None])
    grey, _, _ = read_folder(tmp_path, size=(5, 1), channels=1)
    assert grey.shape == (1, 1, 1, 5)
    np.testing.assert_array_equal(grey[0, 0, 0], _luma(colours.T))
    assert grey[0, 0, 0].tolist()[:4] == [76, 150, 29, 255]


def test_grey_to_rgb_repeats_the_value(tmp_path: Path) -> None:
    _solid(tmp_path / "c" / "x.png", 123, size=(4, 4), mode="L")
    rgb, _, _ = read_folder(tmp_path, size=(4, 4), channels=3)
    assert np.all(rgb == 123)


def test_rgba_is_composited_on_black(tmp_path: Path) -> None:
    rgba = np.array(
        [[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128], [255, 255, 255, 64]]],
        dtype=np.uint8,
    )
    _save(tmp_path / "c" / "x.png", Image.fromarray(rgba, "RGBA"))
    rgb, _, _ = read_folder(tmp_path, size=(4, 1), channels=3)
    got = rgb[0, :, 0, :].T.astype(int)  # [4 pixels, 3]
    np.testing.assert_array_equal(got[0], [200, 100, 50])  # opaque: unchanged
    np.testing.assert_array_equal(got[1], [0, 0, 0])  # transparent: black, not the colour
    np.testing.assert_allclose(got[2], np.array([200, 100, 50]) * 128 / 255, atol=1)
    np.testing.assert_allclose(got[3], [64, 64, 64], atol=1)
    grey, _, _ = read_folder(tmp_path, size=(4, 1), channels=1)
    assert grey[0, 0, 0, 1] == 0


def test_grey_alpha_and_palette_transparency(tmp_path: Path) -> None:
    la = Image.fromarray(np.array([[[180, 255], [180, 0]]], dtype=np.uint8), "LA")
    _save(tmp_path / "a" / "la.png", la)
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 250, 250, 250])
    palette.putpixel((0, 0), 1)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 1  # palette entry 1 fully transparent
    _save(tmp_path / "b" / "p.png", palette, transparency=1)
    grey, labels, cats = read_folder(tmp_path, size=(2, 1), channels=1)
    assert cats == ["a", "b"]
    assert grey[0, 0, 0].tolist() == [180, 0]
    assert grey[1, 0, 0].tolist() == [0, 0]


def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    wide = np.array([[0, 1000, 32896, 65535]], dtype=np.uint16)
    _save(tmp_path / "c" / "x.png", wide)
    grey, _, _ = read_folder(tmp_path, size=(4, 1), channels=1)
    assert grey[0, 0, 0].tolist() == [0, 4, 128, 255]


def test_jpeg_solid_colour(tmp_path: Path) -> None:
    colour = (180, 60, 90)
    _solid(tmp_path / "c" / "x.jpg", colour, size=(48, 32), quality=95)
    rgb, _, _ = read_folder(tmp_path, size=(12, 8), channels=3)
    assert rgb.shape == (1, 3, 8, 12)
    err = np.abs(rgb[0].astype(int) - np.asarray(colour)[:, None, None])
    assert err.max() <= 3  # JPEG is lossy, but a flat colour survives almost exactly
    grey, _, _ = read_folder(tmp_path, size=(12, 8), channels=1)
    assert np.abs(grey.astype(int) - _luma(colour)).max() <= 3


def test_large_jpeg_is_downscaled_correctly(tmp_path: Path) -> None:
    # Big enough that the decoder's DCT downscaling (draft) kicks in.
    top_bottom = np.zeros((600, 800, 3), dtype=np.uint8)
    top_bottom[:300] = (250, 250, 250)
    _save(tmp_path / "c" / "big.jpeg", top_bottom, quality=95)
    grey, _, _ = read_folder(tmp_path, size=(16, 16), channels=1)
    assert grey.shape == (1, 1, 16, 16)
    assert grey[0, 0, :6].min() >= 240
    assert grey[0, 0, 10:].max() <= 10


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # Stored 20 wide x 10 tall, left half white; EXIF orientation 6 means "rotate 90
    # degrees clockwise to display", which makes it 10 wide x 20 tall, top half white.
    stored = np.zeros((10, 20), dtype=np.uint8)
    stored[:, :10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    _save(tmp_path / "c" / "x.jpg", stored, exif=exif, quality=95)
    grey, _, _ = read_folder(tmp_path, size=(10, 20), channels=1)
    upright = grey[0, 0]
    assert upright[:8].mean() > 230
    assert upright[12:].mean() < 25


def test_category_order_labels_and_file_order(tmp_path: Path) -> None:
    # Sorted by name (upper case sorts first), files sorted within each category.
    _solid(tmp_path / "b" / "2.png", (20, 20, 20), size=(4, 4))
    _solid(tmp_path / "b" / "1.png", (10, 10, 10), size=(4, 4))
    _solid(tmp_path / "a" / "z.png", (30, 30, 30), size=(4, 4))
    _solid(tmp_path / "C" / "q.png", (40, 40, 40), size=(4, 4))
    images, labels, categories = read_folder(tmp_path, size=(4, 4), channels=1)
    assert categories == ["C", "a", "b"]
    assert labels.tolist() == [0, 1, 2, 2]
    assert images[:, 0, 0, 0].tolist() == [40, 30, 10, 20]


def test_ignored_entries_and_extension_case(tmp_path: Path) -> None:
    cat = tmp_path / "dice"
    _solid(cat / "a.PNG", 1, size=(4, 4), mode="L")
    _solid(cat / "b.Jpg", 128, size=(4, 4), mode="L", format="JPEG")
    _solid(cat / "c.JPEG", 255, size=(4, 4), mode="L", format="JPEG")
    (cat / "notes.txt").write_text("not an image")
    (cat / "d.gif").write_bytes(b"GIF89a not really")
    (cat / ".hidden.png").write_bytes(b"garbage that would fail to decode")
    _solid(cat / "nested" / "deeper.png", 9, size=(4, 4), mode="L")  # folders in categories
    (tmp_path / ".git").mkdir()  # hidden folder: not a category
    (tmp_path / "README.txt").write_text("top-level files are not categories")
    images, labels, categories = read_folder(tmp_path, size=(4, 4), channels=1)
    assert categories == ["dice"]
    assert images.shape == (3, 1, 4, 4)
    assert labels.tolist() == [0, 0, 0]
    assert np.abs(images[:, 0, 0, 0].astype(int) - [1, 128, 255]).max() <= 2


@pytest.mark.parametrize("threads", [None, 1, 3])
def test_thread_count_does_not_change_the_result(tmp_path: Path, threads) -> None:
    rng = np.random.default_rng(1)
    for c in range(3):
        for i in range(7):
            pixels = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
            _save(tmp_path / f"c{c}" / f"{i}.png", pixels)
    reference = read_folder(tmp_path, size=(8, 8), channels=3, threads=1)
    result = read_folder(tmp_path, size=(8, 8), channels=3, threads=threads)
    np.testing.assert_array_equal(result[0], reference[0])
    np.testing.assert_array_equal(result[1], reference[1])
    assert result[2] == ["c0", "c1", "c2"]
    assert np.bincount(result[1]).tolist() == [7, 7, 7]


def test_accepts_str_path_and_list_size(tmp_path: Path) -> None:
    _solid(tmp_path / "c" / "x.png", (1, 2, 3), size=(4, 4))
    images, _, _ = read_folder(str(tmp_path), size=[2, 3], channels=3)
    assert images.shape == (1, 3, 3, 2)


# --- decode_image ------------------------------------------------------------------------


def test_decode_image_from_bytes() -> None:
    data = _png_bytes(Image.new("RGB", (10, 10), (5, 6, 7)))
    out = decode_image(data, (4, 2), 3, "upload.png")
    assert out.shape == (3, 2, 4) and out.dtype == np.uint8
    assert out[:, 0, 0].tolist() == [5, 6, 7]
    assert out.flags.c_contiguous and out.flags.writeable
    grey = decode_image(data, (4, 2), 1, "upload.png")
    assert grey.shape == (1, 2, 4)


def test_decode_image_names_the_upload_on_error() -> None:
    with pytest.raises(ValueError, match=r"photo-42\.jpg.*not a PNG or JPEG"):
        decode_image(b"\x00" * 100, (4, 4), 1, "photo-42.jpg")
    with pytest.raises(ValueError, match="photo-43.png"):
        decode_image(b"", (4, 4), 1, "photo-43.png")


def test_decode_image_rejects_other_formats() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "GIF")
    with pytest.raises(ValueError, match=r"anim\.png.*not a PNG or JPEG"):
        decode_image(buf.getvalue(), (4, 4), 1, "anim.png")


# --- errors ------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope.*does not exist"):
        read_folder(missing, size=(4, 4))


def test_path_is_a_file(tmp_path: Path) -> None:
    file = _solid(tmp_path / "x.png", 0, mode="L")
    with pytest.raises(ValueError, match=r"x\.png.*is not a folder"):
        read_folder(file, size=(4, 4))


def test_no_category_folders(tmp_path: Path) -> None:
    _solid(tmp_path / "stray.png", 0, mode="L")  # images at the top level do not count
    (tmp_path / ".hidden").mkdir()
    with pytest.raises(ValueError, match="no category sub-folders"):
        read_folder(tmp_path, size=(4, 4))


def test_category_without_images_is_named(tmp_path: Path) -> None:
    _solid(tmp_path / "good" / "a.png", 0, mode="L")
    (tmp_path / "empty_cat").mkdir()
    (tmp_path / "empty_cat" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"empty_cat.*contains no images"):
        read_folder(tmp_path, size=(4, 4))


def test_corrupt_png_is_named(tmp_path: Path) -> None:
    _solid(tmp_path / "c" / "a_good.png", 0, mode="L")
    bad = tmp_path / "c" / "b_bad.png"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError) as info:
        read_folder(tmp_path, size=(4, 4))
    assert str(bad) in str(info.value)
    assert "not a PNG or JPEG" in str(info.value)


def test_truncated_jpeg_is_named_with_reason(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    good = _save(tmp_path / "c" / "whole.jpg", noise, quality=90)
    cut = tmp_path / "c" / "cut.jpg"
    data = good.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as info:
        read_folder(tmp_path, size=(8, 8))
    assert str(cut) in str(info.value)
    assert "truncated" in str(info.value)


def test_truncated_png_is_named(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    good = _save(tmp_path / "c" / "whole.png", noise)
    cut = tmp_path / "c" / "cut.png"
    cut.write_bytes(good.read_bytes()[:400])
    with pytest.raises(ValueError, match="truncated") as info:
        read_folder(tmp_path, size=(8, 8))
    assert str(cut) in str(info.value)


def test_first_bad_file_in_order_is_reported(tmp_path: Path) -> None:
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / "cat").mkdir(exist_ok=True)
        (tmp_path / "cat" / name).write_bytes(b"junk")
    for _ in range(3):  # stable despite the thread pool
        with pytest.raises(ValueError) as info:
            read_folder(tmp_path, size=(4, 4), threads=3)
        assert str(tmp_path / "cat" / "a.png") in str(info.value)


def test_decompression_bomb_hard_limit(tmp_path: Path, monkeypatch) -> None:
    # Above 2x MAX_IMAGE_PIXELS Pillow itself refuses (DecompressionBombError).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    bomb = _solid(tmp_path / "c" / "bomb.png", 0, size=(20, 20), mode="L")
    with pytest.raises(ValueError) as info:
        read_folder(tmp_path, size=(4, 4))
    message = str(info.value)
    assert str(bomb) in message
    assert "decompression bomb" in message and "MAX_IMAGE_PIXELS" in message


def test_decompression_bomb_soft_limit(monkeypatch) -> None:
    # Between 1x and 2x the limit Pillow only warns; we still refuse.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    data = _png_bytes(Image.new("L", (12, 12)))
    with pytest.warns(Image.DecompressionBombWarning):
        with pytest.raises(ValueError, match=r"big\.png.*decompression bomb.*MAX_IMAGE_PIXELS"):
            decode_image(data, (4, 4), 1, "big.png")


def test_limit_can_be_disabled(monkeypatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    data = _png_bytes(Image.new("L", (12, 12), 7))
    assert decode_image(data, (4, 4), 1, "ok.png").max() == 7


@pytest.mark.parametrize(
    "size", [(0, 4), (4, -1), (4,), (4, 4, 4), "44", None, 4, (4.0, 4), (True, 4), ("4", "4")]
)
def test_bad_size(tmp_path: Path, size) -> None:
    _solid(tmp_path / "c" / "x.png", 0, mode="L")
    with pytest.raises(ValueError, match="size must be"):
        read_folder(tmp_path, size=size)
    with pytest.raises(ValueError, match="size must be"):
        decode_image(b"", size, 1, "x")


@pytest.mark.parametrize("channels", [0, 2, 4, True, 1.0, "1"])
def test_bad_channels(tmp_path: Path, channels) -> None:
    _solid(tmp_path / "c" / "x.png", 0, mode="L")
    with pytest.raises(ValueError, match="channels must be"):
        read_folder(tmp_path, size=(4, 4), channels=channels)
    with pytest.raises(ValueError, match="channels must be"):
        decode_image(b"", (4, 4), channels, "x")


@pytest.mark.parametrize("threads", [0, -2, 1.5, True])
def test_bad_threads(tmp_path: Path, threads) -> None:
    _solid(tmp_path / "c" / "x.png", 0, mode="L")
    with pytest.raises(ValueError, match="threads must be"):
        read_folder(tmp_path, size=(4, 4), threads=threads)
