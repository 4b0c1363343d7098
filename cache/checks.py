"""The checks every downloaded body passes, in one place: length, MD5 ETag, SHA-256, S3 additional checksum.

A body is accepted only when its byte count equals the expected size (the listing's), its MD5 equals the ETag
when the ETag is a plain MD5 (single-part uploads without SSE-KMS), and its S3 additional checksum
(``x-amz-checksum-crc64nvme`` / ``-crc32`` / ``-crc32c`` / ``-sha1`` / ``-sha256``, full-object only)
matches when the server offered one (CRC64NVME, AWS's default for new uploads since 2025, and CRC32C
are computed by awscrt, the library botocore uses for them: 0.2 ms/MB here, against 0.5 for zlib's CRC32).
Its SHA-256 is always computed: it names the blob. ``hashlib`` and ``zlib`` release the GIL on large buffers,
so hashing may overlap network I/O in other threads.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import os
import re
import threading
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

_MD5_ETAG_RE = re.compile(r'^"?([0-9a-fA-F]{32})"?$')


class BodyCheckError(Exception):
    """A body did not match its announced length, MD5 ETag or additional checksum."""


class ChecksumAlgorithm(enum.Enum):
    """S3 additional checksums tess can verify (CRC64NVME and CRC32C where awscrt is installed)."""

    CRC64NVME = "CRC64NVME"
    CRC32 = "CRC32"
    CRC32C = "CRC32C"
    SHA1 = "SHA1"
    SHA256 = "SHA256"


@dataclass(frozen=True)
class Checksum:
    """An S3 additional checksum as the server sent it (base64 of the big-endian digest)."""

    algorithm: ChecksumAlgorithm
    value_b64: str


def md5_from_etag(etag: str | None) -> str | None:
    """The hex MD5 an ETag stands for, or None for multipart/SSE-KMS style ETags (``"...-N"``)."""
    if not etag:
        return None
    m = _MD5_ETAG_RE.match(etag.strip())
    return m.group(1).lower() if m else None


def same_etag(a: str, b: str) -> bool:
    """Whether two ETag headers name the same version (quotes and a weak ``W/`` prefix aside)."""

    def norm(e: str) -> str:
        return e.strip().removeprefix("W/").strip('"').lower()

    return norm(a) == norm(b)


def checksum_from_head(head: dict[str, Any]) -> Checksum | None:
    """The full-object checksum of a HeadObject/GetObject answer (``ChecksumMode=ENABLED``), if any.

    Composite checksums of multipart uploads (``...-N``) are checksums of part checksums and cannot be
    recomputed from the body alone; they are skipped.
    """
    if str(head.get("ChecksumType", "FULL_OBJECT")).upper() != "FULL_OBJECT":
        return None
    for alg in ChecksumAlgorithm:
        value = head.get(f"Checksum{alg.value}")
        if value and "-" not in str(value) and (alg not in _CRT_ALGORITHMS or _crt() is not None):
            return Checksum(alg, str(value))
    return None


_CRT_ALGORITHMS = (ChecksumAlgorithm.CRC64NVME, ChecksumAlgorithm.CRC32C)


def _crt() -> Any:
    """awscrt's checksums (imported on first use: most bodies have none of these), or None."""
    try:
        from awscrt import checksums
    except ImportError:
        return None
    return checksums


class _Crc:
    def __init__(self, fn: Any, width: int) -> None:
        self._fn = fn
        self._width = width
        self._v = 0

    def update(self, data: bytes | memoryview) -> None:
        self._v = self._fn(data, self._v)

    def digest(self) -> bytes:
        return self._v.to_bytes(self._width, "big")


def _hasher(alg: ChecksumAlgorithm) -> Any:
    if alg is ChecksumAlgorithm.CRC32:
        return _Crc(zlib.crc32, 4)
    if alg is ChecksumAlgorithm.CRC32C:
        return _Crc(_crt().crc32c, 4)
    if alg is ChecksumAlgorithm.CRC64NVME:
        return _Crc(_crt().crc64nvme, 8)
    return hashlib.new(alg.value.lower())


@dataclass(frozen=True, kw_only=True)
class Expected:
    """What a body must match: ``size``, ``etag`` and an optional ``checksum`` (``last_modified``: the
    version's time as a HEAD gave it, ISO 8601, when known)."""

    size: int | None = None
    etag: str | None = None
    checksum: Checksum | None = None
    last_modified: str | None = None


_helper_pool: ThreadPoolExecutor | None = None
_helper_pid = -1
_helper_lock = threading.Lock()


def _helper() -> ThreadPoolExecutor:
    """Threads for :meth:`BodyHasher.update_many` (made on first use, per process)."""
    global _helper_pool, _helper_pid
    with _helper_lock:
        if _helper_pool is None or _helper_pid != os.getpid():
            _helper_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tess-hash")
            _helper_pid = os.getpid()
        return _helper_pool


class BodyHasher:
    """Feed a body in order with :meth:`update`; :meth:`verify` checks it and returns its SHA-256 hex."""

    def __init__(self, expected: Expected, *, label: str) -> None:
        self.expected = expected
        self.label = label
        self._md5_expected = md5_from_etag(expected.etag)
        self._sha = hashlib.sha256()
        self._md5 = hashlib.md5() if self._md5_expected else None
        self._extra = _hasher(expected.checksum.algorithm) if expected.checksum else None
        self.size = 0

    def update(self, chunk: bytes | memoryview) -> None:
        self._sha.update(chunk)
        if self._md5 is not None:
            self._md5.update(chunk)
        if self._extra is not None:
            self._extra.update(chunk)
        self.size += len(chunk)

    def update_many(
        self, chunks: Sequence[bytes | memoryview], *, also: Callable[[bytes | memoryview], object] | None = None
    ) -> None:
        """:meth:`update` for a run of large chunks, with ``also(chunk)`` (e.g. a file write) called on each.

        MD5 and the additional checksum run in a helper thread while SHA-256 and ``also`` run in this one
        (hashlib releases the GIL for large buffers), so two cores work on one body.
        """
        helper = (
            _helper().submit(self._update_others, chunks) if self._md5 is not None or self._extra is not None else None
        )
        try:
            for chunk in chunks:
                if also is not None:
                    also(chunk)
                self._sha.update(chunk)
        finally:
            if helper is not None:
                helper.result()
        self.size += sum(len(c) for c in chunks)

    def _update_others(self, chunks: Sequence[bytes | memoryview]) -> None:
        for chunk in chunks:
            if self._md5 is not None:
                self._md5.update(chunk)
            if self._extra is not None:
                self._extra.update(chunk)

    def verify(self) -> str:
        """SHA-256 hex of the body.

        Raises:
            BodyCheckError: length, MD5 or additional checksum differ from what the server announced.
        """
        e = self.expected
        if e.size is not None and self.size != e.size:
            raise BodyCheckError(f"{self.label}: got {self.size} bytes, expected {e.size} (the listed size)")
        if self._md5 is not None and self._md5.hexdigest() != self._md5_expected:
            raise BodyCheckError(f"{self.label}: MD5 {self._md5.hexdigest()} does not match ETag {self._md5_expected}")
        if self._extra is not None and e.checksum is not None:
            got = base64.b64encode(self._extra.digest()).decode()
            if got != e.checksum.value_b64:
                raise BodyCheckError(
                    f"{self.label}: {e.checksum.algorithm.value} {got} does not match the "
                    f"server's checksum {e.checksum.value_b64}"
                )
        return self._sha.hexdigest()
