"""A fault-injecting HTTP/1.1 proxy for tests: sits between an S3 client and the loopback S3 server.

The client talks to the proxy (``ClientOptions(endpoint=proxy.endpoint)``); the proxy forwards every
request to the upstream server and, on a seeded schedule, answers instead with one of these faults:

* ``500``: ``500 InternalError`` with an S3 XML error body.
* ``503``: ``503 SlowDown`` with an S3 XML error body (S3's throttling answer).
* ``reset``: the connection is reset (``SO_LINGER`` 0, then close) without any response.
* ``stall``: nothing is sent until the client gives up (read timeout) or the proxy stops.
* ``stall_body``: the headers and half the body are sent, then nothing until the client gives up.
* ``truncate``: the headers with the full ``Content-Length``, then only part of the body, then close.
* ``corrupt``: the whole answer with one byte of the body flipped (object GETs only: a listing has no
  checksum that could catch it), as a bad disk or NIC upstream would.

Whether and how request ``n`` of ``(method, path)`` fails is drawn from ``random.Random`` seeded with
``(seed, method, path, n)``: the schedule does not depend on how concurrent requests interleave, so a
failing run can be replayed. ``always`` forces a fault (e.g. ``403`` AccessDenied or ``404`` NoSuchKey)
for every request of one object. Faults are counted by kind, requests by kind and by object.

Only the standard library is used; the proxy runs threads of the test process on 127.0.0.1.
"""

from __future__ import annotations

import collections
import http.client
import random
import select
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import unquote, urlsplit
from xml.sax.saxutils import escape

from pipeline.demo.server import request_kind

# Kinds drawn on the seeded schedule, and the kinds ``always`` may force as well.
SCHEDULED_KINDS = ("500", "503", "reset", "stall", "stall_body", "truncate", "corrupt")
FORCED_KINDS = (*SCHEDULED_KINDS, "403", "404", "badkey")
_ERRORS = {
    "500": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "403": (403, "Forbidden", "AccessDenied", "Access Denied"),
    "404": (404, "Not Found", "NoSuchKey", "The specified key does not exist."),
    # Credentials the server no longer knows (revoked mid-run): fatal for the whole fetch.
    "badkey": (
        403,
        "Forbidden",
        "InvalidAccessKeyId",
        "The AWS Access Key Id you provided does not exist in our records.",
    ),
}
# Headers that describe one hop, not the message; the proxy sets its own framing.
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "proxy-connection",
    "te",
    "upgrade",
    "expect",
}
# A stall never outlasts this, even if the client never times out.
MAX_STALL_S = 60.0


def reads(method: str, path: str, query: str) -> bool:
    """Default target of scheduled faults: GETs of objects and listings."""
    return request_kind(method, path, query) in ("GET", "LIST")


def error_body(code: str, message: str, resource: str, request_id: str) -> bytes:
    """An S3 XML error document."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{escape(message)}</Message>"
        f"<Resource>{escape(resource)}</Resource><RequestId>{request_id}</RequestId></Error>"
    ).encode()


class _Server(socketserver.ThreadingTCPServer):
    proxy: FaultProxy
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog of 5 drops SYNs when dozens of client threads connect at once,
    # and the client then sees connect timeouts the schedule never asked for.
    request_queue_size = 256

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Ignore clients that hang up mid-answer (they timed out, as faults make them); report the rest."""
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.upstream: http.client.HTTPConnection | None = None
        self.server.proxy._opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass  # the socket was reset on purpose
        if self.upstream is not None:
            self.upstream.close()
        self.server.proxy._closed(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # quiet: tests assert on counts, not on logs

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """Send the request upstream (reconnecting once if the kept-alive connection went away)."""
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["Content-Length"] = str(len(body))
        for attempt in (1, 2):
            if self.upstream is None:
                host, port = self.server.proxy.upstream_address
                self.upstream = http.client.HTTPConnection(host, port, timeout=30)
            try:
                self.upstream.request(self.command, self.path, body=body, headers=headers)
                resp = self.upstream.getresponse()
                data = resp.read()
                if resp.will_close:
                    self.upstream.close()
                    self.upstream = None
                return resp.status, resp.reason, resp.getheaders(), data
            except (http.client.HTTPException, OSError):
                self.upstream.close()
                self.upstream = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _send_head(self, status: int, reason: str, headers: list[tuple[str, str]], length: int) -> None:
        self.send_response_only(status, reason)
        for k, v in headers:
            if k.lower() not in _HOP_BY_HOP:
                self.send_header(k, v)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def _reset(self) -> None:
        """Abort the connection with a TCP RST and no response."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()

    def _stall(self) -> None:
        """Send nothing until the client hangs up, the proxy stops, or MAX_STALL_S passes; then close."""
        self.close_connection = True
        deadline = time.monotonic() + MAX_STALL_S
        stopping = self.server.proxy._stopping
        while not stopping.is_set() and time.monotonic() < deadline:
            readable, _, _ = select.select([self.connection], [], [], 0.05)
            if readable:
                try:
                    if self.connection.recv(1, socket.MSG_PEEK) == b"":
                        break  # the client timed out and closed its end
                except OSError:
                    break
        self._reset()

    def _proxy(self) -> None:
        proxy = self.server.proxy
        split = urlsplit(self.path)
        body = self._read_body()
        head = "".join(f"{k}: {v}\r\n" for k, v in self.headers.items())
        proxy._watch(f"{self.requestline}\r\n{head}".encode("utf-8", "surrogateescape") + body)
        kind, rng = proxy._decide(self.command, split.path, split.query)
        if kind in _ERRORS:
            status, reason, code, message = _ERRORS[kind]
            data = error_body(code, message, split.path, f"FAULT{proxy.requests:08d}")
            self._send_head(status, reason, [("Content-Type", "application/xml")], len(data))
            self.wfile.write(data)
            return
        if kind == "reset":
            self._reset()
            return
        if kind == "stall":
            self._stall()
            return
        status, reason, headers, data = self._forward(body)
        rkind = request_kind(self.command, split.path, split.query)
        if self.command == "HEAD" or status in (204, 304):
            if kind is not None:
                proxy._not_applied(kind, rkind)  # no body to cut, stall in or damage
            length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
            self._send_head(status, reason, headers, length)
            return
        if kind in ("truncate", "stall_body") and status == 200 and len(data) >= 1:
            self._send_head(status, reason, headers, len(data))
            cut = rng.randrange(len(data)) if kind == "truncate" else len(data) // 2
            self.wfile.write(data[:cut])
            if kind == "truncate":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_WR)
            else:
                self._stall()
            return
        if kind == "corrupt" and status == 200 and len(data) >= 1 and rkind == "GET":
            pos = rng.randrange(len(data))
            data = data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1 :]
        elif kind is not None:
            proxy._not_applied(kind, rkind)  # an empty or error body, or a listing to corrupt: sent as is
        self._send_head(status, reason, headers, len(data))
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _proxy


class FaultProxy:
    """A loopback proxy to ``upstream`` that injects faults on a seeded schedule.

    Args:
        upstream: ``http://host:port`` of the real server.
        seed: seed of the schedule.
        rates: probability of each scheduled kind per targeted request (their sum is at most 1).
        target: ``(method, path, query) -> bool``: which requests may get a scheduled fault
            (default: :func:`reads`, object GETs and listings).
        always: unquoted request path (``/bucket/key``) -> a kind from :data:`FORCED_KINDS` given on
            every request of that path.
        watch: strings to look for in every request (request line, headers and body).

    Attributes:
        faults: injected faults by kind.
        requests: requests received (each attempt of a client counts once).
        watched: for each string of ``watch``, how many requests carried it.
    """

    def __init__(
        self,
        upstream: str,
        *,
        seed: int = 0,
        rates: Mapping[str, float] | None = None,
        target: Callable[[str, str, str], bool] = reads,
        always: Mapping[str, str] | None = None,
        watch: Sequence[str] = (),
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname or not parts.port:
            raise ValueError(f"upstream {upstream!r} must be http://host:port")
        self.upstream_address = (parts.hostname, parts.port)
        self.seed = seed
        self.rates = dict(rates or {})
        unknown = set(self.rates) - set(SCHEDULED_KINDS)
        if unknown or any(r < 0 for r in self.rates.values()) or sum(self.rates.values()) > 1:
            raise ValueError(f"rates {self.rates} must map kinds of {SCHEDULED_KINDS} to probabilities summing to <= 1")
        self.always = dict(always or {})
        if set(self.always.values()) - set(FORCED_KINDS):
            raise ValueError(f"always {self.always} must map paths to kinds of {FORCED_KINDS}")
        self.target = target
        self._watch_for = [(w, w.encode()) for w in watch]
        self.watched: collections.Counter[str] = collections.Counter({w: 0 for w in watch})
        self.faults: collections.Counter[str] = collections.Counter()
        self._faults_by_request: collections.Counter[str] = collections.Counter()
        self.requests = 0
        self._by_kind: collections.Counter[str] = collections.Counter()
        self._by_path: collections.Counter[tuple[str, str]] = collections.Counter()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._server = _Server(("127.0.0.1", 0), _Handler, bind_and_activate=True)
        self._server.proxy = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="faultproxy", daemon=True
        )

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def fault_total(self) -> int:
        with self._lock:
            return sum(self.faults.values())

    def faults_on(self, request_kind: str) -> int:
        """Faults injected into requests of one S3 kind (``GET``, ``LIST``...)."""
        with self._lock:
            return self._faults_by_request[request_kind]

    def requests_of_kind(self, kind: str) -> int:
        """Requests received of one S3 kind (``GET`` of an object, ``LIST``, ``HEAD``, ``PUT``...)."""
        with self._lock:
            return self._by_kind[kind]

    def requests_for(self, bucket: str, key: str, method: str = "GET") -> int:
        """Requests received for one object (each retry counts)."""
        with self._lock:
            return self._by_path[(method, f"/{bucket}/{key}")]

    # -- called by the handler threads --------------------------------------------------------------

    def _decide(self, method: str, path: str, query: str) -> tuple[str | None, random.Random]:
        """Count the request and draw its fault (None: forward it untouched) and its own RNG."""
        key = unquote(path)
        with self._lock:
            self.requests += 1
            rkind = request_kind(method, path, query)
            self._by_kind[rkind] += 1
            n = self._by_path[(method, key)]
            self._by_path[(method, key)] += 1
            # Seeded by the request's identity, not by arrival order, so threads do not change it.
            rng = random.Random(f"{self.seed}|{method}|{key}|{n}")
            kind = self.always.get(key)
            if kind is None and self.rates and self.target(method, path, query):
                x = rng.random()
                for name in SCHEDULED_KINDS:
                    x -= self.rates.get(name, 0.0)
                    if x < 0:
                        kind = name
                        break
            if kind is not None:
                self.faults[kind] += 1
                self._faults_by_request[rkind] += 1
            return kind, rng

    def _watch(self, raw: bytes) -> None:
        found = [w for w, b in self._watch_for if b in raw]
        if found:
            with self._lock:
                self.watched.update(found)

    def _not_applied(self, kind: str, rkind: str) -> None:
        """Take back a drawn fault that this answer could not carry."""
        with self._lock:
            self.faults[kind] -= 1
            self._faults_by_request[rkind] -= 1

    def _opened(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections[conn] = threading.current_thread()

    def _closed(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.pop(conn, None)

    # -- life cycle ---------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, end every stall, and close every client connection."""
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        with self._lock:
            open_conns = list(self._connections.items())
        for conn, _ in open_conns:
            # Wakes handler threads blocked reading the next request of a kept-alive connection.
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _, thread in open_conns:
            thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
