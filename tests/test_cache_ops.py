"""verify / --repair, stats and the cache size cap, against the loopback S3 server."""

from __future__ import annotations

import os
import random

import pytest

from cache import BlobStore, CacheLayout, load_manifest
from cache.blobs import hash_file
from cache.gc import cache_bytes, cache_stats, enforce_cap
from cache.manifest import list_manifests
from cache.verify import verify_cache
from pipeline.demo.server import seed_objects
from pipeline.fetch.stage import FetchConfig, fetch
from pipeline.transport.boto import StorageError
from tests.conftest import png_bytes
from tests.helpers import run_cli


def _fetch(bucket, options, cache_dir, prefix, **kw):
    return fetch(
        FetchConfig(
            prefix=f"s3://{bucket}/{prefix}", options=options, cache_dir=cache_dir, workers=0, progress=False, **kw
        )
    )


def test_verify_reports_by_key_then_repair_fixes(s3_server, bucket, options, cache_dir):
    seed_objects(bucket, ((f"v/img-{i}_{i % 2}.png", png_bytes(i)) for i in range(10)))
    r = _fetch(bucket, options, cache_dir, "v/")
    m = load_manifest(r.manifest)
    layout = CacheLayout(root=cache_dir)
    layout.blob_path(m.sha_hex(3)).write_bytes(b"flipped bits")
    os.unlink(layout.blob_path(m.sha_hex(7)))

    # Plain verify only reads: run twice, it reports the same, and the corrupted blob is untouched.
    for _ in range(2):
        proc = run_cli("verify", "--cache-dir", str(cache_dir), "--no-progress")
        assert proc.returncode == 1
        assert f"corrupted: key '{m.keys[3]}'" in proc.stdout and f"missing: key '{m.keys[7]}'" in proc.stdout
        assert "1 missing, 1 corrupted" in proc.stdout and "nothing was changed" in proc.stdout
        assert f"make verify REPAIR=1 CACHE_DIR={cache_dir}" in proc.stderr
        assert f"tess verify --repair --cache-dir {cache_dir}" in proc.stderr
        assert layout.blob_path(m.sha_hex(3)).read_bytes() == b"flipped bits"

    s3_server.reset_counts()
    proc = run_cli("verify", "--cache-dir", str(cache_dir), "--repair", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "repaired 2 blobs" in proc.stdout and s3_server.counts["GET"] == 2
    assert "removed" not in proc.stdout  # both were healed in place, nothing left to remove
    assert verify_cache(layout).ok
    assert run_cli("verify", "--cache-dir", str(cache_dir), "--no-progress").returncode == 0


def test_repair_refuses_an_object_changed_on_the_server(s3_server, bucket, put, options, cache_dir):
    put("c/a_0.png", png_bytes(1))
    m = load_manifest(_fetch(bucket, options, cache_dir, "c/").manifest)
    os.unlink(CacheLayout(root=cache_dir).blob_path(m.sha_hex(0)))
    put("c/a_0.png", png_bytes(2))
    proc = run_cli("verify", "--cache-dir", str(cache_dir), "--repair", "--no-progress")
    assert proc.returncode == 1
    assert "changed on the server" in proc.stderr and "make fetch" in proc.stderr
    # The suggested fetch is this cache's own: prefix, endpoint and folder, ready to paste.
    assert f"make fetch PREFIX=s3://{bucket}/c/ ENDPOINT={s3_server.endpoint} CACHE_DIR={cache_dir}" in proc.stderr


def test_verify_tells_a_blob_missing_here_from_an_object_deleted_on_the_server(
    s3_server, s3_client, bucket, put, options, cache_dir
):
    put("d/a_0.png", png_bytes(1))
    put("d/b_1.png", png_bytes(2))
    m = load_manifest(_fetch(bucket, options, cache_dir, "d/").manifest)
    os.unlink(CacheLayout(root=cache_dir).blob_path(m.sha_hex(0)))
    s3_client.delete_object(Bucket=bucket, Key="d/a_0.png")
    fix = f"make fetch PREFIX=s3://{bucket}/d/ ENDPOINT={s3_server.endpoint} CACHE_DIR={cache_dir}"

    # Plain verify cannot know which it is: it names both fixes.
    plain = run_cli("verify", "--cache-dir", str(cache_dir), "--no-progress")
    assert plain.returncode == 1 and "1 missing, 0 corrupted" in plain.stdout
    assert f"run `make verify REPAIR=1 CACHE_DIR={cache_dir}`" in plain.stderr and "to fetch them again" in plain.stderr
    assert (
        "an object deleted on the server since the fetch cannot come back that way and needs a new fetch"
        in plain.stderr
    )
    assert fix in plain.stderr

    # --repair meets the 404: it says the object was deleted there and names the fetch, not verify --repair again.
    proc = run_cli("verify", "--cache-dir", str(cache_dir), "--repair", "--no-progress")
    assert proc.returncode == 1 and "repaired 0 blobs" in proc.stdout
    assert f"s3://{bucket}/d/a_0.png was deleted on the server since {m.path.name} was written" in proc.stderr
    assert f"run `{fix}`" in proc.stderr and "for a new manifest without it" in proc.stderr
    assert "verify REPAIR=1" not in proc.stderr
    # The new fetch it names heals the cache: verify is clean afterwards.
    assert _fetch(bucket, options, cache_dir, "d/").summary.listed == 1
    assert run_cli("verify", "--cache-dir", str(cache_dir), "--no-progress").returncode == 0


def test_repair_removes_a_corrupted_blob_it_cannot_fetch_again_and_says_so(s3_server, bucket, put, options, cache_dir):
    put("r/a_0.png", png_bytes(1))
    m = load_manifest(_fetch(bucket, options, cache_dir, "r/").manifest)
    blob = CacheLayout(root=cache_dir).blob_path(m.sha_hex(0))
    blob.write_bytes(b"damaged")
    put("r/a_0.png", png_bytes(2))  # the server no longer has the pinned bytes
    proc = run_cli("verify", "--cache-dir", str(cache_dir), "--repair", "--no-progress")
    assert proc.returncode == 1
    assert "removed 1 corrupted blobs that could not be fetched again" in proc.stdout
    assert not blob.exists()


def _sized(seed: int, n: int = 1000) -> bytes:
    return random.Random(seed).randbytes(n)


def test_cap_evicts_unreferenced_then_oldest_manifest(s3_server, bucket, options, cache_dir):
    seed_objects(bucket, [(f"a/{i}", _sized(i)) for i in range(4)])
    seed_objects(bucket, [("b/0", _sized(0))] + [(f"b/{i}", _sized(10 + i)) for i in range(1, 4)])  # b/0 shares a/0
    seed_objects(bucket, [(f"c/{i}", _sized(20 + i)) for i in range(3)])
    layout = CacheLayout(root=cache_dir)
    ma = _fetch(bucket, options, cache_dir, "a/").manifest
    mb = _fetch(bucket, options, cache_dir, "b/").manifest
    os.utime(ma, (1_000_000, 1_000_000))
    os.utime(mb, (2_000_000, 2_000_000))
    stray, _ = BlobStore(layout).put_bytes(_sized(99))  # in no manifest
    r = _fetch(bucket, options, cache_dir, "c/", max_cache_bytes=7000)
    ev = r.summary.evicted
    assert ev.before_bytes == 11_000 and ev.after_bytes == 7000 == cache_bytes(layout)
    assert ev.manifests_removed == [ma.name] and ev.blobs_removed == 1 + 3
    assert not layout.blob_path(stray).exists()
    assert [p.name for p in list_manifests(layout)] == [mb.name, r.manifest.name]
    for p in list_manifests(layout):  # every remaining manifest is complete
        m = load_manifest(p)
        assert all(hash_file(layout.blob_path(m.sha_hex(i))) == m.sha_hex(i) for i in range(len(m)))


def test_cap_never_evicts_the_new_manifest_and_refuses_oversized_prefix(s3_server, bucket, options, cache_dir):
    seed_objects(bucket, [(f"big/{i}", _sized(i)) for i in range(5)])
    s3_server.reset_counts()
    with pytest.raises(StorageError) as e:
        _fetch(bucket, options, cache_dir, "big/", max_cache_bytes=4999)
    assert "holds 5000 bytes, more than --max-cache-bytes 4999" in str(e.value)
    assert s3_server.counts["GET"] == 0
    r = _fetch(bucket, options, cache_dir, "big/", max_cache_bytes=5000)
    assert r.summary.evicted.after_bytes == 5000 and list_manifests(CacheLayout(root=cache_dir)) == [r.manifest]
    assert enforce_cap(CacheLayout(root=cache_dir), 1, keep=r.manifest).manifests_removed == []


def test_stats_reports_dedup_and_last_fetch(s3_server, bucket, options, cache_dir):
    seed_objects(bucket, [("s/x", _sized(1)), ("s/y", _sized(1)), ("s/z", _sized(2))])
    _fetch(bucket, options, cache_dir, "s/")
    st = cache_stats(CacheLayout(root=cache_dir))
    assert len(st.manifests) == 1 and st.blobs == 2 and st.blob_bytes == 2000
    assert st.logical_bytes == 3000 and st.dedup_savings == 1000 and st.last_fetch["fetched"] == 3
    proc = run_cli("stats", "--cache-dir", str(cache_dir))
    assert proc.returncode == 0 and "dedup savings: 0.0 MB" in proc.stdout and "blobs: 2" in proc.stdout
    assert "last fetch:" in proc.stdout


@pytest.mark.parametrize(("value", "fragment"), [("12Q", "is not a size"), ("0", "must be at least 1 byte")])
def test_bad_cap_value(cache_dir, value, fragment):
    proc = run_cli("fetch", "s3://bkt/p/", "--max-cache-bytes", value, "--cache-dir", str(cache_dir))
    assert proc.returncode == 2 and fragment in proc.stderr


def test_embedded_demo_fetch_and_repair_from_a_fresh_embedded_server(cache_dir):
    proc = run_cli("fetch", "--demo", "40", "--cache-dir", str(cache_dir), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    m = load_manifest(next((cache_dir / "manifests").glob("*.jsonl")))
    assert len(m) == 40 and m.header.endpoint == "embedded-demo" and m.label.tolist() == [i % 10 for i in range(40)]
    os.unlink(CacheLayout(root=cache_dir).blob_path(m.sha_hex(7)))
    # The demo set is deterministic, so a new embedded server can repair the blob byte for byte.
    proc = run_cli("verify", "--repair", "--cache-dir", str(cache_dir), "--no-progress")
    assert proc.returncode == 0 and "repaired 1 blobs" in proc.stdout, proc.stderr
    again = run_cli("fetch", "--demo", "40", "--cache-dir", str(cache_dir), "--no-progress")
    assert "fetched 0, already cached 40" in again.stdout
