"""GET of object bodies: botocore's SigV4 signer over a urllib3 pool, or boto3's ``get_object``.

``client.get_object`` spends about 2 ms of CPU per small object here (request building, event hooks,
response parsing); signing the same request with botocore's ``S3SigV4Auth`` and sending it through a
urllib3 pool costs about 0.8 ms. On a 2-core machine that CPU is taken from the storage server or the
training loop, so the fetch stage uses the direct path. It keeps everything else of botocore: the
credential chain (refreshed per request), the signer, the region. Retries are tess's own
(:func:`pipeline.s3.retry_call`); with ``retry_mode="adaptive"`` (client-side rate limiting, which only
botocore's retry handler implements) the boto3 path is used instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import botocore.exceptions
import urllib3
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest

from pipeline.config import ClientOptions
from pipeline.s3 import PerProcess

CHUNK = 1 << 20
_CODE_RE = re.compile(rb"<Code>([^<]{1,128})</Code>")
_MSG_RE = re.compile(rb"<Message>([^<]{0,512})</Message>")
# S3 answers these when it is overloaded or briefly failing; a later attempt can succeed.
RETRYABLE_STATUS = {429, 500, 502, 503, 504}


class RetryableHTTPError(botocore.exceptions.ClientError):
    """A 5xx/429 answer (InternalError, SlowDown...): retried with backoff."""


@dataclass
class ObjectBody:
    """An open GET response: its length and ETag, and its bytes in chunks."""

    content_length: int
    etag: str
    _chunks: Iterator[bytes]
    _release: Any = None
    retries: int = 0  # retries botocore made inside the call (boto3 path only)

    def iter_chunks(self) -> Iterator[bytes]:
        try:
            yield from self._chunks
        finally:
            self.close()

    def read(self) -> bytes:
        return b"".join(self.iter_chunks())

    def close(self) -> None:
        if self._release is not None:
            self._release()
            self._release = None


def _client_error(status: int, body: bytes, operation: str = "GetObject") -> botocore.exceptions.ClientError:
    m = _CODE_RE.search(body)
    code = m.group(1).decode("utf-8", "replace") if m else str(status)
    msg_m = _MSG_RE.search(body)
    message = msg_m.group(1).decode("utf-8", "replace") if msg_m else f"HTTP {status}"
    response = {"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}}
    cls = RetryableHTTPError if status in RETRYABLE_STATUS else botocore.exceptions.ClientError
    return cls(response, operation)


class DirectGetter:
    """Signed GETs over one urllib3 pool (per process and client index; never shared across a fork)."""

    def __init__(self, options: ClientOptions, client: Any) -> None:
        import boto3

        self._credentials = boto3.session.Session().get_credentials()
        if self._credentials is None:
            raise botocore.exceptions.NoCredentialsError()
        self._region = client.meta.region_name or "us-east-1"
        self._path_style = options.endpoint is not None
        self._base = (options.endpoint or client.meta.endpoint_url).rstrip("/")
        self._pool = urllib3.PoolManager(
            maxsize=options.max_connections,
            block=False,
            retries=False,
            timeout=urllib3.Timeout(connect=options.connect_timeout, read=options.read_timeout),
        )

    def _target(self, bucket: str, key: str) -> tuple[str, str]:
        """(origin, path) of the object; the path is sent exactly as built, never dot-normalised,
        so a key like ``a/../b`` reaches the server as that key."""
        parts = urlsplit(self._base)
        quoted = quote(key, safe="/~")
        if self._path_style or "." in bucket:
            return f"{parts.scheme}://{parts.netloc}", f"{parts.path}/{bucket}/{quoted}"
        return f"{parts.scheme}://{bucket}.{parts.netloc}", f"{parts.path}/{quoted}"

    def open(self, bucket: str, key: str, headers: dict[str, str] | None = None) -> ObjectBody:
        origin, path = self._target(bucket, key)
        request = AWSRequest(method="GET", url=origin + path, headers=dict(headers or {}))
        S3SigV4Auth(self._credentials.get_frozen_credentials(), "s3", self._region).add_auth(request)
        # ConnectionPool.urlopen sends the target as given; PoolManager.request would normalise it.
        pool = self._pool.connection_from_url(origin)
        resp = pool.urlopen("GET", path, headers=dict(request.headers.items()), preload_content=False,
                            decode_content=False, redirect=False, retries=False, assert_same_host=False)
        if resp.status not in (200, 206):
            body = resp.read(64 * 1024)
            resp.release_conn()
            raise _client_error(resp.status, body)
        length = int(resp.headers.get("Content-Length", "-1"))
        return ObjectBody(content_length=length, etag=resp.headers.get("ETag", ""),
                          _chunks=resp.stream(CHUNK), _release=resp.release_conn)


_getters: PerProcess[DirectGetter] = PerProcess()


def open_object(options: ClientOptions, client: Any, index: int, bucket: str, key: str,
                headers: dict[str, str] | None = None) -> ObjectBody:
    """Start a GET of ``bucket/key`` with client ``index`` of this process (``headers``: Range, If-Match)."""
    if options.retry_mode == "adaptive":
        extra = {}
        if headers and "Range" in headers:
            extra["Range"] = headers["Range"]
        if headers and "If-Match" in headers:
            extra["IfMatch"] = headers["If-Match"]
        resp = client.get_object(Bucket=bucket, Key=key, **extra)
        body = resp["Body"]
        return ObjectBody(content_length=int(resp["ContentLength"]), etag=resp.get("ETag", ""),
                          _chunks=body.iter_chunks(CHUNK), _release=body.close,
                          retries=int(resp.get("ResponseMetadata", {}).get("RetryAttempts", 0) or 0))
    getter = _getters.get((options, index), lambda: DirectGetter(options, client))
    return getter.open(bucket, key, headers)
