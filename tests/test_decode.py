"""Decoding never crashes the process: every single-byte corruption of a PNG either decodes or raises."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from pipeline.data.datasets import UndecodableImage, decode_rgb


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_every_single_byte_corruption_decodes_or_raises():
    # torchvision's decode_image dies with SIGSEGV on some of these (damaged IDAT); tess must not.
    orig = _png()
    outcomes = {}
    for pos in range(len(orig)):
        pid = os.fork()
        if pid == 0:
            data = bytearray(orig)
            data[pos] ^= 0xFF
            try:
                decode_rgb(bytes(data))
                os._exit(0)
            except UndecodableImage:
                os._exit(1)
            except BaseException:
                os._exit(2)
        _, status = os.waitpid(pid, 0)
        outcomes[pos] = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
    assert all(v in (0, 1) for v in outcomes.values()), {p: v for p, v in outcomes.items() if v not in (0, 1)}
    assert sum(v == 1 for v in outcomes.values()) > len(orig) // 2  # most corruptions are detected


@pytest.mark.parametrize("data", [b"", b"not an image", _png()[:30], _png()[:60]])
def test_undecodable_inputs_raise(data):
    with pytest.raises(UndecodableImage):
        decode_rgb(data)


def test_decodes_rgb_uint8_chw():
    x = decode_rgb(_png())
    assert x.shape == (3, 8, 8) and str(x.dtype) == "torch.uint8"
    grey = io.BytesIO()
    Image.new("L", (4, 6), 7).save(grey, format="PNG")
    assert decode_rgb(grey.getvalue()).shape == (3, 6, 4)
