"""Content-addressed blob store: streams bytes to a temp file, checks them, renames them into place.

The blob's file name is the SHA-256 of its bytes, so the same content under two keys is stored once and
no key, however hostile, ever becomes a path. A body is accepted only when its byte count equals the
announced Content-Length and, for single-part uploads whose ETag is a plain MD5, when the MD5 matches.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path

from cache.atomic import temp_path_for
from cache.layout import CacheLayout

CHUNK = 1 << 20
_MD5_ETAG_RE = re.compile(r'^"?([0-9a-fA-F]{32})"?$')


class BlobWriteError(Exception):
    """A downloaded body did not match its announced size or MD5 ETag."""


def md5_from_etag(etag: str | None) -> str | None:
    """The hex MD5 an ETag stands for, or None for multipart/SSE-KMS style ETags (``"...-N"``)."""
    if not etag:
        return None
    m = _MD5_ETAG_RE.match(etag.strip())
    return m.group(1).lower() if m else None


def hash_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class BlobWriter:
    """One in-flight blob: write chunks, then :meth:`commit` (checks, fsync, rename) or :meth:`abort`."""

    def __init__(self, store: BlobStore, *, expected_size: int | None, etag: str | None, label: str) -> None:
        self._store = store
        self._expected_size = expected_size
        self._expected_md5 = md5_from_etag(etag)
        self._label = label
        self._sha = hashlib.sha256()
        self._md5 = hashlib.md5() if self._expected_md5 else None
        self._size = 0
        self.tmp_path = temp_path_for(store.layout.tmp)
        self._f = open(self.tmp_path, "xb")

    def write(self, chunk: bytes) -> None:
        self._f.write(chunk)
        self._sha.update(chunk)
        if self._md5 is not None:
            self._md5.update(chunk)
        self._size += len(chunk)

    def commit(self) -> tuple[str, bool]:
        """Check, fsync and move the blob into place; return (sha256 hex, True if newly stored)."""
        try:
            if self._expected_size is not None and self._size != self._expected_size:
                raise BlobWriteError(
                    f"{self._label}: got {self._size} bytes, Content-Length said {self._expected_size}"
                )
            if self._md5 is not None and self._md5.hexdigest() != self._expected_md5:
                raise BlobWriteError(
                    f"{self._label}: MD5 {self._md5.hexdigest()} does not match ETag {self._expected_md5}"
                )
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            sha = self._sha.hexdigest()
            final = self._store.layout.blob_path(sha)
            existed = final.exists()
            final.parent.mkdir(parents=True, exist_ok=True)
            # Replace even when a file of that name exists: identical content normally, and a damaged
            # blob (found by --verify) is healed by the same atomic rename.
            os.replace(self.tmp_path, final)
            return sha, not existed
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Close and remove the temp file; safe to call twice."""
        self._f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp_path)


class BlobStore:
    """The ``objects/`` tree of one cache."""

    def __init__(self, layout: CacheLayout) -> None:
        self.layout = layout.create()

    def path(self, sha256_hex: str) -> Path:
        return self.layout.blob_path(sha256_hex)

    def writer(self, *, expected_size: int | None = None, etag: str | None = None, label: str = "blob") -> BlobWriter:
        """Start a blob; ``label`` (e.g. the S3 URI) is used only in error messages."""
        return BlobWriter(self, expected_size=expected_size, etag=etag, label=label)

    def put_bytes(self, data: bytes, *, etag: str | None = None, label: str = "blob") -> tuple[str, bool]:
        """Store ``data``; return (sha256 hex, newly stored)."""
        w = self.writer(expected_size=len(data), etag=etag, label=label)
        try:
            w.write(data)
        except BaseException:
            w.abort()
            raise
        return w.commit()

    def verify(self, sha256_hex: str) -> bool:
        """True when the blob exists and its bytes still hash to its name."""
        p = self.path(sha256_hex)
        return p.is_file() and hash_file(p) == sha256_hex
