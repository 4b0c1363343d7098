"""Where training data comes from: the manifest to train on, and the :class:`DataSource` built from it.

Owns the choice of manifest (``--manifest``, else the newest of ``--prefix``, else the newest of the
cache; under DDP the rank's own shard, see :func:`pipeline.train.distributed.pick_rank_manifest`) and the
source built from it: the decoded pack (default), the blobs decoded per sample (``--pack off``), or
S3 streaming through ``DSSDataset`` (``--source s3``: batches read ahead in the sampler's order, and with
``--cache-as-you-go`` stored in the cache, then pinned in a manifest after the first epoch). The cache root is
resolved once, in :func:`cache_layout`, and passed on as a :class:`CacheLayout`. Also the labels trained on
(:func:`manifest_labels`): the manifest's as recorded, or recomputed when ``--labels`` names another rule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from cache.layout import CacheLayout
from cache.locks import GC_LOCK, cache_lock
from cache.manifest import ManifestArrays, latest_manifest, load_manifest, manifests_of, read_manifest_header
from cache.shard import ShardSpec
from pipeline.config import LabelRule, OnBadSample, PackMode, S3Uri, Source, TrainConfig
from pipeline.data.batches import PackedBatches, SampleBatches
from pipeline.hints import fetch_hint, verify_hint
from pipeline.train.distributed import DistState, RankShare, pick_rank_manifest

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class DataSource:
    """The batch dataset, the indices to sample, and what identifies the data (for checkpoints)."""

    batches: Dataset
    indices: np.ndarray
    digest: str
    description: str
    manifest: ManifestArrays | None = None
    layout: CacheLayout | None = None
    network: dict[str, Any] | None = None
    bad_at_build: list[int] = field(default_factory=list)
    ignored: list[int] = field(default_factory=list)
    shard: ShardSpec | None = None
    preview: list[int] = field(default_factory=list)
    fix: str = "check --extensions"
    labels: str = ""  # the label rule trained with and why, one line (the report prints it)
    # Streaming: wraps training's batch sampler so each worker reads its next batches ahead (pipeline.data.readahead).
    read_ahead: Callable[[Any], Any] | None = None
    # Called by the training loop after each epoch (its number): --cache-as-you-go pins a manifest then.
    epoch_done: Callable[[int], None] | None = None

    def key(self, i: int) -> str:
        """The key of sample ``i`` (its index, when streaming)."""
        return self.manifest.keys[i] if self.manifest is not None else str(i)

    def share(self) -> RankShare:
        """What this rank tells the others about its data (:func:`pipeline.train.distributed.plan_ranks`)."""
        header = self.manifest.header if self.manifest is not None else None
        return RankShare(
            digest=self.digest,
            shard=self.shard,
            samples=len(self.indices),
            description=self.description,
            fix=self.fix,
            uri=str(header.uri) if header else "",
            endpoint=header.endpoint if header else None,
            cache_dir=str(self.layout.root) if self.layout else None,
        )


def cache_layout(config: TrainConfig) -> CacheLayout:
    """``--cache-dir``; else the cache that holds ``--manifest`` (its ``../..``); else the default cache."""
    if config.cache_dir:
        return CacheLayout.at(config.cache_dir)
    if config.manifest:
        return CacheLayout.at(Path(config.manifest).parent.parent)
    return CacheLayout.at(None)


def find_manifest(config: TrainConfig, layout: CacheLayout, dist_state: DistState = DistState()) -> Path:  # noqa: B008 - frozen
    """``--manifest``, else the newest manifest of ``--prefix``, else the newest manifest of the cache.

    Under DDP (world > 1) the choice is among the manifests of that (bucket, prefix), by
    :func:`pipeline.train.distributed.pick_rank_manifest`.

    Raises:
        FileNotFoundError: no manifest, or under DDP only other ranks' shards; the message says which
            ``make fetch`` to run.
    """
    if config.manifest:
        return Path(config.manifest)
    if config.prefix:
        uri = S3Uri.parse(config.prefix)
        matches = manifests_of(layout, uri)
        if not matches:
            raise FileNotFoundError(
                f"no manifest for {uri} in {layout.manifests}; run "
                f"{fetch_hint(str(uri), endpoint=config.endpoint, cache_dir=config.cache_dir)} first"
            )
    else:
        try:
            newest = latest_manifest(layout)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no manifest in {layout.manifests}; run {fetch_hint(None, cache_dir=config.cache_dir)} "
                "for the demo set, "
                f"or {fetch_hint('s3://bucket/prefix', endpoint=config.endpoint, cache_dir=config.cache_dir)}"
            ) from None
        if dist_state.world == 1:
            return newest
        uri = read_manifest_header(newest).uri
        matches = manifests_of(layout, uri)
    if dist_state.world == 1:
        return matches[-1]
    headers = {p: read_manifest_header(p) for p in matches}
    shards = {p: h.shard for p, h in headers.items()}
    return pick_rank_manifest(shards, uri, dist_state, layout, headers[matches[-1]].endpoint)


def build_source(config: TrainConfig, dist_state: DistState, stack: contextlib.ExitStack | None = None) -> DataSource:
    """The training data: the cache (decoded pack or blobs) or S3 streaming (``--source s3``).

    ``stack``, when given, holds the cache's shared GC lock for the whole run, so a cache-cap eviction
    never deletes blobs under training.
    """
    layout = cache_layout(config)
    if config.source is Source.S3:
        return _stream_source(config, layout, dist_state, stack)
    return _cache_source(config, layout, dist_state, stack)


def _stream_source(
    config: TrainConfig, layout: CacheLayout, dist_state: DistState, stack: contextlib.ExitStack | None
) -> DataSource:
    from pipeline.config import DEFAULT_SYNC, ClientOptions, manifest_endpoint, resolve_endpoint
    from pipeline.data.datasets import DSSDataset
    from pipeline.data.images import image_indices
    from pipeline.data.readahead import ReadAheadSampler, StreamBatches

    prefix, endpoint = config.prefix, config.endpoint
    if prefix is None:
        h = read_manifest_header(find_manifest(config, layout, dist_state))
        prefix, endpoint = str(h.uri), manifest_endpoint(h.endpoint, endpoint)
    if config.cache_as_you_go:
        if dist_state.world > 1:
            raise ValueError(
                "--cache-as-you-go runs in one process (each rank streams only its share); under torchrun "
                f"run {fetch_hint(prefix, endpoint=endpoint, cache_dir=config.cache_dir)} "
                "first, then train from the cache"
            )
        layout.create()
        if stack is not None:  # as a fetch holds it: an eviction never removes a blob before its manifest pins it
            stack.enter_context(cache_lock(layout, GC_LOCK, shared=True))
    ds = DSSDataset(
        prefix,
        options=ClientOptions(endpoint=resolve_endpoint(endpoint)),
        client_num=config.clients,
        load2memory=True,
        image_size=config.image_size,
        labels=config.labels,
        prefetch=config.prefetch,
        cache_as_you_go=config.cache_as_you_go,
        cache_dir=layout,
        sync=DEFAULT_SYNC,
    )
    keep = image_indices(ds.listing.keys, config.extensions)
    how = ", cached as it goes" if config.cache_as_you_go else ""
    return DataSource(
        batches=StreamBatches(ds, skip_bad=config.on_bad_sample is OnBadSample.SKIP),
        indices=keep,
        digest=f"s3:{prefix}",
        description=f"{prefix} (streaming{how}, {len(keep)} images)",
        preview=[int(i) for i in keep[:8]],
        ignored=np.setdiff1d(np.arange(len(ds)), keep).tolist(),
        labels=ds.listing.label_choice.line(),
        read_ahead=lambda batches: ReadAheadSampler(batches, ds),
        epoch_done=_ManifestAfterFirstEpoch(ds, keep) if config.cache_as_you_go else None,
    )


class _ManifestAfterFirstEpoch:
    """``--cache-as-you-go``: after the first epoch every image is in the cache; pin them in a manifest (once),
    so ``--source cache`` can train on them later, and say where it is."""

    def __init__(self, ds: Any, indices: np.ndarray) -> None:
        self.ds = ds
        self.indices = indices
        self.path: Path | None = None

    def __call__(self, epoch: int) -> None:
        if self.path is not None:
            return
        self.path, lacking = self.ds.write_manifest(self.indices)
        if self.path is None:
            log.warning("--cache-as-you-go: no image of %s reached the cache; no manifest written", self.ds.uri)
        elif lacking:
            log.warning(
                "--cache-as-you-go: manifest %s lacks %d of %d images (not in the cache after epoch %d)",
                self.path,
                lacking,
                len(self.indices),
                epoch + 1,
            )
        else:
            log.info(
                "--cache-as-you-go: wrote manifest %s (%d images) after epoch %d",
                self.path,
                len(self.indices),
                epoch + 1,
            )


def _cache_source(
    config: TrainConfig, layout: CacheLayout, dist_state: DistState, stack: contextlib.ExitStack | None
) -> DataSource:
    from pipeline.data.cached_dataset import CachedImageDataset
    from pipeline.data.packs import can_use_pack, load_or_build_pack

    skip = config.on_bad_sample is OnBadSample.SKIP
    path = find_manifest(config, layout, dist_state)
    if not path.is_file():
        # A plain raise: train() runs build_source through on_every_rank, so every rank reports it.
        raise FileNotFoundError(
            f"manifest {path} not found on rank {dist_state.rank}; run `make fetch` (or `tess fetch`) on every node"
        )
    if stack is not None:
        stack.enter_context(cache_lock(layout, GC_LOCK, shared=True))
    manifest, labels_line = manifest_labels(load_manifest(path), config.labels, layout)
    header = manifest.header
    ds = CachedImageDataset(
        manifest, cache_dir=layout.root, image_size=config.image_size, check_blobs=True, extensions=config.extensions
    )
    src = DataSource(
        batches=SampleBatches(ds, skip_bad=skip),
        indices=ds.image_indices,
        digest=header.records_sha256,
        description=f"{path.name} ({len(ds.image_indices)} images)",
        manifest=manifest,
        layout=layout,
        network=header.network_cost,
        shard=header.shard,
        ignored=ds.ignored_indices.tolist(),
        fix=f"check --extensions, or run {verify_hint(repair=True, endpoint=header.endpoint, cache_dir=layout)}",
        labels=labels_line,
    )
    if config.pack is PackMode.AUTO and not can_use_pack(ds, config.image_size):
        log.warning("the cache at %s is read-only: training without a decoded pack (decoding every epoch)", layout.root)
    elif config.pack in (PackMode.AUTO, PackMode.ON):
        pack = load_or_build_pack(
            ds, image_size=config.image_size, progress=config.progress and dist_state.main, skip_bad=skip
        )
        src.batches = PackedBatches(pack.images, manifest.label)
        src.indices = np.setdiff1d(ds.image_indices, np.asarray(pack.bad, dtype=np.int64))
        src.bad_at_build = [int(i) for i in pack.bad]
        src.description += f", decoded pack {pack.path.name}"
    src.preview = [int(i) for i in src.indices[:8]]
    return src


def manifest_labels(manifest: ManifestArrays, rule: LabelRule, layout: CacheLayout) -> tuple[ManifestArrays, str]:
    """The manifest to train on under ``--labels rule``, and one line saying which labels it carries.

    ``auto`` keeps the labels as the fetch recorded them (its rule was decided over the whole listing); so
    does the manifest's own rule. Another rule recomputes them from the manifest's keys and prefix
    (:func:`pipeline.fetch.labels.assign_labels`); the records digest is unchanged (labels do not change the data).

    Raises:
        ValueError: ``folder`` on a shard's manifest that recorded another rule: classes are numbered over
            the whole listing, which one shard does not hold (the message names the fetch that records it).
    """
    from pipeline.fetch.labels import assign_labels

    header = manifest.header
    recorded = header.labels
    if rule is LabelRule.AUTO or rule == recorded:
        if recorded is None:
            return manifest, (
                "labels: as the manifest holds them (written before tess recorded one label rule per "
                "listing; re-fetch it, or pass --labels folder, suffix or none)"
            )
        classes = f"; {len(header.classes)} classes" if header.classes else ""
        return manifest, f"labels: {recorded} (as recorded in the manifest{classes})"
    if rule is LabelRule.FOLDER and header.shard is not None:
        fix = fetch_hint(
            str(header.uri), endpoint=header.endpoint, cache_dir=layout, shard=str(header.shard), labels=rule
        )
        raise ValueError(
            f"--labels folder: {manifest.path.name} is shard {header.shard} of its listing, and folder classes "
            f"are numbered over the whole listing; run {fix} on every node to record them"
        )
    labelled = assign_labels(manifest.keys, header.prefix, rule)
    line = f"{labelled.choice.line()}; recomputed from the manifest's keys (it recorded {recorded or 'no rule'})"
    return dataclasses.replace(manifest, label=labelled.values), line
