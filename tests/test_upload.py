"""``upload`` sends only what the prefix does not already hold with the same size and MD5 (as ``aws s3
sync`` does), multipart objects included; ``--force`` sends everything. PUTs are counted at the server."""

from __future__ import annotations

import os
import random

from tests.helpers import run_cli


def _puts(server) -> int:
    c = server.counts
    return sum(n for kind, n in c.items() if kind.startswith(("PUT", "POST")))


def _upload(folder, uri, endpoint, *flags):
    proc = run_cli("upload", str(folder), uri, "--endpoint", endpoint, "--no-progress", *flags, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def test_a_repeated_upload_sends_only_what_changed(s3_server, bucket, tmp_path):
    folder = tmp_path / "imgs"
    (folder / "cat").mkdir(parents=True)
    rng = random.Random(4)
    for name in ("a.png", "cat/b.png", "cat/c.png"):
        (folder / name).write_bytes(rng.randbytes(3000))
    (folder / "big.bin").write_bytes(os.urandom((64 << 20) + 1))  # above 64 MiB: a multipart object ("...-9")
    uri = f"s3://{bucket}/up/"
    s3_server.reset_counts()
    assert (
        _upload(folder, uri, s3_server.endpoint)
        == f"uploaded 4 files (67.1 MB) to {uri}; skipped 0 already there with the same size and MD5"
    )
    first = _puts(s3_server)
    assert first >= 4

    s3_server.reset_counts()
    assert _upload(folder, uri, s3_server.endpoint).startswith("uploaded 0 files (0.0 MB)")
    assert _puts(s3_server) == 0 and s3_server.counts["LIST"] == 1

    changed = bytearray((folder / "cat/b.png").read_bytes())
    changed[100] ^= 1  # same size, other MD5
    (folder / "cat/b.png").write_bytes(bytes(changed))
    s3_server.reset_counts()
    line = _upload(folder, uri, s3_server.endpoint)
    assert line.startswith("uploaded 1 files (0.0 MB)") and "skipped 3 already there" in line, line
    assert _puts(s3_server) == 1

    s3_server.reset_counts()
    assert _upload(folder, uri, s3_server.endpoint, "--force").startswith("uploaded 4 files")
    assert _puts(s3_server) == first and s3_server.counts["LIST"] == 0
