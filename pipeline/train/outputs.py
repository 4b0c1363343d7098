"""What a training run leaves in ``--out``: metrics CSV, checkpoint, pictures, and the summary.

* ``metrics.csv`` (rank 0) / ``metrics.rank<R>.csv``: one row per iteration (:data:`METRIC_COLUMNS`),
  appended after every epoch; a resumed run keeps the rows of the epochs it does not redo.
* ``checkpoint.pt`` (rank 0, every epoch): model, optimizer, epoch, config, data digest, RNG state.
* ``reconstructions.png``, ``samples.png``, ``loss.png`` (rank 0, every epoch).
* ``summary.json`` (rank 0): :class:`TrainSummary`, whose :meth:`TrainSummary.report` is the
  printed report.

Checkpoints, pictures and the summary are written atomically (temp file, fsync, rename).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from cache.atomic import atomic_write_bytes, atomic_writer
from pipeline.train.distributed import DistState
from pipeline.train.model import VAE

METRIC_COLUMNS = ("epoch", "iteration", "dataloading_time", "training_time", "batch_time", "loss", "recon", "kl")
CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"


class MetricsLog:
    """This rank's metrics CSV, and its rows in memory (the loss picture and the summary read them)."""

    def __init__(self, out: Path, dist_state: DistState, *, keep_before_epoch: int | None) -> None:
        """Start the file: with ``keep_before_epoch`` (a resume) it keeps the rows of the earlier epochs."""
        self.path = out / ("metrics.csv" if dist_state.rank == 0 else f"metrics.rank{dist_state.rank}.csv")
        old = self._read() if keep_before_epoch is not None else []
        self.rows: list[dict[str, Any]] = [r for r in old if int(r["epoch"]) < (keep_before_epoch or 0)]
        atomic_write_bytes(self.path, self._csv(self.rows))

    def _read(self) -> list[dict[str, str]]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    @staticmethod
    def _csv(rows: Sequence[dict[str, Any]]) -> bytes:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue().encode()

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        """Add one epoch's rows, to memory and to the file."""
        self.rows.extend(rows)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRIC_COLUMNS, lineterminator="\n").writerows(rows)

    def losses(self, epoch: int | None = None) -> list[float]:
        """The loss of every row (of ``epoch`` only, when given)."""
        return [float(r["loss"]) for r in self.rows if epoch is None or int(r["epoch"]) == epoch]


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_writer(path) as f:
        torch.save(state, f)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path``, on the CPU, or None when there is none."""
    if not path.is_file():
        return None
    # map_location cpu: load_state_dict copies to the device, and the object may travel to other ranks.
    return torch.load(path, map_location="cpu", weights_only=False)


def save_pictures(
    vae: VAE, preview: torch.Tensor, out: Path, device: torch.device, seed: int, metrics: MetricsLog
) -> None:
    """``reconstructions.png`` of ``preview``, ``samples.png`` from the prior, ``loss.png`` of the rows."""
    from pipeline.train.plots import save_loss_curve, save_reconstructions, save_samples

    was_training = vae.training
    vae.eval()
    with torch.no_grad():
        if len(preview):
            x = preview.to(device)
            recon, _, _ = vae(x)
            save_reconstructions(x.cpu(), recon.float().cpu(), out / "reconstructions.png")
        g = torch.Generator(device=device).manual_seed(seed)
        save_samples(vae.sample(64, generator=g).float().cpu(), out / "samples.png")
    vae.train(was_training)
    if metrics.rows:
        save_loss_curve(metrics.losses(), [int(r["epoch"]) for r in metrics.rows], out / "loss.png")


@dataclass(frozen=True, kw_only=True)
class TrainSummary:
    """What a run did; ``summary.json`` holds these fields under these names (rank 0 writes it)."""

    device: str
    world_size: int
    source: str
    data: str
    data_digest: str
    data_shards: list[str]
    epochs_run: int
    iterations: int
    images: int
    images_by_rank: list[int]
    images_per_s: float
    epoch_times_s: list[float]
    training_cost_s: float
    network_cost_s: float | None
    network: dict[str, Any] | None
    data_wait_share: float
    loss_first50_mean: float
    loss_last_epoch_mean: float
    bad_samples_skipped: int
    skipped_keys: list[str]
    ignored_keys: int
    ignored_examples: list[str]
    extensions: list[str]
    labels: str
    param_sha256: str
    param_sha256_by_rank: list[str]
    params_identical: bool
    config: dict[str, Any]
    loss_ratio: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, out: Path) -> None:
        atomic_write_bytes(out / SUMMARY, json.dumps(self.to_json(), indent=2).encode())

    def report(self, out: str | Path) -> str:
        """The printed report of the run (``out``: the output folder, as the user named it)."""
        lines = [
            f"trained on {self.data} ({self.source}) on {self.device} x{self.world_size}",
            f"  {self.images} images in {self.training_cost_s:.1f} s: {self.images_per_s:.0f} images/s; "
            f"epoch times {', '.join(f'{t:.1f}' for t in self.epoch_times_s)} s",
            f"  data-wait share {100 * self.data_wait_share:.1f}% of step time",
            f"  loss: first 50 iterations {self.loss_first50_mean:.1f} -> last epoch {self.loss_last_epoch_mean:.1f} "
            f"(ratio {self.loss_ratio:.2f})",
        ]
        if self.labels:
            lines.append(f"  {self.labels}")
        if self.network:
            net = self.network
            runs = f"{net['runs']} fetch run{'s' if net['runs'] != 1 else ''}"
            lines.append(
                f"  network cost {net['seconds']:.1f} s for {net['bytes'] / 1e6:.1f} MB "
                f"({net['objects']} objects, {runs} "
                f"that downloaded; no-op re-fetches excluded) vs training cost {self.training_cost_s:.1f} s"
            )
        if self.ignored_keys:
            shown = ", ".join(repr(k) for k in self.ignored_examples[:3])
            lines.append(
                f"  ignored {self.ignored_keys} keys without an image extension ({shown}"
                f"{', ...' if self.ignored_keys > 3 else ''}); --extensions changes the list"
            )
        if self.bad_samples_skipped:
            shown = ", ".join(repr(k) for k in self.skipped_keys[:5]) + (", ..." if len(self.skipped_keys) > 5 else "")
            lines.append(
                f"  skipped {self.bad_samples_skipped} bad samples: {shown} (all in summary.json skipped_keys)"
            )
        if self.world_size > 1:
            shards = f"shards {', '.join(self.data_shards)}" if self.data_shards else "full manifest on every rank"
            same = "identical" if self.params_identical else "DIFFERENT (see summary.json param_sha256_by_rank)"
            lines.append(
                f"  DDP: {self.world_size} ranks ({shards}); images per rank {self.images_by_rank}; "
                f"parameters {same} on all ranks; metrics.rank<R>.csv per rank"
            )
        lines.append(f"  outputs: {out}/metrics.csv {CHECKPOINT} reconstructions.png samples.png loss.png {SUMMARY}")
        return "\n".join(lines)
