"""Where things live under the cache root.

    CACHE_DIR/
      objects/<sha[0:2]>/<sha[2:4]>/<sha256-hex>   blobs, named only by the SHA-256 of their bytes
      manifests/<name>.jsonl                        one pinned listing per (endpoint, bucket, prefix)
      manifests/<name>.keys                         the same listing as a plain key list
      index/                                        diskcache: (endpoint, bucket, key, etag, size) -> sha256
      packs/                                        optional decoded uint8 packs keyed by manifest digest
      tmp/                                          in-flight downloads (same filesystem, renamed into objects/)
      locks/                                        fcntl lock files
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

ENV_CACHE_DIR = "TESS_CACHE_DIR"
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def default_cache_dir() -> Path:
    """``$TESS_CACHE_DIR``, else ``$XDG_CACHE_HOME/tess``, else ``~/.cache/tess``."""
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "tess"


@dataclass(frozen=True, kw_only=True)
class CacheLayout:
    """Paths of one cache root; creating the object touches no disk, :meth:`create` makes the folders."""

    root: Path

    def __post_init__(self) -> None:
        root = Path(self.root).expanduser()
        if root.exists() and not root.is_dir():
            raise NotADirectoryError(f"cache dir {str(root)!r} is a file; pass --cache-dir DIR pointing to a folder")
        object.__setattr__(self, "root", root.absolute())

    @classmethod
    def at(cls, root: str | os.PathLike[str] | None = None) -> CacheLayout:
        """Layout at ``root``, or at :func:`default_cache_dir` when ``root`` is None or empty."""
        return cls(root=Path(root) if root else default_cache_dir())

    @property
    def objects(self) -> Path:
        return self.root / "objects"

    @property
    def manifests(self) -> Path:
        return self.root / "manifests"

    @property
    def index(self) -> Path:
        return self.root / "index"

    @property
    def packs(self) -> Path:
        return self.root / "packs"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def locks(self) -> Path:
        return self.root / "locks"

    def create(self) -> CacheLayout:
        """Create the folders (idempotent) and return self."""
        for p in (self.objects, self.manifests, self.index, self.packs, self.tmp, self.locks):
            p.mkdir(parents=True, exist_ok=True)
        return self

    def blob_path(self, sha256_hex: str) -> Path:
        """Path of the blob whose content hashes to ``sha256_hex``; the key never enters the path."""
        if not _SHA_RE.match(sha256_hex):
            raise ValueError(f"not a lowercase SHA-256 hex digest: {sha256_hex!r}")
        return self.objects / sha256_hex[0:2] / sha256_hex[2:4] / sha256_hex
