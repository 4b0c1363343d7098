"""Decoded packs: every image of a manifest decoded once into a uint8 ``.npy`` under ``CACHE_DIR/packs``.

PNG decoding is the largest per-sample cost of training from the cache, so the first epoch that wants
a pack builds ``packs/<records_sha256[:24]>-<size>px.npy`` (shape ``(N, 3, size, size)``, uint8) and
every later epoch and run memory-maps it: one fancy index per batch, no per-sample Python work. The pack
is keyed by the manifest's records digest, so a changed listing never reads a stale pack, and written
atomically (temp file, fsync, rename) like everything else in the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cache.atomic import atomic_write_bytes, fsync_dir, temp_path_for
from cache.locks import cache_lock
from cache.manifest import ManifestArrays

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Pack:
    """A built pack: the memory-mapped array and the indices whose blobs could not be used.

    Rows of records that are not images (see :attr:`CachedImageDataset.image_indices`) stay zero.
    """

    path: Path
    images: np.ndarray  # (N, 3, S, S) uint8 memmap
    bad: tuple[int, ...]
    bad_messages: tuple[str, ...]


def pack_path(manifest: ManifestArrays, packs_dir: Path, image_size: int, indices: np.ndarray | None = None) -> Path:
    """``<records digest>-<S>px[-<selection digest>].npy``: a pack of a subset (e.g. other --extensions)
    is another pack."""
    sel = ""
    if indices is not None and len(indices) != len(manifest):
        sel = "-" + hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).tobytes()).hexdigest()[:12]
    return packs_dir / f"{manifest.header.records_sha256[:24]}-{image_size}px{sel}.npy"


def can_use_pack(dataset, image_size: int) -> bool:
    """A pack exists already, or this process may build one (a read-only cache cannot hold a new pack)."""
    packs_dir = dataset.layout.packs
    return pack_path(dataset.manifest, packs_dir, image_size, dataset.image_indices).is_file() or os.access(
        packs_dir if packs_dir.is_dir() else packs_dir.parent, os.W_OK
    )


def load_or_build_pack(dataset, *, image_size: int, progress: bool = True, skip_bad: bool = False) -> Pack:
    """Memory-map the pack of ``dataset``'s images (a CachedImageDataset), building it first if needed.

    Raises:
        ValueError: a blob is missing, corrupted or undecodable and ``skip_bad`` is False (the message
            names the key and the cause).
    """
    manifest: ManifestArrays = dataset.manifest
    packs_dir = dataset.layout.packs
    path = pack_path(manifest, packs_dir, image_size, dataset.image_indices)
    meta = path.with_suffix(".json")
    if not path.is_file():
        packs_dir.mkdir(parents=True, exist_ok=True)
        # One builder at a time; a second process waits and then maps the finished pack. A pack that
        # exists is complete (renamed into place), so reading one needs no lock (nor a writable cache).
        with cache_lock(dataset.layout, f"pack:{path.name}"):
            if not path.is_file():
                _build(dataset, path, meta, image_size=image_size, progress=progress, skip_bad=skip_bad)
    info = json.loads(meta.read_text()) if meta.is_file() else {}
    bad, messages = tuple(info.get("bad", ())), tuple(info.get("messages", ()))
    if bad and not skip_bad:
        raise ValueError(messages[0] if messages else f"sample {bad[0]} could not be decoded when the pack was built")
    images = np.load(path, mmap_mode="r")
    if images.shape != (len(manifest), 3, image_size, image_size):
        raise ValueError(
            f"pack {path} has shape {images.shape}, expected {(len(manifest), 3, image_size, image_size)}; "
            "delete it to rebuild"
        )
    return Pack(path=path, images=images, bad=bad, bad_messages=messages)


def _build(dataset, path: Path, meta: Path, *, image_size: int, progress: bool, skip_bad: bool) -> None:
    """Decode every image of ``dataset`` into a new pack; each blob's sha256 is checked before decoding
    (``load_uint8``), so a pack never bakes in a damaged blob."""
    n = len(dataset)
    tmp = temp_path_for(path.parent, ".npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, 3, image_size, image_size))
    bad: list[int] = []
    messages: list[str] = []
    try:
        for i in tqdm(
            [int(i) for i in dataset.image_indices],
            desc="building decoded pack",
            unit="img",
            disable=not progress,
            dynamic_ncols=True,
        ):
            try:
                img = dataset.load_uint8(i)
            except ValueError as e:
                if not skip_bad:
                    raise
                bad.append(i)
                messages.append(str(e))
                continue
            if tuple(img.shape[-2:]) != (image_size, image_size):
                img = (
                    torch.nn.functional.interpolate(
                        img[None].float(),
                        size=(image_size, image_size),
                        mode="bilinear",
                        antialias=True,
                        align_corners=False,
                    )[0]
                    .round()
                    .clamp(0, 255)
                    .to(torch.uint8)
                )
            out[i] = img.numpy()
        out.flush()
        del out
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        atomic_write_bytes(
            meta, json.dumps({"manifest": str(dataset.manifest.path.name), "bad": bad, "messages": messages}).encode()
        )
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    log.info("built decoded pack %s (%d images, %d bad)", path, len(dataset.image_indices), len(bad))
