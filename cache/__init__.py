"""tess local cache: content-addressed blobs, key-list manifests, the key index and verification.

This package owns hashing, the on-disk layout, the manifest format and cache verification. It imports
neither boto3 nor torch, so any tool (training, verification, stats) can read a cache cheaply.
"""

from cache.atomic import atomic_write_bytes, atomic_writer
from cache.blobs import BlobStore, BlobWriteError
from cache.layout import CacheLayout, default_cache_dir
from cache.locks import GC_LOCK
from cache.shard import ShardSpec
from cache.uri import S3Uri
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

__all__ = [
    "GC_LOCK",
    "MANIFEST_FORMAT",
    "BlobStore",
    "BlobWriteError",
    "CacheLayout",
    "ManifestArrays",
    "ManifestHeader",
    "ManifestRecord",
    "S3Uri",
    "ShardSpec",
    "atomic_write_bytes",
    "atomic_writer",
    "default_cache_dir",
    "latest_manifest",
    "list_manifests",
    "load_manifest",
    "manifest_name",
    "manifests_of",
    "read_key_list",
    "read_manifest_header",
    "write_manifest",
]
