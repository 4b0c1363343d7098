"""Samples for training: datasets over the cache and over S3, image decoding, packs and batches.

Rooms:

* :mod:`~pipeline.data.cached_dataset`: ``CachedImageDataset``, a manifest's blobs from disk (no network).
* :mod:`~pipeline.data.datasets`: ``DSSDataset``, the research loader's interface: streams from S3
  (``load2memory=True``) or mirrors (``False``, :class:`pipeline.fetch.worker_dataset.MirrorDataset`).
* :mod:`~pipeline.data.readahead`: which GETs a streaming process starts before its batches are asked for.
* :mod:`~pipeline.data.images`: decoding (Pillow) and the default transform; the pluggable loader.
* :mod:`~pipeline.data.packs`: a manifest's decoded uint8 pack, built once and memory-mapped.
* :mod:`~pipeline.data.batches`: batch datasets and the epoch batch sampler.

May import :mod:`cache`, :mod:`pipeline.config`, :mod:`pipeline.hints`, :mod:`pipeline.transport` and
:mod:`pipeline.fetch`; nothing of ``train`` or the CLI.
"""
