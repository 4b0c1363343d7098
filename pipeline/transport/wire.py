"""The bytes of one connection, and the watch that bounds how long an answer may take.

:class:`Wire` is the asyncio protocol under each :class:`pipeline.transport.http.Connection`: it hands
received bytes to the reader in order, stops reading the socket while too much waits unread, notes bytes
or EOF that come while no request is in flight (the connection is then never reused), and runs one timer
per request: ``read_timeout`` is the longest silence, and every window of that length must bring
:data:`MIN_RATE` bytes a second (one byte a second fails, a steady 64 KB/s does not). It also defines the
transport's errors below HTTP semantics.
"""

from __future__ import annotations

import asyncio
import collections
import select

MIN_RATE = 1024  # bytes per second, averaged over each read_timeout window
_HIGH_WATER = 4 << 20  # bytes received and not yet read: stop reading the socket
_LOW_WATER = 1 << 20


class TransportError(Exception):
    """A request failed below HTTP semantics (no usable answer)."""

    reconnects = 0  # set to 1 when the request had been sent again after a stale connection


class ConnectError(TransportError):
    """No connection could be opened (refused, no such host, connect timeout, TLS handshake)."""


class CertificateError(ConnectError):
    """The server's TLS certificate was not accepted."""


class ProtocolError(TransportError):
    """The answer broke HTTP/1.1 framing or a bound (headers, body length)."""


class StallError(TransportError):
    """Silence, or too few bytes, for ``read_timeout`` seconds (``silent``: not one byte of the answer)."""

    def __init__(self, message: str, *, silent: bool = False) -> None:
        super().__init__(message)
        self.silent = silent


class ConnectionLost(TransportError):
    """The connection ended or was reset in the middle of an answer."""


class StaleConnection(TransportError):
    """A reused connection ended before any byte of the answer: the server had closed it."""


class Wire(asyncio.Protocol):
    """The bytes of one connection in arrival order, with the silence/low-speed watch of the request."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.eof = False
        self.error: BaseException | None = None
        self.active = False  # a request is in flight: bytes are expected
        self.spoiled = False  # bytes or EOF while idle: never reuse
        self.received = 0  # bytes of the current answer so far
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._timeout = 0.0
        self._last_byte = 0.0
        self._window_start = 0.0
        self._window_bytes = 0

    # -- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self.active:
            self.spoiled = True  # an answer nobody asked for
            return
        self.chunks.append(data)
        self.buffered += len(data)
        self.received += len(data)
        self._window_bytes += len(data)
        self._last_byte = self.loop.time()
        if self.buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self.transport.pause_reading()
            self._paused = True
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self.spoiled = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.spoiled = True
        if exc is not None and self.error is None:
            self.error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- the reader's side --------------------------------------------------------------------------

    async def read(self) -> list[bytes]:
        """The pieces received since the last call, in order, or [] at EOF; raises the stall or reset that
        ended the wait. Pieces are not joined: the parser takes them one by one (a join would copy every
        byte once more; measured at 0.1-0.2 ms per MB when the loop falls behind)."""
        while not self.chunks:
            if self.error is not None:
                raise self.error
            if self.eof:
                return []
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = list(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        if self._paused and self.transport is not None:
            self.transport.resume_reading()
            self._paused = False
        return data

    def begin(self, timeout: float) -> None:
        """A request starts: bytes are expected, and the watch runs."""
        self.active = True
        self.received = 0
        now = self.loop.time()
        self._timeout, self._last_byte, self._window_start, self._window_bytes = timeout, now, now, 0
        self._timer = self.loop.call_at(now + timeout, self._watch)

    def end(self) -> None:
        """The answer was read to its end: the connection is idle again."""
        self.active = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _watch(self) -> None:
        now, t = self.loop.time(), self._timeout
        if self._paused:  # we, not the server, stopped the bytes
            self._last_byte = self._window_start = now
            self._window_bytes = 0
        elif now - self._last_byte >= t:
            return self._stall(f"no byte for {t:g} s (--read-timeout)")
        elif now - self._window_start >= t:
            if self._window_bytes < MIN_RATE * t:
                return self._stall(f"{self._window_bytes} bytes in {t:g} s, under {MIN_RATE} bytes/s (--read-timeout)")
            self._window_start, self._window_bytes = now, 0
        self._timer = self.loop.call_at(min(self._last_byte, self._window_start) + t, self._watch)

    def _stall(self, why: str) -> None:
        self._timer = None
        self.error = StallError(why, silent=self.received == 0)
        self.spoiled = True
        if self.transport is not None:
            self.transport.abort()
        self._wake()

    def readable_while_idle(self) -> bool:
        """True when bytes or EOF wait on the socket unread (a FIN the loop has not seen yet)."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is None:
            return True
        try:
            poller = select.poll()  # not select.select: descriptors above 1023 are common in big processes
            poller.register(sock.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True
