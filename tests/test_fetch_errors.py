"""Bad input and failures: one clear line on stderr, a non-zero exit, and nothing already cached lost."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from cache import CacheLayout, load_manifest
from cache.blobs import hash_file
from pipeline.demo.server import seed_objects
from pipeline.fetch.stage import EXIT_INCOMPLETE, FetchConfig, fetch
from pipeline.transport.listing import Lister
from tests.conftest import png_bytes
from tests.helpers import closed_port, kill_when_blobs, run_cli, server_process


@pytest.fixture
def precious(cache_dir):
    """A cache that already holds a blob and a manifest, which no failure may damage."""
    store = __import__("cache").BlobStore(CacheLayout(root=cache_dir))
    sha, _ = store.put_bytes(b"precious bytes")
    from cache import write_manifest
    from cache.manifest import ManifestRecord

    m = write_manifest(
        CacheLayout(root=cache_dir),
        endpoint="e",
        bucket="keep",
        prefix="p/",
        records=[ManifestRecord(key="p/k", sha256=sha, size=14, etag="", last_modified="")],
    )
    before = m.read_bytes()
    yield
    assert store.verify(sha) and m.read_bytes() == before
    assert [p for p in (cache_dir / "tmp").iterdir()] == []


def _one_line_error(proc, fragment):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("tess: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    assert all(line.startswith("tess: ") for line in lines), proc.stderr  # no traceback
    assert fragment in errors[0], errors[0]


def test_unreachable_endpoint_gives_up_quickly(precious, cache_dir):
    t0 = time.monotonic()
    proc = run_cli(
        "fetch",
        "s3://bkt/p/",
        "--endpoint",
        f"http://127.0.0.1:{closed_port()}",
        "--cache-dir",
        str(cache_dir),
        "--no-progress",
    )
    assert time.monotonic() - t0 < 30
    _one_line_error(proc, "cannot reach the S3 endpoint http://127.0.0.1:")


def test_silent_endpoint_gives_up_after_bounded_retries(precious, cache_dir):
    import socket

    with socket.socket() as silent:  # accepts connections (kernel backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        t0 = time.monotonic()
        proc = run_cli(
            "fetch",
            "s3://bkt/p/",
            "--endpoint",
            f"http://127.0.0.1:{silent.getsockname()[1]}",
            "--read-timeout",
            "2",
            "--max-attempts",
            "3",
            "--cache-dir",
            str(cache_dir),
            "--no-progress",
        )
        elapsed = time.monotonic() - t0
    # 3 attempts x 2 s, botocore's jittered backoff (at most 1 + 2 s), and process start-up.
    assert elapsed < 3 * 2 + 3 + 10, elapsed
    _one_line_error(proc, "accepted connections but did not answer within 2 s (3 attempts)")


def test_wrong_credentials_are_a_clear_403(precious, cache_dir):
    with server_process(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as endpoint:
        proc = run_cli("fetch", "s3://bkt/p/", "--endpoint", endpoint, "--cache-dir", str(cache_dir), "--no-progress")
    _one_line_error(proc, "the access key id is not known to the server (InvalidAccessKeyId)")
    assert "testing-secret-key" not in proc.stderr + proc.stdout


@pytest.mark.parametrize(
    ("prefix", "fragment"),
    [
        ("s3://no-such-bucket-xyz/p/", "bucket 'no-such-bucket-xyz' does not exist at http://127.0.0.1:"),
        ("{bucket}/p/", "is not an S3 URI; use s3://bucket/prefix"),
        ("s3://{bucket}/nothing-here/", "no objects under s3://"),
    ],
)
def test_bad_prefix(precious, s3_server, bucket, put, cache_dir, prefix, fragment):
    put("p/a_1.png", png_bytes(1))
    proc = run_cli(
        "fetch",
        prefix.format(bucket=bucket),
        "--endpoint",
        s3_server.endpoint,
        "--cache-dir",
        str(cache_dir),
        "--no-progress",
    )
    _one_line_error(proc, fragment)


def test_bad_flag_values(cache_dir):
    proc = run_cli("fetch", "s3://bkt/p/", "--workers", "-1", "--cache-dir", str(cache_dir))
    _one_line_error(proc, "workers=-1 must be between 0 and 256")
    proc = run_cli("fetch", "s3://bkt/p/", "--endpoint", "http://user:pw@127.0.0.1:1", "--cache-dir", str(cache_dir))
    _one_line_error(proc, "contains credentials")
    assert "pw@" not in proc.stderr


def test_object_deleted_between_list_and_get(monkeypatch, s3_client, bucket, put, options, cache_dir):
    for i in range(6):
        put(f"del/k{i}_0.png", png_bytes(i))
    real = Lister.next_page

    async def list_then_delete(self):
        page = await real(self)
        if self.done:  # listed, and gone before any GET (GETs start once a page is listed)
            s3_client.delete_object(Bucket=bucket, Key="del/k3_0.png")
        return page

    monkeypatch.setattr(Lister, "next_page", list_then_delete)
    r = fetch(
        FetchConfig(prefix=f"s3://{bucket}/del/", options=options, cache_dir=cache_dir, workers=0, progress=False)
    )
    assert r.exit_code == EXIT_INCOMPLETE and r.summary.missing == 1 and r.summary.fetched == 5
    assert "del/k3_0.png" in r.summary.errors[0] and "deleted since the listing" in r.summary.errors[0]
    m = load_manifest(r.manifest)
    assert "del/k3_0.png" not in list(m.keys) and len(m) == 5 and m.header.extra["incomplete"] == 1


@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    rc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode
    if rc != 0:
        pytest.skip("needs root to mount a small tmpfs (disk-full test)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_fails_cleanly(tiny_disk, s3_server, bucket, options):
    seed_objects(bucket, ((f"big/k{i}_0.bin", os.urandom(150_000)) for i in range(12)))
    cache_dir = tiny_disk / "cache"
    proc = run_cli(
        "fetch",
        f"s3://{bucket}/big/",
        "--endpoint",
        s3_server.endpoint,
        "--cache-dir",
        str(cache_dir),
        "--no-progress",
        "-w",
        "0",
    )
    _one_line_error(proc, "free space or pass --cache-dir")
    assert list((cache_dir / "tmp").iterdir()) == []
    for blob in (cache_dir / "objects").rglob("*"):
        if blob.is_file():
            assert hash_file(blob) == blob.name


def test_fetch_killed_mid_run_then_rerun_completes(s3_server, bucket, cache_dir):
    n = 1500
    seed_objects(bucket, ((f"kill/img-{i:05d}_{i % 10}.png", png_bytes(i, size=24)) for i in range(n)))
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "fetch",
        f"s3://{bucket}/kill/",
        "--endpoint",
        s3_server.endpoint,
        "--cache-dir",
        str(cache_dir),
        "--no-progress",
        "-w",
        "2",
        "-b",
        "16",
    ]
    objects = cache_dir / "objects"
    # Kill it without warning once it is visibly under way (blobs appearing).
    kill_when_blobs(cmd, cache_dir, 100)
    blobs = [p for p in objects.rglob("*") if p.is_file()]
    assert 0 < len(blobs) < n
    assert all(hash_file(p) == p.name for p in blobs), "a partial blob was left under objects/"
    assert not list((cache_dir / "manifests").glob("*.jsonl")), "a manifest was written by a killed fetch"
    rerun = run_cli(
        "fetch",
        f"s3://{bucket}/kill/",
        "--endpoint",
        s3_server.endpoint,
        "--cache-dir",
        str(cache_dir),
        "--no-progress",
    )
    assert rerun.returncode == 0, rerun.stderr
    manifest = next((cache_dir / "manifests").glob("*.jsonl"))
    m = load_manifest(manifest)
    assert len(m) == n
    # Workers record each finished batch in the key index, so at most the batches in flight when the
    # process died (2 workers x 16 objects) are fetched again.
    assert m.header.extra["fetch"]["cached"] >= len(blobs) - 2 * 16
    assert all(CacheLayout(root=cache_dir).blob_path(m.sha_hex(i)).is_file() for i in range(n))
    assert list((cache_dir / "tmp").iterdir()) == []
