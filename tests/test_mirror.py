"""The mirror with a fake getter (no server): records, checks, retries, ranged GETs, durability policy.

Plus the few end-to-end facts that belong to the fetch stage around it: ``-w 0`` never imports torch,
a failed fetch leaves no cache skeleton, the bar and the summary agree on units, and one object is not
reported at "0 objects/s".
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import random
import zlib
from dataclasses import dataclass

import pytest

from cache import CacheLayout
from cache.blobs import BlobStore, BlobWriter, hash_file
from cache.checks import Checksum, ChecksumAlgorithm, Expected
from pipeline.fetch.mirror import (
    FailureKind,
    GetFailure,
    Mirror,
    MirrorRecord,
    MirrorSettings,
    MirrorStatus,
    ObjectRef,
    SyncPolicy,
)
from pipeline.fetch.mirror_loop import mirror_all
from tests.helpers import run_cli

BUCKET = "fake"


def _md5_etag(data: bytes) -> str:
    return f'"{hashlib.md5(data).hexdigest()}"'


@dataclass
class _Body:
    size: int
    etag: str
    parts: list[bytes]
    data: bytes | None = None
    reconnects: int = 0
    closed: bool = False

    async def chunks(self):
        for p in self.parts:
            yield p

    def close(self):
        self.closed = True


class FakeGetter:
    """Objects in a dict; ``faults[key]`` is a list of what the next GETs do (popped one per GET)."""

    bucket = BUCKET

    def __init__(self, objects: dict[str, bytes], *, checksums: dict[str, Checksum] | None = None) -> None:
        self.objects = objects
        self.checksums = checksums or {}
        self.faults: dict[str, list[str]] = {}
        self.gets: list[tuple[str, tuple[int, int] | None]] = []
        self.heads = 0
        self.whole = False
        self.new_etag = '"0000000000000000000000000000beef"'  # what "other-etag" answers
        self.head_etag: str | None = None  # what HEAD answers (default: the object's MD5)

    async def get(self, key, *, byte_range=None, if_match=None, size=None):
        self.gets.append((key, byte_range))
        fault = self.faults.get(key, []).pop(0) if self.faults.get(key) else None
        if fault == "503":
            raise GetFailure(FailureKind.TRANSIENT, f"s3://{BUCKET}/{key}: SlowDown (503)")
        if fault == "404" or key not in self.objects:
            raise GetFailure(FailureKind.MISSING, f"s3://{BUCKET}/{key}: 404")
        if fault == "403":
            raise GetFailure(FailureKind.FATAL, f"s3://{BUCKET}/{key}: access denied (AccessDenied)")
        if fault == "stall":  # as the transport reports a stall past --read-timeout
            raise GetFailure(FailureKind.TRANSIENT, f"s3://{BUCKET}/{key}: no byte for 10 s (--read-timeout)")
        data = self.objects[key]
        start, end = byte_range or (0, len(data))
        body = data[start:end]
        size = len(body)
        if fault == "truncate":
            body = body[: size // 2]
        if fault in ("corrupt", "corrupt-noetag"):
            body = bytes([body[0] ^ 1]) + body[1:]
        etag = _md5_etag(data)
        if fault in ("corrupt-noetag", "truncate-noetag"):
            etag = ""  # an answer that says nothing to check against: only the listing can catch it
        if fault == "truncate-noetag":
            body, size = body[: len(body) // 2], len(body) // 2
        if fault == "other-etag":
            etag = self.new_etag
        # Sent in 3 pieces, as a network would.
        if self.whole:  # as the transport hands small bodies over
            return _Body(size, etag, [], data=body)
        cut = [0, len(body) // 3, 2 * len(body) // 3, len(body)]
        return _Body(size, etag, [body[a:b] for a, b in zip(cut, cut[1:])])

    async def head(self, key):
        self.heads += 1
        data = self.objects[key]
        return Expected(size=len(data), etag=self.head_etag or _md5_etag(data), checksum=self.checksums.get(key))


def _settings(**kw) -> MirrorSettings:
    kw.setdefault("backoff_base_s", 0.001)
    kw.setdefault("backoff_cap_s", 0.002)
    return MirrorSettings(**kw)


def _ref(i: int, key: str, data: bytes) -> ObjectRef:
    return ObjectRef(index=i, key=key, size=len(data), etag=_md5_etag(data), label=i % 3)


def _run(mirror: Mirror, objects: dict[str, bytes]) -> list[MirrorRecord]:
    return mirror_all([mirror], [_ref(i, k, v) for i, (k, v) in enumerate(objects.items())])


@pytest.fixture
def store(tmp_path) -> BlobStore:
    return BlobStore(CacheLayout(root=tmp_path / "cache"))


def _no_temp_files(store: BlobStore) -> bool:
    return list(store.layout.tmp.iterdir()) == []


def test_fetched_records_are_typed_and_blobs_hold_the_bytes(store):
    objects = {f"k{i}": random.Random(i).randbytes(100 + i) for i in range(50)}
    recs = _run(Mirror(store, FakeGetter(objects), _settings(concurrency=7)), objects)
    assert [r.key for r in recs] == list(objects)
    for r, (_key, data) in zip(recs, objects.items()):
        assert r.status is MirrorStatus.FETCHED and r.attempts == 1 and r.retries == 0
        assert r.sha256 == hashlib.sha256(data).hexdigest() and r.size == len(data) and r.new
        assert store.path(r.sha256).read_bytes() == data
    assert _no_temp_files(store)


@pytest.mark.parametrize("whole", [False, True], ids=["streamed", "in-memory"])
@pytest.mark.parametrize("fault", ["503", "truncate", "corrupt", "stall"])
def test_transient_faults_are_retried_and_counted(store, fault, whole):
    data = b"x" * 1000
    getter = FakeGetter({"a": data})
    getter.whole = whole
    getter.faults["a"] = [fault, fault]
    (rec,) = _run(Mirror(store, getter, _settings()), {"a": data})
    assert rec.status is MirrorStatus.FETCHED, rec.error
    assert rec.attempts == 3 == len(getter.gets) and rec.retries == 2
    assert store.verify(rec.sha256) and _no_temp_files(store)


@pytest.mark.parametrize("whole", [False, True], ids=["streamed", "in-memory"])
@pytest.mark.parametrize("fault", ["corrupt-noetag", "truncate-noetag"])
def test_a_body_is_checked_against_the_listing_not_its_own_answer(store, fault, whole):
    """One changed byte, or half a body announced as all of it, with no ETag on the GET: the listed size
    and MD5 catch both; nothing is stored."""
    data = random.Random(5).randbytes(3000)
    getter = FakeGetter({"a": data})
    getter.whole = whole
    getter.faults["a"] = [fault] * 4
    (rec,) = _run(Mirror(store, getter, _settings()), {"a": data})
    assert rec.status is MirrorStatus.FAILED and len(getter.gets) == 4
    assert ("MD5" if fault == "corrupt-noetag" else "expected 3000 (the listed size)") in rec.error, rec.error
    assert not [p for p in store.layout.objects.rglob("*") if p.is_file()] and _no_temp_files(store)


def test_an_answer_with_another_etag_than_head_and_the_listing_is_retried(store):
    data = b"v1" * 100
    getter = FakeGetter({"a": data})
    getter.faults["a"] = ["other-etag"]  # one odd answer; HEAD still gives the listed ETag
    (rec,) = _run(Mirror(store, getter, _settings()), {"a": data})
    assert rec.status is MirrorStatus.FETCHED and rec.attempts == 2 and getter.heads == 1
    assert store.path(rec.sha256).read_bytes() == data


class VersionedGetter:
    """One key whose object is replaced by its next version after ``switch_every`` GETs (a server under
    writes); GETs honour ``If-Match`` with a 412, HEAD answers the current version."""

    bucket = BUCKET

    def __init__(self, versions: list[bytes], switch_every: int) -> None:
        self.versions = versions
        self.switch_every = switch_every
        self.current = 0
        self.gets = 0
        self.heads = 0

    def _etag(self) -> str:
        return _md5_etag(self.versions[self.current])

    async def get(self, key, *, byte_range=None, if_match=None, size=None):
        self.gets += 1
        if self.gets % self.switch_every == 0 and self.current + 1 < len(self.versions):
            self.current += 1  # replaced while it was being fetched
        if if_match and if_match != self._etag():
            raise GetFailure(FailureKind.CHANGED, f"s3://{BUCKET}/{key}: changed while it was being fetched (412)")
        data = self.versions[self.current]
        start, end = byte_range or (0, len(data))
        return _Body(end - start, self._etag(), [], data=data[start:end])

    async def head(self, key):
        self.heads += 1
        return Expected(
            size=len(self.versions[self.current]), etag=self._etag(), last_modified="2026-12-03T10:00:00+00:00"
        )


@pytest.mark.parametrize("size", [3000, 5 << 20], ids=["small", "ranged"])
def test_an_object_replaced_during_its_fetch_is_fetched_at_its_new_version(store, size):
    v1, v2 = random.Random(1).randbytes(size), random.Random(2).randbytes(size + 7)
    getter = VersionedGetter([v1, v2], switch_every=1)  # replaced as the first GET (or first part) comes
    settings = _settings(large_threshold=1 << 20, part_size=1 << 20, parts_in_flight=1)
    (rec,) = mirror_all([Mirror(store, getter, settings)], [_ref(0, "obj", v1)])
    assert rec.status is MirrorStatus.FETCHED, rec.error
    assert store.path(rec.sha256).read_bytes() == v2
    # The record pins the version whose bytes were stored, not the listed one.
    assert (rec.etag, rec.size, rec.last_modified) == (_md5_etag(v2), len(v2), "2026-12-03T10:00:00+00:00")
    assert getter.heads >= 1 and _no_temp_files(store)


def test_an_object_that_keeps_changing_fails_as_changing_faster_than_it_can_be_fetched(store):
    versions = [random.Random(i).randbytes(3 << 20) for i in range(10)]
    getter = VersionedGetter(versions, switch_every=2)  # every other GET meets a new version
    settings = _settings(large_threshold=1 << 20, part_size=1 << 20, parts_in_flight=1, max_versions=3)
    (rec,) = mirror_all([Mirror(store, getter, settings)], [_ref(0, "obj", versions[0])])
    assert rec.status is MirrorStatus.CHANGED
    assert "changing faster than it can be fetched (3 new versions" in rec.error
    assert not [p for p in store.layout.objects.rglob("*") if p.is_file()] and _no_temp_files(store)


def test_a_body_that_stays_corrupt_fails_with_its_md5_and_leaves_nothing(store):
    data = b"y" * 500
    getter = FakeGetter({"a": data})
    getter.faults["a"] = ["corrupt"] * 10
    (rec,) = _run(Mirror(store, getter, _settings(max_attempts=3)), {"a": data})
    assert rec.status is MirrorStatus.FAILED and rec.attempts == 3
    assert "MD5" in rec.error and "does not match ETag" in rec.error
    assert _no_temp_files(store) and not any(store.layout.objects.rglob("*/*/*"))


@pytest.mark.parametrize(("fault", "status"), [("404", MirrorStatus.MISSING), ("403", MirrorStatus.FATAL)])
def test_permanent_answers_are_never_retried(store, fault, status):
    getter = FakeGetter({"a": b"1"})
    getter.faults["a"] = [fault]
    (rec,) = _run(Mirror(store, getter, _settings()), {"a": b"1"})
    assert rec.status is status and len(getter.gets) == 1 and rec.attempts == 1


def test_a_fatal_record_stops_launching_more_objects(store):
    objects = {f"k{i:03d}": b"z%d" % i for i in range(200)}
    getter = FakeGetter(objects)
    getter.faults["k000"] = ["403"]
    recs = _run(Mirror(store, getter, _settings(concurrency=4)), objects)
    assert recs[0].status is MirrorStatus.FATAL
    assert len(getter.gets) < 20, len(getter.gets)


def test_large_objects_use_ranged_gets_and_check_the_additional_checksum(store):
    data = random.Random(1).randbytes(5 * (1 << 20) + 123)
    crc = base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
    getter = FakeGetter({"big": data}, checksums={"big": Checksum(ChecksumAlgorithm.CRC32, crc)})
    settings = _settings(large_threshold=2 << 20, part_size=1 << 20, parts_in_flight=3)
    (rec,) = _run(Mirror(store, getter, settings), {"big": data})
    assert rec.status is MirrorStatus.FETCHED, rec.error
    assert hash_file(store.path(rec.sha256)) == hashlib.sha256(data).hexdigest()
    assert getter.heads == 1
    ranges = sorted(r for _, r in getter.gets)
    assert ranges == [(s, min(s + (1 << 20), len(data))) for s in range(0, len(data), 1 << 20)]


def test_a_large_object_whose_checksum_differs_fails(store):
    data = random.Random(2).randbytes(3 << 20)
    wrong = base64.b64encode(b"\0\0\0\0").decode()
    getter = FakeGetter({"big": data}, checksums={"big": Checksum(ChecksumAlgorithm.CRC32, wrong)})
    settings = _settings(large_threshold=2 << 20, part_size=1 << 20, max_attempts=2)
    (rec,) = _run(Mirror(store, getter, settings), {"big": data})
    assert rec.status is MirrorStatus.FAILED and "CRC32" in rec.error
    assert _no_temp_files(store)


def test_a_cut_range_is_retried_alone(store):
    data = random.Random(3).randbytes(4 << 20)
    getter = FakeGetter({"big": data})
    getter.faults["big"] = ["truncate"]  # the first ranged GET is cut short
    settings = _settings(large_threshold=2 << 20, part_size=1 << 20, parts_in_flight=1)
    (rec,) = _run(Mirror(store, getter, settings), {"big": data})
    assert rec.status is MirrorStatus.FETCHED and rec.retries == 1
    assert len(getter.gets) == 4 + 1 and store.verify(rec.sha256)


def test_parts_in_memory_stay_within_the_slots_and_every_object_completes(store, monkeypatch):
    """Parts hold a slot from launch until written: memory is bounded over all large objects, and objects
    that each hold slots never wait on one another (a deadlock would trip the wait_for)."""
    objects = {f"big{i}": random.Random(i).randbytes((3 << 20) + i) for i in range(5)}
    getter = FakeGetter(objects)
    held, peak = [0], [0]
    real_get, real_append = getter.get, BlobWriter.append

    async def counting_get(key, **kw):
        body = await real_get(key, **kw)
        held[0] += 1
        peak[0] = max(peak[0], held[0])
        return body

    def counting_append(self, chunks):
        held[0] -= 1
        real_append(self, chunks)

    getter.get = counting_get
    monkeypatch.setattr(BlobWriter, "append", counting_append)
    settings = _settings(large_threshold=2 << 20, part_size=1 << 20, parts_in_flight=3, ranges_in_flight=4)
    mirror = Mirror(store, getter, settings)
    recs: list[MirrorRecord] = []
    refs = [_ref(i, k, v) for i, (k, v) in enumerate(objects.items())]
    asyncio.run(asyncio.wait_for(mirror.many(refs, recs.append), timeout=60))
    assert sorted(r.status.value for r in recs) == ["fetched"] * 5, [r.error for r in recs]
    assert all(store.verify(r.sha256) for r in recs)
    assert 1 <= peak[0] <= 4, peak[0]
    assert held[0] == 0


@pytest.mark.parametrize(("policy", "where"), [(SyncPolicy.BEFORE_MANIFEST, "loop"), (SyncPolicy.PER_BLOB, "disk")])
def test_small_puts_run_on_the_loop_unless_each_is_fsynced(store, monkeypatch, policy, where):
    import threading

    threads: list[str] = []
    real = BlobStore.put_body
    monkeypatch.setattr(
        BlobStore,
        "put_body",
        lambda self, *a, **kw: (threads.append(threading.current_thread().name), real(self, *a, **kw))[1],
    )
    getter = FakeGetter({f"k{i}": b"x%d" % i for i in range(4)})
    getter.whole = True  # as the transport hands small bodies over: in memory
    recs = _run(Mirror(store, getter, _settings(sync=policy)), getter.objects)
    assert all(r.status is MirrorStatus.FETCHED for r in recs)
    on_disk_threads = [t.startswith("tess-disk") for t in threads]
    assert (
        len(threads) == 4 and all(on_disk_threads) == (where == "disk") and any(on_disk_threads) == (where == "disk")
    ), threads


@pytest.mark.parametrize(("policy", "fsyncs"), [(SyncPolicy.PER_BLOB, 5), (SyncPolicy.BEFORE_MANIFEST, 0)])
def test_sync_policy_decides_per_blob_fsync(store, monkeypatch, policy, fsyncs):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    objects = {f"k{i}": b"d%d" % i for i in range(5)}
    recs = _run(Mirror(store, FakeGetter(objects), _settings(sync=policy)), objects)
    assert all(r.status is MirrorStatus.FETCHED for r in recs)
    assert len(calls) == fsyncs


# -- the fetch stage around the mirror (end to end) ----------------------------------------------------


NO_TORCH = (
    "import sys; from pipeline.cli import main; rc = main(sys.argv[1:]); "
    "print('TORCH_LOADED' if 'torch' in sys.modules else 'NO_TORCH'); sys.exit(rc)"
)


def test_fetch_with_no_workers_never_imports_torch(s3_server, put, bucket, cache_dir):
    from tests.conftest import png_bytes

    for i in range(5):
        put(f"nt/k{i}_0.png", png_bytes(i))
    proc = run_cli(
        "-c",
        NO_TORCH,
        "fetch",
        f"s3://{bucket}/nt/",
        "--endpoint",
        s3_server.endpoint,
        "--cache-dir",
        str(cache_dir),
        "--no-progress",
        module="",
    )
    assert proc.returncode == 0, proc.stderr
    assert "fetched 5" in proc.stdout and "NO_TORCH" in proc.stdout, proc.stdout


def test_a_failed_fetch_leaves_no_cache_skeleton(s3_server, put, bucket, tmp_path):
    from tests.conftest import png_bytes

    put("p/a_1.png", png_bytes(1))
    for prefix in ("s3://no-such-bucket-q/p/", f"s3://{bucket}/empty/"):
        cache_dir = tmp_path / "never"
        proc = run_cli(
            "fetch", prefix, "--endpoint", s3_server.endpoint, "--cache-dir", str(cache_dir), "--no-progress"
        )
        assert proc.returncode == 2, proc.stderr
        assert not cache_dir.exists(), sorted(str(p) for p in cache_dir.rglob("*"))


def test_bar_and_summary_use_the_same_megabytes(s3_server, put, bucket, cache_dir):
    # 3 x 700,000 bytes = 2.1 MB = 2.0 MiB: a bar in MiB would read 2.00M, the summary 2.1 MB.
    for i in range(3):
        put(f"mb/k{i}_0.bin", random.Random(i).randbytes(700_000))
    proc = run_cli("fetch", f"s3://{bucket}/mb/", "--endpoint", s3_server.endpoint, "--cache-dir", str(cache_dir))
    assert proc.returncode == 0, proc.stderr
    assert "2.1 MB fetched" in proc.stdout, proc.stdout
    assert "2.10M/2.10M" in proc.stderr, proc.stderr[-500:]


def test_one_object_is_not_reported_at_zero_objects_per_second(s3_server, put, bucket, cache_dir):
    put("one/k_0.png", b"only one")
    proc = run_cli(
        "fetch", f"s3://{bucket}/one/", "--endpoint", s3_server.endpoint, "--cache-dir", str(cache_dir), "--no-progress"
    )
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if " objects/s" in x)
    rate = float(line.split(" objects/s")[0].rsplit(" ", 1)[1])
    assert rate > 0, line


def test_summary_rate_is_over_the_mirroring_time_with_decimals_for_small_counts():
    from pipeline.fetch.stage import FetchSummary

    # One object fetched in 0.4 s after 3.6 s of listing and start-up: 2.5 objects/s, not "0 objects/s".
    line = FetchSummary(fetched=1, bytes_fetched=10, wall_s=4.0, mirror_s=0.4).line()
    assert " 2.5 objects/s" in line and " 0 objects/s" not in line, line
    assert " 1000 objects/s" in FetchSummary(fetched=500, wall_s=4.0, mirror_s=0.5).line()


# -- the transport against real servers ---------------------------------------------------------------


def test_the_transport_survives_faults_in_process(s3_server, tmp_path):
    from cache import load_manifest
    from pipeline.config import ClientOptions
    from pipeline.demo.server import seed_objects
    from pipeline.fetch.stage import FetchConfig, fetch
    from tests.faultproxy import FaultProxy

    bucket = "transport-faults"
    rng = random.Random(42)
    objects = {f"e/obj-{i:04d}_{i % 3}.bin": rng.randbytes(rng.randrange(1, 3000)) for i in range(300)}
    seed_objects(bucket, objects.items())
    rates = {"500": 0.04, "503": 0.04, "reset": 0.04, "truncate": 0.04, "corrupt": 0.04}
    with FaultProxy(s3_server.endpoint, seed=5, rates=rates) as proxy:
        options = ClientOptions(endpoint=proxy.endpoint, max_attempts=8, connect_timeout=2, read_timeout=2)
        result = fetch(
            FetchConfig(prefix=f"s3://{bucket}/e/", options=options, cache_dir=tmp_path / "c", progress=False)
        )
    s = result.summary
    assert result.exit_code == 0 and s.fetched == len(objects), s.errors[:3]
    assert proxy.faults_on("GET") > 0
    assert proxy.faults_on("GET") <= proxy.requests_of_kind("GET") - len(objects) <= s.retries
    m = load_manifest(result.manifest)
    for i, key in enumerate(m.keys):
        assert m.sha_hex(i) == hashlib.sha256(objects[key]).hexdigest(), key


def test_fetch_from_s3rver_with_a_large_object_in_ranges(s3rver_env, tmp_path):
    import boto3

    from cache import load_manifest
    from pipeline.config import ClientOptions
    from pipeline.fetch.stage import FetchConfig, fetch

    # A session of its own: boto3's default session may hold the moto credentials of earlier tests.
    s3 = boto3.session.Session().client("s3", endpoint_url=s3rver_env, region_name="us-east-1")
    s3.create_bucket(Bucket="mirror-e2e")
    objects = {f"d/img-{i:03d}_{i % 2}.png": random.Random(i).randbytes(2500) for i in range(40)}
    objects["d/big_1.bin"] = random.Random(99).randbytes(20 * 1024 * 1024 + 17)  # above the 16 MB threshold
    for key, data in objects.items():
        s3.put_object(Bucket="mirror-e2e", Key=key, Body=data)
    result = fetch(
        FetchConfig(
            prefix="s3://mirror-e2e/d/",
            options=ClientOptions(endpoint=s3rver_env),
            cache_dir=tmp_path / "c",
            progress=False,
        )
    )
    assert result.exit_code == 0 and result.summary.fetched == len(objects)
    m = load_manifest(result.manifest)
    layout = CacheLayout(root=tmp_path / "c")
    for i, key in enumerate(m.keys):
        assert m.sha_hex(i) == hashlib.sha256(objects[key]).hexdigest(), key
        assert hash_file(layout.blob_path(m.sha_hex(i))) == m.sha_hex(i)


@pytest.mark.parametrize("algorithm", ["SHA256", "CRC32", "CRC32C", "CRC64NVME"])
def test_a_servers_additional_checksum_is_verified_end_to_end(
    s3_server, s3_client, bucket, tmp_path, monkeypatch, algorithm
):
    """moto stores the checksum of a PUT with ChecksumAlgorithm and answers it on HEAD (ChecksumMode):
    the ranged fetch checks the body against it, and fails when the announced value is not the body's."""
    import dataclasses

    from pipeline.config import ClientOptions
    from pipeline.fetch.stage import FetchConfig, fetch
    from pipeline.transport.client import S3Client

    data = random.Random(7).randbytes((16 << 20) + 5)  # at the 16 MB threshold: ranged GETs after a HEAD
    s3_client.put_object(Bucket=bucket, Key="ck/big_0.bin", Body=data, ChecksumAlgorithm=algorithm)
    heads: list[Expected] = []
    real_head = S3Client.head

    async def recording_head(*a, **kw):
        heads.append(await real_head(*a, **kw))
        return heads[-1]

    monkeypatch.setattr(S3Client, "head", recording_head)
    options = ClientOptions(endpoint=s3_server.endpoint, max_attempts=2)
    ok = fetch(FetchConfig(prefix=f"s3://{bucket}/ck/", options=options, cache_dir=tmp_path / "ok", progress=False))
    assert ok.exit_code == 0 and ok.summary.fetched == 1, ok.summary.errors
    assert heads and heads[0].checksum is not None and heads[0].checksum.algorithm.value == algorithm

    wrong = base64.b64encode(b"\0" * len(base64.b64decode(heads[0].checksum.value_b64))).decode()

    async def wrong_head(*a, **kw):
        return dataclasses.replace(await real_head(*a, **kw), checksum=Checksum(ChecksumAlgorithm(algorithm), wrong))

    monkeypatch.setattr(S3Client, "head", wrong_head)
    bad = fetch(FetchConfig(prefix=f"s3://{bucket}/ck/", options=options, cache_dir=tmp_path / "bad", progress=False))
    assert bad.summary.failed == 1 and f"{algorithm} " in bad.summary.errors[0], bad.summary.errors
    assert "does not match the server's checksum" in bad.summary.errors[0]


def test_a_large_object_replaced_during_its_ranged_fetch_restarts_on_its_new_version(
    s3_server, s3_client, bucket, tmp_path, monkeypatch
):
    """moto answers 412 to the parts' If-Match once the object is replaced: tess HEADs again, fetches the new
    version whole, and the manifest pins it (ETag, size, SHA-256)."""
    from cache import load_manifest
    from pipeline.config import ClientOptions
    from pipeline.fetch.stage import FetchConfig, fetch
    from pipeline.transport.client import S3Client

    v1, v2 = random.Random(1).randbytes((20 << 20) + 5), random.Random(2).randbytes((18 << 20) + 99)
    s3_client.put_object(Bucket=bucket, Key="chg/big_0.bin", Body=v1)
    real_get = S3Client.get
    replaced: list[int] = []

    async def replacing_get(self, b, key, **kw):
        if kw.get("byte_range") and not replaced:  # the first part: replace the object under it
            replaced.append(1)
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: s3_client.put_object(Bucket=b, Key=key, Body=v2)
            )
        return await real_get(self, b, key, **kw)

    monkeypatch.setattr(S3Client, "get", replacing_get)
    result = fetch(
        FetchConfig(
            prefix=f"s3://{bucket}/chg/",
            options=ClientOptions(endpoint=s3_server.endpoint),
            cache_dir=tmp_path / "c",
            progress=False,
        )
    )
    assert replaced and result.exit_code == 0, result.summary.errors
    m = load_manifest(result.manifest)
    assert (m.sha_hex(0), int(m.size[0]), m.etags[0]) == (hashlib.sha256(v2).hexdigest(), len(v2), _md5_etag(v2))
