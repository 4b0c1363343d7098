"""Bring one object into the cache: the one place where a GET becomes a checked, content-addressed blob.

``fetch``, ``verify --repair`` and ``DSSDataset`` (both modes) go through :class:`Mirror`. It takes a
*getter* (:class:`pipeline.transport.client.BucketClient`; unit tests pass a fake one) and a
:class:`~cache.blobs.BlobStore`, runs many objects concurrently on an asyncio event loop, and returns
one typed :class:`MirrorRecord` per object. The body checks live in :mod:`cache.checks`.

Every body is checked against what the listing pinned, never against its own answer's headers alone:
the listed size, the listed ETag, the MD5 where that ETag is a plain MD5, the server's full-object
checksum where it offers one; SHA-256 names the blob. An answer with another ETag (or a 412 to a part's
``If-Match``) means the object may have changed: a HEAD decides. If it did, the object is fetched at the
version the HEAD names, which is then what the record pins (at most ``max_versions`` times, then it
fails as CHANGED); if it did not, the answer was wrong and is retried.

Small objects (below ``MirrorSettings.large_threshold``) take one GET, hashed as it arrives; large ones a
HEAD, then concurrent ranged GETs (:mod:`pipeline.fetch.mirror_ranged`).

Retries: transient failures (5xx/429, resets, stalls, malformed answers, bodies cut short or failing a
check) are retried with full-jitter backoff up to ``max_attempts`` per object (per part for large
objects) within a time budget; 403/404, changed objects and other permanent answers never are. The
getter bounds every answer's time and size. This module imports neither boto3 nor torch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn

from cache.blobs import BlobStore
from cache.checks import BodyCheckError, BodyHasher, Checksum, Expected, same_etag
from pipeline.fetch.mirror_ranged import fetch_ranged
from pipeline.fetch.mirror_types import (  # re-exported: the mirror's public names (and two of its mechanics)
    Attempts,
    Body,
    FailureKind,
    GetFailure,
    Getter,
    MirrorRecord,
    MirrorSettings,
    MirrorStatus,
    NewVersion,
    ObjectRef,
    SyncPolicy,
)
from pipeline.transport.retry import backoff

log = logging.getLogger(__name__)


# Failures of ours (a body that fails its checks) or of a getter that is no transport (tests' fakes).
_TRANSIENT_LOCAL = (BodyCheckError, asyncio.TimeoutError, TimeoutError, ConnectionError)


_STATUS_OF_KIND = {
    FailureKind.MISSING: MirrorStatus.MISSING,
    FailureKind.FATAL: MirrorStatus.FATAL,
    FailureKind.DENIED: MirrorStatus.DENIED,
    FailureKind.CHANGED: MirrorStatus.CHANGED,
    FailureKind.PERMANENT: MirrorStatus.FAILED,
}


class Mirror:
    """Mirror objects of one bucket into ``store`` through ``getter`` (both owned by the caller).

    Without a store the mirror only reads (:meth:`read`: the streaming dataset, which leaves no cache).
    """

    def __init__(
        self,
        store: BlobStore | None,
        getter: Getter,
        settings: MirrorSettings,
        *,
        client: int = 0,
        worker: int = -1,
        cache_root: str = "",
    ) -> None:
        self.store = store
        self.getter = getter
        self.settings = settings
        self.client = client
        self.worker = worker
        self._cache_root = cache_root or (str(store.layout.root) if store is not None else "")
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = -1
        self._ranges: asyncio.Semaphore | None = None  # ranged GETs in flight over all large objects

    def uri(self, key: str) -> str:
        return f"s3://{self.getter.bucket}/{key}"

    @property
    def blobs(self) -> BlobStore:
        """The store bodies are committed into (a mirror without one only reads: :meth:`read`)."""
        if self.store is None:
            raise RuntimeError("this Mirror has no BlobStore: it only reads (Mirror.read)")
        return self.store

    # -- one object --------------------------------------------------------------------------------

    async def one(self, ref: ObjectRef) -> MirrorRecord:
        """Mirror ``ref``; never raises for storage problems (they come back as the record's status).

        An object that is no longer the listed version (a HEAD says so) is fetched at its new version,
        which the record then pins (ETag, size, LastModified), at most ``max_versions`` times.
        """
        if self.store is None:
            raise RuntimeError("this Mirror has no BlobStore: it only reads (Mirror.read)")
        tries = Attempts()
        who = {"client": self.client, "worker": self.worker}

        async def fetch(version: ObjectRef) -> tuple[str, bool]:
            if version.size >= self.settings.large_threshold:
                return await self._large(version, tries)
            return await self._retrying(lambda: self._small(version, tries), tries)

        try:
            version, (sha, new) = await self._each_version(ref, tries, fetch)
        except GetFailure as e:
            status = _STATUS_OF_KIND.get(e.kind) or (
                MirrorStatus.FATAL if e.fatal_when_exhausted else MirrorStatus.FAILED
            )
            return MirrorRecord.of(ref, status, attempts=tries.sent, error=e.message, **who)
        except _TRANSIENT_LOCAL as e:
            error = _one_line(self.uri(ref.key), e)
            return MirrorRecord.of(ref, MirrorStatus.FAILED, attempts=tries.sent, error=error, **who)
        except OSError as e:
            # Local disk problems (ENOSPC, EACCES) are fatal: every further object would fail too.
            return MirrorRecord.of(
                ref,
                MirrorStatus.FATAL,
                attempts=tries.sent,
                error=f"writing the cache at {self._cache_root} failed: {e.strerror or e}; "
                "free space or pass --cache-dir",
                **who,
            )
        # The version whose bytes were stored: the listed one, or the newer one a HEAD named.
        return MirrorRecord.of(version, MirrorStatus.FETCHED, attempts=tries.sent, sha256=sha, new=new, **who)

    async def _each_version(
        self, ref: ObjectRef, tries: Attempts, fetch: Callable[[ObjectRef], Any]
    ) -> tuple[ObjectRef, Any]:
        """``fetch(version)`` of the listed version, then of each new one a HEAD names, each with its own
        attempt budget; :class:`GetFailure` CHANGED once the object changed ``max_versions`` times."""
        version = ref
        for _ in range(self.settings.max_versions):
            try:
                return version, await fetch(version)
            except NewVersion as v:
                log.info("%s changed on the server (%s); fetching its new version", self.uri(ref.key), v)
                version = dataclasses.replace(
                    version,
                    size=int(v.head.size or 0),
                    etag=v.head.etag or "",
                    last_modified=v.head.last_modified or version.last_modified,
                )
                tries.new_version()
        raise GetFailure(
            FailureKind.CHANGED,
            f"{self.uri(ref.key)}: changing faster than it can be fetched "
            f"({self.settings.max_versions} new versions during its fetch); fetch it again later",
        )

    async def read(self, ref: ObjectRef) -> bytes:
        """The bytes of ``ref``, checked against it as a mirrored body is, retried; nothing is stored.

        Raises:
            GetFailure: the object failed (its message names the key and the cause).
        """
        tries = Attempts()

        async def attempt(version: ObjectRef) -> bytes:
            body = await self._get(version, tries)
            data = bytes(body.data) if body.data is not None else b"".join([bytes(c) async for c in body.chunks()])
            hasher = BodyHasher(self._expected(version, body), label=self.uri(version.key))
            hasher.update(data)
            hasher.verify()
            return data

        try:
            return (await self._each_version(ref, tries, lambda v: self._retrying(lambda: attempt(v), tries)))[1]
        except _TRANSIENT_LOCAL as e:
            raise GetFailure(FailureKind.PERMANENT, _one_line(self.uri(ref.key), e)) from None

    async def _retrying(self, attempt: Callable[[], Any], tries: Attempts) -> Any:
        s = self.settings
        deadline = time.monotonic() + s.budget_s
        while True:
            tries.n += 1
            try:
                return await attempt()
            except GetFailure as e:
                tries.reconnects += e.reconnects
                if e.kind is not FailureKind.TRANSIENT or not self._may_retry(tries.n, deadline):
                    raise
                log.debug("retrying: %s", e.message)
            except _TRANSIENT_LOCAL as e:
                if not self._may_retry(tries.n, deadline):
                    raise
                log.debug("retrying after %s: %s", type(e).__name__, e)
            await asyncio.sleep(backoff(tries.n, base_s=s.backoff_base_s, cap_s=s.backoff_cap_s))

    def _may_retry(self, n: int, deadline: float) -> bool:
        return n < self.settings.max_attempts and time.monotonic() < deadline

    async def _get(
        self, ref: ObjectRef, tries: Attempts, byte_range: tuple[int, int] | None = None, if_match: str | None = None
    ) -> Body:
        """A GET of ``ref`` (or of ``byte_range``) whose ETag, if the answer has one, is the listed one."""
        body = await self.getter.get(ref.key, byte_range=byte_range, if_match=if_match, size=ref.size)
        tries.reconnects += getattr(body, "reconnects", 0)
        if body.etag and ref.etag and not same_etag(body.etag, ref.etag):
            body.close()
            await self._changed(ref, body.etag)
        return body

    async def _changed(self, ref: ObjectRef, answered: str) -> NoReturn:
        """An answer named another version than ``ref``'s: a HEAD says whether the object really changed
        (:class:`NewVersion`) or the answer was wrong (a transient failure)."""
        now: Expected = await self.getter.head(ref.key)
        if self._is_version(ref, now):
            raise BodyCheckError(
                f"{self.uri(ref.key)}: an answer named {answered}, but the object's ETag is {ref.etag}"
            )
        raise NewVersion(now)

    @staticmethod
    def _is_version(ref: ObjectRef, head: Expected) -> bool:
        return same_etag(head.etag or "", ref.etag) and head.size == ref.size

    @staticmethod
    def _expected(ref: ObjectRef, body: Body) -> Expected:
        """What the body must match: the listing's size and ETag (the answer's ETag when none was listed)."""
        return Expected(size=ref.size, etag=ref.etag or body.etag)

    async def _small(self, ref: ObjectRef, tries: Attempts) -> tuple[str, bool]:
        fsync = self.settings.sync is SyncPolicy.PER_BLOB
        loop = asyncio.get_running_loop()
        label = self.uri(ref.key)
        body = await self._get(ref, tries)
        expected = self._expected(ref, body)
        if body.data is not None:
            # The whole body is in memory: checked, written and renamed in one go, on the loop
            # itself. A file costs ~25 us of kernel time on a local disk, less than a round trip
            # through a disk thread: two wake-ups and GIL hand-offs (measured on 5,000 objects:
            # 1.5-2 CPU-s less). An fsync per blob (ms) still goes to the disk threads. On a network
            # filesystem, where a create is a round trip, this caps the rate at one create at a time:
            # pass --sync per-blob there.
            if not fsync:
                return self._put_body(body.data, expected, label, fsync)
            return await loop.run_in_executor(self._disk(), self._put_body, body.data, expected, label, fsync)
        writer = self.blobs.writer(expected=expected, label=label, fsync=fsync)
        try:
            async for chunk in body.chunks():
                writer.write(chunk)
        except BaseException:
            body.close()
            writer.abort()
            raise
        return await loop.run_in_executor(self._disk(), writer.commit)

    def _disk(self) -> ThreadPoolExecutor:
        """This process's disk threads (file creation, fsync, hashing of ranged bodies)."""
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(max_workers=self.settings.disk_threads, thread_name_prefix="tess-disk")
            self._pool_pid = os.getpid()
        return self._pool

    def _put_body(self, data: Any, expected: Expected, label: str, fsync: bool) -> tuple[str, bool]:
        return self.blobs.put_body(data, expected=expected, label=label, fsync=fsync)

    async def _large(self, ref: ObjectRef, tries: Attempts) -> tuple[str, bool]:
        async def whole() -> tuple[str, bool]:
            head: Expected = await self.getter.head(ref.key)
            if not self._is_version(ref, head):
                raise NewVersion(head)
            try:
                return await fetch_ranged(self, ref, head, tries)
            except GetFailure as e:
                if e.kind is not FailureKind.CHANGED:
                    raise
                # A part answered 412 to If-Match: the object was replaced while its parts came in.
                await self._changed(ref, "a newer version (412 to If-Match)")

        return await self._retrying(whole, tries)

    # -- many objects ------------------------------------------------------------------------------

    async def many(
        self,
        refs: Iterable[ObjectRef] | AsyncIterable[ObjectRef],
        emit: Callable[[MirrorRecord], None],
        abort: threading.Event | None = None,
    ) -> None:
        """Mirror ``refs`` with at most ``settings.concurrency`` in flight; ``emit`` each record as it ends.

        ``refs`` may be asynchronous (objects still being listed): each is launched as it comes.

        A FATAL record, or ``abort`` set by another thread, stops the launching of further objects;
        those in flight still finish. Cancelled, it cancels what is in flight (their temp files are
        removed; what was renamed was emitted).
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

        try:
            async for ref in _each(refs):
                await gate.acquire()
                if stop or (abort is not None and abort.is_set()):
                    gate.release()
                    break
                t = asyncio.ensure_future(run(ref))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*list(tasks))
        except BaseException:
            pending = list(tasks)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            raise


async def _each(refs: Iterable[ObjectRef] | AsyncIterable[ObjectRef]) -> AsyncIterator[ObjectRef]:
    if isinstance(refs, AsyncIterable):
        async for ref in refs:
            yield ref
    else:
        for ref in refs:
            yield ref


def _one_line(uri: str, e: BaseException) -> str:
    if isinstance(e, BodyCheckError):
        return str(e)
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
        return f"{uri}: no answer within the read timeout (all attempts)"
    return f"{uri}: {type(e).__name__}: {e}"


__all__ = [
    "Body",
    "Checksum",
    "FailureKind",
    "GetFailure",
    "Getter",
    "Mirror",
    "MirrorRecord",
    "MirrorSettings",
    "MirrorStatus",
    "ObjectRef",
    "SyncPolicy",
]
