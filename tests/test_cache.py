"""cache/: layout, atomic blobs, manifest format and compact loading, key list round trip, index."""

import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest

from cache import BlobStore, BodyCheckError, CacheLayout, load_manifest, read_key_list, write_manifest
from cache.atomic import remove_stale_temp_files, temp_path_for
from cache.index import KeyIndex
from cache.manifest import ManifestRecord, latest_manifest, manifest_name, read_manifest_header

ODD_KEYS = [
    "a b/c d.png",
    "ünï/çødé_3.png",
    "../x",
    "/leading",
    "new\nline",
    "back\\slash\\n",
    "tab\there",
    "cr\rx",
    "%2F..%2Fetc",
]


def test_blob_path_comes_from_content_hash(tmp_path):
    store = BlobStore(CacheLayout(root=tmp_path))
    data = b"hello"
    sha, new = store.put_bytes(data)
    assert new and sha == hashlib.sha256(data).hexdigest()
    assert store.path(sha) == tmp_path / "objects" / sha[:2] / sha[2:4] / sha
    assert store.path(sha).read_bytes() == data
    sha2, new2 = store.put_bytes(data)
    assert (sha2, new2) == (sha, False)
    assert len(list((tmp_path / "objects").rglob("*"))) == 3  # two folders + one blob
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.parametrize(
    ("etag", "expected_size", "data", "fragment"),
    [
        ('"00000000000000000000000000000000"', 3, b"abc", "does not match ETag"),
        (None, 4, b"abc", "got 3 bytes, expected 4 (the listed size)"),
    ],
)
def test_blob_checks_size_and_md5(tmp_path, etag, expected_size, data, fragment):
    store = BlobStore(CacheLayout(root=tmp_path))
    w = store.writer(expected_size=expected_size, etag=etag, label="s3://b/k")
    w.write(data)
    with pytest.raises(BodyCheckError) as e:
        w.commit()
    assert fragment in str(e.value) and "s3://b/k" in str(e.value)
    assert list((tmp_path / "objects").rglob("*")) == []
    assert list((tmp_path / "tmp").iterdir()) == []


def test_multipart_etag_is_not_checked_as_md5(tmp_path):
    store = BlobStore(CacheLayout(root=tmp_path))
    sha, _ = store.put_bytes(b"abc", etag='"d41d8cd98f00b204e9800998ecf8427e-2"')
    assert store.verify(sha)


def test_stale_temp_files_of_dead_pids_are_removed(tmp_path):
    dead = tmp_path / f".{2**22 + 12345}-{'0' * 16}.tmp"
    dead.write_bytes(b"partial")
    live = temp_path_for(tmp_path)
    live.write_bytes(b"in flight")
    assert remove_stale_temp_files(tmp_path) == 1
    assert not dead.exists() and live.exists()


def _records(keys):
    out = []
    for i, k in enumerate(keys):
        data = f"blob {i}".encode()
        out.append(
            ManifestRecord(
                key=k,
                sha256=hashlib.sha256(data).hexdigest(),
                size=len(data),
                etag=f'"{hashlib.md5(data).hexdigest()}"',
                last_modified="2026-01-01T00:00:00+00:00",
                label=i % 3,
            )
        )
    return out


def test_manifest_format_and_round_trip(tmp_path):
    layout = CacheLayout(root=tmp_path)
    recs = _records(ODD_KEYS)
    path = write_manifest(
        layout, endpoint="http://127.0.0.1:9", bucket="bkt", prefix="p/", records=recs, extra={"classes": ["x"]}
    )
    assert path.parent == tmp_path / "manifests" and path.suffix == ".jsonl"
    lines = path.read_bytes().decode("utf-8").split("\n")
    header = json.loads(lines[0])
    assert header["format"] == "tess-manifest/1"
    assert {"endpoint", "bucket", "prefix", "created", "count", "total_bytes", "records_sha256"} <= header.keys()
    assert header["count"] == len(recs) and header["total_bytes"] == sum(r.size for r in recs)
    assert header["classes"] == ["x"]
    assert [json.loads(line)["key"] for line in lines[1:-1]] == ODD_KEYS
    # Every field of the record, in declaration order (records_sha256 covers these exact bytes).
    assert list(json.loads(lines[1])) == [f.name for f in dataclasses.fields(ManifestRecord)]
    assert json.loads(lines[1]).keys() == {"key", "sha256", "size", "etag", "last_modified", "label"}
    assert read_key_list(path.with_suffix(".keys")) == ODD_KEYS
    arrays = load_manifest(path)
    assert list(arrays.keys) == ODD_KEYS
    assert [arrays.sha_hex(i) for i in range(len(recs))] == [r.sha256 for r in recs]
    assert arrays.size.dtype == np.int64 and arrays.label.tolist() == [r.label for r in recs]
    assert read_manifest_header(path).records_sha256 == header["records_sha256"]
    assert latest_manifest(layout) == path


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda lines: lines[:-1], "records but the header says"),
        (
            lambda lines: [lines[0]] + [lines[1].replace('"label":0', '"label":7')] + lines[2:],
            "do not match records_sha256",
        ),
        (lambda lines: ['{"format": "other/9"}'] + lines[1:], "is not 'tess-manifest/1'"),
    ],
)
def test_damaged_manifest_is_refused(tmp_path, mutate, fragment):
    path = write_manifest(
        CacheLayout(root=tmp_path), endpoint="e", bucket="b", prefix="p", records=_records(["a_0.png", "b_1.png"])
    )
    lines = path.read_text("utf-8").splitlines()
    path.write_text("\n".join(mutate(lines)) + "\n", "utf-8")
    with pytest.raises(ValueError) as e:
        load_manifest(path)
    assert fragment in str(e.value) and "make fetch" in str(e.value)


def test_manifest_name_depends_on_endpoint_bucket_prefix():
    a = manifest_name("http://h:1", "b", "p/")
    assert a != manifest_name("http://h:2", "b", "p/") != manifest_name("http://h:1", "b", "q/")
    assert a == manifest_name("http://h:1", "b", "p/")
    assert "/" not in manifest_name("e", "b", "../../etc/passwd") and ".." not in manifest_name("e", "b", "../../x")


def test_missing_manifest_error_says_how_to_fetch(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        latest_manifest(CacheLayout(root=tmp_path))
    assert "make fetch" in str(e.value)


def test_key_index_survives_reopen(tmp_path):
    layout = CacheLayout(root=tmp_path)
    with KeyIndex(layout) as idx:
        idx.put_many("e", "b", [("k", '"etag"', 3, "ab" * 32)])
    with KeyIndex(layout) as idx:
        assert idx.get(endpoint="e", bucket="b", key="k", etag='"etag"', size=3) == "ab" * 32
        assert idx.get(endpoint="e", bucket="b", key="k", etag='"other"', size=3) is None
        assert idx.get_many("e", "b", [("k", '"etag"', 3), ("k", '"etag"', 4)]) == ["ab" * 32, None]


def test_cache_package_imports_neither_boto3_nor_torch(tmp_path):
    import subprocess
    import sys

    modules = (
        "cache, cache.index, cache.locks, cache.gc, cache.verify, cache.shard, cache.uri, cache.manifest, "
        "pipeline.config"
    )
    code = f"import sys, {modules}; print(any(m in sys.modules for m in ('boto3','botocore','torch')))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
        check=True,
    )
    assert out.stdout.strip() == "False"


def test_temp_file_of_a_zombie_writer_counts_as_stale(tmp_path):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        # Not reaped yet: the child is a zombie, as killed workers become where nothing reaps orphans.
        while open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            pass
        (tmp_path / f".{pid}-{'1' * 16}.tmp").write_bytes(b"partial")
        assert remove_stale_temp_files(tmp_path) == 1
    finally:
        os.waitpid(pid, 0)
