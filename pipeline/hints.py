"""Commands that tess suggests in its messages, written for the user's own settings.

Every suggestion names the prefix, endpoint, cache folder and shard the user is working with, so it is
right to copy and paste: a hint that drops ``CACHE_DIR=`` fetches into the wrong cache. Each hint gives
the ``make`` line and the equivalent ``python -m pipeline`` line.
"""

from __future__ import annotations

import os
import shlex

from cache.layout import CacheLayout, default_cache_dir
from pipeline.config import EMBEDDED_DEMO, manifest_endpoint


def _cache_dir_arg(cache_dir: str | os.PathLike[str] | CacheLayout | None) -> str | None:
    """The cache folder to name, or None when it is the default one (nothing to pass)."""
    if cache_dir is None:
        return None
    root = cache_dir.root if isinstance(cache_dir, CacheLayout) else CacheLayout.at(cache_dir).root
    return None if root == CacheLayout.at(default_cache_dir()).root else str(root)


def _endpoint_arg(endpoint: str | None) -> str | None:
    """An endpoint URL worth naming: a real URL (a manifest's label may be ``aws`` or the demo's)."""
    return manifest_endpoint(endpoint or "")


def fetch_hint(uri: str | None, *, endpoint: str | None = None, cache_dir=None, shard: str | None = None) -> str:
    """``make fetch ...`` (and the ``python -m pipeline fetch`` form) for this prefix and these settings.

    ``uri`` None (or an embedded-demo manifest) means the demo set.
    """
    make, cli = ["make fetch"], ["python -m pipeline fetch"]
    if uri and endpoint != EMBEDDED_DEMO:
        make.append(f"PREFIX={shlex.quote(uri)}")
        cli.append(shlex.quote(uri))
    if (url := _endpoint_arg(endpoint)) is not None:
        make.append(f"ENDPOINT={shlex.quote(url)}")
        cli.append(f"--endpoint {shlex.quote(url)}")
    if shard:
        make.append(f"SHARD={shard}")
        cli.append(f"--shard {shard}")
    if (root := _cache_dir_arg(cache_dir)) is not None:
        make.append(f"CACHE_DIR={shlex.quote(root)}")
        cli.append(f"--cache-dir {shlex.quote(root)}")
    return f"`{' '.join(make)}` (or `{' '.join(cli)}`)"


def verify_hint(*, repair: bool, endpoint: str | None = None, cache_dir=None) -> str:
    """``make verify [REPAIR=1] ...`` (and the ``python -m pipeline verify`` form) for these settings."""
    make, cli = ["make verify"], ["python -m pipeline verify"]
    if repair:
        make.append("REPAIR=1")
        cli.append("--repair")
    if (url := _endpoint_arg(endpoint)) is not None:
        make.append(f"ENDPOINT={shlex.quote(url)}")
        cli.append(f"--endpoint {shlex.quote(url)}")
    if (root := _cache_dir_arg(cache_dir)) is not None:
        make.append(f"CACHE_DIR={shlex.quote(root)}")
        cli.append(f"--cache-dir {shlex.quote(root)}")
    return f"`{' '.join(make)}` (or `{' '.join(cli)}`)"
