"""The S3 client every request of tess goes through: addressing, signing, HEAD, GET and LIST pages.

One :class:`S3Client` per process, endpoint options and client index (:func:`client_for`; a forked
DataLoader worker sees another ``os.getpid()`` and makes its own). Its coroutines run on the process's
loop (:mod:`pipeline.transport.loop`); HTTP is :mod:`pipeline.transport.http`, failures are classified
by :mod:`pipeline.transport.errors`. Credentials come from botocore's chain (environment, profile,
instance role), read per request so refreshed ones apply; nothing here prints or stores them.
Addressing: path style for custom endpoints (MinIO, Ceph, DSS rarely have wildcard DNS), virtual-hosted
for AWS where the bucket name allows it.
"""

from __future__ import annotations

import datetime as _dt
import email.utils
import os
import re
import threading
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from cache.checks import Expected, checksum_from_head
from pipeline.config import ClientOptions
from pipeline.transport import errors, http, s3xml, tls
from pipeline.transport.errors import FailureKind, GetFailure, StorageError
from pipeline.transport.signer import Signer, query_string

T = TypeVar("T")
WHOLE = 1 << 20  # bodies up to this many bytes are read in one piece
ERROR_BODY = 64 << 10  # of an error answer, whatever its framing, at most this much is read
LIST_BODY = 32 << 20  # a LIST page of 1,000 keys is ~300 KB
_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_DNS_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")
_CHECKSUM_HEADERS = {
    f"Checksum{a}": f"x-amz-checksum-{a.lower()}" for a in ("CRC64NVME", "CRC32", "CRC32C", "SHA1", "SHA256")
}


def _http_date_iso(text: str) -> str | None:
    """An HTTP date (``Wed, 02 Dec 2026 10:00:00 GMT``) as ISO 8601 in UTC, as listings give LastModified."""
    try:
        return email.utils.parsedate_to_datetime(text).astimezone(_dt.UTC).isoformat() if text else None
    except (TypeError, ValueError):
        return None


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


@dataclass(frozen=True)
class _EnvKeys:
    """A key pair (and session token) from the environment, as botocore's first provider reads it."""

    access_key: str
    secret_key: str
    token: str | None

    def get_frozen_credentials(self) -> _EnvKeys:
        return self


def credentials() -> Any:
    """botocore's credential chain, resolved (refreshable credentials are read per request); never
    printed or stored.

    The chain's first provider is the environment: when it holds a key pair (and no expiry, which makes
    botocore refresh them), the answer is read here directly, the same as botocore's, without importing
    botocore (0.27 s of start-up measured: a quarter of a small fetch of 2,000 objects).

    Raises:
        StorageError: no credentials anywhere in the chain, with the fix.
    """
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY") and not env.get("AWS_CREDENTIAL_EXPIRATION"):
        return _EnvKeys(
            env["AWS_ACCESS_KEY_ID"],
            env["AWS_SECRET_ACCESS_KEY"],
            env.get("AWS_SESSION_TOKEN") or env.get("AWS_SECURITY_TOKEN") or None,
        )
    import botocore.session

    creds = botocore.session.get_session().get_credentials()
    if creds is None:
        raise StorageError("no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE")
    return creds


def region_for(options: ClientOptions) -> str:
    """The signing region: ``--region``/``ClientOptions.region``, else botocore's (``AWS_DEFAULT_REGION``,
    read here without botocore when set, then the profile), else us-east-1."""
    if options.region:
        return options.region
    if os.environ.get("AWS_DEFAULT_REGION"):
        return os.environ["AWS_DEFAULT_REGION"]
    import botocore.session

    return botocore.session.get_session().get_config_variable("region") or "us-east-1"


@dataclass
class WholeBody:
    """A body already read whole (the mirror writes it in one go)."""

    size: int
    etag: str
    data: bytes
    reconnects: int = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        if self.data:
            yield self.data

    def close(self) -> None:
        pass


class StreamBody:
    """A body read as it arrives, at most ``limit`` bytes; transport errors come out as :class:`GetFailure`."""

    data = None

    def __init__(self, client: S3Client, resp: http.Response, uri: str, limit: int, etag: str) -> None:
        self._client = client
        self._resp = resp
        self._uri = uri
        self._limit = limit
        self.size = resp.length if resp.length is not None else limit
        self.etag = etag
        self.reconnects = resp.reconnects

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._resp.chunks(self._limit):
                yield chunk
        except http.TransportError as e:
            raise self._client.failure(e, self._uri) from None

    def close(self) -> None:
        self._resp.discard()


class S3Client:
    """Requests to one endpoint with one set of options, on the running loop."""

    def __init__(self, options: ClientOptions, *, creds: Any = None, region: str | None = None) -> None:
        self.options = options
        self.signer = Signer(creds if creds is not None else credentials(), region or region_for(options))
        self._path_style = options.endpoint is not None
        url = urllib.parse.urlsplit(options.endpoint or f"https://s3.{self.signer.region}.amazonaws.com")
        self._https = url.scheme == "https"
        self._host = url.hostname or "127.0.0.1"
        self._port = url.port or (443 if self._https else 80)
        self._base_path = url.path.rstrip("/")
        self._tls = tls.ssl_context(options) if self._https else None
        self._pools: dict[str, http.Pool] = {}

    def _route(self, bucket: str, key: str) -> tuple[http.Pool, str, str]:
        """(pool, Host header, percent-encoded path) of ``bucket/key`` (``key`` "" for the bucket)."""
        quoted = urllib.parse.quote(key, safe="/~")
        host = self._host
        if not self._path_style and _DNS_BUCKET_RE.fullmatch(bucket) and "--" not in bucket:
            host, path = f"{bucket}.{self._host}", f"{self._base_path}/{quoted}"
        else:
            path = f"{self._base_path}/{urllib.parse.quote(bucket, safe='')}" + (f"/{quoted}" if key else "")
        default_port = 443 if self._https else 80
        header = host if self._port == default_port else f"{host}:{self._port}"
        pool = self._pools.get(host)
        if pool is None:
            pool = self._pools[host] = http.Pool(
                http.Origin(host, self._port, self._tls),
                connect_timeout=self.options.connect_timeout,
                read_timeout=self.options.read_timeout,
            )
        return pool, header, path

    async def send(
        self, method: str, bucket: str, key: str, *, uri: str, query: str = "", headers: dict[str, str] | None = None
    ) -> http.Response:
        """One signed request; its answer, whatever its status."""
        pool, host, path = self._route(bucket, key)
        signed = self.signer.headers(method, host, path, query, headers)
        target = f"{path}?{query}" if query else path
        try:
            return await pool.request(method, target, [*signed.items(), ("accept-encoding", "identity")])
        except http.TransportError as e:
            raise self.failure(e, uri) from None

    def failure(self, e: http.TransportError, uri: str) -> GetFailure:
        """A transport error as a classified failure naming ``uri``."""
        if isinstance(e, http.CertificateError):
            failure = errors.certificate_failure(self.options, str(e), tls.ca_bundle(self.options)[1])
        elif isinstance(e, http.ConnectError):
            failure = errors.unreachable(self.options, str(e))
        else:
            failure = GetFailure(
                FailureKind.TRANSIENT, f"{uri}: {e}", no_answer=isinstance(e, http.StallError) and e.silent
            )
        failure.reconnects = e.reconnects
        return failure

    async def error(self, resp: http.Response, uri: str) -> GetFailure:
        """The classified failure of an error answer (its body read up to :data:`ERROR_BODY` bytes)."""
        body = await resp.read(ERROR_BODY, truncate=True)
        return errors.for_answer(
            resp.status,
            s3xml.error_code(body),
            uri=uri,
            options=self.options,
            location=resp.headers.get("location", ""),
        )

    # -- S3 operations ---------------------------------------------------------------------------------

    async def get(
        self,
        bucket: str,
        key: str,
        *,
        byte_range: tuple[int, int] | None = None,
        if_match: str | None = None,
        size: int | None = None,
    ) -> WholeBody | StreamBody:
        """GET ``bucket/key`` (``byte_range`` end exclusive), never reading more than ``size`` bytes
        (the range's length when one is given)."""
        uri = f"s3://{bucket}/{key}"
        extra: dict[str, str] = {}
        if byte_range is not None:
            extra["range"] = f"bytes={byte_range[0]}-{byte_range[1] - 1}"
            size = byte_range[1] - byte_range[0]
        if if_match:
            extra["if-match"] = if_match
        resp = await self.send("GET", bucket, key, uri=uri, headers=extra)
        try:
            if resp.status not in (200, 206):
                raise await self.error(resp, uri)
            self._check_status(resp, uri, byte_range)
            limit = size if size is not None else 1 << 62
            etag = resp.headers.get("etag", "")
            if limit > WHOLE:
                return StreamBody(self, resp, uri, limit, etag)
            data = await resp.read(limit)
            return WholeBody(len(data), etag, data, resp.reconnects)
        except http.TransportError as e:
            failure = self.failure(e, uri)
            failure.reconnects = resp.reconnects  # this request's, whatever failed after it was sent
            raise failure from None
        except GetFailure as failure:
            failure.reconnects = resp.reconnects
            raise

    def _check_status(self, resp: http.Response, uri: str, byte_range: tuple[int, int] | None) -> None:
        if byte_range is None:
            if resp.status != 200:
                resp.discard()
                raise GetFailure(FailureKind.TRANSIENT, f"{uri}: answered {resp.status} to a GET without a Range")
            return
        m = _CONTENT_RANGE_RE.fullmatch(resp.headers.get("content-range", "").strip())
        if resp.status != 206 or m is None or (int(m.group(1)), int(m.group(2)) + 1) != byte_range:
            resp.discard()
            raise GetFailure(
                FailureKind.TRANSIENT,
                f"{uri}: asked for bytes {byte_range[0]}-{byte_range[1] - 1}, "
                f"answered {resp.status} with Content-Range {resp.headers.get('content-range')!r}",
            )

    async def head(self, bucket: str, key: str) -> Expected:
        """Size, ETag and full-object additional checksum of ``bucket/key``."""
        uri = f"s3://{bucket}/{key}"
        resp = await self.send("HEAD", bucket, key, uri=uri, headers={"x-amz-checksum-mode": "ENABLED"})
        try:
            await resp.read(0)
        except http.TransportError as e:
            raise self.failure(e, uri) from None
        if resp.status != 200:
            raise errors.for_answer(resp.status, None, uri=uri, options=self.options)
        if resp.length is None:
            raise GetFailure(FailureKind.TRANSIENT, f"{uri}: HEAD answered without a Content-Length")
        h = resp.headers
        boto_shaped = {
            "ChecksumType": h.get("x-amz-checksum-type", "FULL_OBJECT"),
            **{name: h[header] for name, header in _CHECKSUM_HEADERS.items() if header in h},
        }
        return Expected(
            size=resp.length,
            etag=h.get("etag", ""),
            checksum=checksum_from_head(boto_shaped),
            last_modified=_http_date_iso(h.get("last-modified", "")),
        )

    async def list_page(self, bucket: str, prefix: str, token: str | None, *, max_keys: int = 1000) -> s3xml.ListPage:
        """One ListObjectsV2 page of ``prefix`` (after ``token``)."""
        uri = f"s3://{bucket}/{prefix}"
        params = [("list-type", "2"), ("prefix", prefix), ("max-keys", str(max_keys)), ("encoding-type", "url")]
        if token:
            params.append(("continuation-token", token))
        resp = await self.send("GET", bucket, "", uri=uri, query=query_string(params))
        try:
            if resp.status != 200:
                raise await self.error(resp, uri)
            body = await resp.read(LIST_BODY)
        except http.TransportError as e:
            raise self.failure(e, uri) from None
        try:
            return s3xml.parse_list_page(body)
        except s3xml.MalformedXML as e:
            raise GetFailure(FailureKind.TRANSIENT, f"listing {uri}: {e}") from None

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()


class BucketClient:
    """The mirror's getter: :class:`S3Client` GETs and HEADs of one bucket."""

    def __init__(self, client: S3Client, bucket: str) -> None:
        self.client = client
        self.bucket = bucket

    async def get(
        self,
        key: str,
        *,
        byte_range: tuple[int, int] | None = None,
        if_match: str | None = None,
        size: int | None = None,
    ) -> WholeBody | StreamBody:
        return await self.client.get(self.bucket, key, byte_range=byte_range, if_match=if_match, size=size)

    async def head(self, key: str) -> Expected:
        return await self.client.head(self.bucket, key)


_clients: PerProcess[S3Client] = PerProcess()


def client_for(options: ClientOptions, index: int = 0) -> S3Client:
    """Client number ``index`` for ``options`` in this process, made on first use."""
    return _clients.get((options, index), lambda: S3Client(options))
