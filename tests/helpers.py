"""Helpers for tests that run tess as a user would: a subprocess of ``python -m pipeline``."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120, module: str = "pipeline") -> subprocess.CompletedProcess[str]:
    """Run ``python -m pipeline ARGS`` from the repository root and capture its output."""
    cmd = [sys.executable, "-m", module, *args] if module else [sys.executable, *args]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def closed_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(*, demo: int = 0, env: dict[str, str] | None = None) -> Iterator[str]:
    """``python -m pipeline serve`` in a child process with extra ``env``; yields its endpoint."""
    from pipeline.server import READY_PREFIX

    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve", "--port", "0", "--demo", str(demo), "--until-stdin-closes"],
        cwd=ROOT, env={**os.environ, **(env or {})}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith(READY_PREFIX), f"server did not start: {line!r}"
        yield line[len(READY_PREFIX):].strip()
    finally:
        proc.stdin.close()
        proc.wait(timeout=20)
