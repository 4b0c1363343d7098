"""Where things live under the cache root.

    CACHE_DIR/
      objects/<sha[0:2]>/<sha[2:4]>/<sha256-hex>   blobs, named only by the SHA-256 of their bytes
      manifests/<name>.jsonl                        one pinned listing per (endpoint, bucket, prefix)
      manifests/<name>.keys                         the same listing as a plain key list
      index/                                        diskcache: (endpoint, bucket, key, etag, size) -> sha256
      packs/                                        optional decoded uint8 packs keyed by manifest digest
      tmp/                                          in-flight downloads (same filesystem, renamed into objects/)
      locks/                                        fcntl lock files
      .tess-cache                                   marker: this folder is a tess cache (JSON, written at creation)

tess owns the marker and the six folders above and everything in them; anything else at the root is the
user's and no tess command touches it.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from cache.atomic import temp_path_for

ENV_CACHE_DIR = "TESS_CACHE_DIR"
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
MARKER_NAME = ".tess-cache"
MARKER_FORMAT = "tess-cache/1"
OWNED_FOLDERS = ("objects", "manifests", "index", "packs", "tmp", "locks")


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
    def at(cls, root: str | os.PathLike[str] | CacheLayout | None = None) -> CacheLayout:
        """Layout at ``root`` (a layout passes through), or at :func:`default_cache_dir` when ``root`` is None or
        empty."""
        if isinstance(root, CacheLayout):
            return root
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

    @property
    def marker(self) -> Path:
        return self.root / MARKER_NAME

    @property
    def owned(self) -> tuple[Path, ...]:
        """The folders tess owns under the root (the marker aside)."""
        return tuple(self.root / name for name in OWNED_FOLDERS)

    def foreign_entries(self) -> list[str]:
        """Names at the root that are not tess's (sorted); empty when the root does not exist."""
        if not self.root.is_dir():
            return []
        return sorted(e.name for e in os.scandir(self.root) if e.name not in (*OWNED_FOLDERS, MARKER_NAME))

    def is_cache(self) -> bool:
        """The root carries the marker, or (a cache made before the marker existed) holds a ``manifests``
        folder and nothing but tess's own folders."""
        if self.marker.is_file():
            return True
        return (self.root / "manifests").is_dir() and not self.foreign_entries()

    def create(self) -> CacheLayout:
        """Create the folders and the marker (idempotent) and return self.

        Raises:
            FileExistsError: the root already holds files of someone else and is no tess cache; tess never
                spreads its folders among a user's files (think ``--cache-dir ~``).
        """
        if self.root.is_dir() and not self.marker.is_file():
            foreign = self.foreign_entries()
            if foreign:
                raise FileExistsError(
                    f"cache dir {str(self.root)!r} already holds files that are not a tess cache "
                    f"(e.g. {foreign[0]!r}); "
                    "pass --cache-dir (CACHE_DIR=) pointing to a new or empty folder"
                )
        for p in self.owned:
            p.mkdir(parents=True, exist_ok=True)
        if not self.marker.is_file():
            self._write_marker()
        return self

    def _write_marker(self) -> None:
        body = json.dumps({"format": MARKER_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        # In tmp/ with the writer's pid in its name, so a killed run's leftover is cleaned like any temp file.
        tmp = temp_path_for(self.tmp, "-marker")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(body + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.marker)

    def blob_path(self, sha256_hex: str) -> Path:
        """Path of the blob whose content hashes to ``sha256_hex``; the key never enters the path."""
        if not _SHA_RE.match(sha256_hex):
            raise ValueError(f"not a lowercase SHA-256 hex digest: {sha256_hex!r}")
        return self.objects / sha256_hex[0:2] / sha256_hex[2:4] / sha256_hex
