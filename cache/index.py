"""The key index: (endpoint, bucket, key, etag, size) -> sha256, kept in a diskcache store in the cache.

It is what makes a re-fetch of an unchanged prefix cost LIST requests only: a listed object whose
(key, ETag, size) was seen before and whose blob is still present needs no GET. diskcache (SQLite in
WAL mode) makes it safe to share between processes and survives killed runs.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterable

import diskcache

from cache.layout import CacheLayout

log = logging.getLogger(__name__)


def _index_key(endpoint: str, bucket: str, key: str, etag: str, size: int) -> str:
    return json.dumps([endpoint, bucket, key, etag, int(size)], ensure_ascii=False, separators=(",", ":"))


class KeyIndex:
    """Lookup and bulk insert of key -> content hash."""

    def __init__(self, layout: CacheLayout) -> None:
        layout.index.mkdir(parents=True, exist_ok=True)
        # No eviction: the index is tiny next to the blobs and losing entries costs GETs. cull_limit=0
        # also skips the query for expired keys that diskcache runs on every set (none ever expire).
        self._cache = diskcache.Cache(str(layout.index), eviction_policy="none", size_limit=2**62, cull_limit=0)

    def get(self, *, endpoint: str, bucket: str, key: str, etag: str, size: int) -> str | None:
        return self._cache.get(_index_key(endpoint, bucket, key, etag, size))

    def get_many(self, endpoint: str, bucket: str, items: Iterable[tuple[str, str, int]]) -> list[str | None]:
        """Look up (key, etag, size) triples in one read transaction."""
        get = self._cache.get
        with self._cache.transact():
            return [get(_index_key(endpoint, bucket, k, e, s)) for k, e, s in items]

    def put_many(self, endpoint: str, bucket: str, items: Iterable[tuple[str, str, int, str]]) -> None:
        """Insert (key, etag, size, sha256) quadruples in one write transaction."""
        cset = self._cache.set
        with self._cache.transact():
            for k, e, s, sha in items:
                cset(_index_key(endpoint, bucket, k, e, s), sha)

    def put_many_or_warn(self, endpoint: str, bucket: str, items: list[tuple[str, str, int, str]]) -> None:
        """:meth:`put_many`, where a failure is only logged: the blobs are safe, and a missing index entry
        costs no more than a GET on the next run (a full disk is reported by the blob writes themselves)."""
        try:
            self.put_many(endpoint, bucket, items)
        except (sqlite3.Error, OSError) as e:
            log.warning("key index not updated for %d objects (%s)", len(items), e)

    def __len__(self) -> int:
        return len(self._cache)

    def close(self) -> None:
        self._cache.close()

    def __enter__(self) -> KeyIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
