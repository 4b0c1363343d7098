"""Verification of the cache: rehash every blob some manifest references and report problems by key.

A blob whose bytes no longer hash to its name is removed (it can never be right again), so the next
fetch, or ``verify --repair``, downloads it afresh; a missing blob is reported the same way.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cache.blobs import hash_file
from cache.layout import CacheLayout
from cache.locks import GC_LOCK, cache_lock
from cache.manifest import ManifestArrays, list_manifests, load_manifest


@dataclass(frozen=True, kw_only=True)
class Problem:
    """One referenced blob that is missing or corrupted."""

    manifest: Path
    index: int
    key: str
    sha256: str
    kind: str  # "missing" | "corrupted"


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
    """Rehash each distinct referenced blob once; remove corrupted ones; list every affected key.

    Holds the cache's shared GC lock so no eviction runs underneath it.
    """
    report = VerifyReport()
    verdict: dict[str, str] = {}  # sha -> "ok" | "missing" | "corrupted"
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
                        state = "missing"
                    else:
                        report.blobs_checked += 1
                        report.bytes_checked += path.stat().st_size
                        state = "ok" if hash_file(path) == sha else "corrupted"
                        if state == "corrupted":
                            with contextlib.suppress(FileNotFoundError):
                                os.unlink(path)
                    verdict[sha] = state
                    if progress is not None:
                        progress(1)
                if state != "ok":
                    report.problems.append(Problem(manifest=m.path, index=i, key=m.keys[i], sha256=sha, kind=state))
    return report
