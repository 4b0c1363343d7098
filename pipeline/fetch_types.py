"""What a fetch is asked (:class:`FetchConfig`) and what it tells (:class:`FetchSummary`, :class:`FetchResult`).

Shared by the fetch stage's modules (:mod:`pipeline.fetch`, :mod:`pipeline.fetch_stream`) and the CLI;
imports nothing that talks to a server.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cache.gc import EvictionReport
from cache.shard import ShardSpec
from pipeline.config import DEFAULT_LABELS, ClientOptions, LabelRule, S3Uri, label_rule
from pipeline.labels import LabelChoice
from pipeline.mirror_types import MirrorRecord, MirrorSettings, SyncPolicy

EXIT_INCOMPLETE = 3


@dataclass(frozen=True, kw_only=True)
class FetchConfig:
    """What to fetch and how.

    Attributes:
        prefix: ``s3://bucket/prefix``.
        options: S3 client options (endpoint, connections, retries, timeouts).
        cache_dir: cache root; None means ``$TESS_CACHE_DIR`` or ``~/.cache/tess``.
        workers: DataLoader worker processes (0 = fetch in the main process).
        clients: clients per process; worker ``i`` uses client ``i % clients``.
        batch: objects per DataLoader batch (each batch is fetched concurrently).
        limit: fetch at most this many objects (the first ones in listing order).
        verify: rehash local blobs instead of trusting the key index.
        max_cache_bytes: after the fetch, evict until blobs + packs fit (see :mod:`cache.gc`); a prefix
            larger than the cap fails before any download.
        endpoint_label: what the manifest records as endpoint (default: the endpoint URL or ``aws``).
        progress: show a tqdm bar (bytes in MB = 10^6 bytes, like the summary line).
        sync: when blobs become durable (README "Guarantees"); the manifest is always written after.
        shard: mirror only this shard of the listing (:mod:`cache.shard`); the manifest records it
            as ``shard: "k/N"`` and gets its own file. None (or ``k/1``) means the whole listing.
        labels: the label rule (:mod:`pipeline.labels`), decided over the whole listing before any
            sharding; the manifest records the rule applied as ``labels``.
    """

    prefix: str
    options: ClientOptions = field(default_factory=ClientOptions)
    cache_dir: str | os.PathLike[str] | None = None
    workers: int = 0
    clients: int = 1
    batch: int = 64
    limit: int | None = None
    verify: bool = False
    endpoint_label: str | None = None
    progress: bool = True
    max_cache_bytes: int | None = None
    shard: ShardSpec | None = None
    sync: SyncPolicy = MirrorSettings.sync
    labels: LabelRule = DEFAULT_LABELS

    @property
    def shard_to_fetch(self) -> ShardSpec | None:
        """The shard to keep of the listing, None for all of it (no ``shard``, or ``k/1``)."""
        return self.shard if self.shard is not None and not self.shard.whole else None

    def __post_init__(self) -> None:
        S3Uri.parse(self.prefix)
        object.__setattr__(self, "labels", label_rule(self.labels))
        if not 0 <= self.workers <= 256:
            raise ValueError(f"workers={self.workers} must be between 0 and 256 (-w/--workers, WORKERS=)")
        if not 1 <= self.clients <= 256:
            raise ValueError(f"clients={self.clients} must be between 1 and 256 (-c/--clients, CLIENTS=)")
        if not 1 <= self.batch <= 100_000:
            raise ValueError(f"batch={self.batch} must be between 1 and 100000 (--batch)")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit={self.limit} must be >= 1 (--limit)")
        if self.max_cache_bytes is not None and self.max_cache_bytes < 1:
            raise ValueError(f"max_cache_bytes={self.max_cache_bytes} must be >= 1 (--max-cache-bytes, CACHE_MAX_BYTES=)")


@dataclass(kw_only=True)
class FetchSummary:
    """Counts and rates of one fetch (stored in the manifest header as ``fetch``)."""

    listed: int = 0
    fetched: int = 0
    cached: int = 0
    missing: int = 0
    failed: int = 0
    bytes_fetched: int = 0
    bytes_total: int = 0
    retries: int = 0
    list_s: float = 0.0
    mirror_s: float = 0.0
    wall_s: float = 0.0
    errors: list[str] = field(default_factory=list)
    evicted: EvictionReport | None = None

    @property
    def complete(self) -> bool:
        return self.missing == 0 and self.failed == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "listed": self.listed,
            "fetched": self.fetched,
            "cached": self.cached,
            "missing": self.missing,
            "failed": self.failed,
            "bytes_fetched": self.bytes_fetched,
            "bytes_total": self.bytes_total,
            "retries": self.retries,
            "list_s": round(self.list_s, 3),
            "mirror_s": round(self.mirror_s, 3),
            "wall_s": round(self.wall_s, 3),
        }

    def line(self) -> str:
        """One line; rates are over the mirroring time (not listing), MB = 10^6 bytes as in the bar."""
        t = max(self.mirror_s, 1e-6)
        rate = self.fetched / t if self.fetched else 0.0
        rate_text = f"{rate:.0f}" if rate >= 100 else f"{rate:.3g}"
        return (
            f"fetched {self.fetched}, already cached {self.cached}, missing {self.missing}, failed {self.failed} "
            f"objects; {self.bytes_fetched / 1e6:.1f} MB fetched of {self.bytes_total / 1e6:.1f} MB; "
            f"{self.retries} retries; {self.wall_s:.2f} s wall ({self.mirror_s:.2f} s mirroring); "
            f"{rate_text} objects/s; {self.bytes_fetched / 1e6 / t if self.fetched else 0.0:.2f} MB/s"
        )


@dataclass(frozen=True, kw_only=True)
class FetchResult:
    manifest: Path | None
    summary: FetchSummary
    records: list[MirrorRecord] = field(default_factory=list, repr=False)
    label_choice: LabelChoice | None = None  # the label rule applied and why (the CLI prints its line)

    @property
    def exit_code(self) -> int:
        return 0 if self.summary.complete else EXIT_INCOMPLETE

