"""The mirror's vocabulary: what a getter is and raises, what goes in (:class:`ObjectRef`), what comes out
(:class:`MirrorRecord` with its :class:`MirrorStatus`), and the knobs (:class:`MirrorSettings`).

:mod:`pipeline.fetch.mirror` holds the algorithm and re-exports these names. No boto3, no torch.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from cache.checks import Expected
from pipeline.config import DEFAULT_SYNC, ClientOptions, SyncPolicy  # SyncPolicy re-exported
from pipeline.transport import retry
from pipeline.transport.errors import FailureKind as FailureKind  # re-exported: what a getter raises
from pipeline.transport.errors import GetFailure as GetFailure


class MirrorStatus(enum.Enum):
    """What became of one object."""

    FETCHED = "fetched"  # downloaded and checked; its blob is in the cache
    CACHED = "cached"  # the cache already held it (decided by the caller, e.g. the key index)
    MISSING = "missing"  # gone since the listing (404)
    DENIED = "denied"  # 403 for this object only (e.g. a bucket policy); others may still succeed
    CHANGED = "changed"  # it kept changing while it was fetched (max_versions new versions); others may succeed
    FAILED = "failed"  # this object failed after its retries; others may still succeed
    FATAL = "fatal"  # a problem every object would hit (credentials, bucket, endpoint, local disk)


class Body(Protocol):
    """An open GET answer (its fields read-only, so a body whose ``data`` is always bytes, or always None, is one)."""

    @property
    def size(self) -> int:
        """Content-Length of this answer (the limit asked for when it announced none)."""
        ...

    @property
    def etag(self) -> str:
        """The answer's ETag header ("" when it sent none)."""
        ...

    @property
    def data(self) -> bytes | None:
        """The whole body when the getter already read it, else None."""
        ...

    @property
    def reconnects(self) -> int:
        """1 when the request was sent again after a stale kept-alive connection."""
        ...

    def chunks(self) -> AsyncIterator[bytes | memoryview]: ...

    def close(self) -> None: ...


class Getter(Protocol):
    """A GET engine for one bucket (:class:`pipeline.transport.client.BucketClient`; tests pass fakes).

    ``size`` is the most bytes the body may have (the listed size, or the range's length): a getter
    never reads past it. Its failures are :class:`GetFailure`.
    """

    bucket: str

    async def get(
        self,
        key: str,
        *,
        byte_range: tuple[int, int] | None = None,
        if_match: str | None = None,
        size: int | None = None,
    ) -> Body: ...

    async def head(self, key: str) -> Expected: ...


@dataclass(frozen=True, kw_only=True, slots=True)  # slots: one per listed key, 100,000s at once
class ObjectRef:
    """One listed object to mirror."""

    index: int
    key: str
    size: int
    etag: str = ""
    last_modified: str = ""
    label: int = -1


@dataclass(frozen=True, kw_only=True, slots=True)  # slots: one per listed key, 100,000s at once
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

    @classmethod
    def of(cls, ref: ObjectRef, status: MirrorStatus, **outcome: Any) -> MirrorRecord:
        """The record of ``ref`` (its index, key, size, ETag, LastModified and label) with ``status`` and what
        else the outcome says (``sha256``, ``attempts``, ``error``, ``client``, ...)."""
        return cls(
            index=ref.index,
            key=ref.key,
            status=status,
            size=ref.size,
            etag=ref.etag,
            last_modified=ref.last_modified,
            label=ref.label,
            **outcome,
        )

    @classmethod
    def cached(cls, ref: ObjectRef, sha256: str) -> MirrorRecord:
        """The record of ``ref`` found in the cache as blob ``sha256`` (no request made)."""
        return cls.of(ref, MirrorStatus.CACHED, sha256=sha256)

    @property
    def ok(self) -> bool:
        return self.status in (MirrorStatus.FETCHED, MirrorStatus.CACHED)

    @property
    def retries(self) -> int:
        return max(0, self.attempts - 1)


@dataclass(frozen=True, kw_only=True)
class MirrorSettings:
    """The mirror's knobs. What the command line sets comes from :class:`ClientOptions` (:meth:`from_options`;
    the defaults are its defaults); the rest are the mirror's own.

    Attributes:
        concurrency: objects in flight per process (``ClientOptions.max_in_flight``, ``--max-in-flight``).
        max_attempts: attempts per object (per part for ranged GETs), first try included
            (``ClientOptions.max_attempts``).
        budget_s: no retry starts after this many seconds on one object.
        large_threshold: objects of at least this many bytes are fetched with ranged GETs.
        part_size: bytes per ranged GET.
        parts_in_flight: ranged GETs in flight (or fetched, not yet written) per large object.
        ranges_in_flight: parts in memory over all large objects of one mirror (memory stays below
            ``ranges_in_flight * part_size``).
        disk_threads: threads that create, fsync and hash files (kernel time off the event loop).
        max_versions: versions of one object tried when it changes during its fetch (each with its own
            attempt budget); then it fails as "changing faster than it can be fetched".
        sync: durability policy.
    """

    concurrency: int = ClientOptions.max_in_flight
    max_attempts: int = ClientOptions.max_attempts
    budget_s: float = retry.BUDGET_S
    backoff_base_s: float = retry.BASE_S
    backoff_cap_s: float = retry.CAP_S
    large_threshold: int = 16 << 20
    part_size: int = 8 << 20
    parts_in_flight: int = 8
    ranges_in_flight: int = 16
    disk_threads: int = 8
    max_versions: int = 3
    sync: SyncPolicy = DEFAULT_SYNC

    def __post_init__(self) -> None:
        if not 1 <= self.concurrency <= 4096:
            raise ValueError(f"concurrency={self.concurrency} must be between 1 and 4096 (--max-in-flight)")
        if self.part_size < 1 << 20 or self.large_threshold < self.part_size:
            raise ValueError("part_size must be >= 1 MiB and large_threshold >= part_size")

    @classmethod
    def from_options(cls, options: ClientOptions, **overrides: Any) -> MirrorSettings:
        """The settings of a mirror over a client with ``options`` (objects in flight, attempts)."""
        return cls(concurrency=options.max_in_flight, max_attempts=options.max_attempts, **overrides)


class Attempts:
    """The requests one object (or one part) has cost so far, as its record counts them."""

    def __init__(self) -> None:
        self.n = 0  # attempts at the current version, the first included (bounded by max_attempts)
        self.earlier = 0  # attempts at versions the object had before (each version has its own budget)
        self.reconnects = 0  # requests sent again after a stale connection: retries, but no failed attempts

    @property
    def sent(self) -> int:
        return self.earlier + self.n + self.reconnects

    def new_version(self) -> None:
        self.earlier += self.n
        self.n = 0


class NewVersion(Exception):
    """The object on the server is not the version being fetched; ``head`` names the one it is now."""

    def __init__(self, head: Expected) -> None:
        super().__init__(f"ETag {head.etag}, {head.size} bytes")
        self.head = head
