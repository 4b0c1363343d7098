"""The VAE training loop: setup, resume, epochs, summary.

Loop order is forward, backward, step, ``zero_grad(set_to_none=True)`` (the research code zeroed the
gradients just before ``step()``, so it never learned). Every iteration is timed the way the research
code did it: ``dataloading_time`` (waiting for the batch and moving it to the device), ``training_time``
(forward, backward, step) and their sum ``batch_time``. Under torchrun (``WORLD_SIZE`` > 1) the model
is wrapped in DDP and only rank 0 prints, draws and checkpoints.

The rooms around the loop: :mod:`pipeline.config` (``TrainConfig``), :mod:`pipeline.train.sources` (which
data), :mod:`pipeline.data.batches` (batches and the sampler), :mod:`pipeline.train.distributed` (ranks and
collectives), :mod:`pipeline.train.outputs` (metrics, checkpoint, pictures, summary).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.distributed.algorithms.join import Join
from torch.utils.data import DataLoader, Sampler

from pipeline.config import DeviceKind, OnBadSample, TrainConfig
from pipeline.data.batches import EpochBatchSampler, PackedBatches
from pipeline.train.distributed import (
    DistState,
    RankPlan,
    barrier,
    from_rank0,
    gather,
    init_distributed,
    on_every_rank,
    plan_ranks,
    rank_seed,
    reduce_totals,
    shutdown_distributed,
    state_digest,
)
from pipeline.train.model import VAE, VAEConfig
from pipeline.train.outputs import CHECKPOINT, MetricsLog, TrainSummary, load_checkpoint, save_checkpoint, save_pictures
from pipeline.train.sources import DataSource, build_source

if TYPE_CHECKING:
    from pipeline.data.readahead import ReadAheadSampler

__all__ = ["TrainConfig", "TrainSummary", "pick_device", "train"]

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA, then MPS, then CPU; otherwise the named device (checked to exist)."""
    if name == DeviceKind.AUTO:
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


def _rank_device(config: TrainConfig, dist_state: DistState) -> torch.device:
    """The device of this rank: under DDP on CUDA, the rank's own GPU (DDP needs a concrete index)."""
    ddp_cuda = dist_state.world > 1 and config.device_kind is DeviceKind.AUTO and torch.cuda.is_available()
    device = pick_device(f"cuda:{dist_state.local_rank}" if ddp_cuda else config.device)
    if dist_state.world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist_state.local_rank)
    return device


class _LossModule(nn.Module):
    """forward(x) -> VAELoss, so DDP sees the loss computation as the module's forward."""

    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor):
        return self.vae.loss(x)[1]


@dataclass(kw_only=True)
class _Totals:
    """What the epochs add up, on this rank."""

    iteration: int = 0
    images: int = 0
    skipped: set[int] = field(default_factory=set)  # indices of bad samples, each counted once
    wait_s: float = 0.0
    batch_s: float = 0.0
    epoch_times: list[float] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class _Run:
    """The fixed parts of one run that every epoch uses."""

    config: TrainConfig
    dist_state: DistState
    device: torch.device
    out: Path
    source: DataSource
    plan: RankPlan


def train(config: TrainConfig) -> TrainSummary:
    """Train the VAE as configured; return the summary (also written to ``OUT/summary.json``)."""
    with contextlib.ExitStack() as stack:
        return _train(config, stack)


def _train(config: TrainConfig, stack: contextlib.ExitStack) -> TrainSummary:
    # setup
    if config.threads:
        torch.set_num_threads(config.threads)
    dist_state = init_distributed(config.device)
    stack.callback(shutdown_distributed, dist_state)
    device = _rank_device(config, dist_state)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    source = on_every_rank(lambda: build_source(config, dist_state, stack), dist_state)
    run = _Run(
        config=config,
        dist_state=dist_state,
        device=device,
        out=out,
        source=source,
        plan=plan_ranks(source.share(), dist_state),
    )
    vae = VAE(VAEConfig(image_size=config.image_size, latent_dim=config.latent_dim, beta=config.beta)).to(device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=config.lr)

    # resume
    start_epoch = _resume(run, vae, optimizer)
    model: nn.Module = _LossModule(vae)
    if dist_state.world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    sampler: EpochBatchSampler | ReadAheadSampler = EpochBatchSampler(
        source.indices, batch=config.batch, seed=config.seed, split=run.plan.split, num_samples=run.plan.num_samples
    )
    if source.read_ahead is not None:
        # Streaming: the same batches, tagged, so every worker knows its next ones and GETs them ahead.
        sampler = source.read_ahead(sampler)
    loader = _loader(run, sampler)
    metrics = MetricsLog(out, dist_state, keep_before_epoch=start_epoch if config.resume else None)
    totals = _Totals(iteration=len(metrics.rows), skipped=set(source.bad_at_build))

    # epochs
    t_train = time.perf_counter()
    for epoch in range(start_epoch, config.epochs):
        sampler.set_epoch(epoch)
        if dist_state.world > 1:
            torch.manual_seed(rank_seed(config.seed, epoch, dist_state.rank))
        t_epoch = time.perf_counter()
        rows = _run_epoch(run, model, optimizer, loader, epoch, totals)
        totals.epoch_times.append(time.perf_counter() - t_epoch)
        if source.epoch_done is not None:
            source.epoch_done(epoch)
        metrics.append(rows)
        if dist_state.main:
            save_checkpoint(
                out / CHECKPOINT,
                {
                    "model": vae.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch + 1,
                    "config": asdict(config),
                    "vae_config": vae.config.to_dict(),
                    "manifest_digest": run.plan.digest,
                    "rng_cpu": torch.get_rng_state(),
                    "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                },
            )
            save_pictures(vae, source.batches[source.preview][0], out, device, config.seed, metrics)

    # summary
    summary = _summarize(run, vae, metrics, totals, time.perf_counter() - t_train)
    if dist_state.main:
        summary.write(out)
    barrier(dist_state)
    return summary


def _resume(run: _Run, vae: VAE, optimizer: torch.optim.Optimizer) -> int:
    """Load ``OUT/checkpoint.pt`` into the model and optimizer when ``--resume``; the epoch to start at."""
    config, dist_state, path = run.config, run.dist_state, run.out / CHECKPOINT
    if not config.resume:
        return 0
    # Only rank 0's OUT is sure to hold the checkpoint (other nodes may not share it); every rank must
    # resume from the same state and epoch, or the ranks would train different step counts.
    ckpt = from_rank0(load_checkpoint(path) if dist_state.main else None, dist_state)
    if ckpt is None:
        if dist_state.main:
            print(f"--resume: no checkpoint in {run.out}, starting from scratch")
        return 0
    if ckpt["manifest_digest"] != run.plan.digest and not config.force_resume:
        raise ValueError(
            f"{path} was trained on data {ckpt['manifest_digest'][:16]}..., this run uses "
            f"{run.plan.digest[:16]}... ({run.source.description}); "
            "pass --force-resume to continue anyway or use another --out"
        )
    vae.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if dist_state.world == 1:  # under DDP the noise is reseeded per (epoch, rank) instead
        torch.set_rng_state(ckpt["rng_cpu"])
        if run.device.type == "cuda" and ckpt.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], run.device)
    return int(ckpt["epoch"])


def _loader(run: _Run, sampler: Sampler) -> DataLoader:
    # A decoded-pack batch is one fancy index (microseconds); worker processes would only add the
    # shared-memory hand-off (measured: 212k images/s in-process vs 10k with -w 2), so packs are read
    # in the main process and -w applies to --pack off and --source s3.
    config = run.config
    workers = 0 if isinstance(run.source.batches, PackedBatches) else config.workers
    if workers != config.workers and run.dist_state.main:
        log.info(
            "decoded pack: reading batches in the main process (-w %d applies to --pack off / --source s3)",
            config.workers,
        )
    return DataLoader(
        run.source.batches,
        sampler=sampler,
        batch_size=None,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        pin_memory=run.device.type == "cuda",
    )


def _run_epoch(
    run: _Run, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, epoch: int, totals: _Totals
) -> list[dict[str, Any]]:
    """One epoch of forward, backward, step, zero_grad; the epoch's metric rows (``totals`` adds up)."""
    from tqdm import tqdm

    config, device = run.config, run.device
    use_amp = config.amp and device.type == "cuda"
    model.train()
    t_epoch = time.perf_counter()
    rows: list[dict[str, Any]] = []
    bar = tqdm(
        total=len(loader),
        desc=f"epoch {epoch + 1}/{config.epochs}",
        unit="it",
        disable=not (config.progress and run.dist_state.main),
        dynamic_ncols=True,
        leave=True,
    )
    batches = iter(loader)
    epoch_images = 0
    epoch_wait = 0.0
    # With --on-bad-sample skip a rank may drop a whole batch and take one step fewer; Join lets
    # the ranks that run out first shadow the others' all-reduces instead of hanging.
    uneven = (
        Join([model])  # type: ignore[list-item]  # model is the DDP wrapper, a Joinable, whenever world > 1
        if run.dist_state.world > 1 and config.on_bad_sample is OnBadSample.SKIP
        else contextlib.nullcontext()
    )
    with uneven:
        while True:
            t0 = time.perf_counter()
            try:
                x, _, bad_indices = next(batches)
            except StopIteration:
                break
            totals.skipped.update(int(i) for i in bad_indices)
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
                raise FloatingPointError(f"loss became {loss} at iteration {totals.iteration}; lower --lr or --beta")
            rows.append(
                {
                    "epoch": epoch,
                    "iteration": totals.iteration,
                    "dataloading_time": f"{t1 - t0:.6f}",
                    "training_time": f"{t2 - t1:.6f}",
                    "batch_time": f"{t2 - t0:.6f}",
                    "loss": f"{loss:.6f}",
                    "recon": f"{parts.recon.item():.6f}",
                    "kl": f"{parts.kl.item():.6f}",
                }
            )
            totals.iteration += 1
            totals.images += len(x)
            totals.wait_s += t1 - t0
            totals.batch_s += t2 - t0
            epoch_images += len(x)
            epoch_wait += t1 - t0
            elapsed = max(time.perf_counter() - t_epoch, 1e-9)
            bar.set_postfix(
                loss=f"{loss:.1f}",
                img_s=f"{epoch_images / elapsed:.0f}",
                wait=f"{100 * epoch_wait / elapsed:.1f}%",
                refresh=False,
            )
            bar.update(1)
    bar.close()
    return rows


def _summarize(run: _Run, vae: VAE, metrics: MetricsLog, totals: _Totals, train_s: float) -> TrainSummary:
    """The run's summary, from every rank's figures (collectives: every rank calls it)."""
    dist_state = run.dist_state
    source = run.source
    (images,) = reduce_totals([float(totals.images)], dist_state)
    (wall,) = reduce_totals([train_s], dist_state, op="max")
    param_digests = gather(state_digest(vae), dist_state)
    images_by_rank = gather(totals.images, dist_state)
    skipped_keys = sorted({k for keys in gather([source.key(i) for i in totals.skipped], dist_state) for k in keys})
    if len(set(param_digests)) > 1:
        log.warning("parameters differ between ranks after training: %s", param_digests)
    losses = metrics.losses()
    last_epoch = metrics.losses(epoch=run.config.epochs - 1)
    first50 = float(np.mean(losses[:50])) if losses else float("nan")
    last_mean = float(np.mean(last_epoch)) if last_epoch else float("nan")
    return TrainSummary(
        device=str(run.device),
        world_size=dist_state.world,
        source=run.config.source,
        data=source.description,
        data_digest=run.plan.digest,
        data_shards=run.plan.shards,
        epochs_run=len(totals.epoch_times),
        iterations=totals.iteration,
        images=int(images),
        images_by_rank=images_by_rank,
        images_per_s=images / max(wall, 1e-9),
        epoch_times_s=[round(t, 3) for t in totals.epoch_times],
        training_cost_s=round(wall, 3),
        network_cost_s=(source.network or {}).get("seconds"),
        network=source.network,
        data_wait_share=totals.wait_s / max(totals.batch_s, 1e-12),
        loss_first50_mean=first50,
        loss_last_epoch_mean=last_mean,
        bad_samples_skipped=len(skipped_keys),
        skipped_keys=skipped_keys,
        ignored_keys=len(source.ignored),
        ignored_examples=[source.key(i) for i in source.ignored[:5]],
        extensions=list(run.config.extensions),
        labels=source.labels,
        param_sha256=param_digests[0],
        param_sha256_by_rank=param_digests,
        params_identical=len(set(param_digests)) == 1,
        config=asdict(run.config),
        loss_ratio=last_mean / first50 if losses else float("nan"),
    )
