"""Synthetic dice images: a small, fully deterministic data set for demos and tests.

``render_dice`` draws one die per image (a light rounded square with dark pips in the
standard 1-6 layouts) on a darker background, with random rotation, scale, position,
brightness/contrast jitter and Gaussian pixel noise. Everything is vectorised numpy:
each image is rendered from a coordinate grid by signed-distance functions with 2x2
supersampling, so a few thousand small images take a fraction of a second.

Pure numpy; deliberately does not import torch or the compiled core.
"""

from __future__ import annotations

import numpy as np

__all__ = ["DICE_CATEGORIES", "render_dice"]

#: Category names, index = label. Label k shows k+1 pips.
DICE_CATEGORIES: list[str] = ["1", "2", "3", "4", "5", "6"]

# Geometry in "die units": the die face spans [-0.5, 0.5] on both axes.
_CORNER_RADIUS = 0.12  # rounding of the die outline
_PIP_OFFSET = 0.26  # distance of the off-centre pips from the centre, per axis
_PIP_RADIUS = 0.095  # large enough to survive a 7 px die (size 16, smallest scale)
_MIN_SCALE, _MAX_SCALE = 0.45, 0.85  # die side as a fraction of the image side
_SUPERSAMPLE = 2  # per axis; the SDF edge ramp does the rest of the anti-aliasing

# Which pip groups each face uses. Columns: centre pip, corner pips, "all four corners"
# (False = only the two on one diagonal), middle-row pips (the extra pair on a 6).
_LAYOUT = np.array(
    [
        # centre corners four  middle
        [True, False, False, False],  # 1
        [False, True, False, False],  # 2
        [True, True, False, False],  # 3
        [False, True, True, False],  # 4
        [True, True, True, False],  # 5
        [False, True, True, True],  # 6
    ]
)

# Supersampled points per vectorised chunk: each float32 scratch buffer is then 512 KiB
# (cache-friendly, ~2.5 MB in all), and chunks are still big enough to amortise numpy's
# per-call overhead; measured speed is flat from 1<<16 to 1<<19.
_CHUNK_POINTS = 1 << 17


def render_dice(
    count: int, size: int = 32, seed: int = 0, channels: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Render ``count`` random dice images.

    Args:
        count: number of images, >= 1.
        size: image side in pixels, 8..512 (images are square).
        seed: seed for ``numpy.random.Generator(PCG64(seed))``; the output is a pure
            function of (count, size, seed, channels).
        channels: 1 (grey) or 3 (RGB; die and background get random tints).

    Returns:
        images: uint8 array [count, channels, size, size] (NCHW), 0 = black.
        labels: int64 array [count], values 0..5 meaning faces "1".."6"
            (see ``DICE_CATEGORIES``). Each face occurs count // 6 or count // 6 + 1
            times, in shuffled order.

    Raises:
        ValueError: an argument is out of range (the message names it).
    """
    count = _check_int("count", count, 1, None)
    size = _check_int("size", size, 8, 512)
    channels = _check_int("channels", channels, 1, 3)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    seed = _check_int("seed", seed, 0, None)

    rng = np.random.Generator(np.random.PCG64(seed))

    # Balanced labels: count // 6 of each face, the remainder on randomly chosen faces
    # (not always the low ones), then shuffled.
    per_face, rest = divmod(count, 6)
    labels = np.concatenate(
        [np.repeat(np.arange(6), per_face), rng.choice(6, size=rest, replace=False)]
    ).astype(np.int64)
    labels = rng.permutation(labels)

    # Per-image pose, all drawn up front so chunking cannot change the result.
    theta = rng.uniform(0.0, 2.0 * np.pi, count)
    side = rng.uniform(_MIN_SCALE, _MAX_SCALE, count) * size  # die side, pixels
    # Half-extent of the rotated die's bounding box; let up to 8% of it poke out so
    # large, rotated dice still move around ("almost fully inside").
    half = 0.5 * side * (np.abs(np.cos(theta)) + np.abs(np.sin(theta)))
    slack = np.maximum(0.0, 0.5 * size - 0.92 * half)  # allowed centre offset, pixels
    cx = 0.5 * size + rng.uniform(-1.0, 1.0, count) * slack
    cy = 0.5 * size + rng.uniform(-1.0, 1.0, count) * slack

    # Intensities in [0, 1]: dark background, light die, dark pips; the gaps are wide
    # enough that contrast jitter never swaps their order.
    bg = rng.uniform(0.05, 0.40, count)
    face = rng.uniform(0.70, 0.95, count)
    pip = rng.uniform(0.00, 0.20, count)
    if channels == 3:
        # Background tints are strong (any hue); die and pip tints are mild so the die
        # stays "light" and the pips "dark" in every channel.
        bg = bg[:, None] * rng.uniform(0.4, 1.6, (count, 3))
        face = face[:, None] * rng.uniform(0.85, 1.05, (count, 3))
        pip = pip[:, None] * rng.uniform(0.5, 1.5, (count, 3))
    else:
        bg, face, pip = bg[:, None], face[:, None], pip[:, None]
    contrast = rng.uniform(0.75, 1.25, count)
    brightness = rng.uniform(-0.10, 0.10, count)
    noise_sigma = rng.uniform(0.0, 0.05, count)  # fraction of full scale

    # Fold contrast, brightness and the 0..255 scale into the three colours: the pixel
    # is an affine (weights summing to 1) mix of them, so the affine jitter commutes
    # with the mixing and costs nothing per pixel.
    def jitter(colour: np.ndarray) -> np.ndarray:
        out = ((colour - 0.5) * contrast[:, None] + 0.5 + brightness[:, None]) * 255.0
        return out.astype(np.float32)[:, :, None, None]  # [count, C, 1, 1]

    bg, face, pip = jitter(bg), jitter(face), jitter(pip)
    face_minus_bg, pip_minus_face = face - bg, pip - face
    sigma = (noise_sigma * 255.0).astype(np.float32)[:, None, None, None]

    images = np.empty((count, channels, size, size), dtype=np.uint8)
    n = size * _SUPERSAMPLE
    chunk = min(count, max(1, _CHUNK_POINTS // (n * n)))
    ws = _Workspace(chunk, size, channels)
    for lo in range(0, count, chunk):
        sl = slice(lo, min(count, lo + chunk))
        m = sl.stop - lo
        die_cov, pip_cov = _coverage(labels[sl], theta[sl], side[sl], cx[sl], cy[sl], size, ws)
        die_cov, pip_cov = die_cov[:, None], pip_cov[:, None]  # [m, 1, H, W]
        img, tmp = ws.img[:m], ws.tmp[:m]  # [m, C, H, W]
        # Paint back to front: background, die face over it, pips over the face.
        np.multiply(die_cov, face_minus_bg[sl], out=img)
        np.multiply(pip_cov, pip_minus_face[sl], out=tmp)
        img += tmp
        img += bg[sl]
        rng.standard_normal(out=tmp, dtype=np.float32)
        tmp *= sigma[sl]
        img += tmp
        img += 0.5  # the uint8 cast truncates: +0.5 makes it round to nearest
        np.clip(img, 0.0, 255.0, out=img)
        np.copyto(images[sl], img, casting="unsafe")
    return images, labels


class _Workspace:
    """Scratch buffers for one ``render_dice`` call, sized for one chunk of images.

    Rendering allocates nothing per chunk: fresh half-megabyte temporaries on every
    chunk made glibc hand memory back to the OS and page-fault it in again, which
    measured 2-3x slower than reusing these buffers.
    """

    def __init__(self, chunk: int, size: int, channels: int) -> None:
        n = size * _SUPERSAMPLE
        self.fine = [np.empty((chunk, n, n), dtype=np.float32) for _ in range(4)]
        self.mask = np.empty((chunk, n, n), dtype=np.bool_)
        self.die = np.empty((chunk, size, size), dtype=np.float32)
        self.pip = np.empty((chunk, size, size), dtype=np.float32)
        self.img = np.empty((chunk, channels, size, size), dtype=np.float32)
        self.tmp = np.empty((chunk, channels, size, size), dtype=np.float32)


def _coverage(
    labels: np.ndarray,
    theta: np.ndarray,
    side: np.ndarray,
    cx: np.ndarray,
    cy: np.ndarray,
    size: int,
    ws: _Workspace | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Anti-aliased coverage of the die and of its pips, float32 [m, size, size] in [0, 1].

    ``theta`` is in radians, ``side``, ``cx``, ``cy`` in pixels (image x to the right,
    y down, pixel i covering [i, i + 1)). Each pixel is the mean of SxS subsamples;
    each subsample's coverage is a linear ramp of the signed distance over one
    subsample width, which anti-aliases edges far better than hard 0/1 samples.
    The results are views into ``ws`` (valid until its next use).
    """
    m = labels.shape[0]
    if ws is None:
        ws = _Workspace(m, size, 1)
    ss = _SUPERSAMPLE
    n = size * ss
    f32 = np.float32
    # All [m, n, n] work happens in place in these four buffers (see _Workspace).
    u, v, p, q = (b[:m] for b in ws.fine)
    same_sign = ws.mask[:m]

    # Rotate subsample centres into die coordinates (units of die side, die spans
    # [-0.5, 0.5]); the products below are only [m, 1, n] and [m, n, 1].
    grid = (np.arange(n, dtype=f32) + f32(0.5)) / f32(ss)  # subsample centres, pixels
    cos = (np.cos(theta) / side).astype(f32)[:, None, None]
    sin = (np.sin(theta) / side).astype(f32)[:, None, None]
    dx = grid[None, None, :] - cx.astype(f32)[:, None, None]  # [m, 1, n]
    dy = grid[None, :, None] - cy.astype(f32)[:, None, None]  # [m, n, 1]
    np.add(dx * cos, dy * sin, out=u)
    np.subtract(dy * cos, dx * sin, out=v)
    np.multiply(u, v, out=p)
    np.greater(p, 0, out=same_sign)  # needed for faces 2 and 3, before folding
    # Fold by symmetry: from here on u = |u|, v = |v|.
    np.abs(u, out=u)
    np.abs(v, out=v)
    # Signed distance in die units -> subsample widths, for the 1-wide edge ramp.
    to_sub = (-side * ss).astype(f32)[:, None, None]

    # Rounded square: SDF of a box with half-size 0.5 - r, inflated by r:
    # |max(q, 0)| + min(max(qx, qy), 0) - r with q = (|u|, |v|) - (0.5 - r).
    inner = f32(0.5 - _CORNER_RADIUS)
    np.subtract(u, inner, out=p)
    np.maximum(p, 0, out=p)
    np.square(p, out=p)
    np.subtract(v, inner, out=q)
    np.maximum(q, 0, out=q)
    np.square(q, out=q)
    p += q
    np.sqrt(p, out=p)
    np.maximum(u, v, out=q)
    q -= inner
    np.minimum(q, 0, out=q)
    p += q
    _edge_ramp(p, _CORNER_RADIUS, to_sub)
    die_cov = _box_filter(p, ss, ws.die[:m])

    # Pips, as squared distances to the nearest pip. The fold turns the 4 corner pips
    # into one distance and the 6's middle pair into another, so the cost does not
    # grow with the face value. Pip groups a face lacks get a huge penalty.
    far = f32(1e6)
    penalty = np.where(_LAYOUT[labels], f32(0), far).astype(f32)[:, :, None, None]
    a = f32(_PIP_OFFSET)
    np.square(u, out=p)
    np.square(v, out=q)
    p += q
    p += penalty[:, 0]  # centre pip: |u|^2 + |v|^2
    u -= a
    np.square(u, out=u)  # u = (|u| - a)^2 from here on
    q += u
    q += penalty[:, 3]  # middle row: (|u| - a)^2 + v^2
    np.minimum(p, q, out=p)
    v -= a
    np.square(v, out=v)
    v += u
    v += penalty[:, 1]  # corners: (|u| - a)^2 + (|v| - a)^2
    # Faces 2 and 3 use one diagonal only: the quadrants where u and v share a sign.
    np.logical_or(same_sign, _LAYOUT[labels, 2][:, None, None], out=same_sign)
    np.logical_not(same_sign, out=same_sign)
    np.add(v, far, out=v, where=same_sign)
    np.minimum(p, v, out=p)
    np.sqrt(p, out=p)
    _edge_ramp(p, _PIP_RADIUS, to_sub)
    pip_cov = _box_filter(p, ss, ws.pip[:m])
    return die_cov, pip_cov


def _edge_ramp(x: np.ndarray, radius: float, neg_scale: np.ndarray) -> None:
    """In place: distance ``x`` to a shape inflated by ``radius`` -> coverage in [0, 1].

    Coverage is 0.5 on the edge and ramps linearly over one subsample width;
    ``neg_scale`` is minus the number of subsample widths per die unit, [m, 1, 1].
    """
    x -= np.float32(radius)
    x *= neg_scale
    x += np.float32(0.5)
    np.clip(x, 0, 1, out=x)


def _box_filter(x: np.ndarray, ss: int, out: np.ndarray) -> np.ndarray:
    """Mean of each SxS block of ``x`` [m, H*S, W*S] into ``out`` [m, H, W]."""
    # Summing strided slices is several times faster than .mean(axis=(2, 4)) on a
    # reshaped view, whose strided reduction dominated the render time.
    np.copyto(out, x[:, 0::ss, 0::ss])
    for i in range(ss):
        for j in range(ss):
            if i or j:
                out += x[:, i::ss, j::ss]
    out *= np.float32(1.0 / (ss * ss))
    return out


def _check_int(name: str, value: object, lo: int, hi: int | None) -> int:
    """Return ``value`` as an int, or raise ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise ValueError(f"{name} must be {rng}, got {value}")
    return value
