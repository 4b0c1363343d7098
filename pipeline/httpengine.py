"""The asyncio GET engine: SigV4 (:class:`Signer`) and HTTP/1.1 over ``asyncio`` streams, on the mirror's loop.

Measured on s3rver (README "Performance"), one event-loop thread that does its own HTTP spends the
least CPU per object of every client tried: nothing crosses between threads (obstore's answers cross
from its tokio threads to the loop twice per object, which cost more kernel time than the HTTP itself).
It serves plain-``http://`` endpoints (on-premises MinIO, Ceph, DSS; the loopback servers of the tests
and benchmarks); TLS endpoints and proxies stay with obstore (see :func:`pipeline.engines.engine_name`).

* Keep-alive connections, opened on demand (the mirror bounds the requests in flight) and dropped on
  any error, ``Connection: close`` or a body left unread.
* Bodies by ``Content-Length`` (``Transfer-Encoding: chunked`` too, for error pages); small bodies are
  read whole, larger ones stream in chunks of up to 1 MiB.
* Keys are sent byte for byte (percent-encoded as botocore does), so no key needs another engine.
* Failures are classified like the other engines' (:func:`pipeline.engines.classify_http`, :func:`~pipeline.engines.unreachable`).
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import hashlib
import hmac
import os
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

from cache.checks import Expected
from pipeline.config import ClientOptions
from pipeline.engines import WholeBody, classify_http, request_headers, unreachable
from pipeline.mirror_types import GetFailure

_WHOLE = 1 << 20  # bodies up to this are read in one piece
_CHUNK = 1 << 20
_ERROR_BODY = 64 << 10


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        self.writer.close()


class _Response:
    """Status, headers and the body of one answer; gives its connection back once the body is read."""

    def __init__(self, getter: AsyncioGetter, conn: _Connection, status: int, headers: dict[str, str]) -> None:
        self._getter = getter
        self._conn: _Connection | None = conn
        self.status = status
        self.headers = headers
        self.chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        self.size = int(headers.get("content-length", "0") or 0)
        self.etag = headers.get("etag", "")
        self.data: bytes | None = None

    async def read_all(self, limit: int | None = None) -> bytes:
        conn = self._take()
        try:
            if self.chunked:
                parts = [part async for part in self._chunked(conn)]
                body = b"".join(parts)
            else:
                if limit is not None and self.size > limit:
                    raise ConnectionError("error body too long")
                body = await conn.reader.readexactly(self.size)
        except asyncio.IncompleteReadError as e:
            conn.close()
            raise ConnectionError(f"connection closed {len(e.partial)} bytes into the body") from None
        except BaseException:
            conn.close()
            raise
        self._release(conn)
        return body

    async def chunks(self) -> AsyncIterator[bytes]:
        conn = self._take()
        try:
            left = self.size
            while left:
                piece = await conn.reader.read(min(_CHUNK, left))
                if not piece:
                    raise ConnectionError(f"connection closed {self.size - left} bytes into the body")
                left -= len(piece)
                yield piece
        except BaseException:
            conn.close()
            raise
        self._release(conn)

    async def _chunked(self, conn: _Connection) -> AsyncIterator[bytes]:
        while True:
            size = int((await conn.reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await conn.reader.readline()) not in (b"\r\n", b""):
                    pass
                return
            yield await conn.reader.readexactly(size)
            await conn.reader.readexactly(2)

    def _take(self) -> _Connection:
        if self._conn is None:
            raise RuntimeError("the body of this response was already read")
        conn, self._conn = self._conn, None
        return conn

    def _release(self, conn: _Connection) -> None:
        if self.headers.get("connection", "").lower() == "close":
            conn.close()
        else:
            self._getter._idle.append(conn)

    def discard(self) -> None:
        """The body will not be read: the connection cannot be reused."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class Signer:
    """AWS Signature V4 for unsigned-payload GETs, with the signing key kept for the day.

    botocore's ``SigV4Auth`` re-derives the key and re-parses the URL on every request (~0.1 ms each,
    a tenth of tess's CPU per small object, measured with py-spy); this signs the same canonical request
    (``tests/test_httpengine.py`` compares both headers byte for byte). Credentials are botocore's and
    are read per request, so refreshed ones apply at once.
    """

    def __init__(self, credentials: Any, region: str, host: str) -> None:
        self._creds = credentials
        self._region = region
        self._host = host
        self._key: tuple[str, str, bytes] | None = None  # (secret key, day, signing key)

    def _signing_key(self, secret: str, day: str) -> bytes:
        if self._key is None or self._key[:2] != (secret, day):
            key = ("AWS4" + secret).encode()
            for part in (day, self._region, "s3", "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            self._key = (secret, day, key)
        return self._key[2]

    def headers(self, path: str, extra: dict[str, str], now: _dt.datetime | None = None) -> dict[str, str]:
        """The headers of a signed ``GET path`` (``path`` already percent-encoded), ``extra`` included."""
        frozen = self._creds.get_frozen_credentials()
        amz_date = (now or _dt.datetime.now(_dt.timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
        day = amz_date[:8]
        signed = {"host": self._host, "x-amz-content-sha256": "UNSIGNED-PAYLOAD", "x-amz-date": amz_date}
        if frozen.token:
            signed["x-amz-security-token"] = frozen.token
        for name, value in extra.items():
            signed[name.lower()] = " ".join(value.split())
        names = sorted(signed)
        canonical = "\n".join(["GET", path, "", *(f"{n}:{signed[n]}" for n in names), "", ";".join(names),
                               "UNSIGNED-PAYLOAD"])
        scope = f"{day}/{self._region}/s3/aws4_request"
        to_sign = f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        signature = hmac.new(self._signing_key(frozen.secret_key, day), to_sign.encode(), hashlib.sha256).hexdigest()
        signed["authorization"] = (f"AWS4-HMAC-SHA256 Credential={frozen.access_key}/{scope}, "
                                   f"SignedHeaders={';'.join(names)}, Signature={signature}")
        return signed


class AsyncioGetter:
    """GETs for one bucket of a plain-HTTP endpoint, signed by :class:`Signer`, on the running event loop."""

    def __init__(self, options: ClientOptions, bucket: str, index: int = 0, *, credentials: Any, region: str,
                 head: Any) -> None:
        assert options.endpoint is not None and options.endpoint.startswith("http://")
        self.options = options
        self.bucket = bucket
        self.index = index
        self._head = head  # HEAD through boto3 (large objects only): ChecksumMode parsing stays botocore's
        url = urllib.parse.urlsplit(options.endpoint)
        self._host, self._port = url.hostname or "127.0.0.1", url.port or 80
        self._path = f"{url.path.rstrip('/')}/{urllib.parse.quote(bucket, safe='')}/"
        self._signer = Signer(credentials, region, url.netloc)
        self._idle: list[_Connection] = []
        self._pid = os.getpid()

    def _uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    async def get(self, key: str, *, byte_range: tuple[int, int] | None = None, if_match: str | None = None) -> Any:
        resp = await self._request(key, request_headers(byte_range, if_match))
        if resp.status not in (200, 206):
            raise await self._failure(resp, key)
        if resp.chunked or resp.size <= _WHOLE:
            data = await resp.read_all()
            return WholeBody(len(data) if resp.chunked else resp.size, resp.etag, data)
        return resp

    async def head(self, key: str) -> Expected:
        return await self._head(key)

    async def _request(self, key: str, extra: dict[str, str]) -> _Response:
        path = self._path + urllib.parse.quote(key, safe="/~")
        head = "".join(f"{k}: {v}\r\n" for k, v in self._signer.headers(path, extra).items())
        message = f"GET {path} HTTP/1.1\r\n{head}\r\n".encode("latin-1")
        # A keep-alive connection the server closed meanwhile fails like any other attempt (and is
        # retried, counted, by the mirror): a silent second try would hide resets from the counts.
        conn = await self._connection()
        try:
            conn.writer.write(message)
            status_line = await conn.reader.readline()
            parts = status_line.split(None, 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
                raise ConnectionError(f"no HTTP status line (got {status_line[:80]!r})")
            headers: dict[str, str] = {}
            while (line := await conn.reader.readline()) not in (b"\r\n", b"\n"):
                if not line:
                    raise ConnectionError("connection closed in the headers")
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
        except BaseException:
            conn.close()
            raise
        return _Response(self, conn, int(parts[1]), headers)

    async def _connection(self) -> _Connection:
        if self._pid != os.getpid():  # never a connection of the parent process
            self._idle, self._pid = [], os.getpid()
        if self._idle:
            return self._idle.pop()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(self._host, self._port, limit=_CHUNK),
                                                    self.options.connect_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            raise unreachable(self.options, type(e).__name__) from None
        return _Connection(reader, writer)

    async def _failure(self, resp: _Response, key: str) -> GetFailure:
        try:
            text = (await resp.read_all(limit=_ERROR_BODY)).decode("utf-8", "replace")
        except (ConnectionError, asyncio.IncompleteReadError):
            resp.discard()
            text = ""
        return classify_http(resp.status, text, uri=self._uri(key), options=self.options)
