"""The mirror's vocabulary: what a getter is and raises, what goes in (:class:`ObjectRef`), what comes out
(:class:`MirrorRecord` with its :class:`MirrorStatus`), and the knobs (:class:`MirrorSettings`).

:mod:`pipeline.mirror` holds the algorithm and re-exports these names. No boto3, no torch.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from cache.checks import Expected


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
    # One syncfs of the cache filesystem before the manifest is written (blobs fetched in ranges, at
    # least large_threshold bytes, are still fsynced each, off the event loop, where it overlaps downloads).
    BEFORE_MANIFEST = "before-manifest"


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
        parts_in_flight: ranged GETs in flight (or fetched, not yet written) per large object.
        ranges_in_flight: parts in memory over all large objects of one mirror (memory stays below
            ``ranges_in_flight * part_size``).
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
