"""Configuration of S3 access: the ``s3://`` URI, the endpoint and the client options.

Credentials never appear here: boto3's standard chain (environment, profile, instance role) supplies
them, and nothing in tess prints or stores them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

ENV_ENDPOINTS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
RETRY_MODES = ("standard", "adaptive", "legacy")
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

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def redact_url(url: str) -> str:
    """``url`` with any ``user:password@`` replaced by ``***@`` (for messages)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=f"***@{host}").geturl()


def check_endpoint(url: str) -> str:
    """Validate an endpoint URL and return it without a trailing slash."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"endpoint {redact_url(url)!r} is not an http(s) URL; use e.g. ENDPOINT=http://127.0.0.1:9000")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            f"endpoint {redact_url(url)!r} contains credentials; remove them from the URL and set "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) instead"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"endpoint {url!r} has a query or fragment; pass only scheme://host[:port][/path]")
    return url.rstrip("/")


def resolve_endpoint(explicit: str | None = None) -> str | None:
    """``explicit``, else ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``, else None (AWS)."""
    for candidate in (explicit, *(os.environ.get(k) for k in ENV_ENDPOINTS)):
        if candidate:
            return check_endpoint(candidate)
    return None


@dataclass(frozen=True, kw_only=True)
class ClientOptions:
    """How each S3 client talks to the store (the old ``dss.clientOption``).

    Attributes:
        endpoint: custom endpoint URL (MinIO, Ceph RGW, DSS); None means AWS. Path-style addressing
            is used for custom endpoints.
        max_connections: requests in flight per client (the fetch stage's event loop) and its HTTP pool.
        retry_mode: botocore retry mode, ``standard`` or ``adaptive`` (client-side rate limiting).
        max_attempts: attempts per request, first try included (botocore) and per object body.
        connect_timeout: seconds to open a connection.
        read_timeout: seconds without bytes before a read fails.
        region: signing region; None lets boto3 decide (us-east-1 for custom endpoints).
    """

    endpoint: str | None = None
    # Objects in flight per client on the mirror's event loop (README "Performance"): 128 keeps a store
    # 20 ms away busy (128 / 0.02 s = 6,400 requests/s in flight) at no cost in threads; the blocking
    # paths (streaming DSSDataset, the urllib3 engine) cap their threads at 16-32.
    max_connections: int = 128
    retry_mode: str = "standard"
    max_attempts: int = 4
    connect_timeout: float = 3.0
    # Bounds the silence between bytes, not the length of a download.
    read_timeout: float = 10.0
    region: str | None = None

    def __post_init__(self) -> None:
        if self.endpoint is not None:
            object.__setattr__(self, "endpoint", check_endpoint(self.endpoint))
        if not 1 <= self.max_connections <= 1024:
            raise ValueError(f"max_connections={self.max_connections} must be between 1 and 1024")
        if self.retry_mode not in RETRY_MODES:
            raise ValueError(f"retry_mode={self.retry_mode!r} must be one of {', '.join(RETRY_MODES)}")
        if not 1 <= self.max_attempts <= 20:
            raise ValueError(f"max_attempts={self.max_attempts} must be between 1 and 20")
        for name in ("connect_timeout", "read_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0 seconds")

    @property
    def endpoint_label(self) -> str:
        """What manifests record as the endpoint: the URL, or ``aws`` for AWS itself."""
        return self.endpoint or "aws"
