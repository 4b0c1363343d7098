"""tess local cache: content-addressed blobs, key-list manifests, the key index and verification.

This package owns hashing, the on-disk layout, the manifest format and cache verification. It imports
neither boto3 nor torch, so any tool (training, verification, stats) can read a cache cheaply.

The names of ``__all__`` are exported lazily (PEP 562): ``from cache import X`` imports only the
submodule that defines ``X``. ``import cache`` alone (which every ``import cache.<module>`` does first)
imports no submodule, so a command that needs only :mod:`cache.layout` never pays for numpy
(:mod:`cache.shard`, :mod:`cache.manifest`: ~0.1 s of start-up) or anything else it does not use.
"""

from __future__ import annotations

import importlib

# Not typing.TYPE_CHECKING: typing costs 5 ms of start-up that nothing else of `import cache` needs (mypy
# and pyright read any TYPE_CHECKING as true).
TYPE_CHECKING = False
if TYPE_CHECKING:  # what the names are, for type checkers and IDEs; at run time see __getattr__
    from typing import Any

    from cache.atomic import atomic_write_bytes, atomic_writer
    from cache.blobs import BlobStore
    from cache.checks import BodyCheckError
    from cache.layout import CacheLayout, default_cache_dir
    from cache.locks import GC_LOCK
    from cache.manifest import (
        MANIFEST_FORMAT,
        ManifestArrays,
        ManifestHeader,
        ManifestRecord,
        latest_manifest,
        list_manifests,
        load_manifest,
        manifest_name,
        manifests_of,
        read_key_list,
        read_manifest_header,
        write_manifest,
    )
    from cache.shard import ShardSpec
    from cache.uri import S3Uri

# Exported name -> the submodule that defines it (imported on first use).
_EXPORTS: dict[str, str] = {
    "atomic_write_bytes": "cache.atomic",
    "atomic_writer": "cache.atomic",
    "BlobStore": "cache.blobs",
    "BodyCheckError": "cache.checks",
    "CacheLayout": "cache.layout",
    "default_cache_dir": "cache.layout",
    "GC_LOCK": "cache.locks",
    "ShardSpec": "cache.shard",
    "S3Uri": "cache.uri",
    "MANIFEST_FORMAT": "cache.manifest",
    "ManifestArrays": "cache.manifest",
    "ManifestHeader": "cache.manifest",
    "ManifestRecord": "cache.manifest",
    "latest_manifest": "cache.manifest",
    "list_manifests": "cache.manifest",
    "load_manifest": "cache.manifest",
    "manifest_name": "cache.manifest",
    "manifests_of": "cache.manifest",
    "read_key_list": "cache.manifest",
    "read_manifest_header": "cache.manifest",
    "write_manifest": "cache.manifest",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the submodule behind an exported name on first access, and keep the name here."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
