"""Listing a prefix: ListObjectsV2 pages through :class:`~pipeline.transport.client.S3Client`, retried.

Pages are fetched on the process's loop one after another (each needs the previous one's token), by
:class:`Lister` a page at a time (the fetch stage mirrors a page while the next one is listed) or by
:func:`list_objects` as one iterator;
transient failures of a page are retried with backoff up to ``max_attempts``; anything else ends the
listing with a one-line :class:`StorageError` that names the fix. Zero-byte keys ending in ``/`` are
folder markers and are skipped, as the research loader did.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from pipeline.config import ClientOptions, S3Uri
from pipeline.transport import loop
from pipeline.transport.client import S3Client, client_for
from pipeline.transport.errors import FailureKind, GetFailure, StorageError, where
from pipeline.transport.retry import BUDGET_S, backoff
from pipeline.transport.s3xml import ListPage


@dataclass(frozen=True, kw_only=True, slots=True)  # slots: one per listed key, 100,000s at once
class ObjectInfo:
    """One listed object."""

    key: str
    etag: str
    size: int
    last_modified: str


def iso_utc(ts: object) -> str:
    """A listing's LastModified as ISO 8601 in UTC (``2026-01-02T03:04:05+00:00``); other text as it is."""
    if isinstance(ts, str):
        text = ts
        try:
            ts = _dt.datetime.fromisoformat(text)
        except ValueError:
            return text
    if isinstance(ts, _dt.datetime):
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=_dt.UTC)
        return ts.astimezone(_dt.UTC).isoformat()
    return str(ts)


class Lister:
    """One listing of a prefix, walked a page at a time (each page needs the previous one's token).

    :meth:`next_page` runs on the process's loop, so pages can be listed while objects of earlier pages
    are being fetched; :attr:`done` turns True with the last page. ``stats`` counts ``pages`` and
    ``retries`` (of LIST requests).
    """

    PAGE_KEYS = 1000  # keys per page asked for (S3's maximum)

    def __init__(self, uri: S3Uri, options: ClientOptions, *, limit: int | None = None) -> None:
        self.uri = uri
        self.options = options
        self.limit = limit
        self.stats: dict[str, int] = {}
        self.done = False
        self._client = client_for(options)
        self._token: str | None = None
        self._n = 0

    async def next_page(self) -> list[ObjectInfo]:
        """The next page's objects in listing order, zero-byte folder markers skipped (maybe none).

        Raises:
            StorageError: for access, bucket and endpoint problems, with the fix in the message.
        """
        if self.done:
            return []
        page = await _page(self._client, self.uri, self._token, self.options, self.stats, self.PAGE_KEYS)
        out: list[ObjectInfo] = []
        for obj in page.objects:
            if obj.size == 0 and obj.key.endswith("/"):
                continue
            # Interned: objects uploaded together share their LastModified (one string, not one per key).
            out.append(
                ObjectInfo(
                    key=obj.key, etag=obj.etag, size=obj.size, last_modified=sys.intern(iso_utc(obj.last_modified))
                )
            )
            self._n += 1
            if self.limit is not None and self._n >= self.limit:
                self.done = True
                return out
        if not page.truncated:
            self.done = True
        elif not page.next_token or page.next_token == self._token:
            raise StorageError(
                f"listing {self.uri} at {where(self.options)}: a truncated page without a new continuation token"
            )
        self._token = page.next_token
        return out


def list_objects(
    uri: S3Uri, options: ClientOptions, *, limit: int | None = None, stats: dict[str, int] | None = None
) -> Iterator[ObjectInfo]:
    """Yield the objects under ``uri`` in listing order, skipping zero-byte folder markers.

    ``stats``, when given, receives ``pages`` and ``retries`` (of LIST requests).

    Raises:
        StorageError: for access, bucket and endpoint problems, with the fix in the message.
    """
    lister = Lister(uri, options, limit=limit)
    if stats is not None:
        lister.stats = stats
    while not lister.done:
        yield from loop.run(lister.next_page())


async def _page(
    client: S3Client,
    uri: S3Uri,
    token: str | None,
    options: ClientOptions,
    stats: dict[str, int] | None,
    max_keys: int = 1000,
) -> ListPage:
    deadline = time.monotonic() + BUDGET_S
    attempt = 0
    while True:
        attempt += 1
        try:
            page = await client.list_page(uri.bucket, uri.prefix, token, max_keys=max_keys)
        except GetFailure as e:
            retry = e.kind is FailureKind.TRANSIENT and attempt < options.max_attempts and time.monotonic() < deadline
            if not retry:
                raise StorageError(_listing_message(e, uri, options, attempt)) from None
            if stats is not None:
                stats["retries"] = stats.get("retries", 0) + 1
            await asyncio.sleep(backoff(attempt))
            continue
        if stats is not None:
            stats["pages"] = stats.get("pages", 0) + 1
        return page


def _listing_message(e: GetFailure, uri: S3Uri, options: ClientOptions, attempts: int) -> str:
    if e.no_answer:
        return (
            f"the S3 endpoint {where(options)} accepted connections but did not answer within "
            f"{options.read_timeout:g} s ({attempts} attempts); check ENDPOINT and the server's health"
        )
    if e.kind is FailureKind.TRANSIENT and not e.fatal_when_exhausted:
        return f"listing {uri} failed after {attempts} attempts: {e.message}"
    return e.message
