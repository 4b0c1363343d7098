"""What the DataLoader iterates: batch datasets and the epoch batch sampler.

A batch dataset is indexed by a whole list of sample indices and returns ``(images, labels, bad)``:
:class:`PackedBatches` cuts a batch out of a decoded pack with one fancy index, :class:`SampleBatches`
stacks samples of a per-sample dataset (``bad``: the indices it skipped, with ``--on-bad-sample skip``).
:class:`EpochBatchSampler` yields those index lists, reshuffled per epoch from (seed, epoch) alone so that a
resumed run sees exactly the batches of an uninterrupted one. Training (``pipeline.train.loop``) and the
benchmarks (``bench/``) use these same classes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import BatchSampler, Dataset, DistributedSampler, Sampler

log = logging.getLogger(__name__)


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

    def __init__(
        self,
        indices: np.ndarray,
        *,
        batch: int,
        seed: int,
        split: tuple[int, int] | None = None,
        num_samples: int | None = None,
    ) -> None:
        self.indices = indices
        self.batch = batch
        self.seed = seed
        self.epoch = 0
        self.dist_sampler: DistributedSampler[int] | None = None
        if split is not None:
            replica, replicas = split
            self.dist_sampler = DistributedSampler(
                # torch's stub asks for a Dataset; DistributedSampler only takes len() of it, which a range has
                range(len(indices)),  # type: ignore[arg-type]
                num_replicas=replicas,
                rank=replica,
                shuffle=True,
                seed=seed,
            )
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
