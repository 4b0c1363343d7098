"""The VAE training loop: data source, DataLoader, loop, metrics, checkpoints, pictures, report.

Loop order is forward, backward, step, ``zero_grad(set_to_none=True)`` (the research code zeroed the
gradients just before ``step()``, so it never learned). Every iteration is timed the way the research
code did it: ``dataloading_time`` (waiting for the batch and moving it to the device), ``training_time``
(forward, backward, step) and their sum ``batch_time``; they go to ``metrics.csv`` one row per
iteration. Under torchrun (``WORLD_SIZE`` > 1) the model is wrapped in DDP; only rank 0 prints,
draws and checkpoints.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler

from cache.atomic import atomic_write_bytes, atomic_writer
from cache.layout import CacheLayout
from cache.manifest import ManifestArrays, latest_manifest, list_manifests, load_manifest, read_manifest_header
from pipeline.model import VAE, VAEConfig

log = logging.getLogger(__name__)

METRIC_COLUMNS = ("epoch", "iteration", "dataloading_time", "training_time", "batch_time", "loss", "recon", "kl")
SOURCES = ("cache", "s3")
PACK_MODES = ("auto", "on", "off")
BAD_SAMPLE_MODES = ("stop", "skip")


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

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs={self.epochs} must be >= 1 (-e/--epochs)"),
            (self.batch >= 1, f"batch={self.batch} must be >= 1 (-b/--batch)"),
            (0 <= self.workers <= 64, f"workers={self.workers} must be between 0 and 64 (-w/--workers)"),
            (self.clients >= 1, f"clients={self.clients} must be >= 1 (-c/--clients)"),
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
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> Dist:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda") or device_name.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank)


def agree(ok: bool, message: str, d: Dist) -> None:
    """Raise ``message`` on every rank when any rank says not ``ok`` (so no rank waits forever)."""
    if d.world > 1:
        flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
        dist.all_reduce(flag)
        if int(flag.item()):
            raise FileNotFoundError(message if not ok else f"another rank failed: {message}")
    elif not ok:
        raise FileNotFoundError(message)


# -- data ------------------------------------------------------------------------------------------------


class PackedBatches(Dataset):
    """Batches straight out of a decoded pack: one fancy index, one conversion per batch."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        idx = np.asarray(indices, dtype=np.int64)
        x = torch.from_numpy(np.ascontiguousarray(self.images[idx])).float().div_(255.0)
        return x, torch.from_numpy(self.labels[idx]), 0


class SampleBatches(Dataset):
    """Batches built from a per-sample dataset (``CachedImageDataset`` or ``DSSDataset``)."""

    def __init__(self, dataset: Dataset, *, skip_bad: bool) -> None:
        self.dataset = dataset
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        if not self.skip_bad:
            getitems = getattr(self.dataset, "__getitems__", None)
            samples = getitems(list(indices)) if getitems else [self.dataset[i] for i in indices]
            bad = 0
        else:
            samples = []
            for i in indices:
                try:
                    samples.append(self.dataset[i])
                except ValueError as e:
                    log.warning("skipping %s", e)
            bad = len(indices) - len(samples)
        if not samples:
            return torch.empty(0), torch.empty(0, dtype=torch.int64), bad
        xs, ys = zip(*samples)
        return torch.stack(xs), torch.tensor(ys, dtype=torch.int64), bad


class EpochBatchSampler(Sampler[list[int]]):
    """Shuffled batches, reshuffled by ``set_epoch`` from (seed, epoch) alone, so a resumed run sees
    exactly the batches an uninterrupted run would. Under DDP it splits through ``DistributedSampler``."""

    def __init__(self, indices: np.ndarray, *, batch: int, seed: int, d: Dist, distributed_split: bool) -> None:
        self.indices = indices
        self.batch = batch
        self.seed = seed
        self.epoch = 0
        self.dist_sampler = (
            DistributedSampler(range(len(indices)), num_replicas=d.world, rank=d.rank, shuffle=True, seed=seed)
            if distributed_split and d.world > 1 else None
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.dist_sampler is not None:
            self.dist_sampler.set_epoch(epoch)

    def _order(self) -> list[int]:
        if self.dist_sampler is not None:
            return [int(self.indices[i]) for i in self.dist_sampler]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return [int(self.indices[i]) for i in torch.randperm(len(self.indices), generator=g)]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(BatchSampler(self._order(), self.batch, drop_last=False))

    def __len__(self) -> int:
        n = len(self.dist_sampler) if self.dist_sampler is not None else len(self.indices)
        return (n + self.batch - 1) // self.batch


@dataclass(kw_only=True)
class DataSource:
    """The batch dataset, the indices to sample, and what identifies the data (for checkpoints)."""

    batches: Dataset
    indices: np.ndarray
    digest: str
    description: str
    manifest: ManifestArrays | None = None
    fetch_wall_s: float | None = None
    bad_at_build: int = 0
    sharded: bool = False
    preview: list[int] = field(default_factory=list)


def find_manifest(config: TrainConfig) -> Path:
    """``--manifest``, else the newest manifest of ``--prefix``, else the newest manifest of the cache."""
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
                f"no manifest for {uri} in {layout.manifests}; run `make fetch PREFIX={uri}` first"
            )
        return matches[-1]
    return latest_manifest(layout)


def build_source(config: TrainConfig, d: Dist) -> DataSource:
    """The training data: the cache (decoded pack or blobs) or S3 streaming (``--source s3``)."""
    skip = config.on_bad_sample == "skip"
    if config.source == "s3":
        from pipeline.config import ClientOptions, resolve_endpoint
        from pipeline.datasets import DSSDataset

        prefix, endpoint = config.prefix, config.endpoint
        if prefix is None:
            h = read_manifest_header(find_manifest(config))
            prefix = f"s3://{h.bucket}/{h.prefix}"
            endpoint = endpoint or (h.endpoint if h.endpoint.startswith("http") else None)
        ds = DSSDataset(prefix, options=ClientOptions(endpoint=resolve_endpoint(endpoint)), client_num=config.clients,
                        load2memory=True, image_size=config.image_size)
        n = len(ds)
        return DataSource(batches=SampleBatches(ds, skip_bad=skip), indices=np.arange(n), digest=f"s3:{prefix}",
                          description=f"{prefix} (streaming, {n} objects)", preview=list(range(min(8, n))))

    from pipeline.datasets import CachedImageDataset

    path = find_manifest(config)
    agree(path.is_file(), f"manifest {path} not found on rank {d.rank}; run `make fetch` on every node", d)
    manifest = load_manifest(path)
    ds = CachedImageDataset(manifest, cache_dir=config.cache_dir, image_size=config.image_size, check_blobs=True)
    fetch = manifest.header.extra.get("fetch") or {}
    src = DataSource(
        batches=SampleBatches(ds, skip_bad=skip), indices=np.arange(len(ds)), digest=manifest.header.records_sha256,
        description=f"{path.name} ({len(ds)} images)", manifest=manifest, fetch_wall_s=fetch.get("wall_s"),
        sharded=bool(manifest.header.extra.get("shard")),
    )
    if config.pack in ("auto", "on"):
        from pipeline.packs import load_or_build_pack

        pack = load_or_build_pack(ds, image_size=config.image_size, progress=config.progress and d.main, skip_bad=skip)
        src.batches = PackedBatches(pack.images, manifest.label)
        src.indices = np.setdiff1d(np.arange(len(ds)), np.asarray(pack.bad, dtype=np.int64))
        src.bad_at_build = len(pack.bad)
        src.description += f", decoded pack {pack.path.name}"
    src.preview = [int(i) for i in src.indices[:8]]
    return src


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
    d = init_distributed(config.device)
    device = pick_device(config.device if d.world == 1 or config.device != "auto" or not torch.cuda.is_available()
                         else f"cuda:{d.local_rank}")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    source = build_source(config, d)
    agree(len(source.indices) > 0, f"no usable samples in {source.description}", d)

    vae = VAE(VAEConfig(image_size=config.image_size, latent_dim=config.latent_dim, beta=config.beta)).to(device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=config.lr)
    start_epoch = 0
    ckpt_path = out / "checkpoint.pt"
    if config.resume and ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ckpt["manifest_digest"] != source.digest and not config.force_resume:
            raise ValueError(
                f"{ckpt_path} was trained on data {ckpt['manifest_digest'][:16]}..., this run uses "
                f"{source.digest[:16]}... ({source.description}); pass --force-resume to continue anyway or use another --out"
            )
        vae.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch = int(ckpt["epoch"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if device.type == "cuda" and ckpt.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
    elif config.resume and d.main:
        print(f"--resume: no checkpoint in {out}, starting from scratch")

    model: nn.Module = _LossModule(vae)
    if d.world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    sampler = EpochBatchSampler(source.indices, batch=config.batch, seed=config.seed, d=d,
                                distributed_split=not source.sharded)
    loader = DataLoader(
        source.batches,
        sampler=sampler,
        batch_size=None,
        num_workers=config.workers,
        persistent_workers=config.workers > 0,
        prefetch_factor=4 if config.workers > 0 else None,
        pin_memory=device.type == "cuda",
    )
    metrics_path = _metrics_path(out, d)
    rows: list[dict[str, Any]] = [r for r in _read_metrics(metrics_path) if int(r["epoch"]) < start_epoch] if config.resume else []
    atomic_write_bytes(metrics_path, _rows_to_csv(rows))
    iteration = len(rows)
    use_amp = config.amp and device.type == "cuda"
    epoch_times: list[float] = []
    images = 0
    bad = 0
    sums = {"dataloading_time": 0.0, "batch_time": 0.0}
    t_train = time.perf_counter()

    from tqdm import tqdm

    for epoch in range(start_epoch, config.epochs):
        sampler.set_epoch(epoch)
        model.train()
        t_epoch = time.perf_counter()
        new_rows: list[dict[str, Any]] = []
        bar = tqdm(total=len(sampler), desc=f"epoch {epoch + 1}/{config.epochs}", unit="it", disable=not (config.progress and d.main),
                   dynamic_ncols=True, leave=True)
        it = iter(loader)
        epoch_images = 0
        epoch_wait = 0.0
        while True:
            t0 = time.perf_counter()
            try:
                x, _, n_bad = next(it)
            except StopIteration:
                break
            bad += int(n_bad)
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
                "config": asdict(config), "vae_config": vae.config.to_dict(), "manifest_digest": source.digest,
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            })
            _pictures(vae, source, out, device, config.seed, rows)

    train_s = time.perf_counter() - t_train
    totals = torch.tensor([float(images), float(bad)], dtype=torch.float64)
    wall = torch.tensor([train_s], dtype=torch.float64)
    if d.world > 1:
        dist.all_reduce(totals)
        dist.all_reduce(wall, op=dist.ReduceOp.MAX)
    losses = [float(r["loss"]) for r in rows]
    last_epoch = [float(r["loss"]) for r in rows if int(r["epoch"]) == config.epochs - 1]
    first50 = float(np.mean(losses[:50])) if losses else float("nan")
    summary = {
        "device": str(device),
        "world_size": d.world,
        "source": config.source,
        "data": source.description,
        "data_digest": source.digest,
        "epochs_run": len(epoch_times),
        "iterations": iteration,
        "images": int(totals[0]),
        "images_per_s": float(totals[0]) / max(float(wall[0]), 1e-9),
        "epoch_times_s": [round(t, 3) for t in epoch_times],
        "training_cost_s": round(float(wall[0]), 3),
        "network_cost_s": source.fetch_wall_s,
        "data_wait_share": sums["dataloading_time"] / max(sums["batch_time"], 1e-12),
        "loss_first50_mean": first50,
        "loss_last_epoch_mean": float(np.mean(last_epoch)) if last_epoch else float("nan"),
        "bad_samples_skipped": int(totals[1]) + source.bad_at_build,
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
    if summary.get("network_cost_s") is not None:
        lines.append(f"  network cost (fetch wall time) {summary['network_cost_s']:.1f} s vs training cost {summary['training_cost_s']:.1f} s")
    if summary["bad_samples_skipped"]:
        lines.append(f"  skipped {summary['bad_samples_skipped']} bad samples")
    lines.append(f"  outputs: {out}/metrics.csv checkpoint.pt reconstructions.png samples.png loss.png summary.json")
    return "\n".join(lines)
