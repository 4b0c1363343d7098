"""Bring one object into the cache: the one place where a GET becomes a checked, content-addressed blob.

``fetch``, ``verify --repair`` and ``DSSDataset(load2memory=False)`` all go through :class:`Mirror`. It
takes a *getter* (the GET engine, :mod:`pipeline.engines`; unit tests pass a fake one) and a
:class:`~cache.blobs.BlobStore`, runs many objects concurrently on an asyncio event loop, and returns
one typed :class:`MirrorRecord` per object. The body checks live in :mod:`cache.checks`.

* Small objects (below ``MirrorSettings.large_threshold``): one GET, hashed as it arrives.
* Large objects: a HEAD (size, ETag, S3 additional checksum), then concurrent ranged GETs written at
  their offsets in the temp file (``If-Match`` the ETag, so every part comes from one version), hashed
  from the page cache as the contiguous prefix grows: memory stays at the chunks in flight.

Retries: transient failures (5xx/429, resets, stalls past ``read_timeout``, bodies cut short or failing
a check) are retried with full-jitter backoff up to ``max_attempts`` per object (per part for large
objects) within a time budget; 403/404 and other permanent answers never are. This module imports
neither boto3 nor torch.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from cache.blobs import BlobStore
from cache.checks import BodyCheckError, Checksum, Expected

log = logging.getLogger(__name__)


class MirrorStatus(enum.Enum):
    """What became of one object."""

    FETCHED = "fetched"  # downloaded and checked; its blob is in the cache
    CACHED = "cached"  # the cache already held it (decided by the caller, e.g. the key index)
    MISSING = "missing"  # gone since the listing (404)
    FAILED = "failed"  # this object failed after its retries; others may still succeed
    FATAL = "fatal"  # a problem every object would hit (credentials, bucket, endpoint, local disk)


class FailureKind(enum.Enum):
    TRANSIENT = "transient"  # a later attempt may succeed
    MISSING = "missing"  # 404 NoSuchKey: never retried
    FATAL = "fatal"  # never retried; stops the whole fetch
    PERMANENT = "permanent"  # never retried; only this object fails


class GetFailure(Exception):
    """A getter's failure, classified.

    Attributes:
        kind: how the mirror treats it.
        message: one line for the user (no credentials).
        exhausted: the status when a TRANSIENT failure outlives its retries (FATAL for an endpoint that
            never answers, FAILED otherwise).
    """

    def __init__(self, kind: FailureKind, message: str, *, exhausted: MirrorStatus = MirrorStatus.FAILED) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.exhausted = exhausted


class Body(Protocol):
    """An open GET response."""

    size: int  # Content-Length of this response
    etag: str
    data: bytes | None  # the whole body when the engine already holds it in memory, else None

    def chunks(self) -> AsyncIterator[bytes | memoryview]: ...


class Getter(Protocol):
    """A GET engine for one bucket (see :mod:`pipeline.engines`)."""

    bucket: str

    async def get(self, key: str, *, byte_range: tuple[int, int] | None = None, if_match: str | None = None) -> Body: ...

    async def head(self, key: str) -> Expected: ...


@dataclass(frozen=True, kw_only=True)
class ObjectRef:
    """One listed object to mirror."""

    index: int
    key: str
    size: int
    etag: str = ""
    last_modified: str = ""
    label: int = -1


@dataclass(frozen=True, kw_only=True)
class MirrorRecord:
    """The outcome for one object; ``sha256`` is set for FETCHED and CACHED."""

    index: int
    key: str
    status: MirrorStatus
    size: int
    etag: str
    last_modified: str = ""
    label: int = -1
    sha256: str | None = None
    new: bool = False
    attempts: int = 0
    error: str | None = None
    client: int = 0
    worker: int = -1

    @property
    def ok(self) -> bool:
        return self.status in (MirrorStatus.FETCHED, MirrorStatus.CACHED)

    @property
    def retries(self) -> int:
        return max(0, self.attempts - 1)


class SyncPolicy(enum.Enum):
    """When blobs become durable (see README "Guarantees")."""

    PER_BLOB = "per-blob"  # fsync every blob before its rename
    BEFORE_MANIFEST = "before-manifest"  # one syncfs of the cache filesystem before the manifest is written


@dataclass(frozen=True, kw_only=True)
class MirrorSettings:
    """The mirror's knobs, each default in one place.

    Attributes:
        concurrency: objects in flight per process (``--max-connections``).
        max_attempts: attempts per object (per part for ranged GETs), first try included.
        read_timeout: seconds without an answer or a byte before an attempt fails.
        budget_s: no retry starts after this many seconds on one object.
        large_threshold: objects of at least this many bytes are fetched with ranged GETs.
        part_size: bytes per ranged GET.
        parts_in_flight: ranged GETs in flight per large object.
        ranges_in_flight: ranged GETs in flight over all large objects of one mirror (bounds memory).
        disk_threads: threads that create, fsync and hash files (kernel time off the event loop).
        sync: durability policy.
    """

    concurrency: int = 128
    max_attempts: int = 4
    read_timeout: float = 10.0
    budget_s: float = 60.0
    backoff_base_s: float = 0.2
    backoff_cap_s: float = 5.0
    large_threshold: int = 16 << 20
    part_size: int = 8 << 20
    parts_in_flight: int = 8
    ranges_in_flight: int = 16
    disk_threads: int = 8
    # Measured (README "Guarantees"): one syncfs before the manifest costs a fraction of an fsync per blob.
    sync: SyncPolicy = SyncPolicy.BEFORE_MANIFEST

    def __post_init__(self) -> None:
        if not 1 <= self.concurrency <= 4096:
            raise ValueError(f"concurrency={self.concurrency} must be between 1 and 4096 (--max-connections)")
        if self.part_size < 1 << 20 or self.large_threshold < self.part_size:
            raise ValueError("part_size must be >= 1 MiB and large_threshold >= part_size")


_TRANSIENT_LOCAL = (BodyCheckError, asyncio.TimeoutError, TimeoutError, ConnectionError)


class _Attempts:
    def __init__(self) -> None:
        self.n = 0


class Mirror:
    """Mirror objects of one bucket into ``store`` through ``getter`` (both owned by the caller)."""

    def __init__(self, store: BlobStore, getter: Getter, settings: MirrorSettings, *, client: int = 0,
                 worker: int = -1, cache_root: str = "") -> None:
        self.store = store
        self.getter = getter
        self.settings = settings
        self.client = client
        self.worker = worker
        self._cache_root = cache_root or str(store.layout.root)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = -1
        self._ranges: asyncio.Semaphore | None = None  # ranged GETs in flight over all large objects

    def uri(self, key: str) -> str:
        return f"s3://{self.getter.bucket}/{key}"

    # -- one object --------------------------------------------------------------------------------

    async def one(self, ref: ObjectRef) -> MirrorRecord:
        """Mirror ``ref``; never raises for storage problems (they come back as the record's status)."""
        tries = _Attempts()
        base = dict(index=ref.index, key=ref.key, size=ref.size, etag=ref.etag, last_modified=ref.last_modified,
                    label=ref.label, client=self.client, worker=self.worker)
        try:
            if ref.size >= self.settings.large_threshold:
                sha, new, etag, size = await self._large(ref, tries)
            else:
                sha, new, etag, size = await self._retrying(lambda: self._small(ref), tries)
        except GetFailure as e:
            status = {FailureKind.MISSING: MirrorStatus.MISSING, FailureKind.FATAL: MirrorStatus.FATAL,
                      FailureKind.PERMANENT: MirrorStatus.FAILED}.get(e.kind, e.exhausted)
            error = f"{self.uri(ref.key)}: deleted since the listing (404)" if status is MirrorStatus.MISSING else e.message
            return MirrorRecord(**base, status=status, attempts=tries.n, error=error)
        except _TRANSIENT_LOCAL as e:
            return MirrorRecord(**base, status=MirrorStatus.FAILED, attempts=tries.n, error=_one_line(self.uri(ref.key), e))
        except OSError as e:
            # Local disk problems (ENOSPC, EACCES) are fatal: every further object would fail too.
            return MirrorRecord(**base, status=MirrorStatus.FATAL, attempts=tries.n,
                                error=f"writing the cache at {self._cache_root} failed: {e.strerror or e}; free space or pass --cache-dir")
        return MirrorRecord(**{**base, "etag": etag, "size": size}, status=MirrorStatus.FETCHED, attempts=tries.n, sha256=sha, new=new)

    async def _retrying(self, attempt: Callable[[], Any], tries: _Attempts) -> Any:
        s = self.settings
        deadline = time.monotonic() + s.budget_s
        while True:
            tries.n += 1
            try:
                return await attempt()
            except GetFailure as e:
                if e.kind is not FailureKind.TRANSIENT or not self._may_retry(tries.n, deadline):
                    raise
                log.debug("retrying %s: %s", self.uri(""), e.message)
            except _TRANSIENT_LOCAL as e:
                if not self._may_retry(tries.n, deadline):
                    raise
                log.debug("retrying after %s: %s", type(e).__name__, e)
            await asyncio.sleep(random.uniform(0, min(s.backoff_cap_s, s.backoff_base_s * 2**tries.n)))

    def _may_retry(self, n: int, deadline: float) -> bool:
        return n < self.settings.max_attempts and time.monotonic() < deadline

    async def _small(self, ref: ObjectRef) -> tuple[str, bool, str, int]:
        t = self.settings.read_timeout
        fsync = self.settings.sync is SyncPolicy.PER_BLOB
        loop = asyncio.get_running_loop()
        label = self.uri(ref.key)
        # One timer per object, pushed back after every piece of the body: ``read_timeout`` bounds
        # the silence, not the length of a download.
        async with asyncio.timeout(t) as timer:
            body = await self.getter.get(ref.key)
            expected = Expected(size=body.size, etag=body.etag)
            data = getattr(body, "data", None)
            if data is not None:
                # The whole body is in memory: checked, written and renamed in one go, in the disk
                # threads (creating a file can cost a millisecond of kernel time; the loop keeps going).
                sha, new = await loop.run_in_executor(self._disk(), self._put_body, data, expected, label, fsync)
                return sha, new, body.etag, body.size
            writer = self.store.writer(expected=expected, label=label, fsync=fsync)
            try:
                async for chunk in body.chunks():
                    writer.write(chunk)
                    timer.reschedule(loop.time() + t)
            except BaseException:
                writer.abort()
                raise
        sha, new = await loop.run_in_executor(self._disk(), writer.commit)
        return sha, new, body.etag, body.size

    def _disk(self) -> ThreadPoolExecutor:
        """This process's disk threads (file creation, fsync, hashing of ranged bodies)."""
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(max_workers=self.settings.disk_threads, thread_name_prefix="tess-disk")
            self._pool_pid = os.getpid()
        return self._pool

    def _put_body(self, data: Any, expected: Expected, label: str, fsync: bool) -> tuple[str, bool]:
        return self.store.put_body(data, expected=expected, label=label, fsync=fsync)

    async def _large(self, ref: ObjectRef, tries: _Attempts) -> tuple[str, bool, str, int]:
        async def whole() -> tuple[str, bool, str, int]:
            async with asyncio.timeout(self.settings.read_timeout):
                head: Expected = await self.getter.head(ref.key)
            return await self._ranged(ref, head, tries)

        return await self._retrying(whole, tries)

    async def _ranged(self, ref: ObjectRef, head: Expected, tries: _Attempts) -> tuple[str, bool, str, int]:
        s = self.settings
        size, etag = int(head.size or 0), head.etag or ""
        loop = asyncio.get_running_loop()
        writer = self.store.writer(expected=head, label=self.uri(ref.key), fsync=s.sync is SyncPolicy.PER_BLOB)
        starts = list(range(0, size, s.part_size))
        done: set[int] = set()
        gate = asyncio.Semaphore(s.parts_in_flight)
        hashing: asyncio.Future[None] | None = None

        def frontier() -> int:
            end = 0
            for st in starts:
                if st not in done:
                    break
                end = min(st + s.part_size, size)
            return end

        async def part(start: int) -> None:
            nonlocal hashing
            end = min(start + s.part_size, size)

            async def fetch_part() -> None:
                pos = start
                async with asyncio.timeout(s.read_timeout) as timer:
                    body = await self.getter.get(ref.key, byte_range=(start, end), if_match=etag or None)
                    async for chunk in body.chunks():
                        if pos + len(chunk) > end:
                            raise BodyCheckError(f"{self.uri(ref.key)}: range {start}-{end} answered with more bytes")
                        writer.write_at(pos, chunk)  # into the page cache: microseconds
                        pos += len(chunk)
                        timer.reschedule(loop.time() + s.read_timeout)
                if pos != end:
                    raise BodyCheckError(f"{self.uri(ref.key)}: range {start}-{end} got {pos - start} bytes")

            if self._ranges is None:
                self._ranges = asyncio.Semaphore(s.ranges_in_flight)
            async with gate, self._ranges:
                part_tries = _Attempts()
                await self._retrying(fetch_part, part_tries)
                tries.n += part_tries.n - 1
            done.add(start)
            if hashing is not None and hashing.done():
                hashing.result()  # a read error of the temp file surfaces here
            if hashing is None or hashing.done():
                hashing = loop.run_in_executor(self._disk(), writer.hash_through, frontier())

        tasks = [asyncio.ensure_future(part(st)) for st in starts]
        try:
            await asyncio.gather(*tasks)
            if hashing is not None:
                await hashing
            sha, new = await loop.run_in_executor(self._disk(), writer.commit)
        except BaseException:
            # No part may write into the temp file once it is removed.
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if hashing is not None:
                await asyncio.gather(hashing, return_exceptions=True)
            writer.abort()
            raise
        return sha, new, etag, size

    # -- many objects ------------------------------------------------------------------------------

    async def many(self, refs: Iterable[ObjectRef], emit: Callable[[MirrorRecord], None],
                   abort: threading.Event | None = None) -> None:
        """Mirror ``refs`` with at most ``settings.concurrency`` in flight; ``emit`` each record as it ends.

        A FATAL record, or ``abort`` set by another thread, stops the launching of further objects;
        those in flight still finish (their requests are never abandoned half way, which would leave
        the native engine's threads answering a finished interpreter).
        """
        gate = asyncio.Semaphore(self.settings.concurrency)
        stop = False
        tasks: set[asyncio.Task[None]] = set()

        async def run(ref: ObjectRef) -> None:
            nonlocal stop
            try:
                rec = await self.one(ref)
                if rec.status is MirrorStatus.FATAL:
                    stop = True
                emit(rec)
            finally:
                gate.release()

        for ref in refs:
            await gate.acquire()
            if stop or (abort is not None and abort.is_set()):
                gate.release()
                break
            t = asyncio.ensure_future(run(ref))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*list(tasks))


def _one_line(uri: str, e: BaseException) -> str:
    if isinstance(e, BodyCheckError):
        return str(e)
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
        return f"{uri}: no answer within the read timeout (all attempts)"
    return f"{uri}: {type(e).__name__}: {e}"


__all__ = [
    "Body", "Checksum", "FailureKind", "GetFailure", "Getter", "Mirror", "MirrorRecord", "MirrorSettings",
    "MirrorStatus", "ObjectRef", "SyncPolicy",
]
