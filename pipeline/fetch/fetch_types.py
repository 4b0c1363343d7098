"""What a fetch is asked (:class:`FetchConfig`) and what it tells (:class:`FetchSummary`, :class:`FetchResult`).

Shared by the fetch stage's modules (:mod:`pipeline.fetch.stage`, :mod:`pipeline.fetch.streaming`) and the CLI;
imports nothing that talks to a server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cache.gc import EvictionReport
from pipeline.config import FetchConfig
from pipeline.fetch.labels import LabelChoice
from pipeline.fetch.mirror_types import MirrorRecord

__all__ = ["EXIT_INCOMPLETE", "FetchConfig", "FetchResult", "FetchSummary"]

EXIT_INCOMPLETE = 3


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
