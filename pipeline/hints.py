"""Commands that tess suggests in its messages, written for the user's own settings.

Every suggestion names the prefix, endpoint, cache folder and shard the user is working with, so it is
right to copy and paste: a hint that drops ``CACHE_DIR=`` fetches into the wrong cache. Each hint gives
the ``make`` line and the equivalent ``tess`` line (``.venv/bin/tess``: every make target installs it).
"""

from __future__ import annotations

import os
import shlex

from cache.layout import CacheLayout, default_cache_dir
from pipeline.config import EMBEDDED_DEMO, manifest_endpoint

# One setting as (the make variable, the tess flag); None parts are left out.
Part = tuple[str, str]


def _cache_dir_part(cache_dir: str | os.PathLike[str] | CacheLayout | None) -> Part | None:
    """The cache folder to name, or None when it is the default one (nothing to pass)."""
    if cache_dir is None:
        return None
    root = CacheLayout.at(cache_dir).root
    if root == CacheLayout.at(default_cache_dir()).root:
        return None
    return f"CACHE_DIR={shlex.quote(str(root))}", f"--cache-dir {shlex.quote(str(root))}"


def _endpoint_part(endpoint: str | None) -> Part | None:
    """An endpoint URL worth naming: a real URL (a manifest's label may be ``aws`` or the demo's)."""
    url = manifest_endpoint(endpoint or "")
    return None if url is None else (f"ENDPOINT={shlex.quote(url)}", f"--endpoint {shlex.quote(url)}")


def _command(make: str, cli: str, parts: list[Part | None]) -> str:
    kept = [p for p in parts if p is not None]
    return f"`{' '.join([make, *(m for m, _ in kept)])}` (or `{' '.join([cli, *(c for _, c in kept)])}`)"


def fetch_hint(
    uri: str | None, *, endpoint: str | None = None, cache_dir=None, shard: str | None = None, labels: str | None = None
) -> str:
    """``make fetch ...`` (and the ``tess fetch`` form) for this prefix and these settings.

    ``uri`` None (or an embedded-demo manifest) means the demo set; ``labels`` a label rule to force.
    """
    prefix = (f"PREFIX={shlex.quote(uri)}", shlex.quote(uri)) if uri and endpoint != EMBEDDED_DEMO else None
    return _command(
        "make fetch",
        "tess fetch",
        [
            prefix,
            _endpoint_part(endpoint),
            (f"SHARD={shard}", f"--shard {shard}") if shard else None,
            (f"LABELS={labels}", f"--labels {labels}") if labels else None,
            _cache_dir_part(cache_dir),
        ],
    )


def verify_hint(*, repair: bool, endpoint: str | None = None, cache_dir=None) -> str:
    """``make verify [REPAIR=1] ...`` (and the ``tess verify`` form) for these settings."""
    return _command(
        "make verify",
        "tess verify",
        [
            ("REPAIR=1", "--repair") if repair else None,
            _endpoint_part(endpoint),
            _cache_dir_part(cache_dir),
        ],
    )
