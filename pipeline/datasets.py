"""The datasets: ``DSSDataset`` (S3, the research loader's interface) and ``CachedImageDataset`` (disk).

``DSSDataset(load2memory=True)`` streams: every ``__getitem__`` GETs one object and decodes it in memory.
``DSSDataset(load2memory=False)`` mirrors: every item lands in the content-addressed cache and the item
is its manifest record; the fetch stage drives it with a DataLoader. ``CachedImageDataset``
(:mod:`pipeline.cached_dataset`, re-exported here) trains from a manifest and the cache with no network.

Images are decoded with Pillow (see :func:`pipeline.images.decode_rgb`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import botocore.exceptions
import torch
import urllib3.exceptions
from torch.utils.data import Dataset, get_worker_info

from cache.blobs import BlobStore, BlobWriteError, md5_from_etag
from cache.index import KeyIndex
from cache.layout import CacheLayout
from pipeline.config import ClientOptions, S3Uri
from pipeline.listing import Listing
from pipeline.objectget import RetryableHTTPError, open_object
from pipeline.images import DefaultTransform as _DefaultTransform
from pipeline.images import UndecodableImage, decode_rgb, to_float  # noqa: F401 - re-exported for users
from pipeline.s3 import PerProcess, StorageError, describe_error, get_client, is_missing, list_objects, retry_call

log = logging.getLogger(__name__)
Transform = Callable[[torch.Tensor], torch.Tensor]

# Errors after which a fresh GET of the whole object may succeed.
_TRANSIENT = (
    BlobWriteError,
    RetryableHTTPError,
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectionError,
    urllib3.exceptions.HTTPError,
    ConnectionError,
    TimeoutError,
)


def _botocore_retries(response: dict[str, Any]) -> int:
    """Retries botocore made inside one call, from its ``ResponseMetadata.RetryAttempts``."""
    return int(response.get("ResponseMetadata", {}).get("RetryAttempts", 0) or 0)


_pools: PerProcess[ThreadPoolExecutor] = PerProcess()


def _thread_pool(size: int) -> ThreadPoolExecutor:
    """The fetch thread pool of this process (pools, like clients, must not cross a fork)."""
    return _pools.get("get", lambda: ThreadPoolExecutor(max_workers=size, thread_name_prefix="tess-get"))


class DSSDataset(Dataset):
    """Objects under an S3 prefix as a map-style Dataset (the research loader's ``DSSDataset``).

    Args:
        prefix: ``s3://bucket/prefix``.
        options: client options (endpoint, connections, retries, timeouts).
        client_num: clients per process; worker ``i`` uses client ``i % client_num``.
        transforms: applied to the decoded uint8 (3, H, W) tensor; default: float in [0, 1] at
            ``image_size``.
        load2memory: True returns ``(image, label)`` decoded in memory; False mirrors the object into
            the cache under ``cache_dir`` and returns its record (a dict).
        cache_dir: cache root for ``load2memory=False``.
        limit: list at most this many objects.
        listing: an existing listing (the fetch stage lists once and passes it in).
        image_size: output size of the default transform.
    """

    def __init__(
        self,
        prefix: str,
        *,
        options: ClientOptions | None = None,
        client_num: int = 1,
        transforms: Transform | None = None,
        load2memory: bool = True,
        cache_dir: str | os.PathLike[str] | None = None,
        limit: int | None = None,
        listing: Listing | None = None,
        image_size: int | None = 32,
        endpoint_label: str | None = None,
    ) -> None:
        super().__init__()
        if client_num < 1:
            raise ValueError(f"client_num={client_num} must be >= 1 (use -c 1 or more)")
        self.uri = S3Uri.parse(prefix)
        self.options = options or ClientOptions()
        self.client_num = client_num
        self.transforms = transforms or _DefaultTransform(image_size)
        self.load2memory = load2memory
        self.layout = CacheLayout.at(cache_dir)
        self.endpoint_label = endpoint_label or self.options.endpoint_label
        if listing is None:
            listing = Listing.from_objects(list_objects(self.uri, self.options, limit=limit), prefix=self.uri.prefix)
            if len(listing) == 0:
                raise StorageError(f"no objects under {self.uri}; check PREFIX (keys are case-sensitive)")
        self.listing = listing
        self._store: BlobStore | None = None
        self._index: KeyIndex | None = None
        self._store_pid = -1

    def __len__(self) -> int:
        return len(self.listing)

    def __getstate__(self) -> dict[str, Any]:
        # Spawned workers get the listing and options only; clients, the blob store and the key
        # index are rebuilt lazily in each process (they hold sockets and SQLite handles).
        state = self.__dict__.copy()
        state.update(_store=None, _index=None, _store_pid=-1)
        return state

    def _client_index(self, slot: int) -> int:
        info = get_worker_info()
        if info is not None:
            return info.id % self.client_num
        # In the main process the thread slot spreads requests over all clients.
        return slot % self.client_num

    def _uri(self, i: int) -> str:
        return f"s3://{self.uri.bucket}/{self.listing.keys[i]}"

    def _get_bytes(self, i: int, client_index: int) -> bytes:
        client = get_client(self.options, client_index)
        key = self.listing.keys[i]

        def once() -> bytes:
            body = open_object(self.options, client, client_index, self.uri.bucket, key)
            data = body.read()
            if body.content_length >= 0 and len(data) != body.content_length:
                raise BlobWriteError(f"{self._uri(i)}: got {len(data)} bytes, Content-Length said {body.content_length}")
            # The MD5 ETag catches bytes damaged on the way, which would otherwise fail to decode or,
            # worse, decode into wrong pixels without a word.
            md5 = md5_from_etag(body.etag)
            if md5 is not None and hashlib.md5(data).hexdigest() != md5:
                raise BlobWriteError(f"{self._uri(i)}: MD5 {hashlib.md5(data).hexdigest()} does not match ETag {md5}")
            return data

        try:
            return retry_call(once, attempts=self.options.max_attempts, is_permanent=lambda e: not isinstance(e, _TRANSIENT))
        except _TRANSIENT + (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
            raise StorageError(describe_error(e, uri=self._uri(i), options=self.options) or f"GET {self._uri(i)} failed: {e}") from None

    def _decode(self, i: int, data: bytes) -> tuple[torch.Tensor, int]:
        try:
            image = decode_rgb(data)
        except UndecodableImage as e:
            raise UndecodableImage(f"{self._uri(i)} is not a decodable image ({e}); remove it from the prefix "
                                   "or train with --on-bad-sample skip") from None
        return self.transforms(image), int(self.listing.label[i])

    def __getitem__(self, i: int) -> Any:
        if self.load2memory:
            return self._decode(i, self._get_bytes(i, self._client_index(0)))
        record = self._mirror(i, self._client_index(0))
        self._record_in_index([record])
        return record

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """Fetch a batch concurrently, bounded by the client's max connections."""
        if len(indices) <= 1:
            return [self[i] for i in indices]
        pool = _thread_pool(self.options.max_connections * (self.client_num if get_worker_info() is None else 1))
        if self.load2memory:
            datas = list(pool.map(lambda a: self._get_bytes(a[1], self._client_index(a[0])), enumerate(indices)))
            return [self._decode(i, d) for d, i in zip(datas, indices)]
        records = list(pool.map(lambda a: self._mirror(a[1], self._client_index(a[0])), enumerate(indices)))
        self._record_in_index(records)
        return records

    # -- mirroring -----------------------------------------------------------------------------------

    def _blob_store(self) -> BlobStore:
        if self._store is None or self._store_pid != os.getpid():
            self._store = BlobStore(self.layout)
            self._index = None
            self._store_pid = os.getpid()
        return self._store

    def _record_in_index(self, records: list[dict[str, Any]]) -> None:
        """Remember fetched objects at once, so a killed fetch re-downloads only what was in flight."""
        entries = [(r["key"], r["etag"], int(r["size"]), r["sha256"]) for r in records if r["status"] == "fetched"]
        self._blob_store()
        try:
            if self._index is None:
                self._index = KeyIndex(self.layout)
            self._index.put_many(self.endpoint_label, self.uri.bucket, entries)
        except (sqlite3.Error, OSError) as e:
            # The blobs are safe; a missing index entry only costs a GET on the next run. A full disk
            # is reported by the blob writes themselves.
            log.warning("key index not updated for %d objects (%s)", len(entries), e)

    def _mirror(self, i: int, client_index: int) -> dict[str, Any]:
        """Download object ``i`` into the cache; return its record with a ``status``.

        Status is ``fetched`` or, for problems that concern only this object, ``missing`` (deleted
        since the listing) or ``failed`` (retries exhausted); problems that concern every object
        (credentials, bucket, endpoint) come back as ``fatal`` so the fetch stops at once.
        """
        client = get_client(self.options, client_index)
        store = self._blob_store()
        key = self.listing.keys[i]
        uri = self._uri(i)
        attempts = 0

        def once() -> tuple[str, bool, str, int]:
            nonlocal attempts
            attempts += 1
            try:
                body = open_object(self.options, client, client_index, self.uri.bucket, key)
            except botocore.exceptions.ClientError as e:
                # On the boto3 path (adaptive mode) botocore retried inside this call; count those too.
                attempts += _botocore_retries(e.response)
                raise
            attempts += body.retries
            length, etag = body.content_length, body.etag
            writer = store.writer(expected_size=length, etag=etag, label=uri)
            try:
                for chunk in body.iter_chunks():
                    writer.write(chunk)
            except BaseException:
                writer.abort()
                raise
            sha, new = writer.commit()
            return sha, new, etag, length

        info = get_worker_info()
        base = {
            "index": int(i),
            "key": key,
            "label": int(self.listing.label[i]),
            "last_modified": self.listing.last_modified[i],
            "client": client_index,
            "worker": info.id if info is not None else -1,
        }
        try:
            sha, new, etag, size = retry_call(
                once, attempts=self.options.max_attempts, is_permanent=lambda e: not isinstance(e, _TRANSIENT)
            )
        except Exception as e:
            if is_missing(e):
                return {**base, "status": "missing", "attempts": attempts, "error": f"{uri}: deleted since the listing (404)"}
            fatal = describe_error(e, uri=uri, options=self.options)
            status = "fatal" if fatal else "failed"
            if isinstance(e, OSError) and not isinstance(e, _TRANSIENT):
                # Local disk problems (ENOSPC, EACCES) are fatal too: every further object would fail.
                status, fatal = "fatal", f"writing the cache at {self.layout.root} failed: {e.strerror or e}; free space or pass --cache-dir"
            return {**base, "status": status, "attempts": attempts, "error": fatal or f"{uri}: {type(e).__name__}: {e}"}
        return {**base, "status": "fetched", "attempts": attempts, "sha256": sha, "new": new, "etag": etag, "size": size}


from pipeline.cached_dataset import CachedImageDataset  # noqa: E402,F401 - the research code imported it from here
