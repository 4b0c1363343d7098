"""The ``s3://bucket/prefix`` value: parsed once, printed one way.

It lives in ``cache/`` because a manifest pins the listing of one such location
(:attr:`cache.manifest.ManifestHeader.uri`), and ``cache/`` imports nothing from ``pipeline/``;
``pipeline.config`` re-exports it for the S3 side.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BUCKET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]")


@dataclass(frozen=True, kw_only=True)
class S3Uri:
    """A parsed ``s3://bucket/prefix``; the prefix may be empty (the whole bucket)."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, uri: str) -> S3Uri:
        if not isinstance(uri, str) or not uri.startswith("s3://"):
            raise ValueError(f"PREFIX {uri!r} is not an S3 URI; use s3://bucket/prefix (e.g. PREFIX=s3://data/train/)")
        rest = uri[len("s3://") :]
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise ValueError(f"PREFIX {uri!r} has no bucket name; use s3://bucket/prefix")
        # Lenient on purpose: legacy AWS buckets and MinIO/Ceph allow names that today's AWS rules refuse.
        if not _BUCKET_RE.fullmatch(bucket):
            raise ValueError(
                f"PREFIX {uri!r}: bucket {bucket!r} is not a valid bucket name "
                "(3-255 letters, digits, '.', '-', '_'); use s3://bucket/prefix"
            )
        return cls(bucket=bucket, prefix=prefix)

    def key_uri(self, key: str) -> str:
        """``s3://bucket/key`` of one object of this bucket (for messages)."""
        return f"s3://{self.bucket}/{key}"

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"
