"""Deterministic synthetic demo image set.

This module owns the demo data only: ten visually distinct classes of small RGB
images (shapes, colours and textures), their PNG encoding, and the object keys
they are published under. Every image is a pure function of ``(seed, index)``,
so the demo bucket can be rebuilt byte-for-byte anywhere.
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Iterator

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

CLASS_NAMES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "ring",
    "cross",
    "diamond",
    "hstripes",
    "vstripes",
    "checker",
    "gradient",
)
DEMO_BUCKET = "tess-demo"
DEMO_PREFIX = "shapes-train/"

# Saturated, mutually distant base colours. Channels sit at (or near) 0 and 1
# so that, after jitter and clipping, most pixels are close to binary: that
# keeps the per-pixel BCE floor low and the classes easy to tell apart by eye.
_FOREGROUND: tuple[tuple[float, float, float], ...] = (
    (1.00, 0.10, 0.10),  # circle: red
    (0.15, 0.35, 1.00),  # square: blue
    (0.10, 0.95, 0.10),  # triangle: green
    (1.00, 0.90, 0.00),  # ring: yellow
    (1.00, 0.00, 1.00),  # cross: magenta
    (0.00, 1.00, 1.00),  # diamond: cyan
    (1.00, 1.00, 1.00),  # hstripes: white
    (1.00, 0.50, 0.00),  # vstripes: orange
    (0.60, 0.20, 1.00),  # checker: purple
    (1.00, 0.00, 0.00),  # gradient: red ...
)
_GRADIENT_END = (0.00, 0.20, 1.00)  # ... fading to blue

_SHAPES = frozenset(CLASS_NAMES[:6])
_COLOUR_JITTER = 0.08
_BACKGROUND_MAX = 0.10
_PNG_COMPRESS_LEVEL = 6
_MIN_SIZE = 8


def _check_index(index: int) -> None:
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}; pass a non-negative image index")


def _check_seed(seed: int) -> None:
    # numpy's SeedSequence rejects negative entropy with an opaque message.
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}; pass a non-negative seed")


def _check_size(size: int) -> None:
    if size < _MIN_SIZE:
        raise ValueError(f"size must be >= {_MIN_SIZE}, got {size}; pass a larger image size")


def demo_label(index: int) -> int:
    """Return the class label of demo image ``index``.

    Args:
        index: Non-negative image index.

    Returns:
        The label in ``range(len(CLASS_NAMES))``; classes cycle with the index
        so any ten consecutive images cover every class.

    Raises:
        ValueError: If ``index`` is negative.
    """
    _check_index(index)
    return index % len(CLASS_NAMES)


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1], shape (size, size) each, read-only."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _shape_mask(label: int, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of a centred shape; ``dx``/``dy`` are offsets from its centre."""
    ax, ay = np.abs(dx), np.abs(dy)
    name = CLASS_NAMES[label]
    if name == "circle":
        return dx * dx + dy * dy <= r * r
    if name == "square":
        return np.maximum(ax, ay) <= 0.85 * r
    if name == "triangle":
        # Apex up: the half-width grows linearly from 0 at the top to ~r at the base.
        return (dy >= -r) & (dy <= 0.8 * r) & (ax <= 0.6 * (dy + r))
    if name == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if name == "cross":
        arm = 0.32 * r
        return ((ax <= arm) & (ay <= r)) | ((ay <= arm) & (ax <= r))
    if name == "diamond":
        return ax + ay <= 1.15 * r
    raise AssertionError(f"label {label} is a texture class, not a shape")


def _render(label: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """Render one image as float32 RGB in [0, 1], shape (size, size, 3)."""
    yy, xx = _grid(size)
    background = rng.uniform(0.0, _BACKGROUND_MAX, size=3).astype(np.float32)
    colour = np.clip(
        np.asarray(_FOREGROUND[label], dtype=np.float32)
        + rng.uniform(-_COLOUR_JITTER, _COLOUR_JITTER, size=3).astype(np.float32),
        0.0,
        1.0,
    )
    image = np.broadcast_to(background, (size, size, 3)).copy()
    name = CLASS_NAMES[label]

    if name in _SHAPES:
        cx, cy = rng.uniform(0.38, 0.62, size=2)
        r = float(rng.uniform(0.24, 0.34))
        mask = _shape_mask(label, xx - cx, yy - cy, r)
        image[mask] = colour
        return image

    if name in ("hstripes", "vstripes", "checker"):
        # Period in pixel units scaled to the image so the texture looks the
        # same at any size; the phase moves the pattern from image to image.
        period = float(rng.uniform(0.16, 0.26) if name != "checker" else rng.uniform(0.25, 0.36))
        phase_y, phase_x = rng.uniform(0.0, period, size=2)
        band_y = np.floor((yy + phase_y) / (period / 2)).astype(np.int64)
        band_x = np.floor((xx + phase_x) / (period / 2)).astype(np.int64)
        if name == "hstripes":
            mask = band_y % 2 == 0
        elif name == "vstripes":
            mask = band_x % 2 == 0
        else:
            mask = (band_x + band_y) % 2 == 0
        image[mask] = colour
        return image

    # Gradient: a linear ramp between two colours along a jittered diagonal.
    angle = float(rng.uniform(np.pi / 4 - 0.4, np.pi / 4 + 0.4))
    ramp = xx * np.cos(angle) + yy * np.sin(angle)
    ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min())
    end = np.clip(
        np.asarray(_GRADIENT_END, dtype=np.float32)
        + rng.uniform(-_COLOUR_JITTER, _COLOUR_JITTER, size=3).astype(np.float32),
        0.0,
        1.0,
    )
    return (1.0 - ramp)[..., None] * colour + ramp[..., None] * end


def demo_image(index: int, *, seed: int = 0, size: int = 32) -> Image.Image:
    """Render demo image ``index`` as an RGB PIL image.

    The class is ``demo_label(index)``. Position, scale, colour and background
    tint (or stripe period, phase and gradient angle) are jittered by
    ``numpy.random.default_rng((seed, index))``, so the result depends on
    ``(seed, index, size)`` only.

    Args:
        index: Non-negative image index.
        seed: Non-negative seed of the whole demo set.
        size: Width and height in pixels, at least 8.

    Returns:
        An RGB image of ``size`` x ``size`` pixels.

    Raises:
        ValueError: If ``index`` or ``seed`` is negative or ``size`` < 8.
    """
    _check_index(index)
    _check_seed(seed)
    _check_size(size)
    rng = np.random.default_rng((seed, index))
    pixels = _render(demo_label(index), rng, size)
    return Image.fromarray((pixels * 255.0 + 0.5).astype(np.uint8))


def demo_png(index: int, *, seed: int = 0, size: int = 32) -> bytes:
    """Encode demo image ``index`` as PNG bytes.

    The encoding uses a fixed compression level and writes no metadata chunks,
    so the bytes (and therefore their content hash) are identical on every call.

    Args:
        index: Non-negative image index.
        seed: Non-negative seed of the whole demo set.
        size: Width and height in pixels, at least 8.

    Returns:
        The PNG file contents.

    Raises:
        ValueError: As for :func:`demo_image`.
    """
    buffer = io.BytesIO()
    demo_image(index, seed=seed, size=size).save(
        buffer, format="PNG", compress_level=_PNG_COMPRESS_LEVEL, optimize=False
    )
    return buffer.getvalue()


def demo_key(index: int, *, prefix: str = DEMO_PREFIX) -> str:
    """Return the object key of demo image ``index``.

    Args:
        index: Non-negative image index.
        prefix: Key prefix, normally ending in ``/``.

    Returns:
        ``f"{prefix}img-{index:06d}_{label}.png"``, e.g.
        ``"shapes-train/img-000123_3.png"``; the label is the integer between
        the last ``_`` and ``.png``.

    Raises:
        ValueError: If ``index`` is negative.
    """
    return f"{prefix}img-{index:06d}_{demo_label(index)}.png"


def demo_items(n: int, *, seed: int = 0, prefix: str = DEMO_PREFIX, size: int = 32) -> Iterator[tuple[str, bytes]]:
    """Yield ``(key, png_bytes)`` for demo images ``0 .. n-1`` in order.

    Args:
        n: Number of images, at least 1.
        seed: Non-negative seed of the whole demo set.
        prefix: Key prefix passed to :func:`demo_key`.
        size: Width and height in pixels, at least 8.

    Returns:
        A lazy iterator; images are rendered as they are consumed.

    Raises:
        ValueError: If ``n`` < 1, ``seed`` < 0 or ``size`` < 8 (raised at the
            call, not on first iteration).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}; ask for at least one demo image")
    _check_seed(seed)
    _check_size(size)
    logger.debug("generating %d demo images (seed=%d, size=%d)", n, seed, size)
    return _iter_items(n, seed=seed, prefix=prefix, size=size)


def _iter_items(n: int, *, seed: int, prefix: str, size: int) -> Iterator[tuple[str, bytes]]:
    for index in range(n):
        yield demo_key(index, prefix=prefix), demo_png(index, seed=seed, size=size)
