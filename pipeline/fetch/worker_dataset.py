"""``MirrorDataset``: the listing as a torch Dataset whose items mirror objects into the cache.

The fetch stage's ``-w N`` path runs a DataLoader over it (:func:`pipeline.fetch.stage.fetch`): worker ``i``
uses client ``i % client_num``, as the research loader did, and every item is the object's
:class:`~pipeline.fetch.mirror.MirrorRecord`. :class:`pipeline.data.datasets.DSSDataset` builds on it (its
``load2memory=False`` is this class's behaviour). Imports torch: only the ``-w N`` path loads this module.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterator, Sequence
from typing import Any

from torch.utils.data import DataLoader, Dataset, get_worker_info

from cache.blobs import BlobStore
from cache.index import KeyIndex
from cache.layout import CacheLayout
from pipeline.config import (
    DATASET_SYNC,
    DEFAULT_LABELS,
    ClientOptions,
    FetchConfig,
    LabelRule,
    S3Uri,
    SyncPolicy,
    label_rule,
)
from pipeline.fetch.listing import Listing
from pipeline.fetch.mirror import Mirror, MirrorRecord, MirrorSettings, MirrorStatus
from pipeline.fetch.mirror_loop import mirror_all
from pipeline.fetch.mirrors import make_mirror
from pipeline.transport.errors import StorageError
from pipeline.transport.listing import list_objects

log = logging.getLogger(__name__)


class MirrorDataset(Dataset):
    """Objects under an S3 prefix; item ``i`` mirrors object ``i`` into the cache and is its record.

    Args:
        prefix: ``s3://bucket/prefix``.
        options: client options (endpoint, objects in flight, retries, timeouts).
        client_num: clients per process; worker ``i`` uses client ``i % client_num`` (the research loader's
            name; the CLI and the configs call it ``clients``, ``-c``).
        cache_dir: cache root (a :class:`CacheLayout`, a path, or None for the default).
        limit: list at most this many objects.
        listing: an existing listing (the fetch stage lists once and passes it in).
        endpoint_label: what the key index and manifests record as the endpoint.
        sync: when mirrored blobs become durable.
        labels: the label rule, decided over the whole listing (ignored when ``listing`` is given).
    """

    def __init__(
        self,
        prefix: str,
        *,
        options: ClientOptions | None = None,
        client_num: int = 1,
        cache_dir: str | os.PathLike[str] | CacheLayout | None = None,
        limit: int | None = None,
        listing: Listing | None = None,
        endpoint_label: str | None = None,
        sync: SyncPolicy = DATASET_SYNC,
        labels: LabelRule | str = DEFAULT_LABELS,
    ) -> None:
        super().__init__()
        if client_num < 1:
            raise ValueError(f"client_num={client_num} must be >= 1 (use -c 1 or more)")
        self.uri = S3Uri.parse(prefix)
        self.options = options or ClientOptions()
        self.client_num = client_num
        self.layout = CacheLayout.at(cache_dir)
        self.endpoint_label = endpoint_label or self.options.endpoint_label
        self.sync = sync
        if listing is None:
            listing = Listing.from_objects(
                list_objects(self.uri, self.options, limit=limit), prefix=self.uri.prefix, labels=label_rule(labels)
            )
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

    def __getitem__(self, i: int) -> Any:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """A batch, its objects mirrored concurrently on the event loop; their records, in that order."""
        return self._mirror_batch(indices)

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
        settings = MirrorSettings.from_options(self.options, sync=self.sync)
        if info is not None:
            c = info.id % self.client_num
            return [make_mirror(self.options, self.uri.bucket, store, client=c, worker=info.id, settings=settings)]
        return [
            make_mirror(self.options, self.uri.bucket, store, client=c, settings=settings)
            for c in range(self.client_num)
        ]

    def _mirror_batch(self, indices: Sequence[int]) -> list[MirrorRecord]:
        """Mirror objects ``indices`` into the cache; the :class:`MirrorRecord` of each, in that order."""
        records = mirror_all(self._mirrors(self._blob_store()), [self.listing.object_ref(i) for i in indices])
        self._record_in_index(records)
        return records

    def _record_in_index(self, records: Sequence[MirrorRecord]) -> None:
        """Remember fetched objects at once, so a killed fetch re-downloads only what was in flight."""
        # A FETCHED record always carries its blob's digest (MirrorRecord); the check only tells mypy so.
        entries = [
            (r.key, r.etag, r.size, r.sha256)
            for r in records
            if r.status is MirrorStatus.FETCHED and r.sha256 is not None
        ]
        if not entries:
            return
        index = self._key_index()
        if index is None:
            log.warning("key index not opened; %d objects not recorded", len(entries))
            return
        index.put_many_or_warn(self.endpoint_label, self.uri.bucket, entries)

    def _key_index(self) -> KeyIndex | None:
        """This process's key index (None, logged, when it cannot be opened)."""
        self._blob_store()  # a new process drops the parent's index handle
        try:
            if self._index is None:
                self._index = KeyIndex(self.layout)
        except (sqlite3.Error, OSError) as e:
            log.warning("key index of %s not opened (%s)", self.layout.root, e)
            return None
        return self._index


def _keep_list(batch: list[Any]) -> list[Any]:
    return batch


def records_in_workers(
    config: FetchConfig, uri: S3Uri, sub: Listing, layout: CacheLayout, endpoint: str
) -> Iterator[MirrorRecord]:
    """The fetch stage's ``-w N`` path: ``sub`` mirrored by ``config.workers`` DataLoader processes, worker ``i``
    over client ``i % config.clients``; each object's record as its batch comes back."""
    dataset = MirrorDataset(
        str(uri),
        options=config.options,
        client_num=config.clients,
        cache_dir=layout,
        listing=sub,
        endpoint_label=endpoint,
        sync=config.sync,
    )
    loader = DataLoader(
        dataset,
        batch_size=config.batch,
        shuffle=False,
        num_workers=config.workers,
        collate_fn=_keep_list,
        # Enough batches queued per worker that its event loop never waits on the main process.
        prefetch_factor=4,
    )
    for batch in loader:
        yield from batch
