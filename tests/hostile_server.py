"""A hostile S3 server for tests: right LIST and HEAD answers, GETs that misbehave on purpose.

Owns the server: a loopback listener (127.0.0.1 only), one thread per connection, HTTP/1.1 read from
raw sockets and answers written byte for byte (so they can be as malformed as a case wants),
path-style addressing (``/hostile/<percent-encoded key>``), any ``Authorization`` accepted unchecked,
keep-alive by default; ListObjectsV2 as S3 answers it (``prefix``, ``delimiter``, ``max-keys`` up to
1,000, ``continuation-token``, ``start-after``, ``encoding-type=url``: keys, prefixes and ``StartAfter``
URL-encoded with space as ``+``, and ``<EncodingType>url</EncodingType>``); HEAD with
``Content-Length``, ``ETag`` (the listing's: by default the quoted hex MD5 of the true bytes) and
``Last-Modified``; request counts per (method, key) and per connection; and its life cycle:
:meth:`HostileServer.stop` ends every sender (waits watch the stop event, blocked sends are woken by a
socket shutdown), joins every thread and lists survivors in ``threads_left``. A sender also stops as
soon as its client hangs up. GET ``n`` of a key runs ``obj.gets[min(n, len(obj.gets)) - 1]`` (no
schedule: the right answer); the behaviours live in ``tests/hostile_cases.py``, their tools in
:class:`Conn`. ``Range`` and ``If-Match`` are ignored: every object is far below tess's 16 MB
ranged-GET threshold.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import datetime
import email.utils
import hashlib
import itertools
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from urllib.parse import parse_qs, quote_plus, unquote, urlsplit
from xml.sax.saxutils import escape

BUCKET = "hostile"
LAST_MODIFIED = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
MAX_REQUEST_HEAD = 64 << 10  # a longer request head is refused by closing the connection
IDLE_S = 60.0  # a kept-alive connection without a request for this long is closed
SEND_STALL_S = 30.0  # a send that makes no progress for this long (a client that stopped reading) ends it
POLL_S = 0.05  # how often waits look at the stop event
LINGER_S = 2.0  # a graceful close waits this long at most for the client's end of the connection

Behaviour = Callable[["Conn", "StoredObject"], bool]  # writes one answer; returns keep-alive


class Stopping(Exception):
    """The server is stopping: the behaviour in progress must end now."""


class ClientGone(ConnectionError):
    """The client closed its end of the connection while the server was pausing."""


@dataclasses.dataclass(frozen=True)
class StoredObject:
    """One object: its true bytes, what LIST and HEAD say of it, and what its GETs do."""

    key: str
    data: bytes
    index: int = 0  # position within its case: behaviours pick their variant by it
    etag: str = ""  # LIST and HEAD ETag; empty means the quoted hex MD5 of ``data``
    content_encoding: str | None = None  # stored Content-Encoding metadata (HEAD and a right GET send it)
    gets: tuple[Behaviour, ...] = ()

    def __post_init__(self) -> None:
        if not self.etag:
            object.__setattr__(self, "etag", f'"{hashlib.md5(self.data).hexdigest()}"')

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclasses.dataclass(frozen=True)
class Request:
    method: str
    path: str  # unquoted
    query: str
    headers: dict[str, str]


# -- answers ---------------------------------------------------------------------------------------------


def message(
    status: int, reason: str, headers: Iterable[tuple[str, str]], body: bytes = b"", *, version: str = "HTTP/1.1"
) -> bytes:
    """A whole HTTP answer, exactly as given (no header added, none checked)."""
    head = "".join(f"{k}: {v}\r\n" for k, v in headers)
    return f"{version} {status} {reason}\r\n{head}\r\n".encode("latin-1") + body


def base_headers() -> list[tuple[str, str]]:
    return [("Date", email.utils.formatdate(usegmt=True)), ("Server", "HostileS3"), ("x-amz-request-id", "HOSTILE0")]


def object_headers(obj: StoredObject, *, length: bool = True, etag: bool = True) -> list[tuple[str, str]]:
    """The headers of a right answer for ``obj`` (``length``/``etag`` False leave those out)."""
    headers = [
        *base_headers(),
        ("Last-Modified", email.utils.format_datetime(LAST_MODIFIED, usegmt=True)),
        ("Content-Type", "application/octet-stream"),
        ("Accept-Ranges", "bytes"),
    ]
    if etag:
        headers.append(("ETag", obj.etag))
    if obj.content_encoding:
        headers.append(("Content-Encoding", obj.content_encoding))
    if length:
        headers.append(("Content-Length", str(len(obj.data))))
    return headers


def error_xml(code: str, text: str, resource: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{escape(text)}</Message>'
        f"<Resource>{escape(resource)}</Resource><RequestId>HOSTILE0</RequestId></Error>"
    ).encode()


def error_answer(status: int, reason: str, code: str, text: str, resource: str, *, body: bool = True) -> bytes:
    data = error_xml(code, text, resource)
    headers = [*base_headers(), ("Content-Type", "application/xml"), ("Content-Length", str(len(data)))]
    return message(status, reason, headers, data if body else b"")


def right(conn: Conn, obj: StoredObject) -> bool:
    """The right answer: 200, the true bytes, Content-Length and the listing's ETag; keep-alive."""
    conn.send(message(200, "OK", object_headers(obj), obj.data))
    return True


# -- one connection --------------------------------------------------------------------------------------


class Conn:
    """One client connection, as the behaviours see it."""

    def __init__(self, server: HostileServer, sock: socket.socket, cid: int) -> None:
        self.server = server
        self.sock = sock
        self.cid = cid
        self.closed = False
        self.buf = b""

    def send(self, data: bytes | memoryview) -> None:
        if self.server.stopping.is_set():
            raise Stopping
        self.sock.sendall(data)

    def pause(self, seconds: float) -> None:
        """Send nothing for ``seconds``; raises :class:`ClientGone` at once if the client hangs up."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self.server.stopping.is_set():
                raise Stopping
            readable, _, _ = select.select([self.sock], [], [], min(POLL_S, left))
            if readable:
                if self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    raise ClientGone("the client closed the connection")
                time.sleep(min(POLL_S, max(left, 0)))  # it sent more (a next request): keep it for later

    def paced(self, data: bytes, piece: int, interval: float) -> None:
        """``data`` in pieces of ``piece`` bytes, one every ``interval`` seconds."""
        view = memoryview(data)
        for start in range(0, len(view), piece):
            if start:
                self.pause(interval)
            self.send(view[start : start + piece])

    def wait_gone(self, cap: float) -> None:
        """Send nothing until the client hangs up (or ``cap`` seconds, or the server stops)."""
        try:
            self.pause(cap)
        except ClientGone:
            pass

    def reset(self) -> None:
        """Abort with a TCP RST (SO_LINGER 0, then close)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.drop()

    def drop(self) -> None:
        """Close at once: a FIN, or an RST if the client already sent something unread."""
        self.closed = True
        self.sock.close()

    def finish(self) -> None:
        """Close gracefully: FIN after everything sent, then wait (bounded) for the client's end."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_S
            while time.monotonic() < deadline and not self.server.stopping.is_set():
                readable, _, _ = select.select([self.sock], [], [], POLL_S)
                if readable and self.sock.recv(65536) == b"":
                    break
        except OSError:
            pass
        self.drop()


# -- the server ------------------------------------------------------------------------------------------


class HostileServer:
    """The server over ``objects``; ``with HostileServer(objects) as s:`` or ``start()``/``stop()``."""

    def __init__(self, objects: Iterable[StoredObject]) -> None:
        self.objects = {o.key: o for o in objects}
        self._sorted = sorted(self.objects, key=lambda k: k.encode())
        self.stopping = threading.Event()
        self.errors: list[str] = []  # bugs in the server or a behaviour (the tests assert there are none)
        self._lock = threading.Lock()
        self._requests: collections.Counter[tuple[str, str]] = collections.Counter()
        self._per_connection: dict[int, int] = {}
        self._socks: dict[int, socket.socket] = {}
        self._threads: list[threading.Thread] = []
        self._ids = itertools.count()
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=512)
        self._accepter = threading.Thread(target=self._accept_loop, name="hostile-accept", daemon=True)
        self.threads_left: list[str] = []

    @property
    def endpoint(self) -> str:
        host, port = self._listener.getsockname()[:2]
        return f"http://{host}:{port}"

    def case_objects(self, case: str) -> list[StoredObject]:
        return [self.objects[k] for k in self._sorted if k.startswith(f"{case}/")]

    # -- counts -------------------------------------------------------------------------------------

    def requests_of(self, method: str, key: str = "") -> int:
        """Requests received of ``method`` (``GET``, ``HEAD``; ``LIST`` for listings, key "") for ``key``."""
        with self._lock:
            return self._requests[(method, key)]

    def gets(self, key: str) -> int:
        return self.requests_of("GET", key)

    def connection_requests(self) -> list[int]:
        """Requests received on each connection opened so far, in the order they were opened."""
        with self._lock:
            return [self._per_connection[c] for c in sorted(self._per_connection)]

    # -- life cycle ---------------------------------------------------------------------------------

    def start(self) -> HostileServer:
        self._accepter.start()
        return self

    def stop(self) -> None:
        """End every behaviour and connection, join every thread, record any that survived."""
        self.stopping.set()
        self._accepter.join(timeout=5)
        self._listener.close()
        with self._lock:
            socks, threads = list(self._socks.values()), list(self._threads)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a send blocked on a client that stopped reading
            except OSError:
                pass
        for t in [self._accepter, *threads]:
            t.join(timeout=5)
        self.threads_left = [t.name for t in [self._accepter, *threads] if t.is_alive()]

    def __enter__(self) -> HostileServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            readable, _, _ = select.select([self._listener], [], [], POLL_S)
            if not readable:
                continue
            try:
                sock, _ = self._listener.accept()
            except OSError:
                continue
            sock.settimeout(SEND_STALL_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            cid = next(self._ids)
            thread = threading.Thread(target=self._serve, args=(sock, cid), name=f"hostile-conn-{cid}", daemon=True)
            with self._lock:
                self._per_connection[cid] = 0
                self._socks[cid] = sock
                self._threads.append(thread)
            thread.start()

    # -- requests -----------------------------------------------------------------------------------

    def _serve(self, sock: socket.socket, cid: int) -> None:
        conn = Conn(self, sock, cid)
        try:
            while (req := self._read_request(conn)) is not None:
                with self._lock:
                    self._per_connection[cid] += 1
                if not self._answer(conn, req):
                    if not conn.closed:
                        conn.finish()
                    break
        except (OSError, Stopping):
            pass  # the client hung up, the behaviour reset the connection, or the server is stopping
        except Exception as e:  # noqa: BLE001 - a bug of the server or of a case: the tests report it
            self.errors.append(f"connection {cid}: {type(e).__name__}: {e}")
        finally:
            if not conn.closed:
                conn.drop()
            with self._lock:
                self._socks.pop(cid, None)

    def _read_request(self, conn: Conn) -> Request | None:
        """The next request of ``conn`` (its body read and dropped), or None when the connection ends."""
        deadline = time.monotonic() + IDLE_S
        while b"\r\n\r\n" not in conn.buf.lstrip(b"\r\n"):
            if len(conn.buf) > MAX_REQUEST_HEAD or self.stopping.is_set() or time.monotonic() > deadline:
                return None
            readable, _, _ = select.select([conn.sock], [], [], POLL_S)
            if readable:
                chunk = conn.sock.recv(65536)
                if not chunk:
                    return None
                conn.buf += chunk
        head, conn.buf = conn.buf.lstrip(b"\r\n").split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, _version = lines[0].split(" ", 2)
        except ValueError:
            return None
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0") or 0)
        while len(conn.buf) < length:  # request bodies (never sent by tess) are read and dropped
            chunk = conn.sock.recv(65536)
            if not chunk:
                return None
            conn.buf += chunk
        conn.buf = conn.buf[length:]
        split = urlsplit(target)
        return Request(method.upper(), unquote(split.path), split.query, headers)

    def _count(self, method: str, key: str) -> int:
        with self._lock:
            self._requests[(method, key)] += 1
            return self._requests[(method, key)]

    def _answer(self, conn: Conn, req: Request) -> bool:
        bucket, _, key = req.path.lstrip("/").partition("/")
        head_only = req.method == "HEAD"
        if bucket != BUCKET:
            conn.send(
                error_answer(
                    404,
                    "Not Found",
                    "NoSuchBucket",
                    "The specified bucket does not exist.",
                    f"/{bucket}",
                    body=not head_only,
                )
            )
            return True
        if not key:
            if req.method == "GET" and "list-type=2" in req.query.split("&"):
                self._count("LIST", "")
                body = self.list_v2(req.query)
                conn.send(
                    message(
                        200,
                        "OK",
                        [*base_headers(), ("Content-Type", "application/xml"), ("Content-Length", str(len(body)))],
                        body,
                    )
                )
            elif head_only:
                conn.send(message(200, "OK", [*base_headers(), ("Content-Length", "0")]))
            else:
                conn.send(
                    error_answer(501, "Not Implemented", "NotImplemented", "Only ListObjectsV2 is served.", req.path)
                )
            return True
        n = self._count(req.method, key)
        obj = self.objects.get(key)
        if obj is None:
            conn.send(
                error_answer(404, "Not Found", "NoSuchKey", "The key does not exist.", req.path, body=not head_only)
            )
            return True
        if req.method not in ("GET", "HEAD"):
            conn.send(error_answer(405, "Method Not Allowed", "MethodNotAllowed", "GET and HEAD only.", req.path))
            return True
        if head_only:
            conn.send(message(200, "OK", object_headers(obj)))
            return True
        behaviour = obj.gets[min(n, len(obj.gets)) - 1] if obj.gets else right
        return behaviour(conn, obj)

    # -- ListObjectsV2 ------------------------------------------------------------------------------

    def list_v2(self, query: str) -> bytes:
        """The ListObjectsV2 answer for ``query`` (the raw query string), as S3 gives it."""
        q = parse_qs(query, keep_blank_values=True)

        def arg(name: str, default: str = "") -> str:
            return q.get(name, [default])[0]

        prefix, delimiter, token, start_after = (
            arg("prefix"),
            arg("delimiter"),
            arg("continuation-token"),
            arg("start-after"),
        )
        max_keys = max(0, min(1000, int(arg("max-keys", "1000") or 1000)))
        url = arg("encoding-type") == "url"
        after, skip = start_after, ""
        if token:
            kind, after = _untoken(token)
            skip = after if kind == "P" else ""  # resume after a common prefix: none of its keys again
        entries: list[tuple[str, str]] = []  # ("K", key) or ("P", common prefix), in key order
        for key in self._sorted:
            if not key.startswith(prefix) or key.encode() <= after.encode() or (skip and key.startswith(skip)):
                continue
            cut = key.find(delimiter, len(prefix)) if delimiter else -1
            if cut >= 0:
                common = key[: cut + len(delimiter)]
                if not entries or entries[-1] != ("P", common):
                    entries.append(("P", common))
            else:
                entries.append(("K", key))
        page, truncated = entries[:max_keys], len(entries) > max_keys

        def text(s: str) -> str:
            return escape(quote_plus(s, safe="/") if url else s, {'"': "&quot;"})

        out = [
            '<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">',
            f"<Name>{BUCKET}</Name><Prefix>{text(prefix)}</Prefix>",
        ]
        if delimiter:
            out.append(f"<Delimiter>{text(delimiter)}</Delimiter>")
        if start_after:
            out.append(f"<StartAfter>{text(start_after)}</StartAfter>")
        if token:
            out.append(f"<ContinuationToken>{escape(token)}</ContinuationToken>")
        out.append(f"<KeyCount>{len(page)}</KeyCount><MaxKeys>{max_keys}</MaxKeys>")
        if url:
            out.append("<EncodingType>url</EncodingType>")
        out.append(f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>")
        if truncated:
            out.append(f"<NextContinuationToken>{_token(*page[-1])}</NextContinuationToken>")
        stamp = LAST_MODIFIED.strftime("%Y-%m-%dT%H:%M:%S.000Z")
        for kind, name in page:  # S3 lists Contents first, then CommonPrefixes
            if kind == "K":
                obj = self.objects[name]
                out.append(
                    f"<Contents><Key>{text(name)}</Key><LastModified>{stamp}</LastModified>"
                    f"<ETag>{escape(obj.etag, {chr(34): '&quot;'})}</ETag><Size>{len(obj.data)}</Size>"
                    "<StorageClass>STANDARD</StorageClass></Contents>"
                )
        out += [f"<CommonPrefixes><Prefix>{text(name)}</Prefix></CommonPrefixes>" for kind, name in page if kind == "P"]
        out.append("</ListBucketResult>")
        return "".join(out).encode()


def _token(kind: str, name: str) -> str:
    return base64.urlsafe_b64encode(f"{kind}{name}".encode()).decode()


def _untoken(token: str) -> tuple[str, str]:
    raw = base64.urlsafe_b64decode(token.encode()).decode()
    return raw[:1], raw[1:]
