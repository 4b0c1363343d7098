"""What training takes from a real bucket: only image keys, checked blobs, hints that fit the cause."""

from __future__ import annotations

import io
import json
import re
import subprocess

import numpy as np
import pytest
from PIL import Image

from cache import BlobStore, CacheLayout, load_manifest, write_manifest
from cache.manifest import ManifestRecord
from pipeline.config import TrainConfig
from pipeline.data.cached_dataset import BadSample, CachedImageDataset
from pipeline.data.images import IMG_EXTENSIONS, image_indices, parse_extensions
from pipeline.demo.demo_set import demo_items
from pipeline.demo.server import seed_objects
from pipeline.fetch.stage import FetchConfig, fetch
from pipeline.train.loop import train
from tests.conftest import png_bytes
from tests.helpers import ROOT, run_cli

N_IMAGES = 16
OTHERS = {
    "shapes/README.txt": b"digits, 10 classes\n",
    "shapes/_SUCCESS": b"",
    "shapes/.DS_Store": b"\x00\x00\x00\x01Bud1",
    "shapes/labels.csv": b"key,label\n",
}


def make_mixed_cache(root, extra: dict[str, bytes] | None = None):
    """Demo images plus the non-image objects real buckets hold; returns the manifest path."""
    store = BlobStore(CacheLayout(root=root))
    items = list(demo_items(N_IMAGES, prefix="shapes/")) + list(OTHERS.items()) + list((extra or {}).items())
    recs = []
    for key, data in sorted(items):
        sha, _ = store.put_bytes(data)
        label = int(key[-5]) if key[-5].isdigit() else -1
        recs.append(ManifestRecord(key=key, sha256=sha, size=len(data), etag="", last_modified="", label=label))
    return write_manifest(
        CacheLayout(root=root), endpoint="http://127.0.0.1:9", bucket="demo", prefix="shapes/", records=recs
    )


def _cfg(cache_dir, out, **kw):
    base = dict(epochs=1, batch=8, workers=0, cache_dir=str(cache_dir), out=str(out), progress=False, seed=1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize(
    ("text", "expected"),
    [(".png,.JPG", (".png", ".jpg")), ("png, jpeg", (".png", ".jpeg")), (["webp", ".webp"], (".webp",))],
)
def test_parse_extensions(text, expected):
    assert parse_extensions(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "names no extension"),
        (",", "names no extension"),
        ("a/b", "is not a file extension"),
        (". png", "is not a file extension"),
    ],
)
def test_parse_extensions_rejects(text, fragment):
    with pytest.raises(ValueError) as e:
        parse_extensions(text)
    assert fragment in str(e.value) and "--extensions" in str(e.value)


def test_image_indices_follow_imagefolder_case_insensitively():
    keys = ["a/x.PNG", "a/y.jpeg", "README.txt", "a/z.png.txt", "b/w.Tiff", "_SUCCESS", "c/.DS_Store"]
    assert list(image_indices(keys)) == [0, 1, 4]
    assert list(image_indices(keys, (".txt",))) == [2, 3]
    assert ".png" in IMG_EXTENSIONS and ".jpg" in IMG_EXTENSIONS


@pytest.mark.parametrize("pack", ["on", "off"])
def test_training_ignores_non_image_keys_and_says_so(tmp_path, pack):
    make_mixed_cache(tmp_path / "cache")
    s = train(_cfg(tmp_path / "cache", tmp_path / "out", pack=pack))
    assert s.images == N_IMAGES and s.ignored_keys == len(OTHERS) and s.bad_samples_skipped == 0
    assert f"({N_IMAGES} images" in s.data
    text = s.report(str(tmp_path / "out"))
    assert f"ignored {len(OTHERS)} keys without an image extension" in text and "--extensions" in text
    assert f"trained on {s.data}" in text


def test_extensions_flag_narrows_the_set_and_an_empty_set_fails_with_the_fix(tmp_path):
    make_mixed_cache(tmp_path / "cache", {"shapes/extra_3.jpg": png_bytes(3)})
    s = train(_cfg(tmp_path / "cache", tmp_path / "a", extensions=(".jpg",)))
    assert s.images == 1 and s.ignored_keys == N_IMAGES + len(OTHERS)
    with pytest.raises(ValueError) as e:
        train(_cfg(tmp_path / "cache", tmp_path / "b", extensions=(".bmp",)))
    assert "no usable samples" in str(e.value) and "--extensions" in str(e.value)


def test_an_intact_non_image_says_so_without_a_repair_hint(tmp_path):
    make_mixed_cache(tmp_path / "cache", {"shapes/fake_1.png": b"this is text named .png"})
    with pytest.raises(ValueError) as e:
        train(_cfg(tmp_path / "cache", tmp_path / "a", pack="on"))
    msg = str(e.value)
    assert "'shapes/fake_1.png'" in msg and "is not a decodable image" in msg and "match the bucket's object" in msg
    assert "verify" not in msg and "repair" not in msg  # the cache is fine: repairing cannot help
    assert len(re.findall(r"\bsample \d+ \(key", msg)) == 1 and msg.count("is not a decodable image") == 1  # said once


def test_a_corrupted_blob_says_so_with_the_repair_command_for_this_cache(tmp_path):
    manifest = make_mixed_cache(tmp_path / "cache")
    ds = CachedImageDataset(manifest)
    i = int(ds.image_indices[2])
    with open(ds.blob_path(i), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(BadSample) as e:
        ds.load_uint8(i)
    msg = str(e.value)
    assert "is corrupted in the cache" in msg and ds.manifest.keys[i] in msg
    assert f"make verify REPAIR=1 ENDPOINT=http://127.0.0.1:9 CACHE_DIR={tmp_path / 'cache'}" in msg


def test_pack_build_rehashes_blobs_and_refuses_a_swapped_but_valid_image(tmp_path):
    """A blob replaced by another valid PNG decodes fine; only the sha256 check catches it."""
    manifest = make_mixed_cache(tmp_path / "cache")
    ds = CachedImageDataset(manifest)
    i = int(ds.image_indices[4])
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, format="PNG")
    with open(ds.blob_path(i), "wb") as f:
        f.write(buf.getvalue())
    with pytest.raises(ValueError) as e:
        train(_cfg(tmp_path / "cache", tmp_path / "a", pack="on"))
    assert "is corrupted in the cache" in str(e.value) and ds.manifest.keys[i] in str(e.value)
    assert not list((tmp_path / "cache" / "packs").glob("*.npy"))  # no pack baked the wrong pixels in


def test_skipped_keys_are_named_in_the_report_and_all_in_summary_json(tmp_path):
    bad = {f"shapes/broken-{j}_1.png": b"not an image %d" % j for j in range(7)}
    make_mixed_cache(tmp_path / "cache", bad)
    out = tmp_path / "out"
    s = train(_cfg(tmp_path / "cache", out, pack="off", on_bad_sample="skip", epochs=2))
    assert s.skipped_keys == sorted(bad) and s.bad_samples_skipped == 7  # counted once, not per epoch
    assert json.loads((out / "summary.json").read_text())["skipped_keys"] == sorted(bad)
    text = s.report(str(out))
    assert "skipped 7 bad samples: 'shapes/broken-0_1.png'" in text and "summary.json skipped_keys" in text
    assert text.count("broken-") == 5  # the first few on stdout, all of them in summary.json


def test_network_cost_is_the_downloading_fetch_not_the_no_op_one(s3_server, bucket, options, tmp_path):
    seed_objects(bucket, ((f"net/img-{i}_{i % 2}.png", png_bytes(i, size=16)) for i in range(20)))
    cfg = FetchConfig(prefix=f"s3://{bucket}/net/", options=options, cache_dir=tmp_path / "cache", progress=False)
    first = fetch(cfg)
    cost = load_manifest(first.manifest).header.network
    assert cost["objects"] == 20 and cost["runs"] == 1 and cost["bytes"] == first.summary.bytes_fetched > 0
    second = fetch(cfg)
    assert second.summary.fetched == 0
    assert load_manifest(second.manifest).header.network == cost  # the no-op added nothing
    seed_objects(bucket, [("net/img-0_0.png", png_bytes(99, size=16))])  # one object changes
    third = fetch(cfg)
    grown = load_manifest(third.manifest).header.network
    assert (
        grown["runs"] == 2 and grown["objects"] == 21 and grown["bytes"] == cost["bytes"] + third.summary.bytes_fetched
    )
    s = train(_cfg(tmp_path / "cache", tmp_path / "out"))
    assert s.network == grown and s.network_cost_s == grown["seconds"]
    assert "2 fetch runs that downloaded" in s.report(str(tmp_path / "out"))


def test_make_train_passes_on_bad_sample_extensions_and_threads():
    proc = subprocess.run(
        ["make", "-n", "train", "ON_BAD_SAMPLE=skip", "EXTENSIONS=.png,.jpg", "THREADS=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = [ln for ln in proc.stdout.splitlines() if "train_vae.py" in ln][-1]
    assert "--on-bad-sample skip" in line and "--extensions .png,.jpg" in line and "--threads 1" in line


def test_train_cli_extensions_flag_reaches_the_run(tmp_path):
    make_mixed_cache(tmp_path / "cache", {"shapes/extra_3.jpg": png_bytes(3)})
    proc = run_cli(
        "train_vae.py",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "o"),
        "--no-progress",
        "--extensions",
        ".JPG",
        module="",
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["images"] == 1
    assert f"ignored {N_IMAGES + len(OTHERS)} keys" in proc.stdout


def test_training_defaults_to_one_intra_op_thread(tmp_path):
    """One thread by default: torch's one-per-core threads collapse beside any competing process."""
    import torch

    from pipeline.config import TrainConfig as Config

    assert Config().threads == 1
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        make_mixed_cache(tmp_path / "cache")
        train(_cfg(tmp_path / "cache", tmp_path / "out"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("threads", "policy"), [("1", None), ("2", "PASSIVE"), ("0", "PASSIVE")])
def test_more_threads_wait_passively(monkeypatch, tmp_path, threads, policy):
    import os

    import pipeline.train.loop
    import train_vae

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    seen = {}

    def fake_train(config):
        seen.update(threads=config.threads, policy=os.environ.get("OMP_WAIT_POLICY"))
        raise ValueError("stop here")

    monkeypatch.setattr(pipeline.train.loop, "train", fake_train)
    assert train_vae.main(["--threads", threads, "--out", str(tmp_path / "o")]) == 2
    assert seen == {"threads": int(threads), "policy": policy}
