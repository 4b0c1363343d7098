"""The end-to-end fetch against a second S3 implementation: s3rver (npm ``s3rver@3.7.1``, Node.js).

moto is the main test server; these tests run the same user-visible promises against s3rver, whose
listings, ETags and errors are its own, to catch S3 dialect differences: pagination past 1,000 keys,
odd keys, multipart ETags, the zero-GET re-fetch (counted by the server), changed and deleted keys, a
key deleted between LIST and GET, and the errors a user meets (one ``tess: error:`` line, exit 2, no
credentials printed, nothing cached lost).

tess is driven only through its entry points: ``pipeline.cli.main`` in this process, or
``python -m pipeline`` in a child process where a fresh process matters (credentials; stderr as a user
sees it). Objects are put with boto3 over HTTP.

What s3rver 3.7.1 cannot do, so these tests do not ask it to (all checked against its source):

* It maps keys to file paths, so keys with ``//``, ``.`` or ``..`` segments are normalised by the
  store, and it ignores ``encoding-type=url``, so keys with control characters other than TAB cannot
  travel in its XML listings; a key segment over about 230 bytes exceeds the file-name limit and
  crashes the server (ENAMETOOLONG). Those keys are covered against moto (``tests/test_hostile_keys.py``).
* It gives a multipart upload the MD5 of the whole object as ETag (AWS, MinIO and Ceph give
  ``md5-of-part-md5s-N``) and does not enforce the 5 MiB minimum part size. The AWS-style ETag is
  produced by rewriting the ETag s3rver keeps beside the object.
* It does not check SigV4 signatures: a wrong secret key is accepted, only an unknown access key id is
  refused (``InvalidAccessKeyId``).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import pytest

from cache import load_manifest, read_key_list
from pipeline import cli
from tests.helpers import closed_port, multipart_upload, run_cli

ACCESS_KEY = SECRET_KEY = "S3RVER"
N_MANY = 1234


def _client(endpoint: str):
    import boto3
    import botocore.config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=botocore.config.Config(s3={"addressing_style": "path"}, max_pool_connections=16),
    )


@pytest.fixture(scope="module")
def s3c(s3rver_server):
    return _client(s3rver_server.endpoint)


def _new_bucket(s3c) -> str:
    name = f"t-{uuid.uuid4().hex[:16]}"
    s3c.create_bucket(Bucket=name)
    return name


@pytest.fixture
def sbucket(s3c) -> str:
    """A fresh, empty s3rver bucket."""
    return _new_bucket(s3c)


def _body(i: int) -> bytes:
    return f"object {i:06d} ".encode() * (1 + i % 3)


@pytest.fixture(scope="module")
def many_bucket(s3c):
    """A bucket with N_MANY distinct objects under ``many/``, a zero-byte object and a folder marker."""
    bucket = _new_bucket(s3c)
    objects = [(f"many/k{i:05d}", _body(i)) for i in range(N_MANY)] + [("many/empty-file", b""), ("many/folder/", b"")]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: s3c.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), objects))
    return bucket


def _fetch(capsys, endpoint: str, uri: str, cache_dir: Path, *extra: str) -> tuple[int, str, str, Path | None]:
    """``tess fetch URI`` in this process; returns exit code, stdout, stderr, manifest path."""
    rc = cli.main(["fetch", uri, "--endpoint", endpoint, "--cache-dir", str(cache_dir), "--no-progress", *extra])
    out, err = capsys.readouterr()
    paths = [
        line.split("manifest: ", 1)[1].strip() for line in out.splitlines() if line.strip().startswith("manifest: ")
    ]
    assert len(paths) <= 1, out
    return rc, out, err, Path(paths[0]) if paths else None


def _records(manifest: Path) -> dict[str, dict]:
    """Key -> record of a manifest, in listing order, as written (``tess-manifest/1`` JSON Lines)."""
    load_manifest(manifest)  # checks the header and records_sha256
    lines = manifest.read_text("utf-8").splitlines()[1:]
    records = [json.loads(line) for line in lines]
    return {r["key"]: r for r in records}


def _quoted_md5(data: bytes) -> str:
    return f'"{hashlib.md5(data).hexdigest()}"'


def test_listing_over_1000_keys_paginates_and_refetch_sends_no_get(
    capsys, s3rver_server, s3rver_env, many_bucket, tmp_path
):
    cache_dir = tmp_path / "cache"
    uri = f"s3://{many_bucket}/many/"
    s3rver_server.reset_counts()
    # Two DataLoader workers and two clients: concurrent GETs against s3rver.
    rc, out, err, manifest = _fetch(capsys, s3rver_env, uri, cache_dir, "--workers", "2", "--clients", "2")
    assert rc == 0, err
    first = s3rver_server.counts
    m = load_manifest(manifest)
    expected = sorted([f"many/k{i:05d}" for i in range(N_MANY)] + ["many/empty-file"])
    assert list(m.keys) == expected  # every page, in listing order; the folder marker skipped
    assert m.header.count == N_MANY + 1 and m.header.extra["fetch"]["listed"] == N_MANY + 1
    assert first["LIST"] == 2  # 1,000 + 236 entries: the second page came from s3rver's continuation token
    assert first["GET"] == m.header.extra["fetch"]["fetched"] >= N_MANY
    records = _records(manifest)
    assert records["many/empty-file"]["sha256"] == hashlib.sha256(b"").hexdigest()
    for i in (0, 997, 998, N_MANY - 1):  # both sides of the page boundary (after empty-file, folder/)
        rec = records[f"many/k{i:05d}"]
        assert rec["sha256"] == hashlib.sha256(_body(i)).hexdigest() and rec["size"] == len(_body(i))
        assert rec["etag"] == _quoted_md5(_body(i))

    s3rver_server.reset_counts()
    rc, out, err, again = _fetch(capsys, s3rver_env, uri, cache_dir)
    assert rc == 0, err
    # LIST requests only, no GET, no HEAD: the two pages.
    assert s3rver_server.counts == {"LIST": 2}
    assert load_manifest(again).header.extra["fetch"]["cached"] == N_MANY + 1
    assert load_manifest(again).header.records_sha256 == m.header.records_sha256

    # --limit past the first page: the first 1,001 listed keys, from both pages, all cached.
    s3rver_server.reset_counts()
    rc, out, err, limited = _fetch(capsys, s3rver_env, uri, cache_dir, "--limit", "1001")
    assert rc == 0, err
    assert list(load_manifest(limited).keys) == expected[:1001]
    assert s3rver_server.counts == {"LIST": 2}


# Printable odd keys s3rver can store (see the module docstring for the ones it cannot).
ODD_KEYS = [
    "odd/a b.png",
    "odd/ünï çødé_2.png",
    "odd/a+b=c&d.png",
    "odd/plus+only",
    "odd/100%.png",
    "odd/%2F..%2Fetc",
    "odd/%41%20encoded",
    "odd/q?x=1#frag",
    "odd/tab\tkey",
    "odd/ leading and trailing ",
    "odd/emoji 😀 key",
    "odd/~!$'()*,;:@[]^`{}|",
    'odd/quote"and<angle>&amp;',
    "odd/back\\slash",
    "odd/日本語/ファイル.png",
    "odd/long/" + "/".join(["é" * 90] * 5),  # 913 bytes of UTF-8 in segments s3rver can store
]


def test_odd_keys_round_trip_exactly(capsys, s3rver_server, s3rver_env, s3c, sbucket, tmp_path):
    bodies = {k: f"content of {k!r}".encode() for k in ODD_KEYS}
    for k, data in bodies.items():
        s3c.put_object(Bucket=sbucket, Key=k, Body=data)
    listed = [o["Key"] for o in s3c.list_objects_v2(Bucket=sbucket)["Contents"]]
    assert sorted(listed) == sorted(ODD_KEYS)  # s3rver itself stored every key as given
    cache_dir = tmp_path / "cache"
    rc, out, err, manifest = _fetch(capsys, s3rver_env, f"s3://{sbucket}/odd/", cache_dir)
    assert rc == 0, err
    records = _records(manifest)
    assert sorted(records) == sorted(ODD_KEYS)
    assert sorted(read_key_list(manifest.with_suffix(".keys"))) == sorted(ODD_KEYS)
    for k, rec in records.items():
        assert rec["sha256"] == hashlib.sha256(bodies[k]).hexdigest(), k
        assert rec["etag"] == _quoted_md5(bodies[k]), k
        assert datetime.fromisoformat(rec["last_modified"]).tzinfo is not None, rec["last_modified"]
    # The key index finds every odd key again: the re-fetch sends no GET.
    s3rver_server.reset_counts()
    rc, out, err, _ = _fetch(capsys, s3rver_env, f"s3://{sbucket}/odd/", cache_dir)
    assert rc == 0 and s3rver_server.counts["GET"] == 0, (err, s3rver_server.counts)


def _set_stored_etag(server_dir: Path, bucket: str, md5_hex: str, etag: str) -> None:
    """Make s3rver answer ``etag`` for the object whose stored MD5 is ``md5_hex``: it keeps the ETag in a
    ``<name>._S3rver_object.md5`` file beside the object and sends it quoted in listings, HEAD and GET."""
    hits = [p for p in (server_dir / bucket).rglob("*._S3rver_object.md5") if p.read_text() == md5_hex]
    assert len(hits) == 1, hits
    hits[0].write_text(etag)


@pytest.mark.parametrize("etag_style", ["s3rver", "aws"])
def test_multipart_object_is_fetched_whole_and_verified(
    capsys, s3rver_server, s3rver_env, s3c, sbucket, tmp_path, etag_style
):
    # Three parts, the last one short. s3rver does not enforce AWS's 5 MiB minimum, so the parts are small.
    parts = [os.urandom(256 * 1024), os.urandom(256 * 1024), os.urandom(1000)]
    whole = b"".join(parts)
    multipart_upload(s3c, sbucket, "mp/big_1.bin", parts)
    s3c.put_object(Bucket=sbucket, Key="mp/small_1.bin", Body=b"single part")
    if etag_style == "s3rver":
        expected_etag = _quoted_md5(whole)  # s3rver's dialect: the whole object's MD5, checkable
    else:
        # What AWS, MinIO and Ceph send: MD5 of the parts' binary MD5s, "-" and the part count.
        aws = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest() + "-3"
        _set_stored_etag(s3rver_server.directory, sbucket, hashlib.md5(whole).hexdigest(), aws)
        expected_etag = f'"{aws}"'
    assert s3c.head_object(Bucket=sbucket, Key="mp/big_1.bin")["ETag"] == expected_etag
    cache_dir = tmp_path / "cache"
    s3rver_server.reset_counts()
    rc, out, err, manifest = _fetch(capsys, s3rver_env, f"s3://{sbucket}/mp/", cache_dir)
    assert rc == 0, err
    assert s3rver_server.counts["GET"] == 2
    rec = _records(manifest)["mp/big_1.bin"]
    # A "-3" ETag is not an MD5 of the body: it must not be taken for one (no false mismatch, no retries).
    assert rec["sha256"] == hashlib.sha256(whole).hexdigest() and rec["size"] == len(whole)
    assert rec["etag"] == expected_etag
    assert load_manifest(manifest).header.extra["fetch"]["retries"] == 0
    s3rver_server.reset_counts()
    rc, out, err, _ = _fetch(capsys, s3rver_env, f"s3://{sbucket}/mp/", cache_dir)
    assert rc == 0 and s3rver_server.counts["GET"] == 0, (err, s3rver_server.counts)


def test_changed_and_deleted_keys(capsys, s3rver_server, s3rver_env, s3c, sbucket, tmp_path):
    for i in range(5):
        s3c.put_object(Bucket=sbucket, Key=f"chg/k{i}_{i}.bin", Body=f"version 1 of k{i}".encode())
    cache_dir = tmp_path / "cache"
    uri = f"s3://{sbucket}/chg/"
    rc, out, err, manifest = _fetch(capsys, s3rver_env, uri, cache_dir)
    assert rc == 0, err
    old = _records(manifest)
    # k1 changes with the same size (only the ETag tells), k2 changes size, k0 is deleted, k5 is new.
    s3c.put_object(Bucket=sbucket, Key="chg/k1_1.bin", Body=b"version 2 of k1")
    s3c.put_object(Bucket=sbucket, Key="chg/k2_2.bin", Body=b"version 2 of k2, longer")
    s3c.delete_object(Bucket=sbucket, Key="chg/k0_0.bin")
    s3c.put_object(Bucket=sbucket, Key="chg/k5_5.bin", Body=b"new key k5")
    s3rver_server.reset_counts()
    rc, out, err, again = _fetch(capsys, s3rver_env, uri, cache_dir)
    assert rc == 0, err
    assert s3rver_server.counts["GET"] == 3, s3rver_server.counts  # k1, k2, k5; nothing else
    new = _records(again)
    assert list(new) == [f"chg/k{i}_{i}.bin" for i in range(1, 6)]  # k0 dropped from the new manifest
    assert (
        new["chg/k1_1.bin"]["sha256"] == hashlib.sha256(b"version 2 of k1").hexdigest() != old["chg/k1_1.bin"]["sha256"]
    )
    assert new["chg/k1_1.bin"]["etag"] == _quoted_md5(b"version 2 of k1")
    assert new["chg/k2_2.bin"]["sha256"] == hashlib.sha256(b"version 2 of k2, longer").hexdigest()
    assert new["chg/k3_3.bin"] == old["chg/k3_3.bin"]
    assert load_manifest(again).header.extra["fetch"]["fetched"] == 3


def test_key_deleted_between_list_and_get_is_reported(capsys, s3rver_server, s3rver_env, s3c, sbucket, tmp_path):
    for i in range(6):
        s3c.put_object(Bucket=sbucket, Key=f"del/k{i}_0.bin", Body=f"body {i}".encode())
    cache_dir = tmp_path / "cache"
    uri = f"s3://{sbucket}/del/"
    # s3rver lists del/k3_0.bin, then deletes it before its listing reaches tess: no race, no sleep.
    s3rver_server.delete_after_next_list(sbucket, "del/k3_0.bin")
    rc, out, err, manifest = _fetch(capsys, s3rver_env, uri, cache_dir)
    assert rc == 3, (out, err)
    # Named on stderr with the cause, and counted in the summary line.
    assert f"s3://{sbucket}/del/k3_0.bin: deleted since the listing" in err, err
    assert "missing 1" in out, out
    assert manifest is not None
    m = load_manifest(manifest)
    assert list(m.keys) == [f"del/k{i}_0.bin" for i in range(6) if i != 3]
    assert m.header.extra["incomplete"] == 1 and m.header.extra["fetch"]["missing"] == 1
    # The next fetch no longer lists it: complete, exit 0, nothing downloaded again.
    s3rver_server.reset_counts()
    rc, out, err, again = _fetch(capsys, s3rver_env, uri, cache_dir)
    assert rc == 0 and s3rver_server.counts["GET"] == 0, (err, s3rver_server.counts)
    assert "incomplete" not in load_manifest(again).header.extra


# --- errors: one line, exit 2, nothing cached lost ------------------------------------------------


def _cache_state(cache_dir: Path) -> dict[str, str]:
    """sha256 of every blob, manifest and key list of the cache (what a user could lose)."""
    out = {}
    for sub in ("objects", "manifests"):
        for p in sorted((cache_dir / sub).rglob("*")):
            if p.is_file():
                out[str(p.relative_to(cache_dir))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def precious(capsys, s3rver_server, s3rver_env, s3c, tmp_path):
    """A cache already holding a fetched prefix of s3rver, which no failing fetch may change."""
    bucket = _new_bucket(s3c)
    for i in range(3):
        s3c.put_object(Bucket=bucket, Key=f"keep/k{i}_0.bin", Body=f"precious {i}".encode())
    cache_dir = tmp_path / "cache"
    uri = f"s3://{bucket}/keep/"
    rc, _, err, manifest = _fetch(capsys, s3rver_env, uri, cache_dir)
    assert rc == 0, err
    records_sha256 = load_manifest(manifest).header.records_sha256
    before = _cache_state(cache_dir)
    assert len(before) == 3 + 2  # 3 blobs, the manifest and its key list
    yield cache_dir
    assert _cache_state(cache_dir) == before
    assert not (cache_dir / "tmp").is_dir() or list((cache_dir / "tmp").iterdir()) == []
    # The key index still knows every cached object: fetching the prefix again sends no GET.
    s3rver_server.reset_counts()
    rc, _, err, again = _fetch(capsys, s3rver_env, uri, cache_dir)
    assert rc == 0 and s3rver_server.counts == {"LIST": 1}, (err, s3rver_server.counts)
    assert load_manifest(again).header.records_sha256 == records_sha256


WRONG_KEY_ID = "AKIANOTS3RVER0000000"
WRONG_SECRET = "wrong-secret-5f2e9c1d8a7b"


ERROR_CASES = {
    # case: fragments of the one error line (the problem, then the fix)
    "wrong-credentials": ["access key id is not known to the server (InvalidAccessKeyId)", "check AWS_ACCESS_KEY_ID"],
    "missing-bucket": ["bucket 'no-such-bucket-", "does not exist at http://127.0.0.1:", "check PREFIX"],
    "empty-prefix": ["no objects under s3://", "/nothing-here/", "check PREFIX"],
    "only-folder-markers": ["no objects under s3://", "/markers/", "check PREFIX"],
    "unreachable-endpoint": ["cannot reach the S3 endpoint http://127.0.0.1:", "check ENDPOINT"],
}


@pytest.mark.parametrize(("case", "fragments"), list(ERROR_CASES.items()), ids=list(ERROR_CASES))
def test_errors_are_one_line_exit_2_and_keep_the_cache(precious, s3rver_server, s3rver_env, s3c, case, fragments):
    bucket = _new_bucket(s3c)
    s3c.put_object(Bucket=bucket, Key="p/a_1.bin", Body=b"a")
    uri, endpoint, env = f"s3://{bucket}/p/", s3rver_env, {}
    if case == "wrong-credentials":
        env = {"AWS_ACCESS_KEY_ID": WRONG_KEY_ID, "AWS_SECRET_ACCESS_KEY": WRONG_SECRET}
    elif case == "missing-bucket":
        uri = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/p/"
    elif case == "empty-prefix":
        uri = f"s3://{bucket}/nothing-here/"
    elif case == "only-folder-markers":  # zero-byte keys ending in "/" are not objects to fetch
        for key in ("markers/", "markers/sub/"):
            s3c.put_object(Bucket=bucket, Key=key, Body=b"")
        uri = f"s3://{bucket}/markers/"
    elif case == "unreachable-endpoint":
        endpoint = f"http://127.0.0.1:{closed_port()}"
    # A child process, as a user runs it: fresh credentials, the real stderr (logging included).
    proc = run_cli(
        "fetch",
        uri,
        "--endpoint",
        endpoint,
        "--cache-dir",
        str(precious),
        "--no-progress",
        "--max-attempts",
        "2",
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tess: error: "), proc.stderr  # no traceback, no noise
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "manifest:" not in proc.stdout
    for secret in (WRONG_KEY_ID, WRONG_SECRET, SECRET_KEY):
        assert secret not in proc.stdout + proc.stderr
