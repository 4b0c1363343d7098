"""Cost of framing one S3 GET answer with each kept HTTP/1.1 parser (h11, httptools), no network.

The transport feeds the parser what the socket gave; this replays a typical small-object answer (S3's
headers, a 20 KB body, delivered in 64 KiB reads) through each parser and prints microseconds of CPU per
answer. Run: ``.venv/bin/python bench/parser_bench.py``.
"""

from __future__ import annotations

import os
import time

import h11

try:
    import httptools
except ImportError:  # a bench-only comparison: tess itself does not use it
    raise SystemExit("bench/parser_bench.py compares h11 with httptools: .venv/bin/pip install httptools") from None

BODY = os.urandom(20_000)
HEAD = (
    "HTTP/1.1 200 OK\r\nx-amz-id-2: abcdefghijklmnopqrstuvwxyz0123456789\r\nx-amz-request-id: 0123456789ABCDEF\r\n"
    "Date: Thu, 03 Dec 2026 13:00:00 GMT\r\nLast-Modified: Thu, 03 Dec 2026 12:00:00 GMT\r\n"
    'ETag: "0123456789abcdef0123456789abcdef"\r\nAccept-Ranges: bytes\r\nContent-Type: image/png\r\n'
    f"Server: AmazonS3\r\nContent-Length: {len(BODY)}\r\n\r\n"
).encode()
WIRE = HEAD + BODY
N = 20_000


def with_h11() -> None:
    conn = h11.Connection(h11.CLIENT)
    for _ in range(N):
        conn.send(h11.Request(method="GET", target="/b/k", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        conn.receive_data(WIRE)
        got = 0
        while True:
            ev = conn.next_event()
            if type(ev) is h11.Data:
                got += len(ev.data)
            elif type(ev) is h11.EndOfMessage:
                break
            elif ev is h11.NEED_DATA:
                raise AssertionError("short")
        assert got == len(BODY)
        conn.start_next_cycle()


def with_httptools() -> None:
    class P:
        def __init__(self) -> None:
            self.got = 0
            self.done = False
            self.headers: list[tuple[bytes, bytes]] = []

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers.append((name, value))

        def on_body(self, body: bytes) -> None:
            self.got += len(body)

        def on_message_complete(self) -> None:
            self.done = True

    for _ in range(N):
        p = P()
        parser = httptools.HttpResponseParser(p)
        parser.feed_data(WIRE)
        assert p.done and p.got == len(BODY) and parser.get_status_code() == 200


def main() -> None:
    for name, fn in (("h11", with_h11), ("httptools", with_httptools)):
        t = time.process_time()
        fn()
        print(
            f"{name:10s} {(time.process_time() - t) / N * 1e6:6.1f} us CPU per answer "
            f"({h11.__version__ if name == 'h11' else httptools.__version__})"
        )


if __name__ == "__main__":
    main()
