"""Faults between the client and the store: a fetch through :class:`tests.faultproxy.FaultProxy`.

The proxy answers 500 and 503 SlowDown, resets connections, stalls past the read timeout and cuts
bodies short on a seeded schedule. The fetch must still complete with every blob equal to the server's
bytes and count every retry; permanent errors (403, 404) must not be retried; the mirror must back
off with full jitter and give up within its time budget.
"""

from __future__ import annotations

import hashlib
import random
import socket
import time

import pytest
import torch

from cache import CacheLayout, load_manifest
from cache.blobs import BlobStore, hash_file
from pipeline.config import ClientOptions
from pipeline.data.datasets import DSSDataset, decode_rgb
from pipeline.demo.server import seed_objects
from pipeline.fetch.mirror import FailureKind, GetFailure, Mirror, MirrorRecord, MirrorSettings, MirrorStatus, ObjectRef
from pipeline.fetch.mirror_loop import mirror_all
from pipeline.fetch.stage import EXIT_INCOMPLETE, FetchConfig, fetch
from pipeline.transport.client import WholeBody
from tests.conftest import png_bytes
from tests.faultproxy import SCHEDULED_KINDS, FaultProxy

# About 15.5% of targeted requests fail; stalls cost a read timeout each, so they are rarer.
RATES = {
    "500": 0.03,
    "503": 0.03,
    "reset": 0.03,
    "stall": 0.0075,
    "stall_body": 0.0075,
    "truncate": 0.03,
    "corrupt": 0.02,
}


def _options(proxy: FaultProxy, **kw) -> ClientOptions:
    kw.setdefault("max_attempts", 8)
    # A short read timeout so that stalls cost about a second each.
    return ClientOptions(endpoint=proxy.endpoint, connect_timeout=2, read_timeout=1, **kw)


def _objects(n: int, prefix: str, seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {f"{prefix}obj-{i:05d}_{i % 10}.bin": rng.randbytes(rng.randrange(1, 600)) for i in range(n)}


def test_fetch_of_2000_objects_survives_faults_and_counts_retries(s3_server, tmp_path):
    n = 2000
    bucket = "faults-2000"  # fixed name, so the seeded schedule is the same on every run
    expected = _objects(n, "f/", seed=2000)
    seed_objects(bucket, expected.items())
    cache_dir = tmp_path / "cache"
    t0 = time.monotonic()
    with FaultProxy(s3_server.endpoint, seed=7, rates=RATES) as proxy:
        result = fetch(
            FetchConfig(
                prefix=f"s3://{bucket}/f/",
                options=_options(proxy, max_in_flight=32),
                cache_dir=cache_dir,
                workers=2,
                batch=200,
                progress=False,
            )
        )
    wall = time.monotonic() - t0
    s = result.summary
    gets, get_faults = proxy.requests_of_kind("GET"), proxy.faults_on("GET")
    print(
        f"\n{proxy.requests} requests ({gets} GET, {proxy.requests_of_kind('LIST')} LIST), "
        f"{proxy.fault_total} faults {dict(proxy.faults)}, {s.retries} retries counted, {wall:.1f} s"
    )

    assert result.exit_code == 0, s.errors[:5]
    assert s.fetched == n and s.failed == 0 and s.missing == 0
    assert proxy.fault_total >= 0.10 * proxy.requests, (proxy.fault_total, proxy.requests)
    assert all(proxy.faults[k] > 0 for k in SCHEDULED_KINDS), proxy.faults
    # Every GET beyond one per object was a retry, and the summary counts each of them (those botocore
    # made inside one get_object call and those of the outer loop after cut or stalled bodies). A few
    # more may come from read timeouts of slow answers on a busy machine; they are retries too.
    assert get_faults <= gets - n <= s.retries, (get_faults, gets, s.retries)
    assert s.retries <= gets - n + n // 100, "retries counted that never reached the server"
    assert load_manifest(result.manifest).header.extra["fetch"]["retries"] == s.retries
    # Object by object, the requests the proxy saw are the attempts the record counts (a request sent
    # again on a fresh connection after a stale kept-alive one included).
    miscounted = [
        (r.key, proxy.requests_for(bucket, r.key), r.attempts)
        for r in result.records
        if proxy.requests_for(bucket, r.key) != r.attempts
    ]
    assert miscounted == [], miscounted[:5]

    m = load_manifest(result.manifest)
    layout = CacheLayout(root=cache_dir)
    assert sorted(m.keys) == sorted(expected)
    for i, key in enumerate(m.keys):
        sha = hashlib.sha256(expected[key]).hexdigest()
        assert m.sha_hex(i) == sha, key
        assert hash_file(layout.blob_path(sha)) == sha, key
    # Every cut or stalled body was thrown away, not left behind as a temp file.
    assert list(layout.tmp.iterdir()) == []


def test_streaming_dataset_survives_faults(s3_server):
    bucket = "faults-stream"
    images = {f"s/img-{i:03d}_{i % 3}.png": png_bytes(i, size=8) for i in range(40)}
    seed_objects(bucket, images.items())
    rates = {"500": 0.1, "503": 0.05, "reset": 0.1, "stall_body": 0.025, "truncate": 0.1, "corrupt": 0.1}
    with FaultProxy(s3_server.endpoint, seed=3, rates=rates) as proxy:
        ds = DSSDataset(f"s3://{bucket}/s/", options=_options(proxy), image_size=None)
        items = ds.__getitems__(list(range(len(ds))))
    assert proxy.faults["corrupt"] > 0 and proxy.faults["truncate"] > 0, proxy.faults
    for key, (x, label) in zip(ds.listing.keys, items):
        assert torch.equal((x * 255).round().to(torch.uint8), decode_rgb(images[key])), key
        assert label == int(key[-5])


@pytest.mark.parametrize("kind", ["403", "404"])
def test_permanent_errors_are_not_retried(s3_server, tmp_path, kind):
    bucket = f"faults-permanent-{kind}"
    objects = _objects(24, "p/", seed=int(kind))
    seed_objects(bucket, objects.items())
    victim = sorted(objects)[10]
    cache_dir = tmp_path / "cache"
    # Transient faults elsewhere, to show that only the permanent one goes unretried.
    with FaultProxy(
        s3_server.endpoint,
        seed=11,
        rates={"500": 0.1, "503": 0.1, "truncate": 0.1},
        always={f"/{bucket}/{victim}": kind},
    ) as proxy:
        config = FetchConfig(
            prefix=f"s3://{bucket}/p/", options=_options(proxy), cache_dir=cache_dir, workers=2, batch=4, progress=False
        )
        result = fetch(config)
        # A denial of one object (a bucket policy) fails that object, not the fetch.
        assert result.exit_code == EXIT_INCOMPLETE
        assert result.summary.fetched == len(objects) - 1
        assert (result.summary.missing, result.summary.failed) == ((1, 0) if kind == "404" else (0, 1))
        assert len(result.summary.errors) == 1 and victim in result.summary.errors[0]
        assert (
            "deleted since the listing" if kind == "404" else "access denied (AccessDenied)"
        ) in result.summary.errors[0]
        assert victim not in list(load_manifest(result.manifest).keys)
        assert proxy.requests_for(bucket, victim) == 1
        assert proxy.faults[kind] == 1


def test_a_stall_ends_when_the_proxy_stops(s3_server):
    seed_objects("faults-stall", [("k", b"x")])
    proxy = FaultProxy(s3_server.endpoint, rates={"stall": 1.0}).start()
    host, port = proxy.endpoint.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        conn.sendall(b"GET /faults-stall/k HTTP/1.1\r\nHost: x\r\n\r\n")
        deadline = time.monotonic() + 10
        while proxy.faults["stall"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)  # polling for the proxy to take the request, not standing in for it
        assert proxy.faults["stall"] == 1
        t0 = time.monotonic()
        proxy.stop()
        stop_s = time.monotonic() - t0
        try:
            answer = conn.recv(1024)
        except ConnectionResetError:
            answer = b""
    assert stop_s < 2, stop_s  # MAX_STALL_S is 60: the stop ended the stall
    assert answer == b"", answer  # and the client got no response at all


# -- the mirror's retries ------------------------------------------------------------------------------


class _Failing:
    """A getter whose GETs fail as told (TRANSIENT by default), noting when each came."""

    bucket = "b"

    def __init__(self, outcomes: list[object] | None = None, kind: FailureKind = FailureKind.TRANSIENT) -> None:
        self.calls: list[float] = []
        self.outcomes = outcomes
        self.kind = kind

    async def get(self, key, **kw):
        self.calls.append(time.monotonic())
        if self.outcomes:
            out = self.outcomes.pop(0)
            if out == "ok":
                return WholeBody(3, "", b"abc")
        raise GetFailure(self.kind, f"attempt {len(self.calls)}")

    async def head(self, key):
        raise AssertionError("no HEAD for a small object")


def _mirror_one(getter: _Failing, tmp_path, **settings) -> MirrorRecord:
    mirror = Mirror(BlobStore(CacheLayout(root=tmp_path / "c")), getter, MirrorSettings(**settings))
    return mirror_all([mirror], [ObjectRef(index=0, key="k", size=3)])[0]


def test_retries_back_off_with_full_jitter(tmp_path):
    base, cap, attempts = 0.01, 0.08, 6
    state = random.getstate()
    try:
        random.seed(1234)
        getter = _Failing()
        rec = _mirror_one(getter, tmp_path, max_attempts=attempts, backoff_base_s=base, backoff_cap_s=cap, budget_s=30)
    finally:
        random.setstate(state)
    assert rec.status is MirrorStatus.FAILED and rec.error == "attempt 6" and rec.attempts == attempts
    # The same draws the mirror made: uniform(0, min(cap, base * 2**attempt)) before each retry.
    replay = random.Random(1234)
    drawn = [replay.uniform(0, min(cap, base * 2**a)) for a in range(1, attempts)]
    gaps = [b - a for a, b in zip(getter.calls, getter.calls[1:])]
    assert len(getter.calls) == attempts
    assert all(g >= d - 0.002 for g, d in zip(gaps, drawn)), (gaps, drawn)  # slept at least the draw
    assert all(g <= d + 0.5 for g, d in zip(gaps, drawn)), (gaps, drawn)
    assert len({round(d, 6) for d in drawn}) == len(drawn)  # jittered, not a fixed ladder
    assert max(drawn) <= cap


def test_retries_give_up_within_the_budget(tmp_path):
    getter = _Failing()
    t0 = time.monotonic()
    rec = _mirror_one(getter, tmp_path, max_attempts=1000, backoff_base_s=0.05, backoff_cap_s=0.2, budget_s=0.6)
    elapsed = time.monotonic() - t0
    assert rec.status is MirrorStatus.FAILED
    assert elapsed <= 0.6 + 0.25, elapsed
    assert 2 <= len(getter.calls) < 1000


@pytest.mark.parametrize("kind", [FailureKind.PERMANENT, FailureKind.DENIED, FailureKind.MISSING, FailureKind.CHANGED])
def test_permanent_failures_are_not_retried(tmp_path, kind):
    getter = _Failing(kind=kind)
    rec = _mirror_one(getter, tmp_path, max_attempts=8, budget_s=30)
    assert len(getter.calls) == 1 and rec.attempts == 1 and not rec.ok


def test_an_object_is_fetched_after_transient_failures(tmp_path):
    getter = _Failing(outcomes=["fail", "fail", "ok"])
    rec = _mirror_one(getter, tmp_path, max_attempts=3, backoff_base_s=0.001)
    assert rec.status is MirrorStatus.FETCHED and rec.attempts == 3 and rec.retries == 2
