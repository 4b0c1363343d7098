"""GET engines for :mod:`pipeline.mirror`, chosen per endpoint by :func:`engine_name` (README "Performance").

* **asyncio** (:mod:`pipeline.httpengine`, the default for plain-``http://`` endpoints without a proxy:
  on-premises MinIO, Ceph, DSS): HTTP/1.1 and SigV4 in Python on the mirror's own event loop, no thread
  hand-offs; it used the least CPU per object of every client measured, and sends every key byte for
  byte.
* **obstore** (Rust ``object_store``; TLS endpoints such as AWS, and proxies): signs and sends requests
  in native code on its own tokio runtime, awaited from the loop. It also parses the LIST pages of a
  ``-w 0`` fetch (:mod:`pipeline.native_listing`).
* **urllib3** (:class:`ThreadGetter`, botocore's signer over urllib3 threads) where obstore cannot: keys
  ``object_store`` would rewrite (``a/../b``, ``a//b``, ``%``...), a process forked after obstore's
  runtime started in its parent (tokio does not survive a fork), ``retry_mode="adaptive"``
  (botocore's client-side rate limiting), and ``TESS_ENGINE=urllib3``.

What stays from boto3 in all of them: the credential chain (resolved, refreshed credentials read per
request or handed to obstore through a provider callback; never printed or stored), custom endpoints
with path-style addressing, the region. Retries are the mirror's own (obstore's are off), so
``tests/test_faults.py`` counts every one.
"""
from __future__ import annotations

import asyncio
import datetime as _dt
import logging
import os
import re
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import botocore.exceptions
import urllib3.exceptions

from cache.checks import Expected, checksum_from_head
from pipeline.config import ClientOptions, redact_url
from cache.blobs import BlobStore
from pipeline.mirror import FailureKind, GetFailure, Mirror, MirrorSettings, MirrorStatus
from pipeline.objectget import RETRYABLE_STATUS, RetryableHTTPError, open_object
from pipeline.s3 import PerProcess, describe_error, get_client

log = logging.getLogger(__name__)

ENV_ENGINE = "TESS_ENGINE"
ENGINES = ("asyncio", "obstore", "urllib3")
_PROXY_VARS = ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
# Keys object_store sends unchanged: no empty, "." or ".." segments and only unreserved characters.
_SAFE_KEY_RE = re.compile(r"[A-Za-z0-9._\-~]+(?:/[A-Za-z0-9._\-~]+)*")
_STATUS_RE = re.compile(r"status code: (\d{3})|status (\d{3})")
_CODE_RE = re.compile(r"<Code>([^<]{1,128})</Code>")
_CHUNK = 1 << 20
# Where obstore's runtime was started (a forked child must not use it).
_obstore_pid: int | None = None
_obstore_lock = threading.Lock()


def obstore_key_ok(key: str) -> bool:
    return bool(_SAFE_KEY_RE.fullmatch(key)) and not any(seg in (".", "..") for seg in key.split("/"))


def _classify(exc: BaseException, *, uri: str, options: ClientOptions) -> GetFailure:
    """A botocore/urllib3 exception (or one shaped like it) as a classified :class:`GetFailure`."""
    if isinstance(exc, GetFailure):
        return exc
    fatal = describe_error(exc, uri=uri, options=options)
    code = None
    if isinstance(exc, botocore.exceptions.ClientError):
        code = str(exc.response.get("Error", {}).get("Code"))
    if code in ("NoSuchKey", "404", "NotFound"):
        return GetFailure(FailureKind.MISSING, f"{uri}: deleted since the listing (404)")
    if code in ("PreconditionFailed", "412"):
        return GetFailure(FailureKind.TRANSIENT, f"{uri}: changed while it was being fetched (ETag)")
    transient = isinstance(exc, (RetryableHTTPError, botocore.exceptions.IncompleteReadError,
                                 botocore.exceptions.ResponseStreamingError, botocore.exceptions.ReadTimeoutError,
                                 botocore.exceptions.ConnectionError, urllib3.exceptions.HTTPError,
                                 ConnectionError, TimeoutError))
    if transient:
        return GetFailure(FailureKind.TRANSIENT, fatal or f"{uri}: {type(exc).__name__}: {exc}",
                          exhausted=MirrorStatus.FATAL if fatal else MirrorStatus.FAILED)
    if fatal:
        return GetFailure(FailureKind.FATAL, fatal)
    return GetFailure(FailureKind.PERMANENT, f"{uri}: {type(exc).__name__}: {exc}")


def _client_error(status: int, code: str | None, message: str) -> botocore.exceptions.ClientError:
    cls = RetryableHTTPError if status in RETRYABLE_STATUS else botocore.exceptions.ClientError
    return cls({"Error": {"Code": code or str(status), "Message": message},
                "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def classify_http(status: int, text: str, *, uri: str, options: ClientOptions) -> GetFailure:
    """An HTTP error answer (its status, and the S3 XML error ``<Code>`` found in ``text``), classified."""
    code_m = _CODE_RE.search(text)
    return _classify(_client_error(status, code_m.group(1) if code_m else None, f"HTTP {status}"), uri=uri, options=options)


def request_headers(byte_range: tuple[int, int] | None, if_match: str | None) -> dict[str, str]:
    """The HTTP headers of a GET for ``byte_range`` (end exclusive) of the version ``if_match``."""
    headers: dict[str, str] = {}
    if byte_range is not None:
        headers["Range"] = f"bytes={byte_range[0]}-{byte_range[1] - 1}"
    if if_match:
        headers["If-Match"] = if_match
    return headers


def unreachable(options: ClientOptions, detail: str = "") -> GetFailure:
    """No connection to the endpoint: retried, and fatal once the retries are spent."""
    where = redact_url(options.endpoint) if options.endpoint else "AWS S3"
    return GetFailure(FailureKind.TRANSIENT, f"cannot reach the S3 endpoint {where}; check ENDPOINT / AWS_ENDPOINT_URL "
                      f"and that the server is up{f' ({detail})' if detail else ''}", exhausted=MirrorStatus.FATAL)


def head_object(options: ClientOptions, index: int, bucket: str, key: str) -> Expected:
    """Size, ETag and full-object additional checksum of ``bucket/key`` (HEAD with ``ChecksumMode``)."""
    resp = get_client(options, index).head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    return Expected(size=int(resp["ContentLength"]), etag=resp.get("ETag", ""), checksum=checksum_from_head(resp))


@dataclass
class WholeBody:
    """A body the engine already holds in memory (the mirror writes it in one go)."""

    size: int
    etag: str
    data: Any

    async def chunks(self) -> AsyncIterator[Any]:
        if len(self.data):
            yield self.data


# -- urllib3 threads ----------------------------------------------------------------------------------


class ThreadGetter:
    """botocore's SigV4 signer over a urllib3 pool, one blocking request per thread of a pool."""

    def __init__(self, options: ClientOptions, bucket: str, index: int = 0, threads: int | None = None) -> None:
        self.options = options
        self.bucket = bucket
        self.index = index
        self._pool = ThreadPoolExecutor(max_workers=threads or min(options.max_connections, 32),
                                        thread_name_prefix="tess-get")

    def _uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def _get_blocking(self, key: str, headers: dict[str, str]) -> WholeBody:
        try:
            body = open_object(self.options, get_client(self.options, self.index), self.index, self.bucket, key, headers)
            # Whole ranges/objects: the mirror's parts are at most part_size bytes.
            return WholeBody(body.content_length, body.etag, body.read())
        except Exception as e:
            raise _classify(e, uri=self._uri(key), options=self.options) from None

    async def get(self, key: str, *, byte_range: tuple[int, int] | None = None, if_match: str | None = None) -> WholeBody:
        headers = request_headers(byte_range, if_match)
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._get_blocking, key, headers)

    async def head(self, key: str) -> Expected:
        def run() -> Expected:
            try:
                return head_object(self.options, self.index, self.bucket, key)
            except Exception as e:
                raise _classify(e, uri=self._uri(key), options=self.options) from None

        return await asyncio.get_running_loop().run_in_executor(self._pool, run)


# -- obstore ------------------------------------------------------------------------------------------


def _credential_provider() -> Callable[[], dict[str, Any]]:
    """botocore's credential chain as an obstore provider (refreshed credentials reach obstore too)."""
    creds = _credentials()

    def provide() -> dict[str, Any]:
        f = creds.get_frozen_credentials()
        # Asked again well before botocore's own refresh window closes.
        expires = _dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(minutes=5)
        return {"access_key_id": f.access_key, "secret_access_key": f.secret_key, "token": f.token, "expires_at": expires}

    return provide


def s3_store(options: ClientOptions, bucket: str, *, request_timeout: _dt.timedelta = _dt.timedelta(hours=1)) -> Any:
    """obstore's ``S3Store`` for ``bucket`` (its retries off: the mirror's and boto3's are the ones counted).

    ``request_timeout`` bounds a whole request: long for GETs (the mirror bounds their silences itself).
    """
    global _obstore_pid
    from obstore.store import S3Store

    kwargs: dict[str, Any] = {}
    if options.endpoint:
        kwargs.update(endpoint=options.endpoint, virtual_hosted_style_request=False)
    store = S3Store(
        bucket, region=_region(options), credential_provider=_credential_provider(),
        client_options={"allow_http": True, "connect_timeout": _dt.timedelta(seconds=options.connect_timeout),
                        "timeout": request_timeout, "http1_only": True,
                        "pool_max_idle_per_host": str(max(options.max_connections, 8))},
        retry_config={"max_retries": 0, "retry_timeout": _dt.timedelta(seconds=1),
                      "backoff": {"init_backoff": _dt.timedelta(milliseconds=100),
                                  "max_backoff": _dt.timedelta(seconds=1), "base": 2}},
        **kwargs,
    )
    with _obstore_lock:
        _obstore_pid = os.getpid()
    return store


class _ObstoreBody:
    data = None  # streamed

    def __init__(self, result: Any, size: int, etag: str) -> None:
        self._result = result
        self.size = size
        self.etag = etag

    async def chunks(self) -> AsyncIterator[Any]:
        async for chunk in self._result.stream(min_chunk_size=_CHUNK):
            yield chunk


class ObstoreGetter:
    """GETs through obstore's ``S3Store`` (native signing and HTTP), awaited on the mirror's loop."""

    def __init__(self, options: ClientOptions, bucket: str, index: int = 0) -> None:
        self.options = options
        self.bucket = bucket
        self.index = index
        self._fallback: ThreadGetter | None = None
        self._store = s3_store(options, bucket)

    def _uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def fallback(self) -> ThreadGetter:
        if self._fallback is None:
            self._fallback = ThreadGetter(self.options, self.bucket, self.index, threads=8)
        return self._fallback

    async def get(self, key: str, *, byte_range: tuple[int, int] | None = None, if_match: str | None = None) -> Any:
        if not obstore_key_ok(key):
            return await self.fallback().get(key, byte_range=byte_range, if_match=if_match)
        import obstore

        opts: dict[str, Any] = {}
        if byte_range is not None:
            opts["range"] = byte_range
        if if_match:
            opts["if_match"] = if_match
        try:
            result = await obstore.get_async(self._store, key, options=opts or None)
            meta = result.meta
            start, end = result.range
            size, etag = end - start, meta.get("e_tag") or ""
            if byte_range is None and size < _CHUNK:
                return WholeBody(size, etag, await result.bytes_async())
            return _ObstoreBody(result, size, etag)
        except Exception as e:
            raise self._failure(e, key) from None

    async def head(self, key: str) -> Expected:
        return await self.fallback().head(key)

    def _failure(self, e: BaseException, key: str) -> GetFailure:
        import obstore.exceptions as oe

        uri = self._uri(key)
        text = str(e)
        if isinstance(e, oe.PreconditionError):
            return GetFailure(FailureKind.TRANSIENT, f"{uri}: changed while it was being fetched (ETag)")
        m = _STATUS_RE.search(text)
        if m:
            return classify_http(int(m.group(1) or m.group(2)), text, uri=uri, options=self.options)
        first = text.splitlines()[0][:300] if text else ""
        if "error sending request" in text and "connect" in text.lower():
            return unreachable(self.options)
        if isinstance(e, (oe.GenericError, OSError, TimeoutError)) or "error sending request" in text:
            return GetFailure(FailureKind.TRANSIENT, f"{uri}: {type(e).__name__}: {first}")
        return GetFailure(FailureKind.PERMANENT, f"{uri}: {type(e).__name__}: {first}")


def _credentials() -> Any:
    """botocore's resolved (refreshable) credentials; never printed or stored."""
    import boto3

    creds = boto3.session.Session().get_credentials()
    if creds is None:
        raise botocore.exceptions.NoCredentialsError()
    return creds


def _region(options: ClientOptions) -> str:
    import boto3

    return options.region or boto3.session.Session().region_name or "us-east-1"


# -- choice ------------------------------------------------------------------------------------------


def engine_name(options: ClientOptions) -> str:
    """The engine this process uses for ``options`` (see the module docstring for the fallbacks)."""
    wanted = os.environ.get(ENV_ENGINE, "").strip().lower() or "asyncio"
    if wanted not in ENGINES:
        raise ValueError(f"{ENV_ENGINE}={wanted!r} is not an engine; use one of {', '.join(ENGINES)}")
    if wanted == "urllib3" or options.retry_mode == "adaptive":
        return "urllib3"
    plain_http = bool(options.endpoint and options.endpoint.startswith("http://"))
    if wanted == "asyncio" and plain_http and not any(os.environ.get(v) for v in _PROXY_VARS):
        return "asyncio"
    if _obstore_pid is not None and _obstore_pid != os.getpid():
        log.debug("obstore's runtime started in parent %d; this forked process uses urllib3", _obstore_pid)
        return "urllib3"
    try:
        import obstore  # noqa: F401
    except ImportError:
        return "urllib3"
    return "obstore"


_getters: PerProcess[Any] = PerProcess()


def getter_for(options: ClientOptions, bucket: str, index: int = 0) -> Any:
    """The getter for client ``index`` of this process (made on first use; never crosses a fork)."""
    name = engine_name(options)
    make = {"asyncio": _asyncio_getter, "obstore": ObstoreGetter, "urllib3": ThreadGetter}[name]
    return _getters.get((options, bucket, index, name), lambda: make(options, bucket, index))


def _asyncio_getter(options: ClientOptions, bucket: str, index: int) -> Any:
    from pipeline.httpengine import AsyncioGetter

    heads = ThreadGetter(options, bucket, index, threads=4)  # HEADs of large objects only: ChecksumMode via botocore
    return AsyncioGetter(options, bucket, index, credentials=_credentials(), head=heads.head, region=_region(options))


def settings_for(options: ClientOptions, **overrides: Any) -> MirrorSettings:
    """Mirror settings from client options: concurrency = ``max_connections``, attempts, read timeout."""
    return MirrorSettings(concurrency=options.max_connections, max_attempts=options.max_attempts,
                          read_timeout=options.read_timeout, **overrides)


def make_mirror(options: ClientOptions, bucket: str, store: BlobStore, *, client: int = 0, worker: int = -1,
                settings: MirrorSettings | None = None) -> Mirror:
    """A :class:`~pipeline.mirror.Mirror` over client ``client`` of this process."""
    return Mirror(store, getter_for(options, bucket, client), settings or settings_for(options), client=client, worker=worker)


def obstore_started_here() -> bool:
    """True when this process has started obstore's runtime (a fork of it would hang in obstore)."""
    return _obstore_pid == os.getpid()
