"""The embedded S3 server: moto's S3 on 127.0.0.1, seeded with the demo set, counting requests.

``make fetch`` without PREFIX and ``make serve`` use it, and so do the tests. The server is moto's WSGI
app behind werkzeug's threaded server, wrapped in a small middleware that counts requests by kind
(``GET`` of an object, ``LIST``, ``HEAD``, ``PUT``...) and answers ``GET /_tess/stats`` with those
counts as JSON, so tests and benchmarks can prove how many GETs a run sent.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs

log = logging.getLogger(__name__)

# Public, fake credentials for the embedded demo server only (moto accepts any key).
DEMO_ACCESS_KEY = "tess-demo"
DEMO_SECRET_KEY = "tess-demo-secret"
STATS_PATH = "/_tess/stats"
READY_PREFIX = "TESS_S3_ENDPOINT="


def request_kind(method: str, path: str, query: str) -> str:
    """Classify a path-style S3 request: ``GET`` (object), ``LIST``, ``HEAD``, ``PUT``, ..."""
    parts = path.lstrip("/").split("/", 1)
    has_key = len(parts) == 2 and parts[1] != ""
    if method == "GET":
        if has_key:
            return "GET"
        q = parse_qs(query)
        return "LIST" if ("list-type" in q or "prefix" in q or not q) else "GET_BUCKET_OTHER"
    return method


class _Counting:
    """WSGI middleware: count requests by kind, serve the counts at ``/_tess/stats``."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == STATS_PATH:
            with self._lock:
                body = json.dumps(dict(self.counts)).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        kind = request_kind(environ.get("REQUEST_METHOD", ""), path, environ.get("QUERY_STRING", ""))
        with self._lock:
            self.counts[kind] += 1
        return self.app(environ, start_response)


class LoopbackS3Server:
    """moto's S3 served from a thread of this process on ``host`` at a free port."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._middleware = _Counting(DomainDispatcherApplication(create_backend_app))
        # Bound here, not by werkzeug: werkzeug prints a bind failure and calls sys.exit(1), where a
        # port in use or a privileged port must reach the CLI as an OSError (one line, exit 2).
        self._socket = socket.create_server((host, port), backlog=128)
        self._server = make_server(
            host, port, self._middleware, threaded=True, request_handler=MotoRequestHandler, fd=self._socket.fileno()
        )
        self._thread = threading.Thread(target=self._server.serve_forever, name="tess-s3", daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        assert isinstance(host, str), host  # the address of a TCP socket: getsockname() names the host as a str
        return f"http://{host}:{port}"

    @property
    def counts(self) -> collections.Counter[str]:
        """Requests served so far, by kind (a copy)."""
        with self._middleware._lock:
            return collections.Counter(self._middleware.counts)

    def reset_counts(self) -> None:
        with self._middleware._lock:
            self._middleware.counts.clear()

    def start(self) -> LoopbackS3Server:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._socket.close()
        self._thread.join()

    def __enter__(self) -> LoopbackS3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def seed_objects(bucket: str, items: Iterable[tuple[str, bytes]]) -> int:
    """Create ``bucket`` in this process's moto backend and store ``items`` directly (no HTTP)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
    with contextlib.suppress(Exception):
        backend.create_bucket(bucket, "us-east-1")
    n = 0
    for key, data in items:
        backend.put_object(bucket, key, data)
        n += 1
    return n


def seed_demo(n: int, *, seed: int = 0) -> tuple[str, str]:
    """Seed this process's backend with ``n`` demo images; return (bucket, prefix)."""
    from pipeline.demo.demo_set import DEMO_BUCKET, DEMO_PREFIX, demo_items

    seed_objects(DEMO_BUCKET, demo_items(n, seed=seed))
    return DEMO_BUCKET, DEMO_PREFIX


def serve(*, host: str, port: int, demo: int, seed: int, until_stdin_closes: bool) -> None:
    """Run the server with ``demo`` images until SIGINT/SIGTERM (or until stdin closes)."""
    import signal

    server = LoopbackS3Server(host=host, port=port)
    bucket, prefix = seed_demo(demo, seed=seed) if demo else ("", "")
    server.start()
    print(f"{READY_PREFIX}{server.endpoint}", flush=True)
    if not until_stdin_closes:
        print(
            f"serving {demo} demo objects at s3://{bucket}/{prefix} on {server.endpoint} (Ctrl-C stops)\n"
            f"  export AWS_ENDPOINT_URL={server.endpoint}\n"
            f"  export AWS_ACCESS_KEY_ID={DEMO_ACCESS_KEY} AWS_SECRET_ACCESS_KEY={DEMO_SECRET_KEY}  # demo-only keys\n"
            f"  make fetch PREFIX=s3://{bucket}/{prefix} ENDPOINT={server.endpoint}\n"
            f"  # or: tess fetch s3://{bucket}/{prefix} --endpoint {server.endpoint}",
            flush=True,
        )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if until_stdin_closes:

        def stop_at_eof() -> None:
            sys.stdin.read()
            stop.set()

        threading.Thread(target=stop_at_eof, daemon=True).start()
    try:
        while not stop.wait(3600):
            pass
    except KeyboardInterrupt:
        pass
    server.stop()


@contextlib.contextmanager
def embedded_server_process(*, demo: int, seed: int = 0) -> Iterator[tuple[str, int]]:
    """Start ``python -m pipeline serve`` in a child process (its own GIL); yield (endpoint, pid).

    The child exits when this process closes its stdin, so it never outlives a killed parent.
    """
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "serve",
        "--port",
        "0",
        "--demo",
        str(demo),
        "--seed",
        str(seed),
        "--until-stdin-closes",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        endpoint = None
        for line in proc.stdout:
            if line.startswith(READY_PREFIX):
                endpoint = line[len(READY_PREFIX) :].strip()
                break
        if endpoint is None:
            raise RuntimeError(f"the embedded S3 server exited with code {proc.wait()} before it was ready")
        yield endpoint, proc.pid
    finally:
        if proc.stdin:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def embedded_server(*, demo: int, seed: int = 0) -> Iterator[str]:
    """:func:`embedded_server_process`, yielding only the endpoint."""
    with embedded_server_process(demo=demo, seed=seed) as (endpoint, _pid):
        yield endpoint
