"""Hostile object keys: never turned into file paths, and round-tripped exactly by the manifest.

Keys are put over HTTP to the loopback server and fetched with two DataLoader workers. The fetch must
create no file outside the cache dir, no file whose name comes from a key, and the manifest
(:func:`cache.load_manifest`) and the ``.keys`` list (:func:`cache.read_key_list`) must give back every
key byte for byte.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cache import CacheLayout, load_manifest, read_key_list, write_manifest
from cache.blobs import hash_file
from cache.manifest import ManifestRecord
from pipeline.fetch.stage import FetchConfig, fetch
from tests.helpers import ROOT

MARK = "hostile7e1"  # in every short key, so that a file named after a key would be easy to find
KEYS = [
    # Path traversal, relative and absolute.
    "..",
    f"../../{MARK}-etc/x",
    f"../{MARK}",
    f"/tmp/{MARK}-abs",
    f"/etc/{MARK}-passwd",
    f"{MARK}/./dot",
    f"{MARK}//double-slash",
    f"{MARK}\\..\\..\\backslashes",
    f"~/{MARK}-home",
    # Percent-encoding that a careless decoder would turn into separators.
    f"{MARK}/%2F..%2F{MARK}-enc",
    f"{MARK}/%2e%2e/%2e%2e/{MARK}-dots",
    f"{MARK}/%00-nul-escaped",
    f"{MARK}/%",
    f"{MARK}/?query=1#frag",
    # Control characters and other line breaks. A newline cannot be stored through moto's HTTP front
    # (it answers 404 to a PUT of a key with %0A), so keys with LF are covered below, without a server.
    f"{MARK}/a\x00nul",
    f"{MARK}/a\x01soh",
    f"{MARK}/a\x1fus",
    f"{MARK}/a\x7fdel",
    f"{MARK}/a\ttab",
    f"{MARK}/a\rcr",
    f"{MARK}/a\x0bvt\x0cff\x1cfs",
    f"{MARK}/a\x85nel\u2028ls",
    f"{MARK}/a\\nbackslash-n",
    f"{MARK}/trailing-backslash\\",
    f"{MARK}/ leading and trailing spaces ",
    f"{MARK}/ünïcødé-😀",
    # The longest keys S3 allows: 1,024 bytes of UTF-8 (far past the 255-byte limit of a file name).
    MARK + "/" + "k" * (1024 - len(MARK) - 1),
    "é" * 512,
]


def _tree(root: Path) -> set[str]:
    """Every path under ``root`` (not following links), relative to it."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            out.add(os.path.relpath(os.path.join(dirpath, name), root))
    return out


def _named_after_keys(root: Path) -> list[str]:
    """Paths under ``root`` whose names carry a key's marker or a long run of a key's characters."""
    hits = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in (".git", ".venv", "node_modules")]
        for name in dirnames + filenames:
            if MARK in name or "kkkkkkkk" in name or "éééé" in name:
                hits.append(os.path.join(dirpath, name))
    return hits


def test_hostile_keys_never_become_paths_and_round_trip(put, bucket, options, tmp_path):
    assert (
        all(len(k.encode("utf-8")) <= 1024 for k in KEYS) and len(KEYS[-2].encode()) == len(KEYS[-1].encode()) == 1024
    )
    data = {k: b"content of " + k.encode("utf-8") for k in KEYS}
    for k in KEYS:
        put(k, data[k])
    cache_dir = tmp_path / "cache"
    outside = tmp_path.parent
    before = _tree(outside)
    absolute_targets = [Path(f"/tmp/{MARK}-abs"), Path(f"/etc/{MARK}-passwd"), Path.home() / f"{MARK}-home"]

    result = fetch(
        FetchConfig(prefix=f"s3://{bucket}/", options=options, cache_dir=cache_dir, workers=2, batch=4, progress=False)
    )

    assert result.exit_code == 0 and result.summary.fetched == len(KEYS), result.summary.errors
    # Nothing new outside the cache dir, nowhere a key could point to.
    new_outside = {p for p in _tree(outside) - before if not (outside / p).is_relative_to(cache_dir)}
    assert new_outside == set(), sorted(new_outside)[:5]
    assert not any(p.exists() for p in absolute_targets)
    assert _named_after_keys(tmp_path.parent) == [] and _named_after_keys(ROOT) == []
    # Where keys resolved against the working directory or the file system root would land.
    for folder in (Path("/"), Path("/tmp"), Path("/etc"), ROOT.parent, Path.home()):
        assert not [name for name in os.listdir(folder) if MARK in name], folder
    # Inside the cache, blobs are named by their SHA-256 only and nothing is a link.
    layout = CacheLayout(root=cache_dir)
    for rel in _tree(cache_dir):
        p = cache_dir / rel
        assert not p.is_symlink(), rel
        if p.is_file() and p.is_relative_to(layout.objects):
            assert p.name == hash_file(p) and rel == os.path.relpath(layout.blob_path(p.name), cache_dir), rel

    m = load_manifest(result.manifest)
    assert sorted(m.keys) == sorted(KEYS)
    assert read_key_list(result.manifest.with_suffix(".keys")) == list(m.keys)
    for i, key in enumerate(m.keys):
        assert m.sha_hex(i) == hashlib.sha256(data[key]).hexdigest(), repr(key)


def test_keys_with_line_breaks_round_trip_through_the_manifest(tmp_path):
    """Keys moto cannot store over HTTP (LF) and escapes that must not be confused with them."""
    layout = CacheLayout(root=tmp_path / "cache").create()
    keys = ["a\nb", "a\\nb", "a\\\nb", "\n", "\r\n", "a\\", "\\", "x\u2028y\x85z", "\n" * 3 + "k" * 1000]
    records = [
        ManifestRecord(key=k, sha256=hashlib.sha256(k.encode()).hexdigest(), size=1, etag="", last_modified="")
        for k in keys
    ]
    path = write_manifest(layout, endpoint="e", bucket="b", prefix="", records=records)
    assert read_key_list(path.with_suffix(".keys")) == keys
    assert list(load_manifest(path).keys) == keys
