"""Crash safety, concurrent fetches, odd objects and bounded memory, with real processes and a real
S3 protocol server on loopback."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from cache import CacheLayout, load_manifest
from cache.blobs import hash_file
from cache.verify import verify_cache
from pipeline.config import TrainConfig
from pipeline.demo.server import seed_objects
from pipeline.fetch.stage import FetchConfig, fetch
from pipeline.train.loop import train
from tests.conftest import png_bytes
from tests.helpers import ROOT, kill_when_blobs, run_cli


def _fetch_cmd(endpoint, uri, cache_dir, *extra):
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
        *extra,
    ]


def test_sigkill_at_three_random_points(s3_server, bucket, cache_dir):
    n = 1200
    uri = f"s3://{bucket}/k/"
    seed_objects(bucket, ((f"k/{i:05d}_{i % 10}.png", png_bytes(i, size=16)) for i in range(n)))
    first = run_cli(
        "fetch", uri, "--endpoint", s3_server.endpoint, "--cache-dir", str(cache_dir), "--no-progress", "--limit", "100"
    )
    assert first.returncode == 0
    old = next((cache_dir / "manifests").glob("*.jsonl")).read_bytes()
    rng = random.Random(20261126)
    points = sorted(rng.sample(range(150, 900), 3))
    for point in points:
        kill_when_blobs(_fetch_cmd(s3_server.endpoint, uri, cache_dir, "-w", "2", "-b", "16"), cache_dir, point)
        manifests = list((cache_dir / "manifests").glob("*.jsonl"))
        assert [m.read_bytes() for m in manifests] == [old], "the manifest changed or was half-written by a killed run"
        assert all(hash_file(p) == p.name for p in (cache_dir / "objects").rglob("*") if p.is_file())
    leftovers = list((cache_dir / "tmp").iterdir())
    rerun = run_cli("fetch", uri, "--endpoint", s3_server.endpoint, "--cache-dir", str(cache_dir), "--no-progress")
    assert rerun.returncode == 0, rerun.stderr
    m = load_manifest(next((cache_dir / "manifests").glob("*.jsonl")))
    assert len(m) == n and m.header.fetch["cached"] >= points[-1] - 2 * 16
    assert verify_cache(CacheLayout(root=cache_dir)).ok
    assert list((cache_dir / "tmp").iterdir()) == [], f"stale temp files not cleaned (had {len(leftovers)})"


@pytest.mark.parametrize("second", ["same", "overlapping"])
def test_concurrent_fetches_leave_a_valid_cache(s3_server, bucket, cache_dir, second):
    seed_objects(
        bucket, ((f"p/{'sub/' if i % 2 else ''}{i:04d}_{i % 10}.png", png_bytes(i, size=16)) for i in range(600))
    )
    uris = [f"s3://{bucket}/p/", f"s3://{bucket}/p/" if second == "same" else f"s3://{bucket}/p/sub/"]
    procs = [
        subprocess.Popen(
            _fetch_cmd(s3_server.endpoint, u, cache_dir, "-w", "1"),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for u in uris
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    report = verify_cache(CacheLayout(root=cache_dir))
    assert report.ok and report.manifests == (1 if second == "same" else 2)
    counts = sorted(len(load_manifest(p)) for p in (cache_dir / "manifests").glob("*.jsonl"))
    assert counts == ([600] if second == "same" else [300, 600])
    assert list((cache_dir / "tmp").iterdir()) == []


def test_odd_objects_are_fetched_as_bytes_and_skipped_in_training(s3_server, bucket, cache_dir, options, tmp_path):
    from pipeline.demo.demo_set import demo_items

    good = list(demo_items(30, prefix="odd/"))
    seed_objects(
        bucket,
        good + [("odd/readme_1.txt", b"not an image"), ("odd/cut_2.png", good[0][1][:40]), ("odd/empty_3.png", b"")],
    )
    r = fetch(
        FetchConfig(prefix=f"s3://{bucket}/odd/", options=options, cache_dir=cache_dir, workers=0, progress=False)
    )
    m = load_manifest(r.manifest)
    assert r.exit_code == 0 and len(m) == 33
    sizes = dict(zip(m.keys, m.size.tolist()))
    assert sizes["odd/empty_3.png"] == 0 and sizes["odd/cut_2.png"] == 40
    with pytest.raises(ValueError) as e:
        train(TrainConfig(epochs=1, cache_dir=str(cache_dir), out=str(tmp_path / "stop"), progress=False))
    assert "odd/" in str(e.value) and "--on-bad-sample skip" in str(e.value)
    s = train(
        TrainConfig(
            epochs=1, cache_dir=str(cache_dir), out=str(tmp_path / "skip"), progress=False, on_bad_sample="skip"
        )
    )
    # The .txt key is not an image: ignored, not a bad sample; the two damaged PNGs are skipped by name.
    assert s.images == 30 and s.ignored_keys == 1 and s.ignored_examples == ["odd/readme_1.txt"]
    assert s.skipped_keys == ["odd/cut_2.png", "odd/empty_3.png"] and s.bad_samples_skipped == 2


def _peak_rss_mb(cmd) -> tuple[int, float]:
    """Exit code and VmHWM (peak resident memory) of ``python -m pipeline ...`` measured in-process.

    ru_maxrss of a child is no good here: Linux carries the parent's high-water mark across fork and
    exec, and this test process holds the server's 200 MB object.
    """
    args = cmd[3:]  # drop: python -m pipeline
    code = (
        "import sys; from pipeline.cli import main; rc = main(sys.argv[1:]); "
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
        "print('VMHWM', hwm); sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    kb = int(proc.stdout.split("VMHWM", 1)[1].split()[0])
    return proc.returncode, kb / 1024


def test_200mb_object_streams_with_bounded_memory(s3_server, bucket, cache_dir, tmp_path):
    seed_objects(bucket, [("small/x", b"tiny")])
    rc, base = _peak_rss_mb(_fetch_cmd(s3_server.endpoint, f"s3://{bucket}/small/", tmp_path / "c0", "-w", "0"))
    assert rc == 0
    big = random.Random(5).randbytes(200 * 1024 * 1024)
    seed_objects(bucket, [("large/blob.bin", big)])
    rc, peak = _peak_rss_mb(_fetch_cmd(s3_server.endpoint, f"s3://{bucket}/large/", cache_dir, "-w", "0"))
    assert rc == 0
    m = load_manifest(next((cache_dir / "manifests").glob("*.jsonl")))
    assert m.size[0] == len(big) and hash_file(CacheLayout(root=cache_dir).blob_path(m.sha_hex(0))) == m.sha_hex(0)
    print(f"peak RSS: small fetch {base:.0f} MB, 200 MB object {peak:.0f} MB, growth {peak - base:.0f} MB")
    assert peak - base < 64, f"peak RSS grew by {peak - base:.0f} MB"
