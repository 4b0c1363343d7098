"""Sharded fetch against the loopback S3 server: the N shard manifests partition the listing, a key
never changes shard when other keys are added, and SHARD / NODE_RANK / RANK resolve as documented."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cache import CacheLayout, load_manifest
from cache.shard import (
    ShardSpec,
    in_shard,
    parse_shard,
    resolve_shard,
    shard_from_env,
    shard_indices,
    shard_mask,
    shard_of,
)
from pipeline.demo.server import seed_objects
from pipeline.fetch.stage import FetchConfig, fetch
from tests.helpers import blob_count, run_cli

N_KEYS = 300


def _items(start: int, stop: int, prefix: str = "sh/"):
    # Distinct contents, so blob counts equal record counts (no dedup in the way of the checks).
    # Image names (nothing decodes them here), so the label rule has image keys to decide on: class folders.
    return [(f"{prefix}cls{i % 4}/obj-{i:05d}.png", f"object {i}".encode()) for i in range(start, stop)]


def _fetch(bucket, options, cache_dir, shard: ShardSpec | None, prefix: str = "sh/"):
    return fetch(
        FetchConfig(
            prefix=f"s3://{bucket}/{prefix}",
            options=options,
            cache_dir=cache_dir,
            workers=0,
            progress=False,
            shard=shard,
        )
    )


def test_union_of_shard_manifests_is_the_listing_without_repeats(bucket, options, tmp_path):
    seed_objects(bucket, _items(0, N_KEYS))
    full = load_manifest(_fetch(bucket, options, tmp_path / "full", None).manifest)
    assert len(full) == N_KEYS and full.header.shard is None
    assert full.header.labels == "folder" and sorted(set(full.label.tolist())) == [0, 1, 2, 3]

    seen: list[str] = []
    for k in range(3):
        cache = tmp_path / f"node{k}"  # one node-local cache per shard
        result = _fetch(bucket, options, cache, ShardSpec(k, 3))
        m = load_manifest(result.manifest)
        keys = list(m.keys)
        assert m.header.shard == ShardSpec(k, 3) and f"shard{k}of3" in result.manifest.name
        assert all(in_shard(key, ShardSpec(k, 3)) for key in keys)
        # Roughly a third each (300 keys, hash split): a position or prefix bug would skew this.
        assert 60 <= len(keys) <= 140, len(keys)
        # The node mirrored its shard and nothing else, and the full listing was counted once.
        assert result.summary.fetched == len(keys) == blob_count(cache)
        assert m.header.fetch["listed"] == N_KEYS
        # Labels (folder classes) are numbered over the whole listing, so every shard agrees with the full one.
        full_label = {full.keys[i]: int(full.label[i]) for i in range(len(full))}
        assert all(int(m.label[i]) == full_label[m.keys[i]] for i in range(len(m)))
        assert (m.header.labels, m.header.classes) == ("folder", ("cls0", "cls1", "cls2", "cls3"))
        seen += keys
    assert len(seen) == len(set(seen)) == N_KEYS
    assert sorted(seen) == sorted(full.keys)


def test_shards_in_one_cache_get_their_own_manifests(bucket, options, cache_dir):
    seed_objects(bucket, _items(0, 40))
    paths = {_fetch(bucket, options, cache_dir, ShardSpec(k, 2)).manifest for k in range(2)}
    paths.add(_fetch(bucket, options, cache_dir, None).manifest)
    assert len(paths) == 3  # shard 0/2, shard 1/2 and the full manifest side by side
    # The full fetch found every blob already in the cache from the two shard fetches.
    full = [load_manifest(p) for p in paths if load_manifest(p).header.shard is None][0]
    assert full.header.fetch["cached"] == 40 and full.header.fetch["fetched"] == 0


def test_adding_keys_moves_no_key_to_another_shard(bucket, options, cache_dir):
    seed_objects(bucket, _items(0, 200))
    spec = ShardSpec(1, 3)
    before = set(load_manifest(_fetch(bucket, options, cache_dir, spec).manifest).keys)
    # New keys sort before, between and after the old ones.
    seed_objects(bucket, _items(200, 300) + [(f"sh/aaa-{i}.bin", f"new {i}".encode()) for i in range(30)])
    second = _fetch(bucket, options, cache_dir, spec)
    after = set(load_manifest(second.manifest).keys)
    assert before <= after
    added = after - before
    assert added and all(k.startswith("sh/aaa-") or int(k[-9:-4]) >= 200 for k in added)
    # Nothing of the old shard was fetched again: the split of the old keys did not change.
    assert second.summary.cached == len(before) and second.summary.fetched == len(added)


def test_shard_of_is_pinned_and_vectorised():
    # Pinned values: the split must never change between releases, or nodes' caches would disagree.
    assert [shard_of("shapes/img-000000_0.png", n) for n in (2, 3, 7)] == [0, 1, 6]
    assert [shard_of("ünï/çødé", n) for n in (2, 3, 7)] == [1, 0, 5]
    keys = [f"k/{i}" for i in range(2000)]
    idx = shard_indices(keys, 4)
    assert idx.tolist() == [shard_of(k, 4) for k in keys]
    assert np.array_equal(shard_mask(keys, ShardSpec(2, 4)), idx == 2)
    counts = np.bincount(idx, minlength=4)
    assert counts.sum() == 2000 and counts.min() > 420  # 500 expected per shard


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("3/2", "SHARD '3/2': index must be < count; use k/N with 0 <= k < N"),
        ("2/2", "SHARD '2/2': index must be < count; use k/N with 0 <= k < N"),
        ("0/0", "SHARD '0/0': count must be >= 1; use k/N with 0 <= k < N"),
        ("-1/2", "SHARD '-1/2': not of the form k/N; use k/N with 0 <= k < N (e.g. 0/4)"),
        ("1", "SHARD '1': not of the form k/N; use k/N with 0 <= k < N (e.g. 0/4)"),
        ("a/b", "SHARD 'a/b': not of the form k/N; use k/N with 0 <= k < N (e.g. 0/4)"),
    ],
)
def test_parse_shard_errors_are_one_line_with_fix(text, message):
    with pytest.raises(ValueError) as e:
        parse_shard(text)
    assert str(e.value) == message


def test_parse_shard_and_spec():
    assert parse_shard(" 2 / 8 ") == ShardSpec(2, 8) and str(ShardSpec(2, 8)) == "2/8"
    assert ShardSpec(0, 1).whole and not ShardSpec(0, 2).whole
    with pytest.raises(ValueError, match=r"^SHARD '3/2': index must be < count"):
        ShardSpec(3, 2)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"RANK": "1", "WORLD_SIZE": "4"}, ShardSpec(1, 4)),
        ({"NODE_RANK": "2", "NNODES": "3"}, ShardSpec(2, 3)),
        # One fetch per node: the node pair wins over the process pair.
        ({"NODE_RANK": "0", "NNODES": "2", "RANK": "3", "WORLD_SIZE": "8"}, ShardSpec(0, 2)),
    ],
)
def test_shard_from_env(environ, expected):
    assert shard_from_env(environ) == expected


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"NODE_RANK": "1"}, "NODE_RANK=1 but NNODES is not set; set both or pass --shard k/N (SHARD=k/N)"),
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 but RANK is not set; set both or pass --shard k/N (SHARD=k/N)"),
        (
            {"RANK": "x", "WORLD_SIZE": "2"},
            "RANK=x, WORLD_SIZE=2: both must be integers; set them or pass --shard k/N (SHARD=k/N)",
        ),
        ({"NODE_RANK": "2", "NNODES": "2"}, "NODE_RANK=2, NNODES=2: index must be < count; use k/N with 0 <= k < N"),
    ],
)
def test_shard_from_env_errors(environ, message):
    with pytest.raises(ValueError) as e:
        shard_from_env(environ)
    assert str(e.value) == message


def test_resolve_shard_precedence():
    env = {"NODE_RANK": "1", "NNODES": "2", "RANK": "0", "WORLD_SIZE": "4"}
    assert resolve_shard("2/3", env) == (ShardSpec(2, 3), "--shard")
    assert resolve_shard(None, env) == (ShardSpec(1, 2), "NODE_RANK/NNODES")
    assert resolve_shard(None, {"RANK": "0", "WORLD_SIZE": "4"}) == (ShardSpec(0, 4), "RANK/WORLD_SIZE")
    # k/1 and a single-process torchrun mean the whole listing: the plain, unsharded manifest.
    assert resolve_shard("0/1", {})[0] is None
    assert resolve_shard(None, {"RANK": "0", "WORLD_SIZE": "1"})[0] is None
    assert resolve_shard(None, {}) == (None, "")


def test_cli_fetch_shard_from_env_and_bad_flag(s3_server, bucket, tmp_path):
    seed_objects(bucket, _items(0, 30))
    cache = tmp_path / "cache"
    proc = run_cli(
        "fetch",
        f"s3://{bucket}/sh/",
        "--endpoint",
        s3_server.endpoint,
        "--cache-dir",
        str(cache),
        "-w",
        "0",
        "--no-progress",
        env={"NODE_RANK": "1", "NNODES": "2"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "fetching shard 1/2 (from NODE_RANK/NNODES)" in proc.stderr
    (manifest,) = CacheLayout(root=cache).manifests.glob("*.jsonl")
    header = json.loads(manifest.read_text().splitlines()[0])
    assert header["shard"] == "1/2" and header["count"] == sum(in_shard(k, ShardSpec(1, 2)) for k, _ in _items(0, 30))

    bad = run_cli(
        "fetch", f"s3://{bucket}/sh/", "--endpoint", s3_server.endpoint, "--cache-dir", str(cache), "--shard", "2/2"
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == "tess: error: SHARD '2/2': index must be < count; use k/N with 0 <= k < N"
