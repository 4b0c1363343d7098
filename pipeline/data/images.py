"""Which keys are images, and decoding them: torchvision ``ImageFolder``'s rule, Pillow's decoder.

Real buckets hold README files, ``_SUCCESS`` markers, ``.DS_Store`` files and label CSVs beside the
images. Like ``ImageFolder``, training uses only keys whose name ends in an image extension
(case-insensitive) and counts the others as ignored; ``--extensions`` changes the list.
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import numpy as np
import torch
from PIL import Image

from pipeline.config import IMG_EXTENSIONS, parse_extensions

__all__ = ["IMG_EXTENSIONS", "DefaultTransform", "UndecodableImage", "decode_rgb", "image_indices", "parse_extensions"]

# IMG_EXTENSIONS and parse_extensions live with the other defaults in pipeline.config (torch-free).


class UndecodableImage(ValueError):
    """The bytes are not a complete, valid image."""


def image_indices(keys: Iterable[str], extensions: tuple[str, ...] = IMG_EXTENSIONS) -> np.ndarray:
    """Indices of the keys whose name ends in one of ``extensions`` (case-insensitive), in order."""
    exts = tuple(e.lower() for e in extensions)
    return np.fromiter((i for i, k in enumerate(keys) if k.lower().endswith(exts)), dtype=np.int64)


def decode_rgb(data: bytes | bytearray | memoryview) -> torch.Tensor:
    """Decode PNG/JPEG/GIF/WEBP/BMP/TIFF bytes into a uint8 (3, H, W) tensor with Pillow.

    Pillow, not ``torchvision.io.decode_image``: torchvision is about twice as fast on 32x32 PNGs, but
    its libpng wrapper kills the process with SIGSEGV on a PNG whose IDAT data is damaged (flip one
    byte and see), where Pillow raises an exception that names the problem. The decoded pack takes
    decoding off the per-epoch path anyway.

    Raises:
        UndecodableImage: the bytes are not a complete, valid image.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UndecodableImage(f"{type(e).__name__}: {e}") from None
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)


def to_float(image: torch.Tensor, *, image_size: int | None = None) -> torch.Tensor:
    """uint8 CHW -> float32 in [0, 1], resized (bilinear, antialiased) when ``image_size`` differs."""
    x = image.float().div_(255.0)
    if image_size is not None and tuple(x.shape[-2:]) != (image_size, image_size):
        x = torch.nn.functional.interpolate(
            x.unsqueeze(0), size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
        )[0]
    return x


class DefaultTransform:
    """uint8 -> float [0,1] at ``image_size`` (a class, not a lambda, so it pickles for spawn workers)."""

    def __init__(self, image_size: int | None) -> None:
        self.image_size = image_size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return to_float(image, image_size=self.image_size)
