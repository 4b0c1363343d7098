"""``clean-cache``: remove a tess cache, and only what tess owns in it.

A folder is removed only if it is a tess cache (:meth:`CacheLayout.is_cache`): the marker, or a legacy
cache holding nothing but tess's folders. Only the marker and tess's six folders go; anything else at
the root (a user's notes, say) stays, and so does the root while it holds them. The exclusive GC lock is
taken without waiting: while a fetch, a training run or verify holds the cache, nothing is removed.
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from cache.layout import CacheLayout
from cache.locks import GC_LOCK, cache_lock


@dataclass(kw_only=True)
class CleanReport:
    root: Path
    files: int = 0
    bytes: int = 0
    root_removed: bool = False
    kept: list[str] = field(default_factory=list)


def _tally(folder: Path, report: CleanReport) -> None:
    for dirpath, _, files in os.walk(folder):
        for name in files:
            try:
                report.bytes += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                continue
            report.files += 1


def clean_cache(layout: CacheLayout) -> CleanReport:
    """Remove the cache at ``layout`` (see the module docstring).

    Raises:
        ValueError: the folder is not a tess cache (nothing is touched).
        BlockingIOError: another tess process holds the cache (nothing is touched).
    """
    if not layout.is_cache():
        raise ValueError(
            f"{str(layout.root)!r} is not a tess cache (no {layout.marker.name} marker); nothing removed. "
            "Check --cache-dir / CACHE_DIR"
        )
    report = CleanReport(root=layout.root)
    try:
        with cache_lock(layout, GC_LOCK, blocking=False):
            for folder in layout.owned:
                if folder == layout.locks:
                    continue  # last: it holds the lock this removal runs under
                if folder.is_dir():
                    _tally(folder, report)
                    shutil.rmtree(folder)
            if layout.marker.is_file():
                report.files += 1
                report.bytes += layout.marker.stat().st_size
                layout.marker.unlink()
            if layout.locks.is_dir():
                _tally(layout.locks, report)
                shutil.rmtree(layout.locks)
    except BlockingIOError:
        raise BlockingIOError(
            errno.EWOULDBLOCK,
            f"cache {str(layout.root)!r} is in use by a fetch, a training run or verify; nothing removed. "
            "Let it finish (or stop it) and run clean-cache again",
        ) from None
    report.kept = layout.foreign_entries()
    if not report.kept:
        os.rmdir(layout.root)
        report.root_removed = True
    return report


__all__ = ["CleanReport", "clean_cache"]
