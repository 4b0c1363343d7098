"""Mirrors over the transport: the one place a :class:`~pipeline.fetch.mirror.Mirror` gets its S3 client.

The mirror takes any getter (tests pass fakes); fetch, repair and the datasets build theirs here, over
client ``client`` of this process (:func:`pipeline.transport.client.client_for`).
"""

from __future__ import annotations

from cache.blobs import BlobStore
from pipeline.config import ClientOptions
from pipeline.fetch.mirror import Mirror, MirrorSettings
from pipeline.transport.client import BucketClient, client_for


def make_mirror(
    options: ClientOptions,
    bucket: str,
    store: BlobStore | None,
    *,
    client: int = 0,
    worker: int = -1,
    settings: MirrorSettings | None = None,
) -> Mirror:
    """A :class:`~pipeline.fetch.mirror.Mirror` of ``bucket`` over client ``client`` of this process (without a
    ``store``, one that only reads)."""
    return Mirror(
        store,
        BucketClient(client_for(options, client), bucket),
        settings or MirrorSettings.from_options(options),
        client=client,
        worker=worker,
    )
