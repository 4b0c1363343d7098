"""Inter-process locks for the cache (``fcntl.flock`` on files under ``locks/``).

flock locks die with their process, so a killed fetch never leaves the cache locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator

from cache.layout import CacheLayout

# Held shared by every fetch, training run and verification, exclusive by eviction (cache/gc.py), so an
# eviction never removes a blob that a running job uses.
GC_LOCK = "gc"


@contextlib.contextmanager
def cache_lock(layout: CacheLayout, name: str, *, shared: bool = False) -> Iterator[None]:
    """Hold the lock called ``name`` (exclusive by default) for the ``with`` block."""
    layout.locks.mkdir(parents=True, exist_ok=True)
    fname = hashlib.sha256(name.encode("utf-8")).hexdigest()[:24] + ".lock"
    fd = os.open(layout.locks / fname, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
