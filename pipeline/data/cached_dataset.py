"""``CachedImageDataset``: the images of one manifest, read from the local cache with no network at all.

The hot path is lookup -> read -> check -> decode -> transform. The check (SHA-256 of the blob against
the manifest, about 1 GB/s) is what lets a failure name its cause: bytes that no longer match the
manifest are a damaged cache (``verify --repair`` fixes them); bytes that match but do not decode are
the bucket's own object, which no repair can turn into an image.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cache.layout import CacheLayout
from cache.manifest import ManifestArrays, load_manifest
from pipeline.data.images import IMG_EXTENSIONS, DefaultTransform, UndecodableImage, decode_rgb, image_indices
from pipeline.hints import fetch_hint, verify_hint

Transform = Callable[[torch.Tensor], torch.Tensor]


class BadSample(ValueError):
    """A sample that cannot be trained on; the message names its key, the cause and the fix."""


class CachedImageDataset(Dataset):
    """Images of one manifest, read from the local cache.

    Args:
        manifest: path of a ``.jsonl`` manifest (or already loaded :class:`ManifestArrays`).
        cache_dir: cache root holding the blobs (default: the manifest's ``../..``).
        transforms: applied to the decoded uint8 (3, H, W) tensor; default: float [0, 1] at ``image_size``.
        image_size: output size of the default transform.
        check_blobs: stat every image's blob at construction and fail with one line if any is missing.
        extensions: keys ending in one of these (case-insensitive) are images (:attr:`image_indices`);
            the others are ignored by training, as ``ImageFolder`` ignores them.

    Raises:
        FileNotFoundError: the manifest or some blobs are missing (the message says how to fetch them).
    """

    def __init__(
        self,
        manifest: str | os.PathLike[str] | ManifestArrays,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        transforms: Transform | None = None,
        image_size: int | None = 32,
        check_blobs: bool = True,
        extensions: tuple[str, ...] = IMG_EXTENSIONS,
    ) -> None:
        super().__init__()
        self.manifest = manifest if isinstance(manifest, ManifestArrays) else load_manifest(manifest)
        root = Path(cache_dir) if cache_dir else self.manifest.path.parent.parent
        self.layout = CacheLayout.at(root)
        self.transforms = transforms or DefaultTransform(image_size)
        self.image_indices = image_indices(self.manifest.keys, extensions)
        self._objects = str(self.layout.objects)
        if check_blobs:
            self._check_blobs()

    def __len__(self) -> int:
        return len(self.manifest)

    @property
    def ignored_indices(self) -> np.ndarray:
        """Records whose key has no image extension (README files, markers, CSVs)."""
        return np.setdiff1d(np.arange(len(self)), self.image_indices)

    def blob_path(self, i: int) -> str:
        # CacheLayout.blob_path's layout, without its Path object and digest check: this runs once per
        # sample, and the digest comes from a manifest whose records_sha256 was verified at load.
        h = self.manifest.sha256[i].tobytes().hex()
        return f"{self._objects}/{h[0:2]}/{h[2:4]}/{h}"

    def _repair_hint(self) -> str:
        return verify_hint(repair=True, endpoint=self.manifest.header.endpoint, cache_dir=self.layout)

    def _sample(self, i: int) -> str:
        return f"sample {i} (key {self.manifest.keys[i]!r})"

    def _check_blobs(self) -> None:
        missing = [int(i) for i in self.image_indices if not os.path.isfile(self.blob_path(int(i)))]
        if missing:
            hdr = self.manifest.header
            shard = None if hdr.shard is None else str(hdr.shard)
            raise FileNotFoundError(
                f"{len(missing)} of {len(self.image_indices)} image blobs of manifest {self.manifest.path.name} are "
                f"missing from {self.layout.objects} (first: key {self.manifest.keys[missing[0]]!r}); run "
                f"{fetch_hint(str(hdr.uri), endpoint=hdr.endpoint, cache_dir=self.layout, shard=shard)} "
                f"or {self._repair_hint()}"
            )

    def read_checked(self, i: int) -> bytes:
        """The bytes of blob ``i``, checked against the manifest's SHA-256.

        Raises:
            BadSample: the blob is missing or its bytes no longer match (a damaged cache).
        """
        try:
            with open(self.blob_path(i), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise BadSample(f"{self._sample(i)} is missing from the cache; run {self._repair_hint()}") from None
        if hashlib.sha256(data).digest() != self.manifest.sha256[i].tobytes():
            raise BadSample(
                f"{self._sample(i)} is corrupted in the cache (its bytes no longer match the manifest's "
                f"sha256 {self.manifest.sha_hex(i)[:16]}...); run {self._repair_hint()}"
            )
        return data

    def load_uint8(self, i: int) -> torch.Tensor:
        """Decoded uint8 (3, H, W) image ``i``.

        Raises:
            BadSample: missing, corrupted, or intact but not a decodable image (the message says which).
        """
        data = self.read_checked(i)
        try:
            return decode_rgb(data)
        except UndecodableImage as e:
            raise BadSample(
                f"{self._sample(i)} is not a decodable image ({e}); the cached bytes match the bucket's object, so "
                "fix or remove it in the bucket, narrow --extensions, or train with --on-bad-sample skip"
            ) from None

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transforms(self.load_uint8(i)), int(self.manifest.label[i])
