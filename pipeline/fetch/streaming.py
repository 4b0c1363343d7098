"""The fetch stage in one process: the listing streams into the mirror, records stream into the key index.

Objects of the first listing page are fetched while the second is listed: the listing runs on the
process's loop (:class:`~pipeline.transport.listing.Lister`) and posts each page to a
:class:`~pipeline.fetch.mirror_loop.MirrorRun`; this thread looks each page up in the key index (what is cached
is counted, not fetched), feeds the rest to the mirrors, and takes the records back as they finish: the
key index, the bar and the counts follow them. Labels are decided over the whole listing once it is
complete (:mod:`pipeline.fetch.labels`), and the caller writes the manifest only after every object is
accounted for, in listing order.

Also here, for both ways of fetching (this one and DataLoader workers): the cache lookup of listed
objects, the counting of records (:class:`Outcomes`) and the batched key-index writes (:class:`IndexWriter`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from cache.blobs import BlobStore, hash_file
from cache.index import KeyIndex
from cache.layout import CacheLayout
from cache.shard import shard_mask
from pipeline.config import S3Uri
from pipeline.fetch.fetch_types import FetchConfig, FetchSummary
from pipeline.fetch.listing import Listing
from pipeline.fetch.mirror import MirrorRecord, MirrorSettings, MirrorStatus, ObjectRef
from pipeline.fetch.mirror_loop import MirrorRun, fewer_collections
from pipeline.transport.errors import StorageError
from pipeline.transport.listing import Lister, ObjectInfo
from pipeline.transport.loop import LoopThread

log = logging.getLogger(__name__)

# The first objects whose outcome decides whether a denial is of everything (exit 2 at once) or of some.
DENIAL_PROBE = 32
# Fetched objects are written to the key index in groups of this many (and at the end).
INDEX_EVERY = 256


class _NoBar:
    """The bar's interface doing nothing (``--no-progress``: tqdm is not even imported, 40-60 ms of start-up)."""

    total = 0

    def update(self, n: int) -> None:
        pass

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        pass

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total_bytes: int, enabled: bool) -> Any:
    """A tqdm bar of bytes fetched (or one that does nothing when not ``enabled``)."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    # unit_divisor 1000: the bar's MB are the summary line's MB (10^6 bytes).
    return tqdm(
        total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc="fetch", dynamic_ncols=True, smoothing=0.1
    )


def cached_shas(
    index: KeyIndex,
    layout: CacheLayout,
    endpoint: str,
    bucket: str,
    objects: Sequence[tuple[str, str, int]],
    *,
    verify: bool,
) -> list[str | None]:
    """The blob of each listed ``(key, etag, size)`` whose content is already in the cache, else None."""
    out: list[str | None] = []
    for (_, _, size), sha in zip(objects, index.get_many(endpoint, bucket, objects)):
        if sha is not None:
            path = layout.blob_path(sha)
            try:
                # Marks the blob as used now (the LRU order of cache.gc) and proves it exists with the
                # listed size (a blob cut short by a power loss is fetched again).
                os.utime(path)
                complete = os.stat(path).st_size == size
            except FileNotFoundError:
                sha = None
            else:
                sha = sha if complete and (not verify or hash_file(path) == sha) else None
        out.append(sha)
    return out


class IndexWriter:
    """Fetched objects into the key index, in groups of :data:`INDEX_EVERY` (a transaction each)."""

    def __init__(self, index: KeyIndex, endpoint: str, bucket: str) -> None:
        self._index, self._endpoint, self._bucket = index, endpoint, bucket
        self._pending: list[tuple[str, str, int, str]] = []

    def add(self, records: Iterable[MirrorRecord]) -> None:
        self._pending.extend(
            (r.key, r.etag, r.size, r.sha256 or "") for r in records if r.status is MirrorStatus.FETCHED
        )
        if len(self._pending) >= INDEX_EVERY:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self._index.put_many_or_warn(self._endpoint, self._bucket, list(self._pending))
            self._pending.clear()


@dataclass
class Outcomes:
    """Each record of the mirror as it comes: the counts of the summary, the bar, and the two stops.

    A FATAL record (a full disk, say) ends the fetch; so do the first :data:`DENIAL_PROBE` objects all
    refused (403): that is no policy on some keys but credentials without ``s3:GetObject`` on the prefix.
    """

    summary: FetchSummary
    bar: Any  # tqdm, or _NoBar
    uri: S3Uri
    done: int = 0
    denied_only: bool = True

    def add(self, rec: MirrorRecord, known: int, *, all_known: bool) -> None:
        """Count ``rec``; ``known`` objects to fetch are known so far (all of them when ``all_known``)."""
        s = self.summary
        s.retries += rec.retries
        if rec.status is MirrorStatus.FATAL:
            raise StorageError(rec.error or f"fetching {self.uri} failed")
        if rec.status is MirrorStatus.FETCHED:
            s.fetched += 1
            s.bytes_fetched += rec.size
        else:
            s.missing += rec.status is MirrorStatus.MISSING
            s.failed += rec.status is not MirrorStatus.MISSING
            s.errors.append(rec.error or "")
            log.debug("%s", rec.error)
        self.denied_only = self.denied_only and rec.status is MirrorStatus.DENIED
        probe = DENIAL_PROBE if not all_known else min(DENIAL_PROBE, known)
        if self.denied_only and self.done + 1 >= probe:
            raise StorageError(f"{rec.error} (the first {self.done + 1} objects were all refused)")
        self.done += 1
        self.bar.update(rec.size)
        if self.done % 64 == 0 or self.done == known:
            self.bar.set_postfix_str(f"{self.done}/{known}{'' if all_known else '+'} objects", refresh=False)

    def end(self) -> None:
        """Every object is done: refused all (fewer than the probe, known only now) is the same stop."""
        if self.denied_only and self.done:
            raise StorageError(f"{self.summary.errors[-1]} (all {self.done} objects were refused)")


class _Listed:
    """Posted by the listing task after its last page."""


class _Taken:
    """What the streamed fetch has taken in so far: the listed objects, this fetch's members (its shard) and
    their records (None while in flight), fed to the mirror page by page."""

    def __init__(
        self,
        config: FetchConfig,
        layout: CacheLayout,
        uri: S3Uri,
        index: KeyIndex,
        endpoint: str,
        summary: FetchSummary,
        bar: Any,
        run: MirrorRun,
    ) -> None:
        self.config, self.layout, self.uri, self.index, self.endpoint = config, layout, uri, index, endpoint
        self.summary, self.bar, self.run = summary, bar, run
        self.shard = config.shard_to_fetch
        self.objects: list[ObjectInfo] = []
        self.members: list[int] = []
        self.records: list[MirrorRecord | None] = []
        self.to_fetch = 0
        self.t_mirror: float | None = None

    def take(self, page: list[ObjectInfo]) -> None:
        """A page of the listing: its cached members recorded at once, the others fed to the mirror."""
        objects = self.objects
        base = len(objects)
        objects.extend(page)
        mine: Sequence[int] = range(base, base + len(page))
        if self.shard is not None:
            mask = shard_mask([o.key for o in page], self.shard)
            mine = [i for i, keep in zip(mine, mask) if keep]
        keys = [(objects[i].key, objects[i].etag, objects[i].size) for i in mine]
        found = cached_shas(self.index, self.layout, self.endpoint, self.uri.bucket, keys, verify=self.config.verify)
        new: list[ObjectRef] = []
        for i, sha in zip(mine, found):
            o = objects[i]
            ref = ObjectRef(index=len(self.members), key=o.key, size=o.size, etag=o.etag, last_modified=o.last_modified)
            self.members.append(i)
            if sha is not None:
                self.summary.cached += 1
                self.records.append(MirrorRecord.cached(ref, sha))
            else:
                self.records.append(None)
                new.append(ref)
        if new:
            self.t_mirror = self.t_mirror if self.t_mirror is not None else time.perf_counter()
            self.to_fetch += len(new)
            self.bar.total = (self.bar.total or 0) + sum(r.size for r in new)
            self.bar.refresh()
            self.run.feed(new)

    def result(self) -> tuple[Listing, list[MirrorRecord | None]]:
        """The whole listing, labelled over all of it, and this fetch's records with their labels."""
        listing = Listing.from_objects(self.objects, prefix=self.uri.prefix, labels=self.config.labels)
        labels = listing.label
        out = [replace(r, label=int(labels[self.members[r.index]])) if r is not None else None for r in self.records]
        if self.shard is not None:
            log.info("shard %s: %d of %d listed objects", self.shard, len(self.members), len(self.objects))
        return listing, out


def fetch_streaming(
    config: FetchConfig,
    layout: CacheLayout,
    uri: S3Uri,
    lister: Lister,
    first: list[ObjectInfo],
    summary: FetchSummary,
    mirrors: Sequence,
    *,
    endpoint: str,
    t0: float,
) -> tuple[Listing, list[MirrorRecord | None]]:
    """List the rest of ``uri`` after its ``first`` page while the objects listed so far are mirrored.

    Returns the whole listing (labelled over all of it) and a record for each object of this fetch (its
    shard), in listing order. Fills ``summary`` (counts, ``list_s`` when the last page came, ``mirror_s``
    from the first GET).
    """
    bar = progress_bar(0, config.progress)
    outcomes = Outcomes(summary, bar, uri)
    listed = lister.done
    listing_task = None
    with KeyIndex(layout) as index, fewer_collections():
        written = IndexWriter(index, endpoint, uri.bucket)
        run = MirrorRun(mirrors, leftover=written.add)
        taken = _Taken(config, layout, uri, index, endpoint, summary, bar, run)
        try:
            taken.take(first)
            if listed:
                summary.list_s = time.perf_counter() - t0
                run.end_feed()
            else:
                listing_task = asyncio.run_coroutine_threadsafe(_list_rest(lister, run), LoopThread.get().loop)
            for event in run.events():
                if isinstance(event, MirrorRecord):
                    taken.records[event.index] = event
                    written.add((event,))
                    outcomes.add(event, taken.to_fetch, all_known=listed)
                elif isinstance(event, _Listed):
                    listed = True
                    summary.list_s = time.perf_counter() - t0
                    run.end_feed()
                else:
                    taken.take(event)
            outcomes.end()
        finally:
            if listing_task is not None:
                listing_task.cancel()
            run.close()
            written.flush()
            bar.close()
    if taken.t_mirror is not None:
        summary.mirror_s = time.perf_counter() - taken.t_mirror
    summary.listed = len(taken.objects)
    summary.retries += lister.stats.get("retries", 0)
    return taken.result()


async def _list_rest(lister: Lister, run: MirrorRun) -> None:
    """The listing's remaining pages, each posted to ``run`` as it comes; then :class:`_Listed`."""
    try:
        while not lister.done:
            run.post(await lister.next_page())
        run.post(_Listed())
    except asyncio.CancelledError:
        raise
    except BaseException as e:  # noqa: BLE001 - a StorageError reaches the fetching thread
        run.post(e)


def make_mirrors(config: FetchConfig, uri: S3Uri, layout: CacheLayout) -> list:
    """One mirror per client (``-c``) of this process, sharing one blob store."""
    from pipeline.fetch.mirrors import make_mirror

    store = BlobStore(layout)
    settings = MirrorSettings.from_options(config.options, sync=config.sync)
    return [make_mirror(config.options, uri.bucket, store, client=c, settings=settings) for c in range(config.clients)]
