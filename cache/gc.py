"""Cache size cap: evict least-recently-used unreferenced blobs first, then whole old manifests.

Order of eviction, until the cache (blobs + packs) is under the cap:
1. decoded packs whose manifest no longer exists;
2. blobs that no manifest references, least recently used first (last use = max(atime, mtime);
   fetch touches the blobs it finds cached);
3. whole manifests, oldest first, never the one just written (``keep``), each with the blobs that
   no remaining manifest shares, and its packs.

Eviction holds the cache's exclusive GC lock; fetches, training and verify hold it shared, so no blob
disappears under a run that references it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from cache.layout import CacheLayout
from cache.locks import GC_LOCK, cache_lock
from cache.manifest import KEYS_SUFFIX, list_manifests, load_manifest

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class EvictionReport:
    before_bytes: int = 0
    after_bytes: int = 0
    blobs_removed: int = 0
    packs_removed: int = 0
    manifests_removed: list[str] = field(default_factory=list)


def _blob_files(layout: CacheLayout) -> dict[str, os.stat_result]:
    out: dict[str, os.stat_result] = {}
    if not layout.objects.is_dir():
        return out
    for a in os.scandir(layout.objects):
        if not a.is_dir():
            continue
        for b in os.scandir(a.path):
            if not b.is_dir():
                continue
            for f in os.scandir(b.path):
                if f.is_file() and not f.name.startswith("."):
                    out[f.name] = f.stat()
    return out


def _pack_files(layout: CacheLayout) -> dict[Path, int]:
    if not layout.packs.is_dir():
        return {}
    return {p: p.stat().st_size for p in layout.packs.iterdir() if p.is_file() and not p.name.startswith(".")}


def cache_bytes(layout: CacheLayout) -> int:
    """Bytes of blobs and packs (what the cap limits)."""
    return sum(s.st_size for s in _blob_files(layout).values()) + sum(_pack_files(layout).values())


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def enforce_cap(layout: CacheLayout, max_bytes: int, *, keep: Path | None = None) -> EvictionReport:
    """Evict until blobs + packs take at most ``max_bytes`` (see the module docstring for the order)."""
    with cache_lock(layout, GC_LOCK):
        blobs = _blob_files(layout)
        packs = _pack_files(layout)
        total = sum(s.st_size for s in blobs.values()) + sum(packs.values())
        report = EvictionReport(before_bytes=total)
        if total <= max_bytes:
            report.after_bytes = total
            return report
        manifests = list_manifests(layout)
        refs: dict[Path, set[str]] = {}
        digests: dict[Path, str] = {}
        for p in manifests:
            m = load_manifest(p)
            refs[p] = {m.sha_hex(i) for i in range(len(m))}
            digests[p] = m.header.records_sha256
        referenced = set().union(*refs.values()) if refs else set()

        live_digests = {d[:24] for d in digests.values()}
        for p, size in sorted(packs.items()):
            if total <= max_bytes:
                break
            if p.name[:24] not in live_digests:
                _remove(p)
                total -= size
                report.packs_removed += 1

        unreferenced = sorted(
            (sha for sha in blobs if sha not in referenced), key=lambda s: max(blobs[s].st_atime, blobs[s].st_mtime)
        )
        for sha in unreferenced:
            if total <= max_bytes:
                break
            _remove(layout.blob_path(sha))
            total -= blobs[sha].st_size
            report.blobs_removed += 1

        for p in manifests:  # oldest first
            if total <= max_bytes:
                break
            if keep is not None and p.resolve() == keep.resolve():
                continue
            others = set().union(*(r for q, r in refs.items() if q != p)) if len(refs) > 1 else set()
            _remove(p)
            _remove(p.with_suffix(KEYS_SUFFIX))
            report.manifests_removed.append(p.name)
            for sha in refs.pop(p) - others:
                if sha in blobs and layout.blob_path(sha).exists():
                    _remove(layout.blob_path(sha))
                    total -= blobs[sha].st_size
                    report.blobs_removed += 1
            for pack, size in list(packs.items()):
                if pack.name.startswith(digests[p][:24]) and pack.exists():
                    _remove(pack)
                    total -= size
                    report.packs_removed += 1
        report.after_bytes = total
        if report.blobs_removed or report.manifests_removed or report.packs_removed:
            log.info(
                "evicted %d blobs, %d packs, manifests %s",
                report.blobs_removed,
                report.packs_removed,
                report.manifests_removed,
            )
        return report


@dataclass(kw_only=True)
class CacheStats:
    root: Path
    manifests: list[dict] = field(default_factory=list)
    blobs: int = 0
    blob_bytes: int = 0
    pack_bytes: int = 0
    logical_bytes: int = 0
    unique_bytes: int = 0
    unreferenced_blobs: int = 0
    last_fetch: dict | None = None

    @property
    def dedup_savings(self) -> int:
        """Bytes the manifests list minus the bytes of the distinct blobs they reference."""
        return self.logical_bytes - self.unique_bytes


def cache_stats(layout: CacheLayout) -> CacheStats:
    """Manifests, blobs, bytes, dedup savings and the last fetch of the cache at ``layout``."""
    stats = CacheStats(root=layout.root)
    blobs = _blob_files(layout)
    stats.blobs = len(blobs)
    stats.blob_bytes = sum(s.st_size for s in blobs.values())
    stats.pack_bytes = sum(_pack_files(layout).values())
    sizes: dict[bytes, int] = {}
    for p in list_manifests(layout):
        m = load_manifest(p)
        h = m.header
        for i in range(len(m)):
            sizes[m.sha256[i].tobytes()] = int(m.size[i])
        stats.manifests.append(
            {
                "name": p.name,
                "uri": str(h.uri),
                "endpoint": h.endpoint,
                "count": h.count,
                "bytes": h.total_bytes,
                "created": h.created,
                "shard": str(h.shard) if h.shard else None,
            }
        )
        stats.logical_bytes += h.total_bytes
        stats.last_fetch = {"manifest": p.name, "created": h.created, **(h.fetch or {})}
    stats.unique_bytes = sum(sizes.values())
    stats.unreferenced_blobs = sum(1 for sha in blobs if bytes.fromhex(sha) not in sizes)
    return stats
