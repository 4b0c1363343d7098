"""The hostile cases: for each key prefix (one case), its objects and what their GETs do.

This module owns the objects of every case (seeded random bytes, a few KB each unless a case says
otherwise), their LIST/HEAD ETags, and the GET behaviours: functions ``(conn, obj) -> keep_alive`` that
write raw bytes on the connection (see :class:`tests.hostile_server.Conn`). Where a case has variants
(several ways to be wrong in the same way), object ``i`` of the case gets variant ``i % len(variants)``.
:func:`build_server` gives a :class:`~tests.hostile_server.HostileServer` holding every case.

What tess must do with each case is not here: ``tests/test_hostile.py`` holds the expected outcomes, in
one table.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import random
from collections.abc import Callable
from urllib.parse import quote

from tests.hostile_server import (
    BUCKET,
    Behaviour,
    Conn,
    HostileServer,
    StoredObject,
    base_headers,
    error_answer,
    error_xml,
    message,
    object_headers,
    right,
)

ERROR_BODY_BYTES = 100_000_000  # the "big" error answers: 100 MB
CHUNKED_LONG_BYTES = 2 << 30  # chunked-long streams up to 2 GiB, unless the client hangs up first
STEADY_RATE = 64 << 10  # slow-steady: bytes per second, in a piece every STEADY_PIECE_S
STEADY_PIECE_S = 0.05
SLOW_STEADY_SIZE = 300_000
STALL_CAP_S = 60.0  # a stall never outlasts this even if the client never hangs up
REDIRECT_TARGETS = "redirect-target"  # where redirects point: the same bytes, outside every case's prefix
_FILLER = bytes(range(256)) * 256  # 64 KiB of filler for chunked-long
_PADDING = b" " * (64 << 10)  # pads the big error bodies (XML whitespace: the documents stay well-formed)


def _random_bytes(name: str, size: int | None = None) -> bytes:
    rng = random.Random(name)
    return rng.randbytes(size if size is not None else rng.randrange(2_000, 6_000))


def _frame(piece: bytes, size_line: bytes | None = None) -> bytes:
    """One chunk of a chunked body (its size line as given, else the right hex size)."""
    return (size_line if size_line is not None else b"%x" % len(piece)) + b"\r\n" + piece + b"\r\n"


def _chunked_headers(obj: StoredObject, *, etag: bool = True) -> list[tuple[str, str]]:
    return [*object_headers(obj, length=False, etag=etag), ("Transfer-Encoding", "chunked")]


# -- framing and status lines ----------------------------------------------------------------------------

_INTERIMS = (
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 102 Processing\r\nX-Hostile-Progress: 50\r\nRetry-After: 1\r\n\r\n",
    b"HTTP/1.1 103 Early Hints\r\nLink: </hostile>; rel=preload\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n",
)


def interim(conn: Conn, obj: StoredObject) -> bool:
    conn.send(_INTERIMS[obj.index % len(_INTERIMS)])
    conn.pause(0.02)  # the real answer in a segment of its own
    return right(conn, obj)


_GARBAGE = (b"\x00\xffHOSTILE TRAILING GARBAGE\r\n" * 4, b"\r\n\r\n", b"HTTP/1.1 5")


def trailing_garbage(conn: Conn, obj: StoredObject) -> bool:
    conn.send(message(200, "OK", object_headers(obj), obj.data) + _GARBAGE[obj.index % len(_GARBAGE)])
    return True


def double_answer(other: StoredObject) -> Behaviour:
    """A right answer, then at once a complete second 200 carrying ``other``'s bytes and ETag."""

    def send(conn: Conn, obj: StoredObject) -> bool:
        conn.send(
            message(200, "OK", object_headers(obj), obj.data) + message(200, "OK", object_headers(other), other.data)
        )
        return True

    return send


def chunked_ok(conn: Conn, obj: StoredObject) -> bool:
    d, v = obj.data, obj.index % 4
    pieces = [d[:1], d[1:8], d[8:108], d[108:1108], d[1108:]] if v < 3 else [d]
    size = {0: lambda p: b"%x" % len(p), 1: lambda p: b"%X;ext=1" % len(p), 2: lambda p: b"%08x" % len(p)}.get(v, None)
    body = b"".join(_frame(p, size(p) if size else None) for p in pieces if p)
    trailer = b"x-hostile-trailer: 1\r\n" if v == 1 else b""
    conn.send(message(200, "OK", _chunked_headers(obj), body + b"0\r\n" + trailer + b"\r\n"))
    return True


def chunked_long(conn: Conn, obj: StoredObject) -> bool:
    """The true bytes, then filler chunks up to CHUNKED_LONG_BYTES; stops when the client hangs up."""
    conn.send(message(200, "OK", _chunked_headers(obj), _frame(obj.data)))
    filler, sent = _frame(_FILLER), len(obj.data)
    while sent < CHUNKED_LONG_BYTES:
        conn.send(filler)
        sent += len(_FILLER)
    conn.send(b"0\r\n\r\n")
    return False


def chunked_cut(conn: Conn, obj: StoredObject) -> bool:
    """Chunks, then a clean close at a chunk boundary, never the last 0-chunk (all bytes, or half)."""
    d = obj.data if obj.index % 2 == 0 else obj.data[: len(obj.data) // 2]
    conn.send(
        message(200, "OK", _chunked_headers(obj), b"".join(_frame(d[i : i + 1000]) for i in range(0, len(d), 1000)))
    )
    return False


def chunked_badsize(conn: Conn, obj: StoredObject) -> bool:
    """One chunk whose size line is not hex (some spellings a lenient int() would take)."""
    h = b"%x" % len(obj.data)
    line = (b"zz", b"0x" + h, b"+" + h, h[:1] + b"_" + h[1:], b"-" + h)[obj.index % 5]
    conn.send(message(200, "OK", _chunked_headers(obj), _frame(obj.data, line) + b"0\r\n\r\n"))
    return False


def _length_answer(conn: Conn, obj: StoredObject, lengths: list[str]) -> None:
    conn.send(
        message(200, "OK", [*object_headers(obj, length=False), *(("Content-Length", v) for v in lengths)], obj.data)
    )


def cl_short(conn: Conn, obj: StoredObject) -> bool:
    _length_answer(conn, obj, [str(len(obj.data) + 1000)])
    return False


def cl_huge(conn: Conn, obj: StoredObject) -> bool:
    """Content-Length 10^12, the true bytes, then a close (even objects) or a stall (odd ones)."""
    _length_answer(conn, obj, [str(10**12)])
    if obj.index % 2:
        conn.wait_gone(STALL_CAP_S)
    return False


def cl_dup(conn: Conn, obj: StoredObject) -> bool:
    n = len(obj.data)
    _length_answer(conn, obj, [str(n), str(n + 17)] if obj.index % 2 == 0 else [str(n + 17), str(n)])
    return False


def cl_negative(conn: Conn, obj: StoredObject) -> bool:
    _length_answer(conn, obj, ["-1" if obj.index % 2 == 0 else f"-{len(obj.data)}"])
    return False


def cl_nonnumeric(conn: Conn, obj: StoredObject) -> bool:
    s = str(len(obj.data))
    _length_answer(conn, obj, [("abc", f"+{s}", f"{s[0]}_{s[1:]}", f"{s}.0", f"0x{len(obj.data):x}")[obj.index % 5]])
    return False


def http10(conn: Conn, obj: StoredObject) -> bool:
    conn.send(message(200, "OK", object_headers(obj, length=False), obj.data, version="HTTP/1.0"))
    return False


def close_nolength(conn: Conn, obj: StoredObject) -> bool:
    conn.send(message(200, "OK", [*object_headers(obj, length=False, etag=False), ("Connection", "close")], obj.data))
    return False


def header_2mib(conn: Conn, obj: StoredObject) -> bool:
    conn.send(message(200, "OK", [*object_headers(obj), ("X-Hostile-Junk", "a" * (2 << 20))], obj.data))
    return False


def headers_10k(conn: Conn, obj: StoredObject) -> bool:
    extra = [(f"X-Hostile-{i:05d}", "v") for i in range(10_000)]
    conn.send(message(200, "OK", [*object_headers(obj), *extra], obj.data))
    return False


_STATUS_LINES = (b"HTTP/1.1 2x0 OK\r\n", b"garbage\r\n", b"HTTP/1.1 20 OK\r\n", b"HTTP/1.1 -200 OK\r\n")


def status_garbage(conn: Conn, obj: StoredObject) -> bool:
    head = "".join(f"{k}: {v}\r\n" for k, v in object_headers(obj)).encode()
    conn.send(_STATUS_LINES[obj.index % len(_STATUS_LINES)] + head + b"\r\n" + obj.data)
    return False


# -- pace ------------------------------------------------------------------------------------------------


def byte_per_second(conn: Conn, obj: StoredObject) -> bool:
    conn.send(message(200, "OK", object_headers(obj)))
    conn.paced(obj.data, 1, 1.0)
    return True


def slow_steady(conn: Conn, obj: StoredObject) -> bool:
    conn.send(message(200, "OK", object_headers(obj)))
    conn.paced(obj.data, int(STEADY_RATE * STEADY_PIECE_S), STEADY_PIECE_S)
    return True


# -- connections -----------------------------------------------------------------------------------------


def close_each(conn: Conn, obj: StoredObject) -> bool:
    """A right answer (no ``Connection: close``), then a close 0-6 ms later: reuse races the close."""
    right(conn, obj)
    conn.pause(0.002 * (obj.index % 4))
    conn.drop()
    return False


def reset_mid_body(conn: Conn, obj: StoredObject) -> bool:
    conn.send(message(200, "OK", object_headers(obj), obj.data[: len(obj.data) // 2]))
    conn.pause(0.02)
    conn.reset()
    return False


# -- content ---------------------------------------------------------------------------------------------


def gzip_on_the_fly(conn: Conn, obj: StoredObject) -> bool:
    """The true bytes gzipped with ``Content-Encoding: gzip``: with length and ETag, or chunked without ETag."""
    packed = gzip.compress(obj.data, mtime=0)
    if obj.index % 2 == 0:
        headers = [
            *object_headers(obj, length=False),
            ("Content-Encoding", "gzip"),
            ("Content-Length", str(len(packed))),
        ]
        conn.send(message(200, "OK", headers, packed))
    else:
        headers = [*_chunked_headers(obj, etag=False), ("Content-Encoding", "gzip")]
        conn.send(message(200, "OK", headers, _frame(packed) + b"0\r\n\r\n"))
    return True


def changed(*, etag: bool) -> Behaviour:
    """One byte of the body changed; the GET sends the listing's ETag, or no ETag at all."""

    def send(conn: Conn, obj: StoredObject) -> bool:
        mid = len(obj.data) // 2
        data = obj.data[:mid] + bytes([obj.data[mid] ^ 0x01]) + obj.data[mid + 1 :]
        conn.send(message(200, "OK", object_headers(obj, etag=etag), data))
        return True

    return send


# -- errors ----------------------------------------------------------------------------------------------

_REASONS = {403: "Forbidden", 404: "Not Found", 500: "Internal Server Error", 503: "Service Unavailable"}
_CODES = {
    403: ("AccessDenied", "Access Denied"),
    404: ("NoSuchKey", "The specified key does not exist."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}


def error_big(status: int, *, chunked: bool = False) -> Behaviour:
    """An S3 XML error whose <Message> is padded to a body of ERROR_BODY_BYTES (Content-Length or chunked)."""

    def send(conn: Conn, obj: StoredObject) -> bool:
        code, text = _CODES[status]
        head = f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{text}'.encode()
        tail = f"</Message><Resource>/{BUCKET}/{obj.key}</Resource><RequestId>HOSTILE0</RequestId></Error>".encode()
        framing = ("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(ERROR_BODY_BYTES))
        conn.send(message(status, _REASONS[status], [*base_headers(), ("Content-Type", "application/xml"), framing]))
        conn.send(_frame(head) if chunked else head)
        left = ERROR_BODY_BYTES - len(head) - len(tail)
        while left > 0:
            piece = _PADDING if left >= len(_PADDING) else _PADDING[:left]
            conn.send(_frame(piece) if chunked else piece)
            left -= len(piece)
        conn.send(_frame(tail) + b"0\r\n\r\n" if chunked else tail)
        return True

    return send


def error_small(status: int) -> Behaviour:
    def send(conn: Conn, obj: StoredObject) -> bool:
        conn.send(error_answer(status, _REASONS[status], *_CODES[status], f"/{BUCKET}/{obj.key}"))
        return True

    return send


def redirect(status: int) -> Behaviour:
    """A redirect to the same bytes elsewhere on this server (REDIRECT_TARGETS/<key>): never to be followed.

    301 is a web server's or proxy's (an HTML body: S3's own 301 PermanentRedirect, a bucket in another
    region, carries no Location); 307 is S3's TemporaryRedirect, which does.
    """

    def send(conn: Conn, obj: StoredObject) -> bool:
        if status == 301:
            reason, kind, body = (
                "Moved Permanently",
                "text/html",
                b"<html><body><h1>301 Moved Permanently</h1></body></html>",
            )
        else:
            reason, kind = "Temporary Redirect", "application/xml"
            body = error_xml(
                "TemporaryRedirect",
                "Please re-send this request to the specified temporary endpoint.",
                f"/{BUCKET}/{obj.key}",
            )
        location = f"{conn.server.endpoint}/{BUCKET}/{quote(f'{REDIRECT_TARGETS}/{obj.key}', safe='/~')}"
        headers = [*base_headers(), ("Location", location), ("Content-Type", kind), ("Content-Length", str(len(body)))]
        conn.send(message(status, reason, headers, body))
        return True

    return send


# -- the cases -------------------------------------------------------------------------------------------


def _case(
    *gets: Behaviour,
    n: int = 4,
    size: int | None = None,
    multipart_etag: bool = False,
    data: Callable[[str], bytes] | None = None,
    encoding: str | None = None,
) -> Callable[[str], list[StoredObject]]:
    """Objects ``<case>/obj-NN.bin`` whose GETs follow the schedule ``gets`` (the last one repeats)."""

    def build(case: str) -> list[StoredObject]:
        out = []
        for i in range(n):
            key = f"{case}/obj-{i:02d}.bin"
            body = data(key) if data else _random_bytes(key, size)
            etag = f'"{hashlib.md5(body).hexdigest()}-2"' if multipart_etag else ""
            out.append(StoredObject(key, body, i, etag=etag, content_encoding=encoding, gets=gets))
        return out

    return build


def _double(case: str) -> list[StoredObject]:
    """Same-size objects, so that only the listing's ETag (or dropping the connection) tells them apart."""
    objs = _case(n=5, size=4096)(case)
    return [dataclasses.replace(o, gets=(double_answer(objs[(i + 1) % len(objs)]),)) for i, o in enumerate(objs)]


def _slow_steady(case: str) -> list[StoredObject]:
    sizes = [SLOW_STEADY_SIZE, 4_000, 4_000]
    return [
        StoredObject(f"{case}/obj-{i:02d}.bin", _random_bytes(f"{case}/{i}", s), i, gets=(slow_steady,))
        for i, s in enumerate(sizes)
    ]


def _one_denied(case: str) -> list[StoredObject]:
    objs = _case(n=4)(case)
    return [dataclasses.replace(objs[0], gets=(error_big(403),)), *objs[1:]]


def _gzip_data(key: str) -> bytes:
    return gzip.compress(_random_bytes(key), mtime=0)


CASES: dict[str, Callable[[str], list[StoredObject]]] = {
    "interim": _case(interim, n=3),
    "garbage": _case(trailing_garbage, n=5),
    "double": _double,
    "chunked-ok": _case(chunked_ok),
    "chunked-long": _case(chunked_long, n=3),
    "chunked-cut": _case(chunked_cut, multipart_etag=True),
    "chunked-badsize": _case(chunked_badsize, n=5),
    "cl-short": _case(cl_short, n=3),
    "cl-huge": _case(cl_huge),
    "cl-dup": _case(cl_dup),
    "cl-negative": _case(cl_negative),
    "cl-nonnumeric": _case(cl_nonnumeric, n=5),
    "http10": _case(http10, n=3),
    "close-nolength": _case(close_nolength, n=3),
    "header-2mib": _case(header_2mib, n=3),
    "headers-10k": _case(headers_10k, n=3),
    "status-garbage": _case(status_garbage),
    "byte-per-second": _case(byte_per_second, n=3),
    "slow-steady": _slow_steady,
    "close-each": _case(close_each, n=40),
    "reset-once": _case(reset_mid_body, right),
    "reset-always": _case(reset_mid_body, n=3),
    "gzip-fly": _case(gzip_on_the_fly),
    "gzip-stored": _case(right, n=3, data=_gzip_data, encoding="gzip"),
    "changed-etag": _case(changed(etag=True), n=3),
    "changed-noetag": _case(changed(etag=False), n=3),
    "err-500-big": _case(error_big(500), n=3),
    "err-500-big-chunked": _case(error_big(500, chunked=True), n=3),
    "err-503-big": _case(error_big(503), n=3),
    "err-503-big-chunked": _case(error_big(503, chunked=True), n=3),
    "err-404-big": _case(error_big(404), n=3),
    "err-403-one": _one_denied,
    "err-403-all": _case(error_small(403), n=3),
    "redirect-301": _case(redirect(301), n=3),
    "redirect-307": _case(redirect(307), n=3),
}

# Keys for the server's self-tests (right answers): spaces, '+', '%', unicode, a folder, a marker.
SELFTEST_KEYS = (
    "selftest/a b+c.bin",
    "selftest/x%2Fy.bin",
    "selftest/ünï/ké y.bin",
    "selftest/sub/deep/z.bin",
    "selftest/zz~.bin",
)


def build_objects() -> list[StoredObject]:
    """Every case's objects, the redirect targets and the self-test objects."""
    objects = [o for case, build in CASES.items() for o in build(case)]
    targets = [StoredObject(f"{REDIRECT_TARGETS}/{o.key}", o.data) for o in objects if o.key.startswith("redirect-")]
    selftest = [StoredObject(k, _random_bytes(k), i) for i, k in enumerate(SELFTEST_KEYS)]
    return [*objects, *targets, *selftest]


def build_server() -> HostileServer:
    return HostileServer(build_objects())
