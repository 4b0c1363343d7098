"""Inter-process locks for the cache (``fcntl.flock`` on files under ``locks/``), and their names.

flock locks die with their process, so a killed fetch never leaves the cache locked.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
from collections.abc import Iterator

from cache.layout import CacheLayout

log = logging.getLogger(__name__)

# Eviction and clean-cache hold it exclusively; fetch, training and verify hold it shared, so no blob
# disappears under a run that references it.
GC_LOCK = "gc"
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def _open_lock_file(layout: CacheLayout, name: str, *, shared: bool) -> int | None:
    """The lock file's descriptor; None for a shared lock on a cache this process cannot write."""
    path = layout.locks / (hashlib.sha256(name.encode("utf-8")).hexdigest()[:24] + ".lock")
    try:
        layout.locks.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if not shared or e.errno not in _READ_ONLY:
            raise
    # A read-only cache (a read-only mount, another user's folder) can still be read: flock works on a
    # read-only descriptor, and where not even the lock file exists, no tess process of ours can be
    # evicting from a folder we cannot write either.
    try:
        return os.open(path, os.O_RDONLY)
    except OSError:
        log.debug("cache %s is read-only and has no lock file %s; reading without a lock", layout.root, path.name)
        return None


@contextlib.contextmanager
def cache_lock(layout: CacheLayout, name: str, *, shared: bool = False, blocking: bool = True) -> Iterator[None]:
    """Hold the lock called ``name`` (exclusive by default) for the ``with`` block.

    Raises:
        BlockingIOError: ``blocking`` is False and another process holds the lock.
    """
    fd = _open_lock_file(layout, name, shared=shared)
    if fd is None:
        yield
        return
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB))
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
