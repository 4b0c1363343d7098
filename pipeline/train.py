"""The VAE training loop: data source, DataLoader, loop, metrics, checkpoints, pictures, report.

Loop order is forward, backward, step, ``zero_grad(set_to_none=True)`` (the research code zeroed the
gradients just before ``step()``, so it never learned). Every iteration is timed the way the research
code did it: ``dataloading_time`` (waiting for the batch and moving it to the device), ``training_time``
(forward, backward, step) and their sum ``batch_time``; they go to ``metrics.csv`` one row per
iteration. Under torchrun (``WORLD_SIZE`` > 1) the model is wrapped in DDP; only rank 0 prints,
draws and checkpoints; each rank writes its own metrics CSV (``metrics.csv`` for rank 0,
``metrics.rank<R>.csv`` for the others). A full manifest is split over all ranks by
``DistributedSampler``; shard manifests (``fetch --shard``) are sampled locally by the ranks of the node
that holds them (:func:`plan_ranks`). Failures before training starts are raised on every rank
(:func:`on_every_rank`), so no rank waits forever in a collective.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.join import Join
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler

from cache.atomic import atomic_write_bytes, atomic_writer
from cache.layout import CacheLayout
from cache.locks import cache_lock
from cache.verify import GC_LOCK
from cache.manifest import ManifestArrays, latest_manifest, list_manifests, load_manifest, network_cost, read_manifest_header
from pipeline.hints import fetch_hint, verify_hint
from pipeline.images import IMG_EXTENSIONS, parse_extensions
from pipeline.model import VAE, VAEConfig

log = logging.getLogger(__name__)

METRIC_COLUMNS = ("epoch", "iteration", "dataloading_time", "training_time", "batch_time", "loss", "recon", "kl")
SOURCES = ("cache", "s3")
PACK_MODES = ("auto", "on", "off")
BAD_SAMPLE_MODES = ("stop", "skip")
T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything one training run needs (the flags of ``train_vae.py``)."""

    epochs: int = 1
    batch: int = 16
    workers: int = 0
    clients: int = 1
    lr: float = 1e-3
    latent_dim: int = 32
    beta: float = 1.0
    image_size: int = 32
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    source: str = "cache"
    prefix: str | None = None
    endpoint: str | None = None
    manifest: str | None = None
    cache_dir: str | None = None
    out: str = "runs/latest"
    resume: bool = False
    force_resume: bool = False
    pack: str = "auto"
    on_bad_sample: str = "stop"
    progress: bool = True
    threads: int | None = None
    extensions: tuple[str, ...] = IMG_EXTENSIONS

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs={self.epochs} must be >= 1 (-e/--epochs)"),
            (self.batch >= 1, f"batch={self.batch} must be >= 1 (-b/--batch)"),
            (0 <= self.workers <= 64, f"workers={self.workers} must be between 0 and 64 (-w/--workers)"),
            (self.clients >= 1, f"clients={self.clients} must be >= 1 (-c/--clients)"),
            (self.threads is None or self.threads >= 1, f"threads={self.threads} must be >= 1 (--threads)"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr={self.lr} must be a positive number (--lr)"),
            (self.source in SOURCES, f"source={self.source!r} must be one of {', '.join(SOURCES)} (--source)"),
            (self.pack in PACK_MODES, f"pack={self.pack!r} must be one of {', '.join(PACK_MODES)} (--pack)"),
            (self.on_bad_sample in BAD_SAMPLE_MODES, f"on_bad_sample={self.on_bad_sample!r} must be stop or skip"),
            (self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"),
             f"device={self.device!r} must be auto, cpu, cuda[:N] or mps (--device)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        object.__setattr__(self, "extensions", parse_extensions(self.extensions))
        VAEConfig(image_size=self.image_size, latent_dim=self.latent_dim, beta=self.beta)


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA, then MPS, then CPU; otherwise the named device (checked to exist)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device auto or cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine; use --device auto or cpu")
    return dev


# -- distributed ---------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Dist:
    """This process's place in the torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> Dist:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, local_world=local_world)


def _gather(obj: Any, d: Dist) -> list[Any]:
    """``obj`` of every rank, in rank order (a collective: every rank must call it)."""
    if d.world == 1:
        return [obj]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def on_every_rank(fn: Callable[[], T], d: Dist) -> T:
    """Run ``fn`` on every rank; if it raises on any rank, raise on every rank.

    Without this, a rank that fails before a collective (a missing shard manifest, say) exits while
    the others block in the collective until torchrun kills them, and only one rank says why. The
    failing rank re-raises its own exception; the others raise FileNotFoundError or ValueError (the
    types ``train_vae.py`` reports in one line) naming the failing rank.
    """
    if d.world == 1:
        return fn()
    try:
        value, failure = fn(), None
    except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks have been told
        value, failure = None, e
    failures = [(r, f) for r, f in enumerate(_gather(None if failure is None else (type(failure).__name__, str(failure)), d))
                if f is not None]
    if failure is not None:
        raise failure
    if failures:
        r, (kind, msg) = failures[0]
        raise (FileNotFoundError if kind == "FileNotFoundError" else ValueError)(f"rank {r} stopped: {msg}")
    return value  # type: ignore[return-value]


def shutdown_distributed(d: Dist) -> None:
    """Leave the process group (torch warns at exit about a group never destroyed)."""
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def rank_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of rank ``rank``'s noise (VAE sampling, worker seeds) in ``epoch`` under DDP.

    Distinct per rank (identical noise on every rank would waste the extra ranks) and a function of
    (seed, epoch, rank) alone, so a resumed DDP run draws exactly the noise of an uninterrupted one.
    """
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


def state_digest(module: nn.Module) -> str:
    """SHA-256 over the names and bytes of ``module``'s state dict (equal digests: equal parameters)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# -- data ------------------------------------------------------------------------------------------------


class PackedBatches(Dataset):
    """Batches straight out of a decoded pack: one fancy index, one conversion per batch."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        idx = np.asarray(indices, dtype=np.int64)
        x = torch.from_numpy(np.ascontiguousarray(self.images[idx])).float().div_(255.0)
        return x, torch.from_numpy(self.labels[idx]), []


class SampleBatches(Dataset):
    """Batches built from a per-sample dataset (``CachedImageDataset`` or ``DSSDataset``)."""

    def __init__(self, dataset: Dataset, *, skip_bad: bool) -> None:
        self.dataset = dataset
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        bad: list[int] = []
        if not self.skip_bad:
            getitems = getattr(self.dataset, "__getitems__", None)
            samples = getitems(list(indices)) if getitems else [self.dataset[i] for i in indices]
        else:
            samples = []
            for i in indices:
                try:
                    samples.append(self.dataset[i])
                except ValueError as e:
                    log.debug("skipping %s", e)
                    bad.append(int(i))
        if not samples:
            return torch.empty(0), torch.empty(0, dtype=torch.int64), bad
        xs, ys = zip(*samples)
        return torch.stack(xs), torch.tensor(ys, dtype=torch.int64), bad


class EpochBatchSampler(Sampler[list[int]]):
    """Shuffled batches, reshuffled by ``set_epoch`` from (seed, epoch) alone, so a resumed run sees
    exactly the batches an uninterrupted run would.

    Under DDP (``split`` given) the order comes from ``DistributedSampler(num_replicas=replicas,
    rank=replica)`` over ``indices``: with the full manifest on every rank that is the usual split
    of one epoch over all ranks; with shard manifests, ``indices`` are the local shard and only the
    ranks holding the same shard split it. ``num_samples`` (the largest per-rank count, agreed by all
    ranks) pads shorter ranks by wrapping their own order, as ``DistributedSampler`` itself pads, so
    every rank takes the same number of steps and no rank waits in an all-reduce that never comes.
    """

    def __init__(self, indices: np.ndarray, *, batch: int, seed: int, split: tuple[int, int] | None = None,
                 num_samples: int | None = None) -> None:
        self.indices = indices
        self.batch = batch
        self.seed = seed
        self.epoch = 0
        self.dist_sampler = None
        if split is not None:
            replica, replicas = split
            self.dist_sampler = DistributedSampler(range(len(indices)), num_replicas=replicas, rank=replica,
                                                   shuffle=True, seed=seed)
        self.num_samples = num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.dist_sampler is not None:
            self.dist_sampler.set_epoch(epoch)

    def _order(self) -> list[int]:
        if self.dist_sampler is not None:
            order = [int(self.indices[i]) for i in self.dist_sampler]
        else:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = [int(self.indices[i]) for i in torch.randperm(len(self.indices), generator=g)]
        if self.num_samples is not None and order:
            # Pad by wrapping (or cut) to the agreed per-rank count.
            order = (order * (self.num_samples // len(order) + 1))[: self.num_samples]
        return order

    def _len_samples(self) -> int:
        if self.num_samples is not None:
            return self.num_samples
        return len(self.dist_sampler) if self.dist_sampler is not None else len(self.indices)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(BatchSampler(self._order(), self.batch, drop_last=False))

    def __len__(self) -> int:
        return (self._len_samples() + self.batch - 1) // self.batch


@dataclass(kw_only=True)
class DataSource:
    """The batch dataset, the indices to sample, and what identifies the data (for checkpoints)."""

    batches: Dataset
    indices: np.ndarray
    digest: str
    description: str
    manifest: ManifestArrays | None = None
    network: dict[str, Any] | None = None
    bad_at_build: list[int] = field(default_factory=list)
    ignored: list[int] = field(default_factory=list)
    shard: str | None = None
    preview: list[int] = field(default_factory=list)
    fix: str = "check --extensions"

    def key(self, i: int) -> str:
        return self.manifest.keys[i] if self.manifest is not None else str(i)


def _shard_of_rank(shard: str, d: Dist) -> bool:
    """Whether shard manifest ``k/M`` belongs to this rank: M divides the world and the ranks are split
    into M consecutive blocks (torchrun numbers ranks node by node), block ``k`` holding shard ``k``.
    With M = number of nodes that is "node k's shard"; with M = world size, "rank k's shard"."""
    from pipeline.shard import parse_shard

    spec = parse_shard(shard, source="manifest shard")
    return d.world % spec.count == 0 and d.rank // (d.world // spec.count) == spec.index


def find_manifest(config: TrainConfig, d: Dist = Dist()) -> Path:
    """``--manifest``, else the newest manifest of ``--prefix``, else the newest manifest of the cache.

    Under DDP (world > 1) the choice is among the manifests of that (bucket, prefix): a full manifest
    if the cache has one (every rank then samples it through ``DistributedSampler``), else the newest
    shard manifest that belongs to this rank (see :func:`_shard_of_rank`), else the only shard the
    cache holds (a node-local cache; :func:`plan_ranks` checks that the ranks cover every shard).

    Raises:
        FileNotFoundError: no manifest, or under DDP only other ranks' shards; the message says which
            ``make fetch`` to run.
    """
    layout = CacheLayout.at(config.cache_dir)
    if config.manifest:
        return Path(config.manifest)
    if config.prefix:
        from pipeline.config import S3Uri

        uri = S3Uri.parse(config.prefix)
        matches = [p for p in list_manifests(layout)
                   if (h := read_manifest_header(p)).bucket == uri.bucket and h.prefix == uri.prefix]
        if not matches:
            raise FileNotFoundError(
                f"no manifest for {uri} in {layout.manifests}; run "
                f"{fetch_hint(str(uri), endpoint=config.endpoint, cache_dir=config.cache_dir)} first"
            )
        if d.world == 1:
            return matches[-1]
    else:
        try:
            newest = latest_manifest(layout)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"no manifest in {layout.manifests}; run {fetch_hint(None, cache_dir=config.cache_dir)} for the demo set, "
                f"or {fetch_hint('s3://bucket/prefix', endpoint=config.endpoint, cache_dir=config.cache_dir)}"
            ) from None
        if d.world == 1:
            return newest
        top = read_manifest_header(newest)
        uri = f"s3://{top.bucket}/{top.prefix}"
        matches = [p for p in list_manifests(layout)
                   if (h := read_manifest_header(p)).bucket == top.bucket and h.prefix == top.prefix]
    shards = {p: read_manifest_header(p).extra.get("shard") for p in matches}
    full = [p for p in matches if not shards[p]]
    if full:
        return full[-1]
    mine = [p for p in matches if _shard_of_rank(shards[p], d)]
    if mine:
        return mine[-1]
    if len(set(shards.values())) == 1:
        # A node-local cache holds its own node's shard only, and torchrun's c10d rendezvous numbers the
        # nodes in the order they join, so node k's ranks need not be block k: use the shard the node
        # has. plan_ranks then checks that the ranks together hold every shard.
        return matches[-1]
    # Several shards here, none this rank's by position: suggest the shard count in use when it fits.
    from pipeline.shard import parse_shard

    counts = sorted({c for s in shards.values() if d.world % (c := parse_shard(s, source="manifest shard").count) == 0})
    count = counts[-1] if counts else max(1, d.world // max(1, d.local_world))
    endpoint = read_manifest_header(matches[-1]).endpoint
    fix = (f"{fetch_hint(str(uri), endpoint=endpoint, cache_dir=config.cache_dir, shard=f'{d.rank // (d.world // count)}/{count}')} on this node"
           if count > 1 else f"{fetch_hint(str(uri), endpoint=endpoint, cache_dir=config.cache_dir)} (the full prefix)")
    have = ", ".join(sorted({str(s) for s in shards.values()}))
    raise FileNotFoundError(
        f"{layout.manifests} holds shards {have} of {uri}, none for rank {d.rank} of {d.world}; run {fix} or pass --manifest"
    )


def build_source(config: TrainConfig, d: Dist, stack: contextlib.ExitStack | None = None) -> DataSource:
    """The training data: the cache (decoded pack or blobs) or S3 streaming (``--source s3``)."""
    skip = config.on_bad_sample == "skip"
    if config.source == "s3":
        from pipeline.config import ClientOptions, resolve_endpoint
        from pipeline.datasets import DSSDataset
        from pipeline.images import image_indices

        prefix, endpoint = config.prefix, config.endpoint
        if prefix is None:
            h = read_manifest_header(find_manifest(config, d))
            prefix = f"s3://{h.bucket}/{h.prefix}"
            endpoint = endpoint or (h.endpoint if h.endpoint.startswith("http") else None)
        ds = DSSDataset(prefix, options=ClientOptions(endpoint=resolve_endpoint(endpoint)), client_num=config.clients,
                        load2memory=True, image_size=config.image_size)
        keep = image_indices(ds.listing.keys, config.extensions)
        ignored = np.setdiff1d(np.arange(len(ds)), keep)
        return DataSource(batches=SampleBatches(ds, skip_bad=skip), indices=keep, digest=f"s3:{prefix}",
                          description=f"{prefix} (streaming, {len(keep)} images)", preview=[int(i) for i in keep[:8]],
                          ignored=[int(i) for i in ignored])

    from pipeline.cached_dataset import CachedImageDataset
    from pipeline.packs import can_use_pack, load_or_build_pack

    path = find_manifest(config, d)
    if not path.is_file():
        # A plain raise: train() runs build_source through on_every_rank, so every rank reports it.
        raise FileNotFoundError(f"manifest {path} not found on rank {d.rank}; run `make fetch` on every node")
    if stack is not None:
        # Held (shared) for the whole run: a cache-cap eviction never deletes blobs under training.
        stack.enter_context(cache_lock(CacheLayout.at(config.cache_dir or path.parent.parent), GC_LOCK, shared=True))
    manifest = load_manifest(path)
    ds = CachedImageDataset(manifest, cache_dir=config.cache_dir, image_size=config.image_size, check_blobs=True,
                            extensions=config.extensions)
    src = DataSource(
        batches=SampleBatches(ds, skip_bad=skip), indices=ds.image_indices, digest=manifest.header.records_sha256,
        description=f"{path.name} ({len(ds.image_indices)} images)", manifest=manifest,
        network=network_cost(manifest.header.extra), shard=manifest.header.extra.get("shard"),
        ignored=[int(i) for i in ds.ignored_indices],
        fix=f"check --extensions, or run {verify_hint(repair=True, endpoint=manifest.header.endpoint, cache_dir=ds.layout)}",
    )
    if config.pack == "auto" and not can_use_pack(ds, config.image_size):
        log.warning("the cache at %s is read-only: training without a decoded pack (decoding every epoch)", ds.layout.root)
    elif config.pack in ("auto", "on"):
        pack = load_or_build_pack(ds, image_size=config.image_size, progress=config.progress and d.main, skip_bad=skip)
        src.batches = PackedBatches(pack.images, manifest.label)
        src.indices = np.setdiff1d(ds.image_indices, np.asarray(pack.bad, dtype=np.int64))
        src.bad_at_build = list(pack.bad)
        src.description += f", decoded pack {pack.path.name}"
    src.preview = [int(i) for i in src.indices[:8]]
    return src


def _check_shard_cover(info: list[dict[str, Any]]) -> None:
    """Every shard ``0..N-1`` of one count ``N`` is held by some rank (else its keys are never trained on)."""
    from pipeline.shard import parse_shard

    by_shard: dict[str, list[int]] = {}
    for r, i in enumerate(info):
        by_shard.setdefault(i["shard"], []).append(r)
    which = "; ".join(f"{s} on rank(s) {', '.join(map(str, rs))}" for s, rs in sorted(by_shard.items()))
    counts = {parse_shard(s, source="manifest shard").count for s in by_shard}
    if len(counts) > 1:
        raise ValueError(f"ranks hold shards of different counts ({which}); fetch every node with the same N in SHARD=k/N")
    count = counts.pop()
    held = {parse_shard(s, source="manifest shard").index for s in by_shard}
    missing = [k for k in range(count) if k not in held]
    if missing:
        k = missing[0]
        raise ValueError(f"no rank holds shard {k}/{count} of {info[0]['uri']} ({which}); "
                         f"run {fetch_hint(info[0]['uri'], endpoint=info[0].get('endpoint'), cache_dir=info[0].get('cache_dir'), shard=f'{k}/{count}')} "
                         "on the node that lacks it")


@dataclass(frozen=True, kw_only=True)
class RankPlan:
    """How the ranks share the data (the same on every rank, from one all-gather).

    Attributes:
        split: ``(replica, replicas)``: this rank's place among the ranks that hold the same data
            (all ranks for a full manifest, the ranks of one shard for shard manifests); None without DDP.
        num_samples: samples per rank per epoch (the largest share of any rank); None without DDP.
        digest: the data of the whole job: the records digest when every rank holds the same data,
            else the SHA-256 of the ranks' digests in rank order (what checkpoints are tied to).
        shards: the shard ``k/N`` of each rank's manifest, empty for a full manifest.
    """

    split: tuple[int, int] | None
    num_samples: int | None
    digest: str
    shards: list[str] = field(default_factory=list)


def plan_ranks(source: DataSource, d: Dist) -> RankPlan:
    """Agree across ranks on who samples what; raise the same error on every rank when they cannot.

    Full manifest on every rank: one group of ``world`` ranks, i.e. plain ``DistributedSampler``.
    Shard manifests: each rank samples its node's shard (split among that node's ranks), so a rank
    never reads a blob another node holds. Shards differ in size by a few per cent (hash split), so
    every rank is padded to the largest share: each epoch all ranks take the same number of steps.

    Raises:
        ValueError: a rank has no usable samples, some ranks use a full manifest and others shards,
            or the ranks' shards do not cover every shard ``0..N-1`` of one ``N``.
    """
    h = source.manifest.header if source.manifest is not None else None
    info = _gather({"digest": source.digest, "shard": source.shard, "n": len(source.indices),
                    "data": source.description, "uri": f"s3://{h.bucket}/{h.prefix}" if h else "", "fix": source.fix,
                    "endpoint": h.endpoint if h else None,
                    "cache_dir": str(source.manifest.path.parent.parent) if source.manifest is not None else None}, d)
    empty = [r for r, i in enumerate(info) if i["n"] == 0]
    if empty:
        r = empty[0]
        where = f" on rank {r}" if d.world > 1 else ""
        raise ValueError(f"no usable samples in {info[r]['data']}{where}; {info[r]['fix']}")
    if d.world == 1:
        return RankPlan(split=None, num_samples=None, digest=source.digest, shards=[source.shard] if source.shard else [])
    kinds = {bool(i["shard"]) for i in info}
    if len(kinds) > 1:
        which = ", ".join(f"rank {r}: {i['shard'] or 'full'}" for r, i in enumerate(info))
        raise ValueError(f"ranks mix full and shard manifests ({which}); fetch the same way on every node or pass --manifest")
    if kinds == {True}:
        _check_shard_cover(info)
    groups: dict[str, list[int]] = {}
    for r, i in enumerate(info):
        groups.setdefault(i["digest"], []).append(r)
    members = groups[source.digest]
    num_samples = max(math.ceil(i["n"] / len(groups[i["digest"]])) for i in info)
    digests = [i["digest"] for i in info]
    digest = digests[0] if len(groups) == 1 else hashlib.sha256("\n".join(digests).encode()).hexdigest()
    return RankPlan(split=(members.index(d.rank), len(members)), num_samples=num_samples, digest=digest,
                    shards=[i["shard"] for i in info if i["shard"]])


# -- outputs ---------------------------------------------------------------------------------------------


def _metrics_path(out: Path, d: Dist) -> Path:
    return out / ("metrics.csv" if d.rank == 0 else f"metrics.rank{d.rank}.csv")


def _read_metrics(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _rows_to_csv(rows: Sequence[dict[str, Any]]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_writer(path) as f:
        torch.save(state, f)


def _pictures(model: VAE, source: DataSource, out: Path, device: torch.device, seed: int, rows: list[dict[str, Any]]) -> None:
    from pipeline.plots import save_loss_curve, save_reconstructions, save_samples

    was_training = model.training
    model.eval()
    with torch.no_grad():
        x, _, _ = source.batches[source.preview]
        if len(x):
            x = x.to(device)
            recon, _, _ = model(x)
            save_reconstructions(x.cpu(), recon.float().cpu(), out / "reconstructions.png")
        g = torch.Generator(device=device).manual_seed(seed)
        save_samples(model.sample(64, generator=g).float().cpu(), out / "samples.png")
    model.train(was_training)
    if rows:
        save_loss_curve([float(r["loss"]) for r in rows], [int(r["epoch"]) for r in rows], out / "loss.png")


class _LossModule(nn.Module):
    """forward(x) -> VAELoss, so DDP sees the loss computation as the module's forward."""

    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor):
        return self.vae.loss(x)[1]


# -- the loop --------------------------------------------------------------------------------------------


def train(config: TrainConfig) -> dict[str, Any]:
    """Train the VAE as configured; return the summary (also written to ``OUT/summary.json``)."""
    with contextlib.ExitStack() as stack:
        return _train(config, stack)


def _train(config: TrainConfig, stack: contextlib.ExitStack) -> dict[str, Any]:
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    d = init_distributed(config.device)
    stack.callback(shutdown_distributed, d)
    device = pick_device(config.device if d.world == 1 or config.device != "auto" or not torch.cuda.is_available()
                         else f"cuda:{d.local_rank}")
    if d.world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", d.local_rank)  # DDP needs the concrete device of this rank
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    source = on_every_rank(lambda: build_source(config, d, stack), d)
    plan = plan_ranks(source, d)

    vae = VAE(VAEConfig(image_size=config.image_size, latent_dim=config.latent_dim, beta=config.beta)).to(device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=config.lr)
    start_epoch = 0
    ckpt_path = out / "checkpoint.pt"
    ckpt = None
    if config.resume and d.main and ckpt_path.is_file():
        # map_location cpu: load_state_dict copies to the device, and the object may travel to other ranks.
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    if config.resume and d.world > 1:
        # Only rank 0's OUT is sure to hold the checkpoint (other nodes may not share it); every rank
        # must resume from the same state and epoch, or the ranks would train different step counts.
        box = [ckpt]
        dist.broadcast_object_list(box, src=0)
        ckpt = box[0]
    if ckpt is not None:
        if ckpt["manifest_digest"] != plan.digest and not config.force_resume:
            raise ValueError(
                f"{ckpt_path} was trained on data {ckpt['manifest_digest'][:16]}..., this run uses "
                f"{plan.digest[:16]}... ({source.description}); pass --force-resume to continue anyway or use another --out"
            )
        vae.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch = int(ckpt["epoch"])
        if d.world == 1:  # under DDP the noise is reseeded per (epoch, rank) instead
            torch.set_rng_state(ckpt["rng_cpu"])
            if device.type == "cuda" and ckpt.get("rng_cuda") is not None:
                torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
    elif config.resume and d.main:
        print(f"--resume: no checkpoint in {out}, starting from scratch")

    model: nn.Module = _LossModule(vae)
    if d.world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    sampler = EpochBatchSampler(source.indices, batch=config.batch, seed=config.seed, split=plan.split,
                                num_samples=plan.num_samples)
    # A decoded-pack batch is one fancy index (microseconds); worker processes would only add the
    # shared-memory hand-off (measured: 212k images/s in-process vs 10k with -w 2), so packs are read
    # in the main process and -w applies to --pack off and --source s3.
    workers = 0 if isinstance(source.batches, PackedBatches) else config.workers
    if workers != config.workers and d.main:
        log.info("decoded pack: reading batches in the main process (-w %d applies to --pack off / --source s3)", config.workers)
    loader = DataLoader(
        source.batches,
        sampler=sampler,
        batch_size=None,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        pin_memory=device.type == "cuda",
    )
    metrics_path = _metrics_path(out, d)
    rows: list[dict[str, Any]] = [r for r in _read_metrics(metrics_path) if int(r["epoch"]) < start_epoch] if config.resume else []
    atomic_write_bytes(metrics_path, _rows_to_csv(rows))
    iteration = len(rows)
    use_amp = config.amp and device.type == "cuda"
    epoch_times: list[float] = []
    images = 0
    skipped: set[int] = set(source.bad_at_build)
    sums = {"dataloading_time": 0.0, "batch_time": 0.0}
    t_train = time.perf_counter()

    from tqdm import tqdm

    for epoch in range(start_epoch, config.epochs):
        sampler.set_epoch(epoch)
        if d.world > 1:
            torch.manual_seed(rank_seed(config.seed, epoch, d.rank))
        model.train()
        t_epoch = time.perf_counter()
        new_rows: list[dict[str, Any]] = []
        bar = tqdm(total=len(sampler), desc=f"epoch {epoch + 1}/{config.epochs}", unit="it", disable=not (config.progress and d.main),
                   dynamic_ncols=True, leave=True)
        it = iter(loader)
        epoch_images = 0
        epoch_wait = 0.0
        # With --on-bad-sample skip a rank may drop a whole batch and take one step fewer; Join lets
        # the ranks that run out first shadow the others' all-reduces instead of hanging.
        uneven = Join([model]) if d.world > 1 and config.on_bad_sample == "skip" else contextlib.nullcontext()
        with uneven:
            while True:
                t0 = time.perf_counter()
                try:
                    x, _, bad_indices = next(it)
                except StopIteration:
                    break
                skipped.update(int(i) for i in bad_indices)
                if len(x) == 0:
                    continue
                x = x.to(device, non_blocking=True)
                t1 = time.perf_counter()
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                    parts = model(x)
                parts.total.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss = float(parts.total.item())
                t2 = time.perf_counter()
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at iteration {iteration}; lower --lr or --beta")
                row = {"epoch": epoch, "iteration": iteration, "dataloading_time": f"{t1 - t0:.6f}",
                       "training_time": f"{t2 - t1:.6f}", "batch_time": f"{t2 - t0:.6f}", "loss": f"{loss:.6f}",
                       "recon": f"{parts.recon.item():.6f}", "kl": f"{parts.kl.item():.6f}"}
                new_rows.append(row)
                iteration += 1
                images += len(x)
                epoch_images += len(x)
                epoch_wait += t1 - t0
                sums["dataloading_time"] += t1 - t0
                sums["batch_time"] += t2 - t0
                elapsed = time.perf_counter() - t_epoch
                bar.set_postfix(loss=f"{loss:.1f}", img_s=f"{epoch_images / max(elapsed, 1e-9):.0f}",
                                wait=f"{100 * epoch_wait / max(elapsed, 1e-9):.1f}%", refresh=False)
                bar.update(1)
        bar.close()
        epoch_times.append(time.perf_counter() - t_epoch)
        rows.extend(new_rows)
        with open(metrics_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRIC_COLUMNS, lineterminator="\n").writerows(new_rows)
        if d.main:
            save_checkpoint(ckpt_path, {
                "model": vae.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                "config": asdict(config), "vae_config": vae.config.to_dict(), "manifest_digest": plan.digest,
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            })
            _pictures(vae, source, out, device, config.seed, rows)

    train_s = time.perf_counter() - t_train
    totals = torch.tensor([float(images)], dtype=torch.float64)
    wall = torch.tensor([train_s], dtype=torch.float64)
    if d.world > 1:
        dist.all_reduce(totals)
        dist.all_reduce(wall, op=dist.ReduceOp.MAX)
    param_digests = _gather(state_digest(vae), d)
    images_by_rank = _gather(images, d)
    skipped_keys = sorted({k for keys in _gather([source.key(i) for i in skipped], d) for k in keys})
    if len(set(param_digests)) > 1:
        log.warning("parameters differ between ranks after training: %s", param_digests)
    losses = [float(r["loss"]) for r in rows]
    last_epoch = [float(r["loss"]) for r in rows if int(r["epoch"]) == config.epochs - 1]
    first50 = float(np.mean(losses[:50])) if losses else float("nan")
    summary = {
        "device": str(device),
        "world_size": d.world,
        "source": config.source,
        "data": source.description,
        "data_digest": plan.digest,
        "data_shards": plan.shards,
        "epochs_run": len(epoch_times),
        "iterations": iteration,
        "images": int(totals[0]),
        "images_by_rank": images_by_rank,
        "images_per_s": float(totals[0]) / max(float(wall[0]), 1e-9),
        "epoch_times_s": [round(t, 3) for t in epoch_times],
        "training_cost_s": round(float(wall[0]), 3),
        "network_cost_s": (source.network or {}).get("seconds"),
        "network": source.network,
        "data_wait_share": sums["dataloading_time"] / max(sums["batch_time"], 1e-12),
        "loss_first50_mean": first50,
        "loss_last_epoch_mean": float(np.mean(last_epoch)) if last_epoch else float("nan"),
        "bad_samples_skipped": len(skipped_keys),
        "skipped_keys": skipped_keys,
        "ignored_keys": len(source.ignored),
        "ignored_examples": [source.key(i) for i in source.ignored[:5]],
        "extensions": list(config.extensions),
        "param_sha256": param_digests[0],
        "param_sha256_by_rank": param_digests,
        "params_identical": len(set(param_digests)) == 1,
        "config": asdict(config),
    }
    summary["loss_ratio"] = summary["loss_last_epoch_mean"] / first50 if losses else float("nan")
    if d.main:
        atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2).encode())
    if d.world > 1:
        dist.barrier()
    return summary


def report(summary: dict[str, Any], out: str) -> str:
    """The printed report of a run."""
    lines = [
        f"trained on {summary['data']} ({summary['source']}) on {summary['device']} x{summary['world_size']}",
        f"  {summary['images']} images in {summary['training_cost_s']:.1f} s: {summary['images_per_s']:.0f} images/s; "
        f"epoch times {', '.join(f'{t:.1f}' for t in summary['epoch_times_s'])} s",
        f"  data-wait share {100 * summary['data_wait_share']:.1f}% of step time",
        f"  loss: first 50 iterations {summary['loss_first50_mean']:.1f} -> last epoch {summary['loss_last_epoch_mean']:.1f} "
        f"(ratio {summary['loss_ratio']:.2f})",
    ]
    net = summary.get("network")
    if net:
        runs = f"{net['runs']} fetch run{'s' if net['runs'] != 1 else ''}"
        lines.append(f"  network cost {net['seconds']:.1f} s for {net['bytes'] / 1e6:.1f} MB ({net['objects']} objects, {runs} "
                     f"that downloaded; no-op re-fetches excluded) vs training cost {summary['training_cost_s']:.1f} s")
    if summary["ignored_keys"]:
        shown = ", ".join(repr(k) for k in summary["ignored_examples"][:3])
        lines.append(f"  ignored {summary['ignored_keys']} keys without an image extension ({shown}"
                     f"{', ...' if summary['ignored_keys'] > 3 else ''}); --extensions changes the list")
    if summary["bad_samples_skipped"]:
        keys = summary["skipped_keys"]
        shown = ", ".join(repr(k) for k in keys[:5]) + (", ..." if len(keys) > 5 else "")
        lines.append(f"  skipped {summary['bad_samples_skipped']} bad samples: {shown} (all in summary.json skipped_keys)")
    if summary["world_size"] > 1:
        shards = f"shards {', '.join(summary['data_shards'])}" if summary["data_shards"] else "full manifest on every rank"
        same = "identical" if summary["params_identical"] else "DIFFERENT (see summary.json param_sha256_by_rank)"
        lines.append(f"  DDP: {summary['world_size']} ranks ({shards}); images per rank {summary['images_by_rank']}; "
                     f"parameters {same} on all ranks; metrics.rank<R>.csv per rank")
    lines.append(f"  outputs: {out}/metrics.csv checkpoint.pt reconstructions.png samples.png loss.png summary.json")
    return "\n".join(lines)
