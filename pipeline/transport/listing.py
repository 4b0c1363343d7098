"""Listing a prefix: ListObjectsV2 pages through :class:`~pipeline.transport.client.S3Client`, retried.

Pages are fetched on the process's loop one after another (each needs the previous one's token);
transient failures of a page are retried with backoff up to ``max_attempts``; anything else ends the
listing with a one-line :class:`StorageError` that names the fix. Zero-byte keys ending in ``/`` are
folder markers and are skipped, as the research loader did.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import time
from collections.abc import Iterator
from dataclasses import dataclass

from pipeline.config import ClientOptions, S3Uri
from pipeline.transport import loop
from pipeline.transport.client import S3Client, client_for
from pipeline.transport.errors import FailureKind, GetFailure, StorageError, where
from pipeline.transport.retry import BUDGET_S, backoff
from pipeline.transport.s3xml import ListPage


@dataclass(frozen=True, kw_only=True)
class ObjectInfo:
    """One listed object."""

    key: str
    etag: str
    size: int
    last_modified: str


def iso_utc(ts: object) -> str:
    """A listing's LastModified as ISO 8601 in UTC (``2026-01-02T03:04:05+00:00``); other text as it is."""
    if isinstance(ts, str):
        try:
            ts = _dt.datetime.fromisoformat(ts)
        except ValueError:
            return ts
    if isinstance(ts, _dt.datetime):
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=_dt.timezone.utc)
        return ts.astimezone(_dt.timezone.utc).isoformat()
    return str(ts)


def list_objects(uri: S3Uri, options: ClientOptions, *, limit: int | None = None,
                 stats: dict[str, int] | None = None) -> Iterator[ObjectInfo]:
    """Yield the objects under ``uri`` in listing order, skipping zero-byte folder markers.

    ``stats``, when given, receives ``pages`` and ``retries`` (of LIST requests).

    Raises:
        StorageError: for access, bucket and endpoint problems, with the fix in the message.
    """
    client = client_for(options)
    token: str | None = None
    n = 0
    while True:
        page = loop.run(_page(client, uri, token, options, stats))
        for obj in page.objects:
            if obj.size == 0 and obj.key.endswith("/"):
                continue
            yield ObjectInfo(key=obj.key, etag=obj.etag, size=obj.size, last_modified=iso_utc(obj.last_modified))
            n += 1
            if limit is not None and n >= limit:
                return
        if not page.truncated:
            return
        if not page.next_token or page.next_token == token:
            raise StorageError(f"listing {uri} at {where(options)}: a truncated page without a new continuation token")
        token = page.next_token


async def _page(client: S3Client, uri: S3Uri, token: str | None, options: ClientOptions,
                stats: dict[str, int] | None) -> ListPage:
    deadline = time.monotonic() + BUDGET_S
    attempt = 0
    while True:
        attempt += 1
        try:
            page = await client.list_page(uri.bucket, uri.prefix, token)
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
        return (f"the S3 endpoint {where(options)} accepted connections but did not answer within "
                f"{options.read_timeout:g} s ({attempts} attempts); check ENDPOINT and the server's health")
    if e.kind is FailureKind.TRANSIENT and not e.fatal_when_exhausted:
        return f"listing {uri} failed after {attempts} attempts: {e.message}"
    return e.message
