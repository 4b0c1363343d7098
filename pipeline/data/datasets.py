"""The datasets: ``DSSDataset`` (S3, the research loader's interface) and ``CachedImageDataset`` (disk).

``DSSDataset(load2memory=True)`` streams: every ``__getitem__`` GETs one object and decodes it in memory
(a batch's GETs run concurrently on the process's event loop, with the mirror's checks, nothing stored).
With the batches of :meth:`DSSDataset.sampler` (or any :class:`~pipeline.data.readahead.ReadAheadSampler`) each
process also keeps its next ``prefetch`` batches in flight (:mod:`pipeline.data.readahead`); with
``cache_as_you_go`` the bodies land in the cache as the fetch stage stores them, and objects the key index
already knows are read from disk (:meth:`DSSDataset.write_manifest` pins them after the first epoch).
``DSSDataset(load2memory=False)`` mirrors: every item lands in the content-addressed cache and the item
is its :class:`~pipeline.fetch.mirror.MirrorRecord`; the fetch stage drives it with a DataLoader for ``-w N``.
``CachedImageDataset`` (:mod:`pipeline.data.cached_dataset`, re-exported here) trains from a manifest and the
cache with no network.

Images are decoded with Pillow (see :func:`pipeline.data.images.decode_rgb`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, get_worker_info

from cache.blobs import sync_filesystem
from cache.layout import CacheLayout
from cache.manifest import ManifestRecord
from cache.manifest import write_manifest as _write_manifest
from pipeline.config import DATASET_SYNC, DEFAULT_LABELS, ClientOptions, LabelRule
from pipeline.data.images import DefaultTransform as _DefaultTransform
from pipeline.data.images import UndecodableImage, decode_rgb, to_float  # noqa: F401 - re-exported: the research code used them
from pipeline.data.readahead import Prefetcher, ReadAheadPlan, ReadAheadSampler, TaggedBatch
from pipeline.fetch.listing import Listing
from pipeline.fetch.mirror import FailureKind, GetFailure, Mirror, MirrorRecord, SyncPolicy
from pipeline.fetch.worker_dataset import MirrorDataset
from pipeline.transport.errors import StorageError

log = logging.getLogger(__name__)
Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(eq=False)
class _Stream:
    """One process's streaming state (made on first use in each process, never crossing a fork)."""

    pid: int
    mirrors: list[Mirror]
    prefetcher: Prefetcher
    blobs: dict[int, str] = field(default_factory=dict)  # sample -> sha256 of its blob (cache_as_you_go)
    unknown: set[int] = field(default_factory=set)  # samples the key index did not know, this epoch
    epoch: int = -1


class DSSDataset(MirrorDataset):
    """Objects under an S3 prefix as a map-style Dataset (the research loader's ``DSSDataset``).

    Args:
        prefix: ``s3://bucket/prefix``.
        options: client options (endpoint, connections, retries, timeouts).
        client_num: clients per process; worker ``i`` uses client ``i % client_num``. The research loader's
            name, kept so its callers work unchanged; the CLI and the configs call it ``clients`` (``-c``).
        transforms: applied to the decoded uint8 (3, H, W) tensor; default: float in [0, 1] at
            ``image_size``.
        load2memory: True returns ``(image, label)`` decoded in memory; False mirrors the object into
            the cache under ``cache_dir`` (:mod:`pipeline.fetch.mirror`) and returns its :class:`MirrorRecord`.
        cache_dir: cache root for ``load2memory=False``.
        limit: list at most this many objects.
        listing: an existing listing (the fetch stage lists once and passes it in).
        image_size: output size of the default transform.
        sync: when mirrored blobs become durable (the fetch stage syncs once before its manifest).
        labels: the label rule (:mod:`pipeline.fetch.labels`), decided over the whole listing; the choice and its
            reason are ``listing.label_choice``. Ignored when ``listing`` is given (it is already labelled).
        prefetch: ``load2memory=True`` with the batches of a :class:`ReadAheadSampler`: batches of this
            process kept in flight ahead of the one asked for (0: each batch's GETs only).
        cache_as_you_go: ``load2memory=True`` also stores every body in the cache under ``cache_dir``
            (:meth:`Mirror.one`, every check of the fetch stage) and records it in the key index; objects
            the key index knows are read from disk, checked against their SHA-256.
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
        sync: SyncPolicy = DATASET_SYNC,
        labels: LabelRule | str = DEFAULT_LABELS,
        prefetch: int = 2,
        cache_as_you_go: bool = False,
    ) -> None:
        if prefetch < 0:
            raise ValueError(f"prefetch={prefetch} must be >= 0 (--prefetch)")
        super().__init__(
            prefix,
            options=options,
            client_num=client_num,
            cache_dir=cache_dir,
            limit=limit,
            listing=listing,
            endpoint_label=endpoint_label,
            sync=sync,
            labels=labels,
        )
        self.transforms = transforms or _DefaultTransform(image_size)
        self.load2memory = load2memory
        self.prefetch = prefetch
        self.cache_as_you_go = cache_as_you_go
        self._plan: ReadAheadPlan | None = None
        self._stream_state: _Stream | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_stream_state"] = None  # this process's event-loop state and clients
        return state

    def _decode(self, i: int, data: bytes) -> tuple[torch.Tensor, int]:
        try:
            image = decode_rgb(data)
        except UndecodableImage as e:
            raise UndecodableImage(
                f"{self._uri(i)} is not a decodable image ({e}); remove it from the prefix "
                "or train with --on-bad-sample skip"
            ) from None
        return self.transforms(image), int(self.listing.label[i])

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """A batch, its objects fetched concurrently on the event loop: decoded, or mirrored into the cache.

        torch's DataLoader calls this with each whole batch (``batch_sampler=ds.sampler(...)``); a batch of
        :meth:`sampler` also starts this process's next ``prefetch`` batches.
        """
        if not self.load2memory:
            return self._mirror_batch(indices)
        return self.items(indices)[0]

    def items(
        self, indices: Sequence[int], *, skip_bad: bool = False
    ) -> tuple[list[tuple[torch.Tensor, int]], list[int]]:
        """The decoded ``(image, label)`` of ``indices`` and, with ``skip_bad``, the undecodable ones left out.

        Raises:
            StorageError: an object failed (its GET, or a check of its body), as it always did, skipped or not.
            UndecodableImage: an image does not decode (unless ``skip_bad``).
        """
        samples: list[tuple[torch.Tensor, int]] = []
        bad: list[int] = []
        for i, data in zip(indices, self._stream_bytes(indices)):
            try:
                samples.append(self._decode(i, data))
            except ValueError as e:
                if not skip_bad:
                    raise
                log.debug("skipping %s", e)
                bad.append(int(i))
        return samples, bad

    # -- streaming with read-ahead (pipeline.data.readahead) ----------------------------------------------

    def sampler(
        self, *, batch_size: int, shuffle: bool = True, seed: int = 0, indices: Sequence[int] | np.ndarray | None = None
    ) -> ReadAheadSampler:
        """A batch sampler (``DataLoader(ds, batch_sampler=ds.sampler(batch_size=16))``) whose batches this
        dataset reads ahead; ``shuffle``: a new order every ``set_epoch``, from ``seed`` and the epoch alone."""
        from pipeline.data.batches import EpochBatchSampler

        idx = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        inner = (
            EpochBatchSampler(idx, batch=batch_size, seed=seed)
            if shuffle
            else BatchSampler([int(i) for i in idx], batch_size, drop_last=False)
        )
        return ReadAheadSampler(inner, self)

    def read_ahead_with(self, sampler: ReadAheadSampler) -> None:
        """Read ahead in ``sampler``'s order (called by :class:`ReadAheadSampler`, before workers start)."""
        self._plan = sampler.plan()
        sampler.on_close(self.drop_read_ahead)

    def drop_read_ahead(self) -> None:
        """Cancel this process's GETs in flight ahead (an epoch ended or was abandoned)."""
        s = self._stream_state
        if s is not None and s.pid == os.getpid():
            s.prefetcher.drop()

    def _stream(self) -> _Stream:
        s = self._stream_state
        if s is None or s.pid != os.getpid():
            mirrors = self._mirrors(self._blob_store() if self.cache_as_you_go else None)
            s = self._stream_state = _Stream(
                pid=os.getpid(), mirrors=mirrors, prefetcher=Prefetcher(lambda i: self._get(mirrors, i))
            )
        return s

    async def _get(self, mirrors: list[Mirror], i: int) -> bytes | MirrorRecord:
        """Object ``i`` through the mirror's checks (on the loop): its bytes, or with a store its record."""
        mirror = mirrors[i % len(mirrors)]
        ref = self.listing.object_ref(i)
        if mirror.store is None:
            return await mirror.read(ref)
        rec = await mirror.one(ref)
        if not rec.ok:
            raise GetFailure(FailureKind.PERMANENT, rec.error or f"{self._uri(i)}: {rec.status.value}")
        return rec

    def _ahead(self, indices: Sequence[int]) -> list[int]:
        if self._plan is None or not self.prefetch:
            return []
        info = get_worker_info()
        return self._plan.ahead(indices, workers=info.num_workers if info else 1, prefetch=self.prefetch) or []

    def _stream_bytes(self, indices: Sequence[int]) -> list[bytes]:
        """The checked bytes of ``indices``: from the cache when it holds them (``cache_as_you_go``), else
        GET (already in flight when read ahead), with this process's next batches started behind them."""
        s = self._stream()
        ahead = self._ahead(indices)
        on_disk = self._from_cache(s, indices, ahead, indices.epoch if isinstance(indices, TaggedBatch) else -1)
        get = [i for i in indices if i not in on_disk]
        got = dict(zip(get, s.prefetcher.take(get, [i for i in ahead if i not in s.blobs])))
        records = {i: r for i, r in got.items() if isinstance(r, MirrorRecord)}
        if records:  # indexed before any failure is raised: what was stored is kept
            self._record_in_index(list(records.values()))
            s.blobs.update((i, r.sha256 or "") for i, r in records.items())
        for i in get:  # the first failure in batch order, as one line naming the object
            if isinstance(got[i], GetFailure):
                raise StorageError(got[i].message)
            if isinstance(got[i], BaseException):
                raise got[i]
        for i in records:
            data = self._blob(s.blobs[i])  # just renamed after the mirror's checks; read back from the page cache
            if data is None:
                raise StorageError(f"{self._uri(i)}: its blob vanished from {self.layout.objects} as it was stored")
            got[i] = data
        return [on_disk[i] if i in on_disk else got[i] for i in indices]

    def _from_cache(self, s: _Stream, indices: Sequence[int], ahead: Sequence[int], epoch: int) -> dict[int, bytes]:
        """``cache_as_you_go``: the bytes of those of ``indices`` whose blobs are in the cache, checked; the
        key index is asked once per epoch about each object of the batch and the window ahead."""
        if not self.cache_as_you_go:
            return {}
        if epoch != s.epoch or epoch < 0:
            s.unknown.clear()
            s.epoch = epoch
        ask = [i for i in dict.fromkeys((*indices, *ahead)) if i not in s.blobs and i not in s.unknown]
        index = self._key_index() if ask else None
        if index is not None:
            listing = self.listing
            shas = index.get_many(self.endpoint_label, self.uri.bucket, listing.index_items(ask))
            for i, sha in zip(ask, shas):
                if sha:
                    s.blobs[i] = sha
                else:
                    s.unknown.add(i)
        out: dict[int, bytes] = {}
        for i in dict.fromkeys(indices):
            data = self._blob(s.blobs[i]) if i in s.blobs else None
            if data is not None:
                out[i] = data
            elif i in s.blobs:
                del s.blobs[i]  # gone or damaged: fetched again, and the new blob replaces it
        return out

    def _blob(self, sha: str) -> bytes | None:
        """The bytes of blob ``sha`` if it exists and still hashes to its name (training never trusts a blob)."""
        try:
            with open(self._blob_store().path(sha), "rb") as f:
                data = f.read()
        except (OSError, ValueError):
            return None
        return data if hashlib.sha256(data).hexdigest() == sha else None

    def write_manifest(self, indices: Sequence[int] | np.ndarray) -> tuple[Path | None, int]:
        """``cache_as_you_go``: pin the objects of ``indices`` whose blobs the key index knows in a manifest,
        as the fetch stage writes it (one syncfs first, so it names only durable blobs); (its path, how
        many of ``indices`` it lacks). None when no object is cached."""
        index = self._key_index()
        if index is None:
            return None, len(indices)
        listing = self.listing
        idx = [int(i) for i in indices]
        shas = index.get_many(self.endpoint_label, self.uri.bucket, listing.index_items(idx))
        kept = [(i, sha) for i, sha in zip(idx, shas) if sha and os.path.isfile(self.layout.blob_path(sha))]
        if not kept:
            return None, len(idx)
        sync_filesystem(self.layout.objects)
        extra: dict[str, Any] = listing.header_fields()
        if len(kept) < len(idx):
            extra["incomplete"] = len(idx) - len(kept)
        path = _write_manifest(
            self.layout,
            endpoint=self.endpoint_label,
            bucket=self.uri.bucket,
            prefix=self.uri.prefix,
            records=(
                ManifestRecord(
                    key=listing.keys[i],
                    sha256=sha,
                    size=int(listing.size[i]),
                    etag=listing.etags[i],
                    last_modified=listing.last_modified[i],
                    label=int(listing.label[i]),
                )
                for i, sha in kept
            ),
            extra=extra,
        )
        return path, len(idx) - len(kept)


from pipeline.data.cached_dataset import CachedImageDataset  # noqa: E402,F401 - the research code imported it from here
