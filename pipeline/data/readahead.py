"""Read-ahead for the streaming ``DSSDataset``: which GETs a process starts before its batches are asked for.

Owns three pieces:

* :class:`ReadAheadSampler`: wraps a batch sampler whose order is a function of its epoch alone
  (:class:`~pipeline.data.batches.EpochBatchSampler`: seeded by seed and epoch) and tags every batch it yields
  with its sampler, epoch and number (:class:`TaggedBatch`). It hands the dataset a copy of that order
  (:class:`ReadAheadPlan`) before the DataLoader starts its workers, so every worker can recompute the
  epoch's batches on its own.
* :class:`ReadAheadPlan`: given a tagged batch, the sample indices of this worker's next ``prefetch``
  batches. torch's DataLoader deals batches round robin (batch ``b`` to worker ``b % num_workers``, the
  cycle restarting at worker 0 every epoch), so the worker that got batch ``b`` gets ``b + W``, ``b + 2W``...
  A batch that is not the one the plan says (another sampler, a changed order) gets no read-ahead:
  guessing wrong would only waste GETs, never change an item.
* :class:`Prefetcher`: the GETs of one process in flight on its event loop (:mod:`pipeline.transport.loop`),
  by sample index. Each batch is one call from the worker's thread: it drops what is no longer wanted,
  starts what of the batch is missing, waits for the batch alone, then starts the window's new keys.
  At most ``prefetch`` batches are in flight (or arrived and not yet asked for) per process, besides the
  batch being handed over; nothing crosses an epoch's end.

:class:`StreamBatches` is what training iterates over the streaming dataset: it passes the tagged batch
through whole (``SampleBatches`` would copy it into a plain list) and applies ``--on-bad-sample``.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from pipeline.transport import loop

log = logging.getLogger(__name__)


def _tagged(indices: list[int], token: str, epoch: int, number: int) -> TaggedBatch:
    return TaggedBatch(indices, token=token, epoch=epoch, number=number)


class TaggedBatch(list):
    """A batch of sample indices that says where it stands: its sampler (``token``), ``epoch`` and ``number``."""

    def __init__(self, indices: Iterable[int], *, token: str, epoch: int, number: int) -> None:
        super().__init__(int(i) for i in indices)
        self.token = token
        self.epoch = epoch
        self.number = number

    def __reduce__(self) -> tuple[Any, ...]:
        # Explicit, so the tag survives the DataLoader's index queue (pickled to the workers).
        return _tagged, (list(self), self.token, self.epoch, self.number)


class ReadAheadPlan:
    """A worker's copy of a sampler's order, to find the indices of its next batches."""

    def __init__(self, token: str, batches: Any) -> None:
        self.token = token
        self._batches = batches  # a private copy: set_epoch here never touches the live sampler
        self._epoch: int | None = None
        self._order: list[list[int]] = []

    def order(self, epoch: int) -> list[list[int]]:
        """The batches of ``epoch``, computed once per epoch and process."""
        if self._epoch != epoch:
            if hasattr(self._batches, "set_epoch"):
                self._batches.set_epoch(epoch)
            self._order = [[int(i) for i in b] for b in self._batches]
            self._epoch = epoch
        return self._order

    def ahead(self, batch: Sequence[int], *, workers: int, prefetch: int) -> list[int] | None:
        """The indices of batches ``number + workers``, ... ``number + prefetch * workers`` of the batch's
        epoch (those this worker gets next); None when ``batch`` is not this plan's, or not what it predicts."""
        if not isinstance(batch, TaggedBatch) or batch.token != self.token:
            return None
        order = self.order(batch.epoch)
        if not 0 <= batch.number < len(order) or order[batch.number] != list(batch):
            log.debug(
                "batch %d of epoch %d is not the one its sampler's order names: no read-ahead",
                batch.number,
                batch.epoch,
            )
            return None
        out: list[int] = []
        for k in range(1, prefetch + 1):
            number = batch.number + k * max(workers, 1)
            if number >= len(order):
                break  # nothing is read ahead across the epoch's end
            out.extend(order[number])
        return out


class ReadAheadSampler(Sampler[list[int]]):
    """Batches of ``batches`` (a batch sampler whose order is a function of its epoch), tagged for read-ahead.

    ``dataset`` (a ``DSSDataset``) gets the plan at once: create the sampler before the DataLoader's first
    ``iter()``, which starts the workers with the dataset as it is then. With any other sampler the dataset
    still fetches each batch concurrently, only without read-ahead.
    """

    def __init__(self, batches: Any, dataset: Any | None = None) -> None:
        self.batches = batches
        self.token = uuid.uuid4().hex[:12]
        self.epoch = 0
        self._on_close: list[Callable[[], None]] = []
        if dataset is not None:
            dataset.read_ahead_with(self)

    def plan(self) -> ReadAheadPlan:
        return ReadAheadPlan(self.token, copy.deepcopy(self.batches))

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when an epoch's iteration ends or is abandoned (drops this process's read-ahead)."""
        self._on_close.append(callback)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.batches, "set_epoch"):
            self.batches.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        try:
            for number, batch in enumerate(self.batches):
                yield TaggedBatch(batch, token=self.token, epoch=self.epoch, number=number)
        finally:
            for callback in self._on_close:
                callback()

    def __len__(self) -> int:
        return len(self.batches)


def _discard(task: asyncio.Future[Any]) -> None:
    """Cancel a task nobody will take; a finished one has its exception retrieved (no 'never retrieved' log)."""
    if not task.done():
        task.cancel()
    elif not task.cancelled():
        task.exception()


class Prefetcher:
    """One process's GETs in flight on its event loop, by sample index (``fetch(i)`` makes one).

    ``_tasks`` is touched on the loop's thread only; callers come in through :meth:`take` and :meth:`drop`.
    """

    def __init__(self, fetch: Callable[[int], Awaitable[Any]]) -> None:
        self._fetch = fetch
        self._tasks: dict[int, asyncio.Future[Any]] = {}
        self._taking: set[int] = set()  # the batch a take is waiting for: a drop leaves it alone
        self.peak = 0  # most objects held at once (in flight, or arrived and not yet taken)

    def take(self, now: Sequence[int], ahead: Sequence[int] = ()) -> list[Any]:
        """The results of ``now`` (a value or the exception it raised, in order), with ``ahead`` started
        behind them; everything else held is dropped."""
        return loop.run(self._take(list(now), list(ahead)))

    async def _take(self, now: list[int], ahead: list[int]) -> list[Any]:
        wanted = set(now).union(ahead)
        for i in [i for i in self._tasks if i not in wanted]:
            _discard(self._tasks.pop(i))
        self._start(now)
        distinct = list(dict.fromkeys(now))
        self._taking.update(distinct)
        try:
            results = await asyncio.gather(*(self._tasks[i] for i in distinct), return_exceptions=True)
        finally:
            self._taking.difference_update(distinct)
        got = dict(zip(distinct, results))
        for i in distinct:
            self._tasks.pop(i, None)
        # The batch asked for first: the window's new keys start once it is in (in steady state it was read
        # ahead and is in already), so a worker's first batch does not queue behind its read-ahead, and at most
        # `prefetch` batches are ever in flight. One turn of the loop sends them before the worker decodes.
        if self._start(ahead):
            await asyncio.sleep(0)
        return [got[i] for i in now]

    def _start(self, indices: Sequence[int]) -> bool:
        """Start the GETs of ``indices`` not yet held; whether any was started."""
        started = False
        for i in indices:
            if i not in self._tasks:
                self._tasks[i] = asyncio.ensure_future(self._fetch(i))
                started = True
        self.peak = max(self.peak, len(self._tasks))
        return started

    def held(self) -> int:
        """Objects in flight or arrived and not taken (0 after an epoch's last batch)."""
        return len(self._tasks)

    def drop(self) -> None:
        """Cancel everything in flight (an epoch abandoned, a worker done). Safe from any thread, the loop's
        included (a generator closed by the garbage collector may run it there): it only schedules the work."""
        loop.LoopThread.get().loop.call_soon_threadsafe(self._drop)

    def _drop(self) -> None:
        for i in [i for i in self._tasks if i not in self._taking]:
            _discard(self._tasks.pop(i))


class StreamBatches(Dataset):
    """Training's batches over a streaming ``DSSDataset``: stacked ``(images, labels, bad)``, the batch passed on
    whole (with its read-ahead tag); ``skip_bad``: undecodable images are skipped and named in ``bad``, as
    ``SampleBatches`` skips them; a failed GET still stops, as it always did."""

    def __init__(self, dataset: Any, *, skip_bad: bool) -> None:
        self.dataset = dataset
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        samples, bad = self.dataset.items(indices, skip_bad=self.skip_bad)
        if not samples:
            return torch.empty(0), torch.empty(0, dtype=torch.int64), bad
        xs, ys = zip(*samples)
        return torch.stack(xs), torch.tensor(ys, dtype=torch.int64), bad
