"""HTTP/1.1 for the S3 client: framing by h11, bounded reads, and connections reused only when clean.

h11 (the parser under httpx) frames every answer; nothing here parses a status line, a header, a chunk
or a length by hand. It was chosen over httptools (llhttp), which parses 20 times faster
(``bench/parser_bench.py``: 2.5 against 53 us per answer, 0.05 ms of a small object's ~0.7 ms), because
httptools cannot be told an answer is to a HEAD (it then waits for a body that never comes), while h11
is a client-side state machine: it knows each request, so HEAD, 1xx and bodies until close follow
RFC 9112, and it says exactly when an answer ended and what is left on the connection.

Rules, each tested (``tests/test_hostile.py``):

* 1xx answers are skipped (at most :data:`MAX_INTERIM` of them).
* A connection is reused only when its answer was read to its exact end with nothing left over; bytes or
  EOF that arrive while it is idle, extra bytes after an answer, ``Connection: close`` and HTTP/1.0
  drop it.
* A kept-alive connection the server had closed (EOF or a reset before any byte of the answer: its
  close crossed our request) is retried once on a fresh connection (:class:`StaleConnection`). That is
  no failed attempt (the attempt budget stays whole) but a request sent again, which callers count
  (``Response.reconnects``, ``TransportError.reconnects``), so fault counts stay exact.
* Status line and headers at most :data:`MAX_HEAD_BYTES` and :data:`MAX_HEADERS`; a body never past the
  caller's limit; error bodies capped by the caller.
* ``read_timeout`` is the longest silence while an answer is awaited or read, and every window of that
  length must bring ``MIN_RATE`` bytes a second (:mod:`pipeline.transport.wire`, which also holds the
  bytes of each connection and the errors below HTTP).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

import h11

from pipeline.transport.wire import (  # the errors callers catch, re-exported
    CertificateError,
    ConnectError,
    ConnectionLost,
    ProtocolError,
    StaleConnection,
    TransportError,
    Wire,
)
from pipeline.transport.wire import StallError as StallError

MAX_HEAD_BYTES = 64 << 10
MAX_HEADERS = 256
MAX_INTERIM = 8


@dataclass(frozen=True)
class Origin:
    """Where requests go: scheme, host and port, and the TLS context (None for plain HTTP)."""

    host: str
    port: int
    tls: ssl.SSLContext | None = None


class Connection:
    """One HTTP/1.1 connection: an h11 state machine over a :class:`Wire`."""

    def __init__(self, wire: Wire) -> None:
        self.wire = wire
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.reused = False

    def close(self) -> None:
        self.wire.spoiled = True
        self.wire.end()
        if self.wire.transport is not None:
            self.wire.transport.abort()

    def reusable(self) -> bool:
        w = self.wire
        trailing, closed = self.h11.trailing_data
        return (
            not w.spoiled
            and not w.chunks
            and not trailing
            and not closed
            and self.h11.our_state is h11.DONE
            and self.h11.their_state is h11.DONE
        )

    async def next_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as e:
                raise ProtocolError(f"malformed answer ({e})") from None
            if event is not h11.NEED_DATA:
                # mypy does not narrow "is not" on h11's sentinel classes: NEED_DATA is excluded here
                return event  # type: ignore[return-value]
            try:
                data = await self.wire.read()
            except OSError as e:
                raise self._lost(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from None
            if not data and self.h11.their_state is h11.SEND_RESPONSE:
                raise self._lost("connection closed")
            for piece in data or (b"",):  # b"": the end of the connection, which h11 must be told
                self.h11.receive_data(piece)

    def _lost(self, why: str) -> TransportError:
        if self.reused and self.wire.received == 0:
            return StaleConnection(f"the server had closed this kept-alive connection ({why})")
        where = "before the answer" if self.wire.received == 0 else f"{self.wire.received} bytes into the answer"
        return ConnectionLost(f"connection lost {where} ({why})")


class Response:
    """Status and headers of one answer; its body read once, within a limit, through :meth:`chunks`."""

    def __init__(self, pool: Pool, conn: Connection, method: str, status: int, headers: dict[str, str]) -> None:
        self._pool = pool
        self.method = method
        self._conn: Connection | None = conn
        self._started = False
        self.reconnects = 0  # 1 when sent again after a stale connection
        self.status = status
        self.headers = headers

    @property
    def length(self) -> int | None:
        """The announced Content-Length (h11 checked its syntax), or None (chunked, until close)."""
        value = self.headers.get("content-length")
        return int(value) if value is not None and "chunked" not in self.headers.get("transfer-encoding", "") else None

    async def chunks(self, limit: int) -> AsyncGenerator[bytes, None]:
        """The body in pieces as they arrive; more than ``limit`` bytes raise :class:`ProtocolError`.

        The connection goes back to the pool only after the answer's last byte; an error, an early
        :meth:`discard` or closing this iterator drops it.
        """
        conn = self._conn
        if conn is None or self._started:
            raise RuntimeError("the body of this answer was already read")
        self._started = True
        got = 0
        try:
            if self.method != "HEAD" and (self.length or 0) > limit:
                raise ProtocolError(f"announced {self.length} bytes, more than the {limit} bytes expected")
            while True:
                event = await conn.next_event()
                if type(event) is h11.Data:
                    got += len(event.data)
                    if got > limit:
                        raise ProtocolError(f"sent more than the {limit} bytes expected")
                    yield event.data
                elif type(event) is h11.EndOfMessage:
                    self._conn = None
                    self._pool.release(conn)
                    return
                else:
                    raise ProtocolError(f"unexpected {type(event).__name__} in the body")
        except BaseException:  # GeneratorExit included: a body left half read spoils its connection
            self.discard()
            raise

    async def read(self, limit: int, *, truncate: bool = False) -> bytes:
        """The whole body; with ``truncate``, at most its first ``limit`` bytes, whatever its framing
        (an error page: the connection is dropped unless the body ended within the limit)."""
        parts: list[bytes] = []
        size = 0
        async with contextlib.aclosing(self.chunks(limit if not truncate else 1 << 62)) as body:
            try:
                async for part in body:
                    parts.append(part)
                    size += len(part)
                    if truncate and size >= limit:
                        break
            except TransportError:
                if not truncate:
                    raise
        data = b"".join(parts) if len(parts) != 1 else bytes(parts[0])
        return data[:limit] if truncate else data

    def discard(self) -> None:
        """The body will not be read (further): the connection cannot be reused."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class Pool:
    """Kept-alive connections to one origin, opened on demand (callers bound what is in flight)."""

    def __init__(self, origin: Origin, *, connect_timeout: float, read_timeout: float, max_idle: int = 256) -> None:
        self.origin = origin
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        self._idle: list[Connection] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    async def request(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes = b"") -> Response:
        """Send one request; its answer's status and headers (the body is read from the :class:`Response`).

        Raises:
            ConnectError, ProtocolError, StallError, ConnectionLost: no usable answer.
        """
        conn = await self._connection()
        try:
            return await self._exchange(conn, method, target, headers, body)
        except StaleConnection:
            pass
        # The server had closed this kept-alive connection: once more on a fresh one.
        try:
            resp = await self._exchange(await self._open(), method, target, headers, body)
        except TransportError as e:
            e.reconnects = 1
            raise
        resp.reconnects = 1
        return resp

    async def _exchange(
        self, conn: Connection, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> Response:
        wire = conn.wire
        try:
            out = conn.h11.send(h11.Request(method=method, target=target, headers=headers))
            if body:
                out += conn.h11.send(h11.Data(data=body))
            out += conn.h11.send(h11.EndOfMessage())
            wire.begin(self.read_timeout)
            assert wire.transport is not None
            wire.transport.write(out)
            for _ in range(MAX_INTERIM + 1):
                event = await conn.next_event()
                if type(event) is h11.InformationalResponse:
                    continue
                if type(event) is not h11.Response:
                    raise ProtocolError(f"unexpected {type(event).__name__} instead of an answer")
                if len(event.headers) > MAX_HEADERS:
                    raise ProtocolError(f"{len(event.headers)} header lines, more than {MAX_HEADERS}")
                return Response(self, conn, method, event.status_code, _header_dict(event.headers))
            raise ProtocolError(f"more than {MAX_INTERIM} interim (1xx) answers")
        except h11.LocalProtocolError as e:
            conn.close()
            raise ProtocolError(f"request not sent ({e})") from None
        except BaseException:
            conn.close()
            raise

    def release(self, conn: Connection) -> None:
        conn.wire.end()
        if conn.reusable() and len(self._idle) < self.max_idle:
            conn.h11.start_next_cycle()
            conn.reused = True
            self._idle.append(conn)
        else:
            conn.close()

    async def _connection(self) -> Connection:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # connections belong to the loop that opened them
            self._idle, self._loop = [], loop
        while self._idle:
            conn = self._idle.pop()
            if not conn.wire.spoiled and not conn.wire.readable_while_idle():
                return conn
            conn.close()
        return await self._open()

    async def _open(self) -> Connection:
        loop = asyncio.get_running_loop()
        o = self.origin
        try:
            _, wire = await asyncio.wait_for(
                loop.create_connection(
                    lambda: Wire(loop), o.host, o.port, ssl=o.tls, server_hostname=o.host if o.tls else None
                ),
                self.connect_timeout,
            )
        except ssl.SSLCertVerificationError as e:
            raise CertificateError(e.verify_message or str(e)) from None
        except ssl.SSLError as e:
            raise ConnectError(f"TLS handshake failed: {e.reason or e}") from None
        except (TimeoutError, OSError) as e:
            raise ConnectError(type(e).__name__ if not str(e) else f"{type(e).__name__}: {e}") from None
        return Connection(wire)

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


def _header_dict(headers: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    """h11's (lower-case name, value) pairs as a dict; repeated names joined with ", " (RFC 9110 5.3)."""
    out: dict[str, str] = {}
    for name, value in headers:
        n, v = name.decode("latin-1"), value.decode("latin-1")
        out[n] = f"{out[n]}, {v}" if n in out else v
    return out
