"""The vocabulary of every mode a flag chooses: one ``StrEnum`` each, so a mode is compared as a member,
never as a string, and each flag's choices are its enum's values.

Imports nothing (the bottom of tess); :mod:`pipeline.config` re-exports every name.
"""

from __future__ import annotations

import enum
from typing import TypeVar

E = TypeVar("E", bound=enum.StrEnum)


class LabelRule(enum.StrEnum):
    """How the keys of one listing get their labels (``--labels``): one rule for the whole listing."""

    AUTO = "auto"  # folder when every image key lies in a class folder, else suffix when every one has it, else none
    FOLDER = "folder"  # the first folder below the prefix is the class (torchvision ImageFolder)
    SUFFIX = "suffix"  # <stem>_<int>.<ext> gives int (the research loader)
    NONE = "none"  # -1 for every key


class SyncPolicy(enum.StrEnum):
    """When blobs become durable (``fetch --sync``; docs/guarantees.md)."""

    PER_BLOB = "per-blob"  # fsync every blob before its rename
    # One syncfs of the cache filesystem before the manifest is written (blobs fetched in ranges, at
    # least large_threshold bytes, are still fsynced each, off the event loop, where it overlaps downloads).
    BEFORE_MANIFEST = "before-manifest"


class Source(enum.StrEnum):
    """What training reads (``--source``)."""

    CACHE = "cache"  # the local cache, through a manifest (no network)
    S3 = "s3"  # stream from S3 through DSSDataset


class PackMode(enum.StrEnum):
    """The decoded uint8 pack of a manifest (``--pack``)."""

    AUTO = "auto"  # on when the cache's images can be packed at --image-size
    ON = "on"
    OFF = "off"


class OnBadSample(enum.StrEnum):
    """What training does with a corrupt or undecodable blob (``--on-bad-sample``)."""

    STOP = "stop"  # stop with its key
    SKIP = "skip"  # leave it out of its batch and count it


class DeviceKind(enum.StrEnum):
    """The kind of device training runs on (``--device``; ``cuda`` may name its index, ``cuda:1``)."""

    AUTO = "auto"  # cuda, then mps, then cpu
    CPU = "cpu"
    CUDA = "cuda"
    MPS = "mps"


class RetryMode(enum.StrEnum):
    """botocore's retry mode of the boto3 calls that remain (upload, bucket creation; ``--retry-mode``)."""

    STANDARD = "standard"
    ADAPTIVE = "adaptive"  # client-side rate limiting
    LEGACY = "legacy"


def parse_mode(kind: type[E], value: str, name: str, flag: str) -> E:
    """``value`` as a member of ``kind``; ValueError naming the value, the choices and the flag otherwise."""
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} must be one of {', '.join(kind)} ({flag})") from None
