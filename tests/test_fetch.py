"""The fetch stage against a real S3 protocol server on loopback: listing, workers and clients, dedup,
incremental re-fetch, changed and deleted keys, odd keys, load2memory, the manifest it writes."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cache import CacheLayout, load_manifest, read_key_list
from cache.blobs import hash_file
from pipeline.config import S3Uri
from pipeline.data.datasets import DSSDataset
from pipeline.demo.server import seed_objects
from pipeline.fetch.labels import assign_labels, label_from_name
from pipeline.fetch.mirror import MirrorStatus
from pipeline.fetch.stage import FetchConfig, fetch
from pipeline.fetch.worker_dataset import _keep_list
from pipeline.transport.listing import list_objects
from tests.conftest import png_bytes


def _fetch(bucket, options, cache_dir, prefix="", **kw):
    kw.setdefault("progress", False)
    kw.setdefault("workers", 0)
    return fetch(FetchConfig(prefix=f"s3://{bucket}/{prefix}", options=options, cache_dir=cache_dir, **kw))


def _blobs(cache_dir):
    return sorted(p for p in (cache_dir / "objects").rglob("*") if p.is_file())


def test_listing_paginates_past_1000_and_skips_folder_markers(s3_server, bucket, options):
    seed_objects(bucket, ((f"many/k{i:05d}", b"x") for i in range(1234)))
    seed_objects(bucket, [("many/folder/", b""), ("many/empty-file", b"")])
    s3_server.reset_counts()
    keys = [o.key for o in list_objects(S3Uri.parse(f"s3://{bucket}/many/"), options)]
    assert len(keys) == 1235 and "many/folder/" not in keys and "many/empty-file" in keys
    assert keys == sorted(keys)
    assert s3_server.counts["LIST"] == 2
    limited = list(list_objects(S3Uri.parse(f"s3://{bucket}/many/"), options, limit=7))
    assert [o.key for o in limited] == keys[:7]


ODD = ["odd/a b.png", "odd/ünï çødé_2.png", "odd/../x", "odd//leading", "odd/%2F..%2Fetc", "odd/tab\tkey"]


def test_odd_keys_are_mirrored_and_round_trip(put, bucket, options, cache_dir):
    for i, k in enumerate(ODD):
        put(k, png_bytes(i))
    r = _fetch(bucket, options, cache_dir, "odd/")
    assert r.exit_code == 0 and r.summary.fetched == len(ODD)
    m = load_manifest(r.manifest)
    assert sorted(m.keys) == sorted(ODD)
    assert sorted(read_key_list(r.manifest.with_suffix(".keys"))) == sorted(ODD)
    for i in range(len(m)):
        assert hash_file(CacheLayout(root=cache_dir).blob_path(m.sha_hex(i))) == m.sha_hex(i)
    # No key ever became a path: the only files are blobs, manifests, index, locks.
    assert not any(p.name in ("x", "leading", "etc") for p in cache_dir.rglob("*"))


def test_workers_use_client_i_mod_c(put, bucket, options, cache_dir):
    for i in range(48):
        put(f"wc/img-{i:03d}_{i % 3}.png", png_bytes(i))
    r = _fetch(bucket, options, cache_dir, "wc/", workers=3, clients=2, batch=4)
    assert r.summary.fetched == 48
    seen = {(rec.worker, rec.client) for rec in r.records}
    assert {w for w, _ in seen} == {0, 1, 2}
    assert all(c == w % 2 for w, c in seen), seen
    r0 = _fetch(bucket, options, cache_dir.with_name("c0"), "wc/", workers=0, clients=3, batch=12)
    assert {rec.client for rec in r0.records} == {0, 1, 2}


def test_identical_content_is_stored_once(put, bucket, options, cache_dir):
    data = png_bytes(7)
    put("dup/a_1.png", data)
    put("dup/b_1.png", data)
    put("dup/c_2.png", png_bytes(8))
    r = _fetch(bucket, options, cache_dir, "dup/")
    m = load_manifest(r.manifest)
    assert len(m) == 3 and len(_blobs(cache_dir)) == 2
    assert m.sha_hex(0) == m.sha_hex(1) == hashlib.sha256(data).hexdigest()


def test_refetch_of_unchanged_prefix_sends_no_get(s3_server, put, bucket, options, cache_dir):
    for i in range(30):
        put(f"inc/img_{i % 10}.png" if i < 10 else f"inc/x{i}_{i % 10}.png", png_bytes(i))
    first = _fetch(bucket, options, cache_dir, "inc/", workers=2)
    assert first.summary.fetched == 30
    s3_server.reset_counts()
    second = _fetch(bucket, options, cache_dir, "inc/", workers=2)
    assert s3_server.counts["GET"] == 0 and s3_server.counts["LIST"] == 1
    assert second.summary.cached == 30 and second.summary.fetched == 0
    assert load_manifest(second.manifest).header.records_sha256 == load_manifest(first.manifest).header.records_sha256


def test_changed_and_deleted_keys(s3_server, s3_client, put, bucket, options, cache_dir):
    for i in range(5):
        put(f"chg/k{i}_{i}.png", png_bytes(i))
    put("other/keep_0.png", png_bytes(0))  # another manifest shares k0's content
    _fetch(bucket, options, cache_dir, "other/")
    first = _fetch(bucket, options, cache_dir, "chg/")
    old = load_manifest(first.manifest)
    put("chg/k1_1.png", png_bytes(100))
    s3_client.delete_object(Bucket=bucket, Key="chg/k0_0.png")
    s3_server.reset_counts()
    second = _fetch(bucket, options, cache_dir, "chg/")
    assert s3_server.counts["GET"] == 1
    new = load_manifest(second.manifest)
    assert list(new.keys) == [f"chg/k{i}_{i}.png" for i in range(1, 5)]
    assert new.sha_hex(0) == hashlib.sha256(png_bytes(100)).hexdigest() != old.sha_hex(1)
    # The blob of the deleted key is still there: the "other/" manifest uses it.
    assert CacheLayout(root=cache_dir).blob_path(old.sha_hex(0)).is_file()


def test_verify_rehashes_and_refetches_corrupted_blob(s3_server, put, bucket, options, cache_dir):
    for i in range(4):
        put(f"ver/k{i}_0.png", png_bytes(i))
    first = _fetch(bucket, options, cache_dir, "ver/")
    m = load_manifest(first.manifest)
    victim = CacheLayout(root=cache_dir).blob_path(m.sha_hex(2))
    # Bit rot of the same length: only rehashing (--verify) can see it.
    victim.write_bytes(bytes(b ^ 0xFF for b in victim.read_bytes()))
    s3_server.reset_counts()
    assert _fetch(bucket, options, cache_dir, "ver/").summary.fetched == 0  # trusts the index
    assert s3_server.counts["GET"] == 0
    again = _fetch(bucket, options, cache_dir, "ver/", verify=True)
    assert again.summary.fetched == 1 and s3_server.counts["GET"] == 1
    # A blob cut short (what a power loss can leave when blobs are not fsynced one by one) is fetched
    # again even without --verify: the cached path checks the size.
    short = CacheLayout(root=cache_dir).blob_path(m.sha_hex(1))
    short.write_bytes(short.read_bytes()[:10])
    s3_server.reset_counts()
    assert _fetch(bucket, options, cache_dir, "ver/").summary.fetched == 1 and s3_server.counts["GET"] == 1
    assert hash_file(victim) == m.sha_hex(2)


def test_manifest_header_and_records(put, bucket, options, cache_dir):
    for i in range(6):
        put(f"hdr/img-{i:06d}_{i % 2}.png", png_bytes(i))
    r = _fetch(bucket, options, cache_dir, "hdr/", limit=5)
    lines = r.manifest.read_text("utf-8").splitlines()
    header = json.loads(lines[0])
    assert header["endpoint"] == options.endpoint and header["bucket"] == bucket and header["prefix"] == "hdr/"
    assert header["count"] == 5 == len(lines) - 1
    assert header["fetch"]["fetched"] == 5 and header["fetch"]["listed"] == 5
    rec = json.loads(lines[1])
    assert rec["key"] == "hdr/img-000000_0.png" and rec["label"] == 0 and rec["size"] == len(png_bytes(0))
    assert rec["etag"].strip('"') == hashlib.md5(png_bytes(0)).hexdigest()
    text = r.manifest.read_text("utf-8") + r.manifest.with_suffix(".keys").read_text("utf-8")
    assert "testing-secret-key" not in text and "testing-access-key" not in text


@pytest.mark.parametrize(
    ("key", "label"),
    [("a/img-000123_4.png", 4), ("a/x_10.jpeg", 10), ("a/cat/photo.png", None), ("a/x_y.png", None), ("a/_7.png", 7)],
)
def test_label_from_name(key, label):
    assert label_from_name(key) == label


def test_labels_never_mix_folder_classes_and_suffixes_in_one_listing():
    # Before issue 16, per key: [1, 0, 0, 5, -1]. One rule per listing: neither fits every key, so none.
    labelled = assign_labels(["p/dog/1.png", "p/cat/2.png", "p/cat/3.png", "p/x_5.png", "p/loose.png"], "p/")
    assert labelled.choice.rule == "none" and labelled.classes == ()
    assert labelled.values.tolist() == [-1] * 5


def test_streaming_leaves_no_cache_behind(put, bucket, options, tmp_path):
    put("st/a_1.png", png_bytes(1))
    cache_dir = tmp_path / "never-made"
    ds = DSSDataset(f"s3://{bucket}/st/", options=options, cache_dir=cache_dir, image_size=None)
    x, y = ds[0]
    assert x.shape == (3, 8, 8) and y == 1
    assert not cache_dir.exists(), "load2memory=True wrote a cache skeleton"


def test_load2memory_returns_decoded_tensors_with_labels(put, bucket, options):
    images = {}
    for i in range(12):
        key = f"mem/img-{i:03d}_{i % 4}.png"
        put(key, png_bytes(i, size=8))
        images[key] = np.asarray(
            __import__("PIL.Image", fromlist=["Image"])
            .open(__import__("io").BytesIO(png_bytes(i, size=8)))
            .convert("RGB")
        )
    ds = DSSDataset(f"s3://{bucket}/mem/", options=options, client_num=2, image_size=None)
    x, y = ds[5]
    assert x.dtype == torch.float32 and x.shape == (3, 8, 8) and y == 5 % 4
    expected = torch.from_numpy(images[ds.listing.keys[5]]).permute(2, 0, 1).float() / 255
    assert torch.allclose(x, expected)
    loader = DataLoader(ds, batch_size=4, num_workers=2)
    xs, ys = zip(*loader)
    assert torch.cat(ys).tolist() == [i % 4 for i in range(12)]
    assert torch.cat(xs).shape == (12, 3, 8, 8)
    resized = DSSDataset(f"s3://{bucket}/mem/", options=options, image_size=32)
    assert resized[0][0].shape == (3, 32, 32)


def test_dataset_pickles_without_clients_and_spawn_workers_fetch(put, bucket, options, cache_dir):
    import pickle

    from pipeline.transport.boto import get_client

    for i in range(8):
        put(f"sp/k{i}_1.png", png_bytes(i))
    ds = DSSDataset(f"s3://{bucket}/sp/", options=options, load2memory=False, cache_dir=cache_dir)
    get_client(options)  # a client exists in this process...
    ds[0]  # ...and the dataset has used its store and index
    blob = pickle.dumps(ds)
    assert b"botocore" not in blob and b"diskcache" not in blob
    loader = DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context="spawn", collate_fn=_keep_list)
    records = [r for batch in loader for r in batch]
    assert [r.status for r in records] == [MirrorStatus.FETCHED] * 8
    assert {r.worker for r in records} == {0, 1}
