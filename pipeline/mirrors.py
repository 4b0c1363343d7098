"""Mirrors over the transport: the one place a :class:`~pipeline.mirror.Mirror` gets its S3 client.

The mirror takes any getter (tests pass fakes); fetch, repair and the datasets build theirs here, over
client ``client`` of this process (:func:`pipeline.transport.client.client_for`).
"""

from __future__ import annotations

from typing import Any

from cache.blobs import BlobStore
from pipeline.config import ClientOptions
from pipeline.mirror import Mirror, MirrorSettings
from pipeline.transport.client import BucketClient, client_for


def settings_for(options: ClientOptions, **overrides: Any) -> MirrorSettings:
    """Mirror settings from client options: concurrency = ``max_connections``, attempts."""
    return MirrorSettings(concurrency=options.max_connections, max_attempts=options.max_attempts, **overrides)


def make_mirror(options: ClientOptions, bucket: str, store: BlobStore | None, *, client: int = 0, worker: int = -1,
                settings: MirrorSettings | None = None) -> Mirror:
    """A :class:`~pipeline.mirror.Mirror` of ``bucket`` over client ``client`` of this process (without a
    ``store``, one that only reads)."""
    return Mirror(store, BucketClient(client_for(options, client), bucket), settings or settings_for(options),
                  client=client, worker=worker)
