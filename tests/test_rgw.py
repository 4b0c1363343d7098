"""End to end against Ceph's RADOS Gateway (RGW, Pacific 16.2), a production S3 server, over HTTP and TLS.

This file owns the RGW end-to-end tests; the cluster itself (install, start, stop, the CA, the request
counting from RGW's access log) is ``tests/rgw.py``, behind the session fixture ``rgw_server``.

tess runs as a user runs it: ``python -m pipeline fetch`` and ``python train_vae.py`` in child
processes, credentials in the environment. Objects are put with boto3. GETs are counted on the server
side (RGW's access lines), so "no GET" means no GET reached RGW.

What RGW accepts: every key below (RGW stores keys as RADOS object names, not as file paths, so ``//``,
``.`` and ``..`` segments, control characters and 1,024-byte keys are kept as given); it refuses a NUL
in a key (400), so that one is covered against moto (``tests/test_hostile_keys.py``). RGW enforces S3's
5 MiB minimum part size, and gives a multipart object the AWS ETag (MD5 of the parts' MD5s, ``-N``).
"""

from __future__ import annotations

import collections
import contextlib
import csv
import hashlib
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from cache import CacheLayout, load_manifest, read_key_list
from tests.conftest import png_bytes
from tests.helpers import ROOT, multipart_upload

pytestmark = pytest.mark.slow  # the session's cluster takes about 15 s to start

RANGED_SIZE = 20 << 20  # above tess's 16 MiB threshold: HEAD, then ranged GETs
ODD_KEYS = [
    "odd/a b.png",
    "odd/ leading and trailing spaces ",
    "odd/ünïcødé-😀.png",
    "odd/日本語/ファイル.png",
    "odd/a+b=c&d.png",
    "odd/plus+only",
    "odd/100%.png",
    "odd/%",
    "odd/%2F..%2Fodd-enc",
    "odd/%2e%2e/%2e%2e/dots",
    "odd/%41%20encoded",
    "odd/%00-nul-escaped",
    "odd/a//b",
    "odd/./dot",
    "odd/../up",
    "odd/q?x=1#frag",
    "odd/tab\tkey",
    "odd/a\nlf",
    "odd/a\rcr",
    "odd/a\x01soh\x1fus\x7fdel",
    "odd/a\x0bvt\x0cff\x85nel\u2028ls",
    "odd/back\\slash",
    "odd/trailing-backslash\\",
    "odd/~!$'()*,;:@[]^`{}|",
    'odd/quote"and<angle>&amp;',
    "odd/" + "k" * 1020,  # 1,024 bytes: the longest key S3 allows
    "odd/" + "é" * 510,  # 1,024 bytes of UTF-8
]
TLS_VARS = ("AWS_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
TRACEBACK = "Traceback (most recent call last)"


@pytest.fixture(scope="module")
def s3c(rgw_server):
    return rgw_server.client()


def _new_bucket(s3c) -> str:
    name = f"t-{uuid.uuid4().hex[:16]}"
    s3c.create_bucket(Bucket=name)
    return name


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def mixed(s3c):
    """A bucket with the odd keys, a 3-part multipart object and a 20 MiB object; returns (bucket, bodies)."""
    bucket = _new_bucket(s3c)
    bodies = {k: f"content of {k!r}".encode() for k in ODD_KEYS}
    for k, data in bodies.items():
        s3c.put_object(Bucket=bucket, Key=k, Body=data)
    parts = [os.urandom(5 << 20), os.urandom(5 << 20), os.urandom(1000)]  # RGW refuses parts below 5 MiB
    multipart_upload(s3c, bucket, "mp/multi_1.bin", parts)
    bodies["mp/multi_1.bin"] = b"".join(parts)
    bodies["big/ranged_2.bin"] = os.urandom(RANGED_SIZE)
    s3c.put_object(Bucket=bucket, Key="big/ranged_2.bin", Body=bodies["big/ranged_2.bin"])
    listed = []
    for page in s3c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        listed += [o["Key"] for o in page.get("Contents", [])]
    assert sorted(listed) == sorted(bodies)  # RGW itself stored every key as given
    return bucket, bodies


def _tess(
    *args: str,
    env: dict[str, str] | None = None,
    drop: tuple[str, ...] = (),
    timeout: float = 180,
    script: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python -m pipeline ARGS`` (or ``python SCRIPT ARGS``) in a child process, without the ``drop`` variables."""
    full = {k: v for k, v in os.environ.items() if k not in drop}
    full.update(env or {})
    cmd = [sys.executable, script, *args] if script else [sys.executable, "-m", "pipeline", *args]
    return subprocess.run(cmd, cwd=ROOT, env=full, capture_output=True, text=True, timeout=timeout)


def _fetch(
    rgw,
    uri: str,
    cache_dir: Path,
    *extra: str,
    endpoint: str | None = None,
    env: dict[str, str] | None = None,
    drop: tuple[str, ...] = (),
    timeout: float = 180,
) -> tuple[subprocess.CompletedProcess[str], Path | None]:
    """``tess fetch URI`` against RGW; returns the process and the manifest it names (None if none)."""
    proc = _tess(
        "fetch",
        uri,
        "--endpoint",
        endpoint or rgw.endpoint,
        "--cache-dir",
        str(cache_dir),
        "--no-progress",
        *extra,
        env={**rgw.env(), **(env or {})},
        drop=drop,
        timeout=timeout,
    )
    paths = [
        ln.split("manifest: ", 1)[1].strip() for ln in proc.stdout.splitlines() if ln.strip().startswith("manifest: ")
    ]
    assert len(paths) <= 1, proc.stdout
    return proc, Path(paths[0]) if paths else None


def _records(manifest: Path) -> dict[str, dict]:
    """Key -> record of a manifest as written (``tess-manifest/1``), after ``load_manifest`` checked it."""
    load_manifest(manifest)
    # split("\n"), not splitlines(): keys may hold NEL and U+2028, which JSON leaves unescaped.
    lines = manifest.read_text("utf-8").split("\n")[1:]
    return {r["key"]: r for r in map(json.loads, filter(None, lines))}


def _assert_blobs(cache_dir: Path, manifest: Path, bodies: dict[str, bytes]) -> None:
    """The manifest lists exactly ``bodies``' keys, pins each one's SHA-256, and each blob holds its bytes."""
    records = _records(manifest)
    assert sorted(records) == sorted(bodies)
    layout = CacheLayout(root=cache_dir)
    for key, data in bodies.items():
        rec = records[key]
        assert rec["sha256"] == _sha(data) and rec["size"] == len(data), key
        assert layout.blob_path(rec["sha256"]).read_bytes() == data, key


def _listening(pids) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket ``pids`` listen on, from /proc/net/tcp{,6} (IPv4 and IPv6)."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for cols in (row.split() for row in Path(table).read_text().splitlines()[1:]):
            if cols[3] == "0A" and cols[9] in inodes:  # 0A = LISTEN
                addr, port = cols[1].split(":")
                raw = bytes.fromhex(addr)  # each 32-bit word in host (little-endian) order
                ip = socket.inet_ntop(
                    socket.AF_INET if len(raw) == 4 else socket.AF_INET6,
                    b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)),
                )
                out.add((ip, int(port, 16)))
    return out


def test_fixture_counts_gets_and_listens_on_loopback_only(rgw_server, s3c):
    addresses = _listening(rgw_server.pids().values())
    assert addresses and {ip for ip, _ in addresses} == {"127.0.0.1"}, addresses
    assert set(rgw_server.pids()) == {"mon", "osd", "rgw"}
    bucket = _new_bucket(s3c)
    s3c.put_object(Bucket=bucket, Key="c/one", Body=b"1")
    s3c.put_object(Bucket=bucket, Key="d/two", Body=b"2")
    before = rgw_server.get_count(bucket)
    s3c.head_object(Bucket=bucket, Key="c/one")  # HEADs and listings are not GETs of an object
    s3c.list_objects_v2(Bucket=bucket)
    assert rgw_server.get_count(bucket) == before
    assert s3c.get_object(Bucket=bucket, Key="c/one")["Body"].read() == b"1"
    assert rgw_server.get_count(bucket) == before + 1
    assert rgw_server.get_count(bucket, "c/") == 1 and rgw_server.get_count(bucket, "d/") == 0
    assert rgw_server.get_keys(bucket)[-1] == "c/one"


def test_odd_keys_multipart_and_ranged_objects_arrive_exactly(rgw_server, s3c, mixed, tmp_path):
    bucket, bodies = mixed
    etag = s3c.head_object(Bucket=bucket, Key="mp/multi_1.bin")["ETag"]
    assert re.fullmatch(r'"[0-9a-f]{32}-3"', etag), etag  # RGW's multipart ETag is not an MD5 of the body
    cache_dir = tmp_path / "cache"
    seen = len(rgw_server.requests())
    proc, manifest = _fetch(rgw_server, f"s3://{bucket}/", cache_dir)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    served = [r for r in rgw_server.requests()[seen:] if r.bucket == bucket and r.key]
    _assert_blobs(cache_dir, manifest, bodies)
    records = _records(manifest)
    assert records["mp/multi_1.bin"]["etag"] == etag
    assert sorted(read_key_list(manifest.with_suffix(".keys"))) == sorted(bodies)
    assert load_manifest(manifest).header.extra["fetch"]["retries"] == 0
    # The 20 MiB object came in ranged GETs (a HEAD first); every other object in exactly one plain GET.
    ranged = [r for r in served if r.key == "big/ranged_2.bin"]
    assert any(r.method == "HEAD" for r in ranged), ranged
    ranged_gets = [r for r in ranged if r.method == "GET"]
    assert len(ranged_gets) >= 2 and all(r.range and r.range.startswith("bytes=") for r in ranged_gets), ranged_gets
    assert all(r.status == 206 for r in ranged_gets), ranged_gets
    spans = sorted(tuple(map(int, r.range.removeprefix("bytes=").split("-"))) for r in ranged_gets)
    assert spans[0][0] == 0 and spans[-1][1] == RANGED_SIZE - 1, spans  # the parts tile the object, no gap or overlap
    assert all(a[1] + 1 == b[0] for a, b in zip(spans, spans[1:])), spans
    small = collections.Counter(r.key for r in served if r.method == "GET" and r.key != "big/ranged_2.bin")
    assert small == {k: 1 for k in bodies if k != "big/ranged_2.bin"}


def test_refetch_sends_no_get(rgw_server, mixed, tmp_path):
    bucket, bodies = mixed
    cache_dir = tmp_path / "cache"
    before = rgw_server.get_count(bucket)
    proc, first = _fetch(rgw_server, f"s3://{bucket}/", cache_dir)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    between = rgw_server.get_count(bucket)
    assert between - before >= len(bodies)  # the first run did GET everything (the counter works)
    proc, again = _fetch(rgw_server, f"s3://{bucket}/", cache_dir)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert rgw_server.get_count(bucket) == between  # zero GETs reached RGW
    header = load_manifest(again).header
    assert header.extra["fetch"]["cached"] == len(bodies) and header.extra["fetch"]["fetched"] == 0
    assert header.records_sha256 == load_manifest(first).header.records_sha256
    _assert_blobs(cache_dir, again, bodies)


def test_changed_deleted_and_added_keys(rgw_server, s3c, tmp_path):
    bucket = _new_bucket(s3c)
    v1 = {f"chg/k{i}_{i}.bin": f"version 1 of k{i}".encode() for i in range(5)}
    for k, data in v1.items():
        s3c.put_object(Bucket=bucket, Key=k, Body=data)
    cache_dir = tmp_path / "cache"
    uri = f"s3://{bucket}/chg/"
    proc, manifest = _fetch(rgw_server, uri, cache_dir)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    old = _records(manifest)
    # k1 changes with the same size (only the ETag tells), k2 changes size, k0 is deleted, k5 is new.
    v2 = {k: v for k, v in v1.items() if k != "chg/k0_0.bin"}
    v2 |= {
        "chg/k1_1.bin": b"version 2 of k1",
        "chg/k2_2.bin": b"version 2 of k2, longer",
        "chg/k5_5.bin": b"new key k5",
    }
    assert len(v2["chg/k1_1.bin"]) == len(v1["chg/k1_1.bin"])
    for k in ("chg/k1_1.bin", "chg/k2_2.bin", "chg/k5_5.bin"):
        s3c.put_object(Bucket=bucket, Key=k, Body=v2[k])
    s3c.delete_object(Bucket=bucket, Key="chg/k0_0.bin")
    seen = rgw_server.get_count(bucket)
    proc, again = _fetch(rgw_server, uri, cache_dir)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert sorted(rgw_server.get_keys(bucket)[seen:]) == ["chg/k1_1.bin", "chg/k2_2.bin", "chg/k5_5.bin"]
    _assert_blobs(cache_dir, again, v2)  # changed bytes pinned, k0 dropped, k5 included
    new = _records(again)
    assert new["chg/k1_1.bin"]["sha256"] != old["chg/k1_1.bin"]["sha256"]
    assert new["chg/k3_3.bin"] == old["chg/k3_3.bin"] and new["chg/k4_4.bin"] == old["chg/k4_4.bin"]
    assert load_manifest(again).header.extra["fetch"]["fetched"] == 3


def test_policy_denied_key_is_reported_and_the_rest_fetched(rgw_server, s3c, tmp_path):
    import botocore.exceptions

    bucket = _new_bucket(s3c)
    allowed = {f"p/ok{i}_0.png": png_bytes(i) for i in range(4)}
    denied = "p/denied.png"
    for k, data in {**allowed, denied: png_bytes(99)}.items():
        s3c.put_object(Bucket=bucket, Key=k, Body=data)
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:GetObject",
                "Resource": f"arn:aws:s3:::{bucket}/{denied}",
            }
        ],
    }
    s3c.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))
    # The explicit Deny applies to the tess user too (the bucket's owner): RGW refuses it the GET.
    with pytest.raises(botocore.exceptions.ClientError) as e:
        s3c.get_object(Bucket=bucket, Key=denied)
    assert e.value.response["Error"]["Code"] == "AccessDenied"
    assert s3c.get_object(Bucket=bucket, Key="p/ok0_0.png")["Body"].read() == allowed["p/ok0_0.png"]
    cache_dir = tmp_path / "cache"
    proc, manifest = _fetch(rgw_server, f"s3://{bucket}/p/", cache_dir)
    assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr)
    assert TRACEBACK not in proc.stderr, proc.stderr
    naming = [ln for ln in proc.stderr.splitlines() if denied in ln]
    assert len(naming) == 1 and "access denied" in naming[0].lower(), proc.stderr
    assert manifest is not None, proc.stdout
    _assert_blobs(cache_dir, manifest, allowed)
    assert load_manifest(manifest).header.extra["incomplete"] == 1


@pytest.fixture(scope="module")
def tls_bucket(s3c):
    """A bucket with a few objects for the TLS tests; returns (bucket, bodies)."""
    bucket = _new_bucket(s3c)
    bodies = {f"tls/img-{i:02d}_{i % 2}.png": png_bytes(100 + i) for i in range(5)}
    for k, data in bodies.items():
        s3c.put_object(Bucket=bucket, Key=k, Body=data)
    return bucket, bodies


@pytest.mark.parametrize("how", ["AWS_CA_BUNDLE", "--ca-bundle"])
def test_tls_with_the_private_ca(rgw_server, tls_bucket, tmp_path, how):
    bucket, bodies = tls_bucket
    cache_dir = tmp_path / "cache"
    # No other trust setting leaks in: only the one under test names the CA.
    ca = str(rgw_server.ca_bundle)
    env, extra = ({"AWS_CA_BUNDLE": ca}, ()) if how == "AWS_CA_BUNDLE" else ({}, ("--ca-bundle", ca))
    proc, manifest = _fetch(
        rgw_server, f"s3://{bucket}/tls/", cache_dir, *extra, endpoint=rgw_server.https_endpoint, env=env, drop=TLS_VARS
    )
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    _assert_blobs(cache_dir, manifest, bodies)
    assert load_manifest(manifest).header.to_json()["endpoint"] == rgw_server.https_endpoint


def test_tls_without_the_ca_fails_fast_with_the_fix(rgw_server, tls_bucket, tmp_path):
    bucket, _ = tls_bucket
    cache_dir = tmp_path / "cache"
    t0 = time.monotonic()
    proc, manifest = _fetch(
        rgw_server, f"s3://{bucket}/tls/", cache_dir, endpoint=rgw_server.https_endpoint, drop=TLS_VARS, timeout=60
    )
    wall = time.monotonic() - t0
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert wall < 20, wall  # a certificate error is not retried like a network error
    assert TRACEBACK not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines, proc.stderr
    last = lines[-1]
    assert last.startswith("tess: error: ") and "certificate" in last.lower(), proc.stderr
    assert "AWS_CA_BUNDLE" in last and "--ca-bundle" in last, last
    assert manifest is None and "manifest:" not in proc.stdout
    assert not list(cache_dir.glob("manifests/*.jsonl"))


def test_tls_no_verify_ssl_fetches_and_warns(rgw_server, tls_bucket, tmp_path):
    bucket, bodies = tls_bucket
    cache_dir = tmp_path / "cache"
    proc, manifest = _fetch(
        rgw_server,
        f"s3://{bucket}/tls/",
        cache_dir,
        "--no-verify-ssl",
        endpoint=rgw_server.https_endpoint,
        drop=TLS_VARS,
    )
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert any("verif" in ln.lower() for ln in proc.stderr.splitlines()), proc.stderr
    assert TRACEBACK not in proc.stderr, proc.stderr
    _assert_blobs(cache_dir, manifest, bodies)


def test_train_one_epoch_from_a_prefix_fetched_from_rgw(rgw_server, s3c, tmp_path):
    bucket = _new_bucket(s3c)
    bodies = {f"train/img-{i:03d}_{i % 4}.png": png_bytes(i) for i in range(40)}
    for k, data in bodies.items():
        s3c.put_object(Bucket=bucket, Key=k, Body=data)
    cache_dir, out = tmp_path / "cache", tmp_path / "run"
    proc, manifest = _fetch(rgw_server, f"s3://{bucket}/train/", cache_dir)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    _assert_blobs(cache_dir, manifest, bodies)
    proc = _tess(
        "-e",
        "1",
        "-b",
        "16",
        "--device",
        "cpu",
        "--no-progress",
        "--cache-dir",
        str(cache_dir),
        "--manifest",
        str(manifest),
        "--out",
        str(out),
        script="train_vae.py",
        env=rgw_server.env(),
    )
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    for name in ("metrics.csv", "checkpoint.pt", "reconstructions.png", "samples.png", "loss.png", "summary.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_run"] == 1 and summary["images"] == len(bodies)
    assert summary["data_digest"] == load_manifest(manifest).header.records_sha256  # trained on this fetch
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == summary["iterations"] > 0
    assert all(math.isfinite(float(r["loss"])) for r in rows)
