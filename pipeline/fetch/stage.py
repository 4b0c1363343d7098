"""The fetch stage: list a prefix, skip what the cache already holds, mirror the rest, pin a manifest.

Listing and GETs go through :mod:`pipeline.transport`; mirroring through :mod:`pipeline.fetch.mirror` (one
event loop, ``--max-in-flight`` objects in flight). With ``workers=0`` (the default) that happens in
this process (:mod:`pipeline.fetch.streaming`: objects of a listing page are fetched while the next page is
listed) and torch is never imported; with ``workers=N`` (or a ``--max-cache-bytes`` cap, which must see
the whole listing's size before any GET) the listing is read whole first, then a torch ``DataLoader``
over ``DSSDataset(load2memory=False)`` runs N processes, worker ``i`` using client ``i % clients``.
Fetched objects are recorded in the key index as they finish; the manifest is written once every object
is accounted for (after one syncfs when blobs are not fsynced one by one), so a killed fetch leaves the
previous manifest untouched and only complete blobs behind.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from cache.atomic import remove_stale_temp_files
from cache.blobs import sync_filesystem
from cache.gc import enforce_cap
from cache.index import KeyIndex
from cache.layout import CacheLayout
from cache.locks import GC_LOCK, cache_lock
from cache.manifest import ManifestRecord, write_manifest
from cache.shard import shard_mask
from pipeline.config import S3Uri
from pipeline.fetch.fetch_types import EXIT_INCOMPLETE, FetchConfig, FetchResult, FetchSummary
from pipeline.fetch.listing import Listing
from pipeline.fetch.mirror import MirrorRecord, SyncPolicy
from pipeline.fetch.mirror_loop import fewer_collections, mirror_stream
from pipeline.fetch.streaming import (
    DENIAL_PROBE,
    IndexWriter,
    Outcomes,
    cached_shas,
    fetch_streaming,
    make_mirrors,
    progress_bar,
)
from pipeline.transport import loop
from pipeline.transport.errors import StorageError
from pipeline.transport.listing import Lister, ObjectInfo

log = logging.getLogger(__name__)

__all__ = ["DENIAL_PROBE", "EXIT_INCOMPLETE", "FetchConfig", "FetchResult", "FetchSummary", "SyncPolicy", "fetch"]


def fetch(config: FetchConfig) -> FetchResult:
    """Mirror ``config.prefix`` into the cache and write its manifest.

    Returns:
        The manifest path (None when nothing could be written) and the summary; ``exit_code`` is 3
        when some objects were missing or failed (the manifest then lists only the others).

    Raises:
        StorageError: for problems no retry fixes (credentials, bucket, endpoint, empty prefix, disk).
    """
    t0 = time.perf_counter()
    uri = S3Uri.parse(config.prefix)
    layout = CacheLayout.at(config.cache_dir)
    # The first page before touching the disk: a bad bucket, an empty prefix or an unreachable endpoint
    # leaves no cache skeleton behind.
    lister = Lister(uri, config.options, limit=config.limit)
    first: list[ObjectInfo] = []
    while not first and not lister.done:
        first = loop.run(lister.next_page())
    if not first:
        raise StorageError(f"no objects under {uri}; check PREFIX (keys are case-sensitive and the prefix is literal)")
    layout.create()
    stale = remove_stale_temp_files(layout.tmp) + remove_stale_temp_files(layout.manifests)
    if stale:
        log.info("removed %d temp files left by killed runs", stale)
    # Shared GC lock for the whole run: an eviction (exclusive) never removes a blob this fetch has
    # counted as cached before its manifest is written.
    with cache_lock(layout, GC_LOCK, shared=True):
        result = _fetch_locked(config, layout, uri, lister, first, t0)
    if config.max_cache_bytes is not None and result.manifest is not None:
        result.summary.evicted = enforce_cap(layout, config.max_cache_bytes, keep=result.manifest)
    return result


def _fetch_locked(
    config: FetchConfig, layout: CacheLayout, uri: S3Uri, lister: Lister, first: list[ObjectInfo], t0: float
) -> FetchResult:
    endpoint = config.endpoint_label or config.options.endpoint_label
    summary = FetchSummary()
    if config.workers == 0 and config.max_cache_bytes is None:
        mirrors = make_mirrors(config, uri, layout)
        listing, records = fetch_streaming(
            config, layout, uri, lister, first, summary, mirrors, endpoint=endpoint, t0=t0
        )
    else:
        listing, records = _fetch_listed_first(config, layout, uri, lister, first, summary, endpoint=endpoint, t0=t0)
    if summary.fetched and config.sync is SyncPolicy.BEFORE_MANIFEST:
        # The manifest never points at a blob a power loss could take away.
        sync_filesystem(layout.objects)

    kept = [r for r in records if r is not None and r.ok]
    summary.bytes_total = sum(r.size for r in kept)
    summary.wall_s = time.perf_counter() - t0
    shard = config.shard_to_fetch
    extra: dict[str, Any] = {"fetch": summary.to_json(), **listing.header_fields()}
    if not summary.complete:
        extra["incomplete"] = summary.missing + summary.failed
    if shard is not None:
        extra["shard"] = str(shard)
    path = write_manifest(
        layout,
        endpoint=endpoint,
        bucket=uri.bucket,
        prefix=uri.prefix,
        records=(
            ManifestRecord(
                key=r.key, sha256=r.sha256 or "", size=r.size, etag=r.etag, last_modified=r.last_modified, label=r.label
            )
            for r in kept
        ),
        extra=extra,
    )
    return FetchResult(
        manifest=path, summary=summary, records=[r for r in records if r is not None], label_choice=listing.label_choice
    )


def _fetch_listed_first(
    config: FetchConfig,
    layout: CacheLayout,
    uri: S3Uri,
    lister: Lister,
    first: list[ObjectInfo],
    summary: FetchSummary,
    *,
    endpoint: str,
    t0: float,
) -> tuple[Listing, list[MirrorRecord | None]]:
    """The whole listing first, then the objects not cached (through DataLoader workers, or under a cap)."""
    objects = list(first)
    while not lister.done:
        objects.extend(loop.run(lister.next_page()))
    listing = Listing.from_objects(objects, prefix=uri.prefix, labels=config.labels)
    summary.retries += lister.stats.get("retries", 0)
    summary.list_s = time.perf_counter() - t0
    summary.listed = len(listing)
    shard = config.shard_to_fetch
    if shard is not None:
        # After labelling (the rule is decided, and folder classes numbered, over the whole listing, so every
        # shard agrees) and before the cache lookup (a node never touches, or counts as cached, another node's keys).
        listing = listing.subset(np.flatnonzero(shard_mask(listing.keys, shard)))
        log.info("shard %s: %d of %d listed objects", shard, len(listing), summary.listed)
    listed_bytes = int(listing.size.sum())
    if config.max_cache_bytes is not None and listed_bytes > config.max_cache_bytes:
        raise StorageError(
            f"{uri} holds {listed_bytes} bytes, more than --max-cache-bytes {config.max_cache_bytes}; "
            "raise the cap (CACHE_MAX_BYTES=) or fetch less (--limit N)"
        )
    with KeyIndex(layout) as index:
        shas = cached_shas(
            index, layout, endpoint, uri.bucket, listing.index_items(range(len(listing))), verify=config.verify
        )
    records: list[MirrorRecord | None] = [None] * len(listing)
    for i, sha in enumerate(shas):
        if sha is not None:
            summary.cached += 1
            records[i] = MirrorRecord.cached(listing.object_ref(i), sha)
    todo = np.array([i for i, sha in enumerate(shas) if sha is None], dtype=np.int64)
    if len(todo):
        t_mirror = time.perf_counter()
        _mirror(config, uri, listing, todo, records, summary, layout=layout, endpoint=endpoint)
        summary.mirror_s = time.perf_counter() - t_mirror
    return listing, records


def _mirror(
    config: FetchConfig,
    uri: S3Uri,
    listing: Listing,
    todo: np.ndarray,
    records: list[MirrorRecord | None],
    summary: FetchSummary,
    *,
    layout: CacheLayout,
    endpoint: str,
) -> None:
    """Download the objects ``todo``: in this process (workers=0) or through DataLoader workers."""
    sub = listing.subset(todo)
    bar = progress_bar(int(sub.size.sum()), config.progress)
    outcomes = Outcomes(summary, bar, uri)
    try:
        with fewer_collections():
            for rec in (_records_here if config.workers == 0 else _records_in_workers)(
                config, uri, sub, layout, endpoint
            ):
                i = int(todo[rec.index])
                rec = dataclasses.replace(rec, index=i)
                records[i] = rec
                outcomes.add(rec, len(todo), all_known=True)
    finally:
        bar.close()


def _records_here(
    config: FetchConfig, uri: S3Uri, sub: Listing, layout: CacheLayout, endpoint: str
) -> Iterator[MirrorRecord]:
    """Mirror in this process on the event loop; no torch."""
    refs = [sub.object_ref(j) for j in range(len(sub))]
    with KeyIndex(layout) as index:
        written = IndexWriter(index, endpoint, uri.bucket)
        stream = mirror_stream(make_mirrors(config, uri, layout), refs, leftover=written.add)
        try:
            for rec in stream:
                written.add((rec,))
                yield rec
        finally:
            stream.close()
            written.flush()


def _records_in_workers(
    config: FetchConfig, uri: S3Uri, sub: Listing, layout: CacheLayout, endpoint: str
) -> Iterator[MirrorRecord]:
    """Mirror through a DataLoader over :class:`~pipeline.fetch.worker_dataset.MirrorDataset` (imports torch)."""
    from pipeline.fetch.worker_dataset import records_in_workers

    return records_in_workers(config, uri, sub, layout, endpoint)
