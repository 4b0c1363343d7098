"""A loopback TCP proxy that adds a fixed delay to every request (the bench's "store 20 ms away").

Each chunk the client sends (an HTTP request: GETs have no body) is held ``delay_s`` before it is
forwarded; answers flow back at once. So every request costs at least one ``delay_s`` round trip, as
it would against a store in another region, while the server behind stays as fast as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading


class LatencyProxy:
    """``with LatencyProxy(upstream_port, 0.02) as proxy: proxy.endpoint``."""

    def __init__(self, upstream_port: int, delay_s: float = 0.02, host: str = "127.0.0.1") -> None:
        self.upstream = (host, upstream_port)
        self.delay_s = delay_s
        self.host = host
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="latency-proxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
        try:
            while data := await reader.read(65536):
                if delay:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        try:
            s_reader, s_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            c_writer.close()
            return
        await asyncio.gather(self._pipe(c_reader, s_writer, self.delay_s), self._pipe(s_reader, c_writer, 0.0))

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, 0, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    def __enter__(self) -> LatencyProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
