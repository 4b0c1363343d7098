"""PNG pictures that people look at after a training run.

This module owns the image outputs: reconstruction grids, prior-sample grids
and the loss curve. Every file is written atomically (temporary file in the
same folder, fsync, ``os.replace``) so a reader never sees a half-written PNG.
matplotlib is imported only inside :func:`save_loss_curve`, so importing this
module stays cheap for code that only needs the grids.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch import Tensor

logger = logging.getLogger(__name__)

GRID_PAD = 2
"""Pixels of separator around and between grid tiles."""
PAIR_GAP = 6
"""Extra pixels between consecutive input/reconstruction row pairs."""

_GRID_FILL = 128
_PNG_COMPRESS_LEVEL = 6
_CURVE_SIZE_IN = (8.0, 4.5)
_CURVE_DPI = 100
# Pictures are for people; mkstemp's private 0600 mode would hide them from
# other users of a shared run folder.
_FILE_MODE = 0o644
_POSIX = os.name == "posix"


def _write_atomic(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> Path:
    """Write a file through ``write`` so that ``path`` is replaced all at once.

    Args:
        path: Destination; missing parent folders are created.
        write: Callback that writes the full contents to the given binary file.

    Returns:
        The destination as a :class:`Path`.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Same folder as the target so os.replace is a rename on one filesystem.
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            if _POSIX:
                os.fchmod(handle.fileno(), _FILE_MODE)
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    if _POSIX:
        # Persist the rename itself, not just the file contents.
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return target


def _to_uint8_hwc(images: Tensor, name: str) -> np.ndarray:
    """Convert ``(N, C, H, W)`` floats in [0, 1] to ``(N, H, W, 3)`` uint8."""
    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] < 1:
        raise ValueError(
            f"{name} must have shape (N>=1, 1 or 3, H, W), got {tuple(images.shape)}; "
            "pass a batch of greyscale or RGB images"
        )
    array = images.detach().to("cpu").float().clamp(0.0, 1.0).mul(255.0).add(0.5).to(torch.uint8)
    hwc = array.permute(0, 2, 3, 1).numpy()
    if hwc.shape[-1] == 1:
        hwc = np.repeat(hwc, 3, axis=-1)
    return hwc


def _check_layout(nrow: int, scale: int) -> None:
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}; pass the number of images per grid row")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}; pass an integer upscaling factor such as 4")


def _grid(rows: list[np.ndarray], scale: int, *, group: int = 1) -> np.ndarray:
    """Tile rows of uint8 images into one padded, upscaled canvas.

    Args:
        rows: Each entry is ``(k, H, W, 3)`` with ``k`` <= the widest row.
        scale: Nearest-neighbour upscaling factor.
        group: Rows per visual group; groups after the first start
            ``PAIR_GAP`` pixels lower. 1 means no extra gaps.

    Returns:
        uint8 canvas of height ``R * H * scale + (R + 1) * GRID_PAD +
        gaps * PAIR_GAP`` and width ``cols * W * scale + (cols + 1) *
        GRID_PAD``, with ``R = len(rows)``, ``cols`` the widest row and
        ``gaps = ceil(R / group) - 1`` when ``group`` > 1, else 0.
    """
    cols = max(row.shape[0] for row in rows)
    tile_h, tile_w = rows[0].shape[1] * scale, rows[0].shape[2] * scale
    gap = PAIR_GAP if group > 1 else 0
    gaps = (len(rows) - 1) // group
    height = len(rows) * tile_h + (len(rows) + 1) * GRID_PAD + gaps * gap
    width = cols * tile_w + (cols + 1) * GRID_PAD
    canvas = np.full((height, width, 3), _GRID_FILL, dtype=np.uint8)
    for r, row in enumerate(rows):
        top = GRID_PAD + r * (tile_h + GRID_PAD) + (r // group) * gap
        for c, image in enumerate(row):
            left = GRID_PAD + c * (tile_w + GRID_PAD)
            canvas[top : top + tile_h, left : left + tile_w] = image.repeat(scale, axis=0).repeat(scale, axis=1)
    return canvas


def _save_canvas(canvas: np.ndarray, path: str | os.PathLike[str]) -> tuple[int, int]:
    image = Image.fromarray(canvas)
    target = _write_atomic(path, lambda handle: image.save(handle, format="PNG", compress_level=_PNG_COMPRESS_LEVEL))
    logger.debug("wrote %s (%dx%d)", target, image.width, image.height)
    return image.width, image.height


def save_reconstructions(
    inputs: Tensor,
    recons: Tensor,
    path: str | os.PathLike[str],
    *,
    nrow: int = 8,
    scale: int = 4,
) -> tuple[int, int]:
    """Save inputs and their reconstructions as a grid of row pairs.

    Images are taken ``nrow`` at a time: each chunk becomes one row of inputs
    with the matching reconstructions in the row directly below it. Every
    image is upscaled ``scale`` times with nearest-neighbour sampling, tiles
    are separated by ``GRID_PAD`` (2) grey pixels, border included, and each
    pair after the first starts ``PAIR_GAP`` (6) pixels lower so the pairs
    read apart.

    With ``N`` images of ``H`` x ``W`` pixels, ``cols = min(N, nrow)`` and
    ``pairs = ceil(N / nrow)``, the PNG is exactly::

        width  = cols * W * scale + (cols + 1) * GRID_PAD
        height = 2 * pairs * H * scale + (2 * pairs + 1) * GRID_PAD + (pairs - 1) * PAIR_GAP

    Args:
        inputs: Original images, ``(N, C, H, W)`` with ``C`` in {1, 3}, values
            in [0, 1] (clamped).
        recons: Reconstructions with the same shape as ``inputs``.
        path: Destination PNG; written atomically, parents created.
        nrow: Images per row, at least 1.
        scale: Integer upscaling factor, at least 1.

    Returns:
        ``(width, height)`` of the written PNG in pixels.

    Raises:
        ValueError: If the shapes differ or are not image batches, or
            ``nrow``/``scale`` < 1.
    """
    _check_layout(nrow, scale)
    if inputs.shape != recons.shape:
        raise ValueError(
            f"inputs {tuple(inputs.shape)} and recons {tuple(recons.shape)} differ in shape; "
            "pass reconstructions of exactly these inputs"
        )
    originals = _to_uint8_hwc(inputs, "inputs")
    rebuilt = _to_uint8_hwc(recons, "recons")
    rows: list[np.ndarray] = []
    for start in range(0, len(originals), nrow):
        rows += [originals[start : start + nrow], rebuilt[start : start + nrow]]
    return _save_canvas(_grid(rows, scale, group=2), path)


def save_samples(
    samples: Tensor,
    path: str | os.PathLike[str],
    *,
    nrow: int = 8,
    scale: int = 4,
) -> tuple[int, int]:
    """Save images (e.g. samples from the prior) as a grid.

    Same tiling as :func:`save_reconstructions` without the paired rows. With
    ``N`` images of ``H`` x ``W`` pixels, ``cols = min(N, nrow)`` and
    ``rows = ceil(N / nrow)``, the PNG is exactly::

        width  = cols * W * scale + (cols + 1) * GRID_PAD
        height = rows * H * scale + (rows + 1) * GRID_PAD

    Args:
        samples: Images, ``(N, C, H, W)`` with ``C`` in {1, 3}, values in
            [0, 1] (clamped).
        path: Destination PNG; written atomically, parents created.
        nrow: Images per row, at least 1.
        scale: Integer upscaling factor, at least 1.

    Returns:
        ``(width, height)`` of the written PNG in pixels.

    Raises:
        ValueError: If ``samples`` is not an image batch or ``nrow``/``scale``
            < 1.
    """
    _check_layout(nrow, scale)
    images = _to_uint8_hwc(samples, "samples")
    rows = [images[start : start + nrow] for start in range(0, len(images), nrow)]
    return _save_canvas(_grid(rows, scale), path)


def save_loss_curve(
    losses: Sequence[float],
    epochs: Sequence[int],
    path: str | os.PathLike[str],
    *,
    title: str = "VAE training loss",
) -> tuple[int, int]:
    """Plot per-iteration loss with per-epoch means and save it as a PNG.

    The figure is always 8 x 4.5 inches at 100 dpi, i.e. 800 x 450 pixels.
    Iterations are numbered from 1 on the x axis; the per-iteration loss is a
    thin line and each epoch's mean is a step line over that epoch's
    iterations with a marker at its midpoint. Non-finite losses are left out
    (gaps in the line, ignored in the means).

    Args:
        losses: Loss of every training iteration, in order.
        epochs: Epoch number of each iteration; same length as ``losses``.
        path: Destination PNG; written atomically, parents created.
        title: Figure title.

    Returns:
        ``(width, height)`` of the written PNG in pixels.

    Raises:
        ValueError: If the sequences are empty, differ in length, or hold no
            finite loss.
    """
    if len(losses) != len(epochs):
        raise ValueError(
            f"losses ({len(losses)}) and epochs ({len(epochs)}) differ in length; pass one epoch number per iteration"
        )
    values = np.asarray(losses, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        raise ValueError(f"no finite loss among {len(values)} values; pass the recorded training losses")
    values = np.where(finite, values, np.nan)
    epoch_ids = np.asarray(epochs)
    iterations = np.arange(1, len(values) + 1)

    # Boundaries where the epoch number changes, so repeated epoch numbers in
    # separate runs still form separate segments.
    starts = np.flatnonzero(np.r_[True, epoch_ids[1:] != epoch_ids[:-1]])
    ends = np.r_[starts[1:], len(values)]
    means = np.array([np.nanmean(values[s:e]) if finite[s:e].any() else np.nan for s, e in zip(starts, ends)])

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Figure + Agg canvas rather than pyplot: no global figure registry, no
    # interactive backend selection, safe to call from any thread.
    figure = Figure(figsize=_CURVE_SIZE_IN, dpi=_CURVE_DPI)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.plot(iterations, values, linewidth=0.6, alpha=0.6, color="tab:blue", label="iteration loss")
    step_x = np.r_[iterations[starts], iterations[-1]]
    step_y = np.r_[means, means[-1]]
    axes.step(step_x, step_y, where="post", linewidth=1.8, color="tab:orange", label="epoch mean")
    midpoints = (iterations[starts] + iterations[ends - 1]) / 2.0
    axes.plot(midpoints, means, linestyle="none", marker="o", color="tab:orange")
    axes.set_xlabel("iteration")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right")
    figure.tight_layout()

    canvas.draw()
    width, height = canvas.get_width_height()
    target = _write_atomic(
        path,
        lambda handle: figure.savefig(handle, format="png", dpi=_CURVE_DPI, metadata={"Software": None}),
    )
    logger.debug("wrote %s (%dx%d)", target, width, height)
    return width, height
