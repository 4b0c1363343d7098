"""Finished work is never lost: whatever ends a fetch, every blob already renamed into the cache is in the
key index before tess exits, so the rerun GETs only the objects not yet fetched (counted at the server).

Causes: Ctrl-C (SIGINT), SIGTERM, and a fatal answer in the middle of the run (credentials the server no
longer knows, through the fault proxy). SIGKILL loses at most the objects in flight
(``tests/test_fetch_errors.py::test_fetch_killed_mid_run_then_rerun_completes``).
"""

from __future__ import annotations

import contextlib
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from cache import CacheLayout
from pipeline.demo.server import seed_objects
from tests.faultproxy import FaultProxy
from tests.helpers import ROOT, blob_count, run_cli

N = 1500


def _objects(prefix: str) -> dict[str, bytes]:
    rng = random.Random(16)
    return {f"{prefix}obj-{i:05d}_{i % 10}.bin": rng.randbytes(rng.randrange(200, 700)) for i in range(N)}


def _fetch_cmd(uri: str, endpoint: str, cache_dir) -> list[str]:
    # 16 in flight: the run lasts a few seconds on moto, so the signal lands in the middle of it.
    return [
        sys.executable,
        "-m",
        "pipeline",
        "fetch",
        uri,
        "--endpoint",
        endpoint,
        "--cache-dir",
        str(cache_dir),
        "--no-progress",
        "--max-in-flight",
        "16",
    ]


def _signal_when_blobs(cmd: list[str], cache_dir, threshold: int, sig: signal.Signals) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline and blob_count(cache_dir) < threshold:
        time.sleep(0.005)  # polling for the condition, not standing in for it
    assert proc.poll() is None, "the fetch ended before the signal"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _indexed(cache_dir) -> int:
    """Entries of the key index, read-only (diskcache's own open writes, and a full disk refuses that)."""
    db = CacheLayout(root=cache_dir).index / "cache.db"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        return con.execute("SELECT COUNT(*) FROM Cache").fetchone()[0]


def _check_nothing_lost(endpoint: str, gets: Callable[[], int], uri: str, cache_dir) -> None:
    """Every blob is indexed, no temp file is left, and a rerun through ``endpoint`` (the key index is per
    endpoint) GETs exactly the objects that have no blob (``gets()`` counts at the server)."""
    blobs = blob_count(cache_dir)
    assert 0 < blobs < N
    assert _indexed(cache_dir) == blobs, "a blob renamed into the cache is missing from the key index"
    assert list((cache_dir / "tmp").iterdir()) == [], "a cancelled download left a temp file"
    before = gets()
    rerun = run_cli("fetch", uri, "--endpoint", endpoint, "--cache-dir", str(cache_dir), "--no-progress")
    assert rerun.returncode == 0, rerun.stderr
    assert gets() - before == N - blobs, (gets() - before, blobs)


@pytest.mark.parametrize(
    ("sig", "code", "said"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_a_signal_keeps_what_finished(s3_server, bucket, cache_dir, sig, code, said):
    seed_objects(bucket, _objects("sig/").items())
    uri = f"s3://{bucket}/sig/"
    proc = _signal_when_blobs(_fetch_cmd(uri, s3_server.endpoint, cache_dir), cache_dir, 200, sig)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"tess: {said}"), proc.stderr
    assert "Traceback" not in proc.stderr
    _check_nothing_lost(s3_server.endpoint, lambda: s3_server.counts["GET"], uri, cache_dir)


def test_a_fatal_answer_mid_run_keeps_what_finished(s3_server, bucket, cache_dir):
    objects = _objects("fatal/")
    seed_objects(bucket, objects.items())
    revoked = sorted(objects)[N // 2]  # the server stops knowing the key half way through the listing
    uri = f"s3://{bucket}/fatal/"
    with FaultProxy(s3_server.endpoint, always={f"/{bucket}/{revoked}": "badkey"}) as proxy:
        proc = run_cli(
            "fetch",
            uri,
            "--endpoint",
            proxy.endpoint,
            "--cache-dir",
            str(cache_dir),
            "--no-progress",
            "--max-in-flight",
            "16",
        )
        assert proc.returncode == 2 and "InvalidAccessKeyId" in proc.stderr, proc.stderr
        proxy.always.clear()  # the key is known again: the rerun goes through the same endpoint
        _check_nothing_lost(proxy.endpoint, lambda: proxy.requests_of_kind("GET"), uri, cache_dir)


def test_a_full_disk_keeps_what_finished(s3_server, bucket, tmp_path):
    """The cache on a 2 MB tmpfs fills up half way through: the fetch ends with one line (exit 2), and the
    blobs that made it are all in the key index (the failed temp file is removed, which frees the room
    the index needs)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("needs root to mount a small tmpfs (the full-disk case)")
    try:
        rng = random.Random(9)
        seed_objects(bucket, ((f"full/k{i:02d}_0.bin", rng.randbytes(150_000)) for i in range(30)))
        cache_dir = mnt / "cache"
        proc = run_cli(
            "fetch",
            f"s3://{bucket}/full/",
            "--endpoint",
            s3_server.endpoint,
            "--cache-dir",
            str(cache_dir),
            "--no-progress",
            "--max-in-flight",
            "4",
        )
        assert proc.returncode == 2 and "free space or pass --cache-dir" in proc.stderr, proc.stderr
        blobs = blob_count(cache_dir)
        assert 0 < blobs < 30
        assert _indexed(cache_dir) == blobs, "a blob renamed into the cache is missing from the key index"
        assert list((cache_dir / "tmp").iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
