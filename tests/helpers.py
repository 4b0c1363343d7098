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


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120, module: str = "pipeline"
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pipeline ARGS`` from the repository root and capture its output."""
    cmd = [sys.executable, "-m", module, *args] if module else [sys.executable, *args]
    return subprocess.run(
        cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


def closed_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(*, demo: int = 0, env: dict[str, str] | None = None) -> Iterator[str]:
    """``python -m pipeline serve`` in a child process with extra ``env``; yields its endpoint."""
    from pipeline.demo.server import READY_PREFIX

    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve", "--port", "0", "--demo", str(demo), "--until-stdin-closes"],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith(READY_PREFIX), f"server did not start: {line!r}"
        yield line[len(READY_PREFIX) :].strip()
    finally:
        proc.stdin.close()
        proc.wait(timeout=20)


def blob_count(cache_dir: Path) -> int:
    objects = cache_dir / "objects"
    return sum(1 for p in objects.rglob("*") if p.is_file()) if objects.is_dir() else 0


def orphans(pid: int) -> list[int]:
    """Children of ``pid`` (DataLoader workers of a killed parent exit on their own; don't wait for it)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if stat.rsplit(")", 1)[1].split()[1] == str(pid):
                out.append(int(d.name))
    return out


def kill_when_blobs(cmd: list[str], cache_dir: Path, threshold: int, *, timeout: float = 120) -> None:
    """Start ``cmd``, wait until ``threshold`` blobs exist under ``cache_dir``, then SIGKILL it and its workers."""
    import signal
    import time

    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline and blob_count(cache_dir) < threshold:
        time.sleep(0.005)
    assert proc.poll() is None, "the fetch ended before the kill point"
    children = orphans(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for child in children + orphans(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def multipart_upload(s3c, bucket: str, key: str, parts: list[bytes]) -> None:
    """Upload ``parts`` as one multipart object (its ETag is ``"<md5 of the part MD5s>-N"``)."""
    up = s3c.create_multipart_upload(Bucket=bucket, Key=key)
    done = []
    for n, part in enumerate(parts, 1):
        r = s3c.upload_part(Bucket=bucket, Key=key, UploadId=up["UploadId"], PartNumber=n, Body=part)
        done.append({"PartNumber": n, "ETag": r["ETag"]})
    s3c.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=up["UploadId"], MultipartUpload={"Parts": done})
