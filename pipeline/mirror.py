"""Bring one object into the cache: the one place where a GET becomes a checked, content-addressed blob.

``fetch``, ``verify --repair`` and ``DSSDataset(load2memory=False)`` all go through :class:`Mirror`. It
takes a *getter* (the GET engine, :mod:`pipeline.engines`; unit tests pass a fake one) and a
:class:`~cache.blobs.BlobStore`, runs many objects concurrently on an asyncio event loop, and returns
one typed :class:`MirrorRecord` per object. The body checks live in :mod:`cache.checks`.

* Small objects (below ``MirrorSettings.large_threshold``): one GET, hashed as it arrives.
* Large objects: a HEAD (size, ETag, S3 additional checksum), then concurrent ranged GETs into memory
  (``If-Match`` the ETag, so every part comes from one version), written to the temp file and hashed
  in order by a disk thread: memory stays at a window of parts per object, and nothing is read back.

Retries: transient failures (5xx/429, resets, stalls past ``read_timeout``, bodies cut short or failing
a check) are retried with full-jitter backoff up to ``max_attempts`` per object (per part for large
objects) within a time budget; 403/404 and other permanent answers never are. This module imports
neither boto3 nor torch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cache.blobs import BlobStore
from cache.checks import BodyCheckError, Checksum, Expected
from pipeline.mirror_types import (  # re-exported: the mirror's public names
    Body, FailureKind, GetFailure, Getter, MirrorRecord, MirrorSettings, MirrorStatus, ObjectRef, SyncPolicy,
)

log = logging.getLogger(__name__)


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
                # The whole body is in memory: checked, written and renamed in one go, on the loop
                # itself. A file costs ~25 us of kernel time on a local disk, less than a round trip
                # through a disk thread: two wake-ups and GIL hand-offs, which contend with obstore's
                # threads (measured on 5,000 objects: 1.5-2 CPU-s less). An fsync per blob (ms) still
                # goes to the disk threads. On a network filesystem, where a create is a round trip,
                # this caps the rate at one create at a time: pass --sync per-blob there.
                if not fsync:
                    sha, new = self._put_body(data, expected, label, fsync)
                else:
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
        """Concurrent ranged GETs into memory, written and hashed in order by a disk thread.

        A part holds one of the mirror's ``ranges_in_flight`` slots from its launch until it is written,
        so memory stays below ``ranges_in_flight * part_size`` over all objects, and every byte is hashed
        from memory (nothing is read back). At most ``parts_in_flight`` parts of one object are ahead.
        """
        s = self.settings
        size, etag = int(head.size or 0), head.etag or ""
        loop = asyncio.get_running_loop()
        # Large blobs are fsynced at commit under either policy: in a disk thread, so the device writes
        # one while others still download, instead of all of them in the syncfs before the manifest
        # (measured on 4 x 512 MB: 8.3 s against 9.4 s).
        writer = self.store.writer(expected=head, label=self.uri(ref.key), fsync=True)
        starts = list(range(0, size, s.part_size))
        if self._ranges is None:
            self._ranges = asyncio.Semaphore(s.ranges_in_flight)
        slots = self._ranges
        parts: dict[int, asyncio.Future[list[Any]]] = {}  # launched, not yet written: each holds a slot

        async def fill(written: int) -> None:
            launched = written + len(parts)
            while launched < len(starts) and len(parts) < s.parts_in_flight:
                if parts and slots.locked():
                    return  # an object holding slots never waits for more (two such could wait on each other)
                await slots.acquire()
                end = min(starts[launched] + s.part_size, size)
                parts[launched] = asyncio.ensure_future(self._part(ref, etag, starts[launched], end, tries))
                launched += 1

        try:
            for i in range(len(starts)):
                await fill(i)
                chunks = await parts[i]
                await loop.run_in_executor(self._disk(), writer.append, chunks)
                del parts[i], chunks
                slots.release()
            sha, new = await loop.run_in_executor(self._disk(), writer.commit)
        except BaseException:
            for t in parts.values():
                t.cancel()
            await asyncio.gather(*parts.values(), return_exceptions=True)
            for _ in parts:
                slots.release()
            writer.abort()
            raise
        return sha, new, etag, size

    async def _part(self, ref: ObjectRef, etag: str, start: int, end: int, tries: _Attempts) -> list[Any]:
        """The bytes ``start:end`` of ``ref`` (``If-Match`` its ETag, so every part is of one version)."""
        s = self.settings
        loop = asyncio.get_running_loop()

        async def fetch_part() -> list[Any]:
            chunks: list[Any] = []
            pos = start
            async with asyncio.timeout(s.read_timeout) as timer:
                body = await self.getter.get(ref.key, byte_range=(start, end), if_match=etag or None)
                async for chunk in body.chunks():
                    pos += len(chunk)
                    if pos > end:
                        raise BodyCheckError(f"{self.uri(ref.key)}: range {start}-{end} answered with more bytes")
                    chunks.append(chunk)
                    timer.reschedule(loop.time() + s.read_timeout)
            if pos != end:
                raise BodyCheckError(f"{self.uri(ref.key)}: range {start}-{end} got {pos - start} bytes")
            return chunks

        part_tries = _Attempts()
        try:
            return await self._retrying(fetch_part, part_tries)
        finally:
            tries.n += max(0, part_tries.n - 1)

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
