"""Tests for the deterministic demo image set (pipeline.demo.demo_set)."""

from __future__ import annotations

import io
import itertools
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pipeline.demo.demo_set import (
    CLASS_NAMES,
    DEMO_BUCKET,
    DEMO_PREFIX,
    demo_image,
    demo_items,
    demo_key,
    demo_label,
    demo_png,
)

KEY_RE = re.compile(r"^(?P<prefix>.*)img-(?P<index>\d{6})_(?P<label>\d+)\.png$")


def parse_label(key: str) -> int:
    """Read the label the way downstream code does: the integer in ``_<int>.png``."""
    match = re.search(r"_(\d+)\.png$", key)
    assert match is not None, key
    return int(match.group(1))


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / 255.0


def test_constants_describe_ten_named_classes() -> None:
    assert len(CLASS_NAMES) == 10
    assert len(set(CLASS_NAMES)) == 10
    assert DEMO_BUCKET == "tess-demo"
    assert DEMO_PREFIX.endswith("/")


def test_png_bytes_are_identical_across_calls() -> None:
    assert demo_png(7) == demo_png(7)
    assert list(demo_items(12, seed=3)) == list(demo_items(12, seed=3))


def test_image_depends_only_on_seed_and_index() -> None:
    # Rendering other images first must not disturb any shared RNG state.
    late = dict(demo_items(10, seed=5))
    assert late[demo_key(9)] == demo_png(9, seed=5)


@pytest.mark.parametrize("index", range(10))
def test_different_seeds_give_different_images(index: int) -> None:
    assert demo_png(index, seed=0) != demo_png(index, seed=1)


def test_different_indices_of_one_class_differ() -> None:
    # Same label, different jitter.
    assert demo_label(3) == demo_label(13)
    assert demo_png(3) != demo_png(13)


@pytest.mark.parametrize("size", [8, 32, 64])
def test_image_is_rgb_of_requested_size(size: int) -> None:
    image = demo_image(4, size=size)
    assert image.mode == "RGB"
    assert image.size == (size, size)


def test_png_decodes_to_the_rendered_image_without_metadata() -> None:
    decoded = Image.open(io.BytesIO(demo_png(21)))
    assert decoded.format == "PNG"
    assert decoded.info == {}
    np.testing.assert_array_equal(np.asarray(decoded.convert("RGB")), np.asarray(demo_image(21)))


def test_key_format_matches_documented_example() -> None:
    assert demo_key(123) == "shapes-train/img-000123_3.png"
    assert demo_key(5, prefix="other/") == "other/img-000005_5.png"


def test_item_keys_parse_back_to_index_and_label() -> None:
    for expected_index, (key, _png) in enumerate(demo_items(25, prefix="p/")):
        match = KEY_RE.match(key)
        assert match is not None, key
        assert match["prefix"] == "p/"
        assert int(match["index"]) == expected_index
        assert parse_label(key) == demo_label(expected_index)
        assert 0 <= parse_label(key) < len(CLASS_NAMES)


def test_first_hundred_images_cover_every_class() -> None:
    counts = Counter(parse_label(key) for key, _png in demo_items(100))
    assert set(counts) == set(range(len(CLASS_NAMES)))
    assert min(counts.values()) >= 5


def test_classes_are_visibly_different() -> None:
    fit = range(200)
    held_out = range(200, 400)
    stacks: dict[int, list[np.ndarray]] = {label: [] for label in range(len(CLASS_NAMES))}
    for index in fit:
        stacks[demo_label(index)].append(as_array(demo_image(index)))
    means = np.stack([np.mean(stacks[label], axis=0) for label in range(len(CLASS_NAMES))])

    # Every pair of class-mean images differs by a clear margin (in [0, 1] units).
    gaps = [float(np.abs(means[a] - means[b]).mean()) for a, b in itertools.combinations(range(10), 2)]
    assert min(gaps) > 0.05

    # And the difference is usable: nearest class mean labels unseen images.
    images = np.stack([as_array(demo_image(index)) for index in held_out])
    distances = ((images[:, None] - means[None]) ** 2).reshape(len(images), len(means), -1).mean(-1)
    labels = np.array([demo_label(index) for index in held_out])
    assert (distances.argmin(axis=1) == labels).mean() >= 0.9


@pytest.mark.parametrize("n", [0, -1, -50])
def test_demo_items_rejects_non_positive_n(n: int) -> None:
    with pytest.raises(ValueError, match=rf"n must be >= 1, got {n}; ask for at least one demo image"):
        demo_items(n)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"index": -1}, r"index must be >= 0, got -1"),
        ({"index": 0, "seed": -2}, r"seed must be >= 0, got -2"),
        ({"index": 0, "size": 4}, r"size must be >= 8, got 4"),
    ],
)
def test_demo_image_rejects_bad_arguments(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        demo_image(**kwargs)
