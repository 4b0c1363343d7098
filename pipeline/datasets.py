"""The datasets: ``DSSDataset`` (S3, the research loader's interface) and ``CachedImageDataset`` (disk).

``DSSDataset(load2memory=True)`` streams: every ``__getitem__`` GETs one object and decodes it in memory
(a batch's GETs run concurrently on the process's event loop, with the mirror's checks, nothing stored).
``DSSDataset(load2memory=False)`` mirrors: every item lands in the content-addressed cache and the item
is its :class:`~pipeline.mirror.MirrorRecord`; the fetch stage drives it with a DataLoader for ``-w N``.
``CachedImageDataset`` (:mod:`pipeline.cached_dataset`, re-exported here) trains from a manifest and the
cache with no network.

Images are decoded with Pillow (see :func:`pipeline.images.decode_rgb`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, get_worker_info

from cache.blobs import BlobStore
from cache.index import KeyIndex
from cache.layout import CacheLayout
from pipeline.config import ClientOptions, LabelRule, S3Uri, label_rule
from pipeline.images import DefaultTransform as _DefaultTransform
from pipeline.images import UndecodableImage, decode_rgb, to_float  # noqa: F401 - re-exported: the research code used them
from pipeline.listing import Listing
from pipeline.mirror import GetFailure, Mirror, MirrorRecord, MirrorStatus, SyncPolicy
from pipeline.mirror_loop import mirror_all
from pipeline.mirrors import make_mirror, settings_for
from pipeline.transport import loop
from pipeline.transport.errors import StorageError
from pipeline.transport.listing import list_objects

log = logging.getLogger(__name__)
Transform = Callable[[torch.Tensor], torch.Tensor]


class DSSDataset(Dataset):
    """Objects under an S3 prefix as a map-style Dataset (the research loader's ``DSSDataset``).

    Args:
        prefix: ``s3://bucket/prefix``.
        options: client options (endpoint, connections, retries, timeouts).
        client_num: clients per process; worker ``i`` uses client ``i % client_num``. The research loader's
            name, kept so its callers work unchanged; the CLI and the configs call it ``clients`` (``-c``).
        transforms: applied to the decoded uint8 (3, H, W) tensor; default: float in [0, 1] at
            ``image_size``.
        load2memory: True returns ``(image, label)`` decoded in memory; False mirrors the object into
            the cache under ``cache_dir`` (:mod:`pipeline.mirror`) and returns its :class:`MirrorRecord`.
        cache_dir: cache root for ``load2memory=False``.
        limit: list at most this many objects.
        listing: an existing listing (the fetch stage lists once and passes it in).
        image_size: output size of the default transform.
        sync: when mirrored blobs become durable (the fetch stage syncs once before its manifest).
        labels: the label rule (:mod:`pipeline.labels`), decided over the whole listing; the choice and its
            reason are ``listing.label_choice``. Ignored when ``listing`` is given (it is already labelled).
    """

    def __init__(
        self,
        prefix: str,
        *,
        options: ClientOptions | None = None,
        client_num: int = 1,
        transforms: Transform | None = None,
        load2memory: bool = True,
        cache_dir: str | os.PathLike[str] | CacheLayout | None = None,
        limit: int | None = None,
        listing: Listing | None = None,
        image_size: int | None = 32,
        endpoint_label: str | None = None,
        sync: SyncPolicy = SyncPolicy.PER_BLOB,
        labels: LabelRule | str = LabelRule.AUTO,
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
        self.sync = sync
        if listing is None:
            listing = Listing.from_objects(list_objects(self.uri, self.options, limit=limit), prefix=self.uri.prefix,
                                           labels=label_rule(labels))
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

    def _uri(self, i: int) -> str:
        return self.uri.key_uri(self.listing.keys[i])

    def _read(self, indices: Sequence[int]) -> list[bytes]:
        """The bytes of objects ``indices``, fetched concurrently on this process's event loop through
        the mirror's checks (listed size and ETag, MD5); spread over the clients in the main process,
        client ``i % c`` in worker ``i``."""
        mirrors = self._mirrors(None)

        async def read_all() -> list[bytes]:
            return await asyncio.gather(*(mirrors[j % len(mirrors)].read(self.listing.object_ref(i))
                                          for j, i in enumerate(indices)))

        try:
            return loop.run(read_all())
        except GetFailure as e:
            raise StorageError(e.message) from None

    def _decode(self, i: int, data: bytes) -> tuple[torch.Tensor, int]:
        try:
            image = decode_rgb(data)
        except UndecodableImage as e:
            raise UndecodableImage(f"{self._uri(i)} is not a decodable image ({e}); remove it from the prefix "
                                   "or train with --on-bad-sample skip") from None
        return self.transforms(image), int(self.listing.label[i])

    def __getitem__(self, i: int) -> Any:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """A batch, its objects fetched concurrently on the event loop: decoded, or mirrored into the cache."""
        if not self.load2memory:
            return self._mirror_batch(indices)
        return [self._decode(i, d) for d, i in zip(self._read(indices), indices)]

    # -- mirroring (pipeline.mirror) -----------------------------------------------------------------

    def _blob_store(self) -> BlobStore:
        if self._store is None or self._store_pid != os.getpid():
            self._store = BlobStore(self.layout)
            self._index = None
            self._store_pid = os.getpid()
        return self._store

    def _mirrors(self, store: BlobStore | None) -> list[Mirror]:
        """This process's mirrors: one per client in the main process, client ``i % c`` in worker ``i``
        (``store`` None: they only read, and the streaming path leaves no cache behind)."""
        info = get_worker_info()
        settings = settings_for(self.options, sync=self.sync)
        if info is not None:
            c = info.id % self.client_num
            return [make_mirror(self.options, self.uri.bucket, store, client=c, worker=info.id, settings=settings)]
        return [make_mirror(self.options, self.uri.bucket, store, client=c, settings=settings) for c in range(self.client_num)]

    def _mirror_batch(self, indices: Sequence[int]) -> list[MirrorRecord]:
        """Mirror objects ``indices`` into the cache; the :class:`MirrorRecord` of each, in that order."""
        records = mirror_all(self._mirrors(self._blob_store()), [self.listing.object_ref(i) for i in indices])
        self._record_in_index(records)
        return records

    def _record_in_index(self, records: Sequence[MirrorRecord]) -> None:
        """Remember fetched objects at once, so a killed fetch re-downloads only what was in flight."""
        entries = [(r.key, r.etag, r.size, r.sha256) for r in records if r.status is MirrorStatus.FETCHED]
        if not entries:
            return
        self._blob_store()  # a new process drops the parent's index handle
        try:
            if self._index is None:
                self._index = KeyIndex(self.layout)
        except (sqlite3.Error, OSError) as e:
            log.warning("key index not opened; %d objects not recorded (%s)", len(entries), e)
            return
        self._index.put_many_or_warn(self.endpoint_label, self.uri.bucket, entries)


from pipeline.cached_dataset import CachedImageDataset  # noqa: E402,F401 - the research code imported it from here
