"""The torchrun job as training sees it: this process's place, the collectives, and the rank plan.

Owns: :class:`DistState` (rank, world, local rank), joining and leaving the process group, gathering
and broadcasting Python objects, :func:`on_every_rank` (an error on one rank is raised on all, so no
rank waits forever in a collective), the per-rank noise seeds, the parameter digest, and how ranks
share the data: which shard manifest belongs to which rank (:func:`pick_rank_manifest`) and the plan
every rank agrees on in one all-gather (:func:`plan_ranks`). Without torchrun everything here is the
single-process case: rank 0 of 1, no collectives.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from cache.layout import CacheLayout
from cache.shard import ShardSpec
from cache.uri import S3Uri
from pipeline.config import DeviceKind
from pipeline.hints import fetch_hint

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class DistState:
    """This process's place in the torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> DistState:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistState()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    kind = DeviceKind(device_name.split(":")[0])
    use_cuda = kind is DeviceKind.CUDA or (kind is DeviceKind.AUTO and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistState(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, local_world=local_world)


def shutdown_distributed(dist_state: DistState) -> None:
    """Leave the process group (torch warns at exit about a group never destroyed)."""
    if dist_state.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def gather(obj: Any, dist_state: DistState) -> list[Any]:
    """``obj`` of every rank, in rank order (a collective: every rank must call it)."""
    if dist_state.world == 1:
        return [obj]
    out: list[Any] = [None] * dist_state.world
    dist.all_gather_object(out, obj)
    return out


def from_rank0(obj: T, dist_state: DistState) -> T:
    """Rank 0's ``obj`` on every rank (a collective under DDP; ``obj`` itself without)."""
    if dist_state.world == 1:
        return obj
    holder = [obj]  # broadcast_object_list fills the list in place
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def reduce_totals(values: list[float], dist_state: DistState, *, op: Literal["sum", "max"] = "sum") -> list[float]:
    """``values`` summed (or ``op="max"``) over the ranks, element by element."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist_state.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def barrier(dist_state: DistState) -> None:
    if dist_state.world > 1:
        dist.barrier()


def on_every_rank(fn: Callable[[], T], dist_state: DistState) -> T:
    """Run ``fn`` on every rank; if it raises on any rank, raise on every rank.

    Without this, a rank that fails before a collective (a missing shard manifest, say) exits while
    the others block in the collective until torchrun kills them, and only one rank says why. The
    failing rank re-raises its own exception; the others raise FileNotFoundError or ValueError (the
    types ``train_vae.py`` reports in one line) naming the failing rank.
    """
    if dist_state.world == 1:
        return fn()
    try:
        value, failure = fn(), None
    except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks have been told
        value, failure = None, e
    said = gather(None if failure is None else (type(failure).__name__, str(failure)), dist_state)
    failures = [(r, f) for r, f in enumerate(said) if f is not None]
    if failure is not None:
        raise failure
    if failures:
        r, (kind, msg) = failures[0]
        raise (FileNotFoundError if kind == "FileNotFoundError" else ValueError)(f"rank {r} stopped: {msg}")
    return value  # type: ignore[return-value]


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


# -- which data each rank trains on ----------------------------------------------------------------------


def shard_of_rank(shard: ShardSpec, dist_state: DistState) -> bool:
    """Whether shard manifest ``k/M`` belongs to this rank: M divides the world and the ranks are split
    into M consecutive blocks (torchrun numbers ranks node by node), block ``k`` holding shard ``k``.
    With M = number of nodes that is "node k's shard"; with M = world size, "rank k's shard"."""
    world, count = dist_state.world, shard.count
    return world % count == 0 and dist_state.rank // (world // count) == shard.index


def pick_rank_manifest(
    shards: dict[Path, ShardSpec | None], uri: S3Uri, dist_state: DistState, layout: CacheLayout, endpoint: str
) -> Path:
    """This rank's manifest among those of one prefix (``shards``: path -> its shard, oldest first;
    ``layout`` and ``endpoint``: the cache and the manifests' endpoint label, for the fetch hint).

    A full manifest if there is one (every rank then samples it through ``DistributedSampler``), else
    the newest shard manifest that belongs to this rank (:func:`shard_of_rank`), else the only shard
    the cache holds (a node-local cache; :func:`plan_ranks` checks that the ranks cover every shard).

    Raises:
        FileNotFoundError: only other ranks' shards; the message says which ``make fetch`` to run.
    """
    full = [p for p, s in shards.items() if s is None]
    if full:
        return full[-1]
    mine = [p for p, s in shards.items() if s is not None and shard_of_rank(s, dist_state)]
    if mine:
        return mine[-1]
    if len(set(shards.values())) == 1:
        # A node-local cache holds its own node's shard only, and torchrun's c10d rendezvous numbers the
        # nodes in the order they join, so node k's ranks need not be block k: use the shard the node
        # has. plan_ranks then checks that the ranks together hold every shard.
        return list(shards)[-1]
    # Several shards here, none this rank's by position: suggest the shard count in use when it fits.
    rank, world = dist_state.rank, dist_state.world
    counts = sorted({s.count for s in shards.values() if s is not None and world % s.count == 0})
    count = counts[-1] if counts else max(1, world // max(1, dist_state.local_world))
    hint = functools.partial(fetch_hint, str(uri), endpoint=endpoint, cache_dir=layout)
    fix = (
        f"{hint(shard=f'{rank // (world // count)}/{count}')} on this node"
        if count > 1
        else f"{hint()} (the full prefix)"
    )
    have = ", ".join(sorted({str(s) for s in shards.values()}))
    raise FileNotFoundError(
        f"{layout.manifests} holds shards {have} of {uri}, none for rank {rank} of {world}; "
        f"run {fix} or pass --manifest"
    )


@dataclass(frozen=True, kw_only=True)
class RankShare:
    """What one rank tells the others about its data (one all-gather in :func:`plan_ranks`)."""

    digest: str
    shard: ShardSpec | None
    samples: int
    description: str
    fix: str = ""
    uri: str = ""
    endpoint: str | None = None
    cache_dir: str | None = None


def check_shard_cover(shares: list[RankShare]) -> None:
    """Every shard ``0..N-1`` of one count ``N`` is held by some rank (else its keys are never trained on)."""
    by_shard: dict[ShardSpec, list[int]] = {}
    for r, share in enumerate(shares):
        if share.shard is not None:
            by_shard.setdefault(share.shard, []).append(r)
    which = "; ".join(
        f"{s} on rank(s) {', '.join(map(str, rs))}" for s, rs in sorted(by_shard.items(), key=lambda i: str(i[0]))
    )
    counts = {s.count for s in by_shard}
    if len(counts) > 1:
        raise ValueError(
            f"ranks hold shards of different counts ({which}); fetch every node with the same N in SHARD=k/N"
        )
    count = counts.pop()
    missing = [k for k in range(count) if ShardSpec(k, count) not in by_shard]
    if missing:
        k, first = missing[0], shares[0]
        hint = fetch_hint(first.uri, endpoint=first.endpoint, cache_dir=first.cache_dir, shard=f"{k}/{count}")
        raise ValueError(
            f"no rank holds shard {k}/{count} of {first.uri} ({which}); run {hint} on the node that lacks it"
        )


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


def plan_ranks(mine: RankShare, dist_state: DistState) -> RankPlan:
    """Agree across ranks on who samples what; raise the same error on every rank when they cannot.

    Full manifest on every rank: one group of ``world`` ranks, i.e. plain ``DistributedSampler``.
    Shard manifests: each rank samples its node's shard (split among that node's ranks), so a rank
    never reads a blob another node holds. Shards differ in size by a few per cent (hash split), so
    every rank is padded to the largest share: each epoch all ranks take the same number of steps.

    Raises:
        ValueError: a rank has no usable samples, some ranks use a full manifest and others shards,
            or the ranks' shards do not cover every shard ``0..N-1`` of one ``N``.
    """
    shares: list[RankShare] = gather(mine, dist_state)
    empty = [r for r, s in enumerate(shares) if s.samples == 0]
    if empty:
        r = empty[0]
        where = f" on rank {r}" if dist_state.world > 1 else ""
        raise ValueError(f"no usable samples in {shares[r].description}{where}; {shares[r].fix}")
    if dist_state.world == 1:
        return RankPlan(
            split=None, num_samples=None, digest=mine.digest, shards=[str(mine.shard)] if mine.shard else []
        )
    kinds = {s.shard is not None for s in shares}
    if len(kinds) > 1:
        which = ", ".join(f"rank {r}: {s.shard or 'full'}" for r, s in enumerate(shares))
        raise ValueError(
            f"ranks mix full and shard manifests ({which}); fetch the same way on every node or pass --manifest"
        )
    if kinds == {True}:
        check_shard_cover(shares)
    groups: dict[str, list[int]] = {}
    for r, s in enumerate(shares):
        groups.setdefault(s.digest, []).append(r)
    members = groups[mine.digest]
    num_samples = max(math.ceil(s.samples / len(groups[s.digest])) for s in shares)
    digests = [s.digest for s in shares]
    digest = digests[0] if len(groups) == 1 else hashlib.sha256("\n".join(digests).encode()).hexdigest()
    return RankPlan(
        split=(members.index(dist_state.rank), len(members)),
        num_samples=num_samples,
        digest=digest,
        shards=[str(s.shard) for s in shares if s.shard],
    )
