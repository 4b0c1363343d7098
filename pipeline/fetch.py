"""The fetch stage: list a prefix, skip what the cache already holds, mirror the rest, pin a manifest.

Listing and GETs go through :mod:`pipeline.transport`; mirroring through :mod:`pipeline.mirror` (one
event loop, ``--max-connections`` objects in flight). With ``workers=0`` (the default) that happens in this process and
torch is never imported; with ``workers=N`` a torch ``DataLoader`` over ``DSSDataset(load2memory=False)``
runs N processes, worker ``i`` using client ``i % clients``. Fetched objects are recorded in the key
index as they finish; the manifest is written once every object is accounted for (after one syncfs
when blobs are not fsynced one by one), so a killed fetch leaves the previous manifest untouched and
only complete blobs behind.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cache.atomic import remove_stale_temp_files
from cache.blobs import BlobStore, hash_file, sync_filesystem
from cache.gc import EvictionReport, enforce_cap
from cache.index import KeyIndex
from cache.layout import CacheLayout
from cache.locks import GC_LOCK, cache_lock
from cache.manifest import ManifestRecord, write_manifest
from cache.shard import ShardSpec, shard_mask
from pipeline.config import DEFAULT_LABELS, ClientOptions, LabelRule, S3Uri, label_rule
from pipeline.labels import LabelChoice
from pipeline.listing import Listing
from pipeline.mirror import MirrorRecord, MirrorSettings, MirrorStatus, SyncPolicy
from pipeline.mirror_loop import fewer_collections, mirror_stream
from pipeline.transport.errors import StorageError
from pipeline.transport.listing import list_objects

log = logging.getLogger(__name__)

EXIT_INCOMPLETE = 3


@dataclass(frozen=True, kw_only=True)
class FetchConfig:
    """What to fetch and how.

    Attributes:
        prefix: ``s3://bucket/prefix``.
        options: S3 client options (endpoint, connections, retries, timeouts).
        cache_dir: cache root; None means ``$TESS_CACHE_DIR`` or ``~/.cache/tess``.
        workers: DataLoader worker processes (0 = fetch in the main process).
        clients: clients per process; worker ``i`` uses client ``i % clients``.
        batch: objects per DataLoader batch (each batch is fetched concurrently).
        limit: fetch at most this many objects (the first ones in listing order).
        verify: rehash local blobs instead of trusting the key index.
        max_cache_bytes: after the fetch, evict until blobs + packs fit (see :mod:`cache.gc`); a prefix
            larger than the cap fails before any download.
        endpoint_label: what the manifest records as endpoint (default: the endpoint URL or ``aws``).
        progress: show a tqdm bar (bytes in MB = 10^6 bytes, like the summary line).
        sync: when blobs become durable (README "Guarantees"); the manifest is always written after.
        shard: mirror only this shard of the listing (:mod:`cache.shard`); the manifest records it
            as ``shard: "k/N"`` and gets its own file. None (or ``k/1``) means the whole listing.
        labels: the label rule (:mod:`pipeline.labels`), decided over the whole listing before any
            sharding; the manifest records the rule applied as ``labels``.
    """

    prefix: str
    options: ClientOptions = field(default_factory=ClientOptions)
    cache_dir: str | os.PathLike[str] | None = None
    workers: int = 0
    clients: int = 1
    batch: int = 64
    limit: int | None = None
    verify: bool = False
    endpoint_label: str | None = None
    progress: bool = True
    max_cache_bytes: int | None = None
    shard: ShardSpec | None = None
    sync: SyncPolicy = MirrorSettings.sync
    labels: LabelRule = DEFAULT_LABELS

    def __post_init__(self) -> None:
        S3Uri.parse(self.prefix)
        object.__setattr__(self, "labels", label_rule(self.labels))
        if not 0 <= self.workers <= 256:
            raise ValueError(f"workers={self.workers} must be between 0 and 256 (-w/--workers, WORKERS=)")
        if not 1 <= self.clients <= 256:
            raise ValueError(f"clients={self.clients} must be between 1 and 256 (-c/--clients, CLIENTS=)")
        if not 1 <= self.batch <= 100_000:
            raise ValueError(f"batch={self.batch} must be between 1 and 100000 (--batch)")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit={self.limit} must be >= 1 (--limit)")
        if self.max_cache_bytes is not None and self.max_cache_bytes < 1:
            raise ValueError(f"max_cache_bytes={self.max_cache_bytes} must be >= 1 (--max-cache-bytes, CACHE_MAX_BYTES=)")


@dataclass(kw_only=True)
class FetchSummary:
    """Counts and rates of one fetch (stored in the manifest header as ``fetch``)."""

    listed: int = 0
    fetched: int = 0
    cached: int = 0
    missing: int = 0
    failed: int = 0
    bytes_fetched: int = 0
    bytes_total: int = 0
    retries: int = 0
    list_s: float = 0.0
    mirror_s: float = 0.0
    wall_s: float = 0.0
    errors: list[str] = field(default_factory=list)
    evicted: EvictionReport | None = None

    @property
    def complete(self) -> bool:
        return self.missing == 0 and self.failed == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "listed": self.listed,
            "fetched": self.fetched,
            "cached": self.cached,
            "missing": self.missing,
            "failed": self.failed,
            "bytes_fetched": self.bytes_fetched,
            "bytes_total": self.bytes_total,
            "retries": self.retries,
            "list_s": round(self.list_s, 3),
            "mirror_s": round(self.mirror_s, 3),
            "wall_s": round(self.wall_s, 3),
        }

    def line(self) -> str:
        """One line; rates are over the mirroring time (not listing), MB = 10^6 bytes as in the bar."""
        t = max(self.mirror_s, 1e-6)
        rate = self.fetched / t if self.fetched else 0.0
        rate_text = f"{rate:.0f}" if rate >= 100 else f"{rate:.3g}"
        return (
            f"fetched {self.fetched}, already cached {self.cached}, missing {self.missing}, failed {self.failed} "
            f"objects; {self.bytes_fetched / 1e6:.1f} MB fetched of {self.bytes_total / 1e6:.1f} MB; "
            f"{self.retries} retries; {self.wall_s:.2f} s wall ({self.mirror_s:.2f} s mirroring); "
            f"{rate_text} objects/s; {self.bytes_fetched / 1e6 / t if self.fetched else 0.0:.2f} MB/s"
        )


@dataclass(frozen=True, kw_only=True)
class FetchResult:
    manifest: Path | None
    summary: FetchSummary
    records: list[MirrorRecord] = field(default_factory=list, repr=False)
    label_choice: LabelChoice | None = None  # the label rule applied and why (the CLI prints its line)

    @property
    def exit_code(self) -> int:
        return 0 if self.summary.complete else EXIT_INCOMPLETE


def _keep_list(batch: list[Any]) -> list[Any]:
    return batch


def _bar(total_bytes: int, enabled: bool) -> tqdm:
    # unit_divisor 1000: the bar's MB are the summary line's MB (10^6 bytes).
    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc="fetch",
                disable=not enabled, dynamic_ncols=True, smoothing=0.1)


def _resolve_cached(listing: Listing, *, layout: CacheLayout, endpoint: str, bucket: str, verify: bool) -> list[str | None]:
    """sha256 for each listed object whose content is already in the cache, else None."""
    with KeyIndex(layout) as index:
        shas = index.get_many(endpoint, bucket, ((listing.keys[i], listing.etags[i], int(listing.size[i])) for i in range(len(listing))))
    out: list[str | None] = []
    for i, sha in enumerate(shas):
        if sha is not None:
            path = layout.blob_path(sha)
            try:
                # Marks the blob as used now (the LRU order of cache.gc) and proves it exists with the
                # listed size (a blob cut short by a power loss is fetched again).
                os.utime(path)
                complete = os.stat(path).st_size == int(listing.size[i])
            except FileNotFoundError:
                sha = None
            else:
                sha = sha if complete and (not verify or hash_file(path) == sha) else None
        out.append(sha)
    return out


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
    # List before touching the disk: a bad bucket, an empty prefix or an unreachable endpoint leaves no
    # cache skeleton behind.
    list_stats: dict[str, int] = {}
    listing = Listing.from_objects(list_objects(uri, config.options, limit=config.limit, stats=list_stats), prefix=uri.prefix,
                                   labels=config.labels)
    if len(listing) == 0:
        raise StorageError(f"no objects under {uri}; check PREFIX (keys are case-sensitive and the prefix is literal)")
    layout.create()
    stale = remove_stale_temp_files(layout.tmp) + remove_stale_temp_files(layout.manifests)
    if stale:
        log.info("removed %d temp files left by killed runs", stale)
    # Shared GC lock for the whole run: an eviction (exclusive) never removes a blob this fetch has
    # counted as cached before its manifest is written.
    with cache_lock(layout, GC_LOCK, shared=True):
        result = _fetch_locked(config, layout, uri, listing, list_stats, t0)
    if config.max_cache_bytes is not None and result.manifest is not None:
        result.summary.evicted = enforce_cap(layout, config.max_cache_bytes, keep=result.manifest)
    return result


def _fetch_locked(config: FetchConfig, layout: CacheLayout, uri: S3Uri, listing: Listing, list_stats: dict[str, int],
                  t0: float) -> FetchResult:
    options = config.options
    endpoint = config.endpoint_label or options.endpoint_label
    summary = FetchSummary()
    summary.retries += list_stats.get("retries", 0)
    summary.list_s = time.perf_counter() - t0
    summary.listed = len(listing)
    shard = config.shard if config.shard is not None and not config.shard.whole else None
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

    shas = _resolve_cached(listing, layout=layout, endpoint=endpoint, bucket=uri.bucket, verify=config.verify)
    records: list[MirrorRecord | None] = [None] * len(listing)
    for i, sha in enumerate(shas):
        if sha is not None:
            summary.cached += 1
            records[i] = MirrorRecord(index=i, key=listing.keys[i], status=MirrorStatus.CACHED, size=int(listing.size[i]),
                                      etag=listing.etags[i], last_modified=listing.last_modified[i],
                                      label=int(listing.label[i]), sha256=sha)
    todo = np.array([i for i, sha in enumerate(shas) if sha is None], dtype=np.int64)
    if len(todo):
        t_mirror = time.perf_counter()
        _mirror(config, uri, listing, todo, records, summary, layout=layout, endpoint=endpoint)
        summary.mirror_s = time.perf_counter() - t_mirror
        if config.sync is SyncPolicy.BEFORE_MANIFEST:
            # The manifest never points at a blob a power loss could take away.
            sync_filesystem(layout.objects)

    kept = [r for r in records if r is not None and r.ok]
    summary.bytes_total = sum(r.size for r in kept)
    summary.wall_s = time.perf_counter() - t0
    extra: dict[str, Any] = {"fetch": summary.to_json(), "labels": str(listing.label_choice.rule)}
    if listing.classes:
        extra["classes"] = list(listing.classes)
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
            ManifestRecord(key=r.key, sha256=r.sha256 or "", size=r.size, etag=r.etag,
                           last_modified=r.last_modified, label=r.label)
            for r in kept
        ),
        extra=extra,
    )
    return FetchResult(manifest=path, summary=summary, records=[r for r in records if r is not None],
                       label_choice=listing.label_choice)


def _mirror(config: FetchConfig, uri: S3Uri, listing: Listing, todo: np.ndarray, records: list[MirrorRecord | None],
            summary: FetchSummary, *, layout: CacheLayout, endpoint: str) -> None:
    """Download the objects ``todo``: in this process (workers=0) or through DataLoader workers."""
    sub = listing.subset(todo)
    bar = _bar(int(sub.size.sum()), config.progress)
    done = 0
    denied_only = True  # every object so far was refused (403): see _check_all_denied
    try:
        with fewer_collections():
            for rec in (_records_here if config.workers == 0 else _records_in_workers)(config, uri, sub, layout, endpoint):
                i = int(todo[rec.index])
                rec = dataclasses.replace(rec, index=i)
                summary.retries += rec.retries
                if rec.status is MirrorStatus.FATAL:
                    raise StorageError(rec.error or f"fetching {uri} failed")
                if rec.status is MirrorStatus.FETCHED:
                    summary.fetched += 1
                    summary.bytes_fetched += rec.size
                else:
                    summary.missing += rec.status is MirrorStatus.MISSING
                    summary.failed += rec.status is not MirrorStatus.MISSING
                    summary.errors.append(rec.error or "")
                    log.debug("%s", rec.error)
                denied_only = _check_all_denied(rec, done, denied_only, len(todo))
                records[i] = rec
                done += 1
                bar.update(int(listing.size[i]))
                if done % 64 == 0 or done == len(todo):
                    bar.set_postfix_str(f"{done}/{len(todo)} objects", refresh=False)
    finally:
        bar.close()


# The first objects whose outcome decides whether a denial is of everything (exit 2 at once) or of some.
DENIAL_PROBE = 32


def _check_all_denied(rec: MirrorRecord, done: int, denied_only: bool, total: int) -> bool:
    """Stop at once when the first objects were all refused: not a policy on some keys, but credentials
    without ``s3:GetObject`` on the prefix (every other object would be refused too)."""
    denied_only = denied_only and rec.status is MirrorStatus.DENIED
    if denied_only and done + 1 >= min(DENIAL_PROBE, total):
        raise StorageError(f"{rec.error} (the first {done + 1} objects were all refused)")
    return denied_only


# Fetched objects are written to the key index in groups of this many (and at the end).
_INDEX_EVERY = 256


def _records_here(config: FetchConfig, uri: S3Uri, sub: Listing, layout: CacheLayout, endpoint: str) -> Iterator[MirrorRecord]:
    """Mirror in this process on the event loop; no torch."""
    from pipeline.mirrors import make_mirror, settings_for

    store = BlobStore(layout)
    settings = settings_for(config.options, sync=config.sync)
    mirrors = [make_mirror(config.options, uri.bucket, store, client=c, settings=settings) for c in range(config.clients)]
    refs = [sub.object_ref(j) for j in range(len(sub))]
    pending: list[tuple[str, str, int, str]] = []
    with KeyIndex(layout) as index:
        def keep(done: list[MirrorRecord]) -> None:  # finished after the consumer stopped: still indexed
            pending.extend((r.key, r.etag, r.size, r.sha256 or "") for r in done if r.status is MirrorStatus.FETCHED)

        stream = mirror_stream(mirrors, refs, leftover=keep)
        try:
            for rec in stream:
                if rec.status is MirrorStatus.FETCHED:
                    pending.append((rec.key, rec.etag, rec.size, rec.sha256 or ""))
                    if len(pending) >= _INDEX_EVERY:
                        _put_index(index, endpoint, uri.bucket, pending)
                yield rec
        finally:
            stream.close()
            _put_index(index, endpoint, uri.bucket, pending)


def _put_index(index: KeyIndex, endpoint: str, bucket: str, pending: list[tuple[str, str, int, str]]) -> None:
    if pending:
        index.put_many_or_warn(endpoint, bucket, list(pending))
        pending.clear()


def _records_in_workers(config: FetchConfig, uri: S3Uri, sub: Listing, layout: CacheLayout, endpoint: str) -> Iterator[MirrorRecord]:
    """Mirror through a DataLoader over ``DSSDataset(load2memory=False)`` (imports torch)."""
    from torch.utils.data import DataLoader

    from pipeline.datasets import DSSDataset

    dataset = DSSDataset(str(uri), options=config.options, client_num=config.clients, load2memory=False,
                         cache_dir=layout, listing=sub, endpoint_label=endpoint, sync=config.sync)
    loader = DataLoader(
        dataset,
        batch_size=config.batch,
        shuffle=False,
        num_workers=config.workers,
        collate_fn=_keep_list,
        # Enough batches queued per worker that its event loop never waits on the main process.
        prefetch_factor=4,
    )
    for batch in loader:
        yield from batch
