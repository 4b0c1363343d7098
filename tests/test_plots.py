"""Tests for the PNG outputs (pipeline.train.plots)."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.train import plots
from pipeline.train.plots import GRID_PAD, PAIR_GAP, save_loss_curve, save_reconstructions, save_samples


def images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=generator)


def assert_only(folder: Path, *names: str) -> None:
    """The folder holds exactly these files: no temp file was left behind."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


def upscaled(image: torch.Tensor, scale: int) -> np.ndarray:
    pixels = image.clamp(0, 1).mul(255).add(0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    return pixels.repeat(scale, axis=0).repeat(scale, axis=1)


@pytest.mark.parametrize(
    ("n", "nrow", "scale"),
    [(1, 8, 4), (5, 8, 4), (8, 8, 4), (12, 8, 4), (16, 8, 4), (7, 3, 2)],
)
def test_reconstruction_grid_size_and_layout(tmp_path: Path, n: int, nrow: int, scale: int) -> None:
    inputs, recons = images(n, seed=1), images(n, seed=2)
    path = tmp_path / "recon.png"
    returned = save_reconstructions(inputs, recons, path, nrow=nrow, scale=scale)

    cols, pairs, tile = min(n, nrow), math.ceil(n / nrow), 32 * scale
    expected = (
        cols * tile + (cols + 1) * GRID_PAD,
        2 * pairs * tile + (2 * pairs + 1) * GRID_PAD + (pairs - 1) * PAIR_GAP,
    )
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.size == returned == expected
        canvas = np.asarray(png.convert("RGB"))
    assert_only(tmp_path, "recon.png")

    # First input sits top-left, its reconstruction directly below it.
    top, left = GRID_PAD, GRID_PAD
    np.testing.assert_array_equal(canvas[top : top + tile, left : left + tile], upscaled(inputs[0], scale))
    below = top + tile + GRID_PAD
    np.testing.assert_array_equal(canvas[below : below + tile, left : left + tile], upscaled(recons[0], scale))
    # The last image opens the last pair when it wraps onto a new row.
    if n > nrow:
        last = n - 1
        col = last % nrow
        row_top = GRID_PAD + 2 * (last // nrow) * (tile + GRID_PAD) + (last // nrow) * PAIR_GAP
        col_left = GRID_PAD + col * (tile + GRID_PAD)
        np.testing.assert_array_equal(
            canvas[row_top : row_top + tile, col_left : col_left + tile], upscaled(inputs[last], scale)
        )


@pytest.mark.parametrize(("n", "nrow", "scale"), [(1, 8, 4), (16, 8, 4), (10, 4, 3)])
def test_sample_grid_size(tmp_path: Path, n: int, nrow: int, scale: int) -> None:
    samples = images(n)
    path = tmp_path / "sub" / "samples.png"
    returned = save_samples(samples, path, nrow=nrow, scale=scale)

    cols, rows, tile = min(n, nrow), math.ceil(n / nrow), 32 * scale
    expected = (cols * tile + (cols + 1) * GRID_PAD, rows * tile + (rows + 1) * GRID_PAD)
    with Image.open(path) as png:
        assert png.size == returned == expected
        canvas = np.asarray(png.convert("RGB"))
    assert_only(path.parent, "samples.png")
    np.testing.assert_array_equal(
        canvas[GRID_PAD : GRID_PAD + tile, GRID_PAD : GRID_PAD + tile], upscaled(samples[0], scale)
    )


def test_greyscale_images_are_supported(tmp_path: Path) -> None:
    grey = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    width, height = save_samples(grey, tmp_path / "grey.png", scale=1)
    with Image.open(tmp_path / "grey.png") as png:
        assert png.size == (width, height) == (3 * 16 + 4 * GRID_PAD, 16 + 2 * GRID_PAD)


def test_loss_curve_has_fixed_size(tmp_path: Path) -> None:
    epochs = [i // 40 for i in range(200)]
    losses = [2000.0 * math.exp(-i / 50) + 900.0 + (i % 7) for i in range(200)]
    path = tmp_path / "loss.png"
    returned = save_loss_curve(losses, epochs, path, title="test run")
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.size == returned == (800, 450)
        # Something was drawn: not a blank canvas.
        colours = np.unique(np.asarray(png.convert("RGB")).reshape(-1, 3), axis=0)
        assert len(colours) > 10
    assert_only(tmp_path, "loss.png")


def test_loss_curve_tolerates_non_finite_losses(tmp_path: Path) -> None:
    returned = save_loss_curve([5.0, math.nan, 3.0, math.inf, 2.0], [0, 0, 1, 1, 2], tmp_path / "loss.png")
    with Image.open(tmp_path / "loss.png") as png:
        assert png.size == returned == (800, 450)


def test_existing_file_is_replaced_whole(tmp_path: Path) -> None:
    path = tmp_path / "samples.png"
    path.write_bytes(b"old contents")
    save_samples(images(2), path)
    with Image.open(path) as png:
        assert png.format == "PNG"
    assert_only(tmp_path, "samples.png")


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "keep.png"
    path.write_bytes(b"previous picture")

    def half_write(handle: BinaryIO) -> None:
        handle.write(b"partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        plots._write_atomic(path, half_write)
    assert path.read_bytes() == b"previous picture"
    assert_only(tmp_path, "keep.png")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda p: save_reconstructions(images(2), images(3), p), r"differ in shape"),
        (lambda p: save_samples(torch.rand(2, 4, 8, 8), p), r"samples must have shape .* got \(2, 4, 8, 8\)"),
        (lambda p: save_samples(images(2), p, nrow=0), r"nrow must be >= 1, got 0"),
        (lambda p: save_samples(images(2), p, scale=0), r"scale must be >= 1, got 0"),
        (lambda p: save_loss_curve([1.0, 2.0], [0], p), r"losses \(2\) and epochs \(1\) differ in length"),
        (lambda p: save_loss_curve([], [], p), r"no finite loss among 0 values"),
    ],
)
def test_bad_arguments_raise_before_writing(tmp_path: Path, call: Callable[[Path], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(tmp_path / "out.png")
    assert_only(tmp_path)


def test_importing_plots_does_not_import_matplotlib() -> None:
    code = "import sys, pipeline.train.plots; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr
