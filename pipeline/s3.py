"""S3 access: per-process lazy clients, paginated listing, streamed GETs, error classification.

This is the only module of tess that imports boto3. Clients are created on first use in each process
and are never pickled: a DataLoader worker (a forked or spawned process) sees a different ``os.getpid()``
and builds its own, as boto3 clients must not cross a fork.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import boto3
import botocore.exceptions
import urllib3.exceptions
from botocore.config import Config

from pipeline.config import ClientOptions, S3Uri, redact_url

log = logging.getLogger(__name__)
T = TypeVar("T")

_FATAL_CODES = {
    "AccessDenied": "access denied",
    "InvalidAccessKeyId": "the access key id is not known to the server",
    "SignatureDoesNotMatch": "the secret key does not match the access key",
    "ExpiredToken": "the session token has expired",
    "InvalidToken": "the session token is invalid",
    "AllAccessDisabled": "all access to this object has been disabled",
}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


class StorageError(Exception):
    """S3 refused or failed a request in a way that retrying will not fix."""


@dataclass(frozen=True, kw_only=True)
class ObjectInfo:
    """One listed object."""

    key: str
    etag: str
    size: int
    last_modified: str


def _make_client(options: ClientOptions) -> Any:
    config = Config(
        max_pool_connections=options.max_connections,
        retries={"mode": options.retry_mode, "total_max_attempts": options.max_attempts},
        connect_timeout=options.connect_timeout,
        read_timeout=options.read_timeout,
        # Custom endpoints (MinIO, Ceph, DSS, moto) rarely have wildcard DNS for virtual hosts.
        s3={"addressing_style": "path" if options.endpoint else "auto"},
        # Shape validation costs CPU on every call and our calls are fixed in code.
        parameter_validation=False,
        # Newer botocore sends and checks CRC checksums by default; many S3-compatible stores do not
        # support them, and tess checks sizes, MD5 ETags and SHA-256 itself.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = boto3.session.Session()
    # Timestamps stay strings (LastModified of a 1,000-key page costs ~0.2 ms per key in dateutil);
    # iso_utc turns them into the same ISO text with the C parser.
    session._session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
    region = options.region or session.region_name or "us-east-1"
    return session.client("s3", endpoint_url=options.endpoint, region_name=region, config=config)


class PerProcess(Generic[T]):
    """Objects made on first use, once per process and key, and never shared across a fork.

    Clients, connection pools and thread pools hold sockets and threads that belong to the process
    that made them; a forked DataLoader worker sees another ``os.getpid()`` and makes its own.
    """

    def __init__(self) -> None:
        self._items: dict[tuple[int, Any], T] = {}
        self._lock = threading.Lock()

    def get(self, key: Any, make: Callable[[], T]) -> T:
        ident = (os.getpid(), key)
        item = self._items.get(ident)
        if item is None:
            with self._lock:
                item = self._items.get(ident)
                if item is None:
                    for stale in [k for k in self._items if k[0] != ident[0]]:
                        del self._items[stale]
                    item = self._items[ident] = make()
        return item


_clients: PerProcess[Any] = PerProcess()


def get_client(options: ClientOptions, index: int = 0) -> Any:
    """Client number ``index`` for ``options`` in this process, created on first use."""
    return _clients.get((options, index), lambda: _make_client(options))


def error_code(exc: BaseException) -> str | None:
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
    return None


def is_missing(exc: BaseException) -> bool:
    """True for 404-type errors (the object or key is gone)."""
    return error_code(exc) in _MISSING_CODES


def describe_error(exc: BaseException, *, uri: str, options: ClientOptions) -> str | None:
    """A one-line message with the fix for errors that retrying cannot fix, else None."""
    where = redact_url(options.endpoint) if options.endpoint else "AWS S3"
    code = error_code(exc)
    if code in _FATAL_CODES:
        return (
            f"{uri}: {_FATAL_CODES[code]} ({code}) at {where}; check AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY / AWS_PROFILE and the bucket policy"
        )
    if code == "NoSuchBucket":
        bucket = uri[5:].split("/", 1)[0]
        return f"bucket {bucket!r} does not exist at {where}; check PREFIX=s3://bucket/prefix and ENDPOINT"
    if code in ("403", "Forbidden"):
        return f"{uri}: forbidden (403) at {where}; check the credentials and the bucket policy"
    if code in ("301", "PermanentRedirect", "AuthorizationHeaderMalformed"):
        return f"{uri}: the bucket is in another region ({code}); set AWS_REGION or AWS_DEFAULT_REGION"
    if isinstance(exc, (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError,
                        urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError)):
        return f"cannot reach the S3 endpoint {where}; check ENDPOINT / AWS_ENDPOINT_URL and that the server is up"
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return "no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
    if isinstance(exc, botocore.exceptions.ParamValidationError):
        return f"{uri}: invalid request parameters; check PREFIX"
    return None


def iso_utc(ts: Any) -> str:
    if isinstance(ts, str):
        try:
            ts = _dt.datetime.fromisoformat(ts)
        except ValueError:
            return ts
    if isinstance(ts, _dt.datetime):
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=_dt.timezone.utc)
        return ts.astimezone(_dt.timezone.utc).isoformat()
    return str(ts)


def list_objects(uri: S3Uri, options: ClientOptions, *, limit: int | None = None,
                 stats: dict[str, int] | None = None) -> Iterator[ObjectInfo]:
    """Yield the objects under ``uri`` in listing order, skipping zero-byte folder markers.

    ``stats``, when given, receives ``pages`` and ``retries`` (botocore's retries of LIST requests).

    Raises:
        StorageError: for access, bucket and endpoint problems, with the fix in the message.
    """
    client = get_client(options)
    paginator = client.get_paginator("list_objects_v2")
    n = 0
    try:
        for page in paginator.paginate(Bucket=uri.bucket, Prefix=uri.prefix, PaginationConfig={"PageSize": 1000}):
            if stats is not None:
                stats["pages"] = stats.get("pages", 0) + 1
                stats["retries"] = stats.get("retries", 0) + int(page.get("ResponseMetadata", {}).get("RetryAttempts", 0) or 0)
            for obj in page.get("Contents", ()):
                key = obj["Key"]
                size = int(obj["Size"])
                if size == 0 and key.endswith("/"):
                    continue
                yield ObjectInfo(key=key, etag=obj.get("ETag", ""), size=size, last_modified=iso_utc(obj.get("LastModified")))
                n += 1
                if limit is not None and n >= limit:
                    return
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
        msg = describe_error(e, uri=str(uri), options=options)
        if msg is None and isinstance(e, botocore.exceptions.ReadTimeoutError):
            where = redact_url(options.endpoint) if options.endpoint else "AWS S3"
            msg = (f"the S3 endpoint {where} accepted connections but did not answer within {options.read_timeout:g} s "
                   f"({options.max_attempts} attempts); check ENDPOINT and the server's health")
        raise StorageError(msg or f"listing {uri} failed: {type(e).__name__}: {e}") from None


def retry_call(fn: Callable[[], T], *, attempts: int, is_permanent: Callable[[BaseException], bool],
               base: float = 0.2, cap: float = 5.0, budget_s: float = 60.0,
               on_retry: Callable[[BaseException], None] | None = None) -> T:
    """Call ``fn`` up to ``attempts`` times with full-jitter exponential backoff within ``budget_s``.

    botocore already retries each HTTP request; this outer loop covers what it cannot see, such as a
    body cut short while streaming or a body whose MD5 does not match its ETag.
    """
    deadline = time.monotonic() + budget_s
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:
            if is_permanent(e) or attempt == attempts:
                raise
            delay = random.uniform(0, min(cap, base * 2**attempt))
            if time.monotonic() + delay > deadline:
                raise
            if on_retry is not None:
                on_retry(e)
            log.debug("retrying after %s: %s", type(e).__name__, e)
            time.sleep(delay)
    raise AssertionError("unreachable")


def ensure_bucket(uri: S3Uri, options: ClientOptions) -> None:
    """Create the bucket of ``uri`` unless it exists."""
    client = get_client(options)
    try:
        client.head_bucket(Bucket=uri.bucket)
        return
    except botocore.exceptions.ClientError as e:
        if error_code(e) not in ("404", "NoSuchBucket", "NotFound"):
            raise StorageError(describe_error(e, uri=str(uri), options=options) or f"HEAD bucket {uri.bucket} failed: {e}") from None
    except botocore.exceptions.BotoCoreError as e:
        raise StorageError(describe_error(e, uri=str(uri), options=options) or f"HEAD bucket {uri.bucket} failed: {e}") from None
    client.create_bucket(Bucket=uri.bucket)


def upload_file(path: os.PathLike[str] | str, bucket: str, key: str, options: ClientOptions, *, uri_for_errors: str) -> None:
    """PUT one local file (multipart through s3transfer above 64 MiB)."""
    client = get_client(options)
    try:
        if os.path.getsize(path) > 64 << 20:
            client.upload_file(str(path), bucket, key)
        else:
            with open(path, "rb") as f:
                client.put_object(Bucket=bucket, Key=key, Body=f.read())
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
        raise StorageError(describe_error(e, uri=uri_for_errors, options=options) or f"PUT {uri_for_errors} failed: {e}") from None
