"""Verification of the cache: rehash every blob some manifest references and report problems by key.

Verification only reads: a check never changes what it checks, so two runs in a row report the same.
Removing corrupted blobs is a separate, explicit step (:func:`remove_corrupted`, run by
``verify --repair`` before it fetches them again).
"""

from __future__ import annotations

import contextlib
import enum
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cache.blobs import hash_file
from cache.layout import CacheLayout
from cache.locks import GC_LOCK, cache_lock
from cache.manifest import ManifestArrays, list_manifests, load_manifest

__all__ = ["GC_LOCK", "BlobState", "Problem", "VerifyReport", "remove_corrupted", "verify_cache"]


class BlobState(enum.StrEnum):
    """What verification found of one referenced blob."""

    OK = "ok"
    MISSING = "missing"  # not in the cache: --repair fetches it again (unless the server deleted it)
    CORRUPTED = "corrupted"  # does not hash to its name: removed by --repair, then fetched again


@dataclass(frozen=True, kw_only=True)
class Problem:
    """One referenced blob that is missing or corrupted."""

    manifest: Path
    index: int
    key: str
    sha256: str
    kind: BlobState  # MISSING or CORRUPTED


@dataclass(kw_only=True)
class VerifyReport:
    manifests: int = 0
    records: int = 0
    blobs_checked: int = 0
    bytes_checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def iter_manifests(layout: CacheLayout) -> Iterator[ManifestArrays]:
    for path in list_manifests(layout):
        yield load_manifest(path)


def verify_cache(layout: CacheLayout, *, progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Rehash each distinct referenced blob once and list every affected key; change nothing.

    Holds the cache's shared GC lock so no eviction runs underneath it.
    """
    report = VerifyReport()
    verdict: dict[str, BlobState] = {}  # sha -> what was found
    with cache_lock(layout, GC_LOCK, shared=True):
        for m in iter_manifests(layout):
            report.manifests += 1
            report.records += len(m)
            for i in range(len(m)):
                sha = m.sha_hex(i)
                state = verdict.get(sha)
                if state is None:
                    path = layout.blob_path(sha)
                    if not path.is_file():
                        state = BlobState.MISSING
                    else:
                        report.blobs_checked += 1
                        report.bytes_checked += path.stat().st_size
                        state = BlobState.OK if hash_file(path) == sha else BlobState.CORRUPTED
                    verdict[sha] = state
                    if progress is not None:
                        progress(1)
                if state is not BlobState.OK:
                    report.problems.append(Problem(manifest=m.path, index=i, key=m.keys[i], sha256=sha, kind=state))
    return report


def remove_corrupted(layout: CacheLayout, problems: list[Problem]) -> int:
    """Delete the blobs ``problems`` found corrupted (their bytes can never be right again); return how many.

    Each is rehashed first under the GC lock, so a blob repaired since the report is kept.
    """
    removed = 0
    with cache_lock(layout, GC_LOCK, shared=True):
        for sha in sorted({p.sha256 for p in problems if p.kind is BlobState.CORRUPTED}):
            path = layout.blob_path(sha)
            if path.is_file() and hash_file(path) != sha:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    removed += 1
    return removed
