"""Training from the cache: the file-backed dataset, the loop, resume, outputs, streaming from S3."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cache import BlobStore, CacheLayout, write_manifest
from cache.manifest import ManifestRecord
from pipeline.config import TrainConfig
from pipeline.data.datasets import CachedImageDataset
from pipeline.demo.demo_set import demo_items
from pipeline.demo.server import seed_objects
from pipeline.train.loop import train
from pipeline.train.outputs import METRIC_COLUMNS
from tests.helpers import run_cli

N = 48


def make_cache(root, n=N, *, prefix="shapes/", bucket="demo"):
    """A cache with ``n`` small demo PNG blobs and their manifest; returns the manifest path."""
    store = BlobStore(CacheLayout(root=root))
    recs = []
    for key, data in demo_items(n, prefix=prefix):
        sha, _ = store.put_bytes(data)
        recs.append(ManifestRecord(key=key, sha256=sha, size=len(data), etag="", last_modified="", label=int(key[-5])))
    return write_manifest(CacheLayout(root=root), endpoint="test", bucket=bucket, prefix=prefix, records=recs)


@pytest.fixture
def manifest(cache_dir):
    return make_cache(cache_dir)


def _cfg(cache_dir, out, **kw):
    base = dict(epochs=2, batch=16, workers=0, cache_dir=str(cache_dir), out=str(out), progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_cached_dataset_reads_decodes_and_labels(manifest, cache_dir):
    ds = CachedImageDataset(manifest, cache_dir=cache_dir)
    assert len(ds) == N
    x, y = ds[7]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y == 7
    from pipeline.demo.demo_set import demo_image

    expected = torch.from_numpy(np.asarray(demo_image(7))).permute(2, 0, 1).float() / 255
    assert torch.allclose(x, expected)
    # No per-sample Python objects: the dataset holds numpy arrays only.
    assert isinstance(ds.manifest.sha256, np.ndarray) and ds.manifest.sha256.shape == (N, 32)


def test_missing_blob_error_names_key_and_fix(manifest, cache_dir):
    ds = CachedImageDataset(manifest, cache_dir=cache_dir)
    path = ds.blob_path(5)
    import os

    os.unlink(path)
    with pytest.raises(FileNotFoundError) as e:
        CachedImageDataset(manifest, cache_dir=cache_dir)
    msg = str(e.value)
    assert "1 of 48 image blobs" in msg and "shapes/img-000005_5.png" in msg
    assert f"make fetch PREFIX=s3://demo/shapes/ CACHE_DIR={cache_dir}" in msg
    assert f"make verify REPAIR=1 CACHE_DIR={cache_dir}" in msg


def test_missing_manifest_is_one_line_with_fix(tmp_path):
    proc = run_cli("train_vae.py", "--cache-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), module="")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    # Every suggested command carries the user's CACHE_DIR, ready to paste.
    assert f"run `make fetch CACHE_DIR={tmp_path / 'empty'}`" in proc.stderr
    assert f"`tess fetch --cache-dir {tmp_path / 'empty'}`" in proc.stderr


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"epochs": 0}, "epochs=0 must be >= 1"),
        ({"batch": 0}, "batch=0 must be >= 1"),
        ({"source": "ftp"}, "source='ftp' must be one of cache, s3"),
        ({"device": "tpu"}, "device='tpu' must be auto"),
        ({"image_size": 30}, "power of two"),
    ],
)
def test_train_config_rejects(tmp_path, kwargs, fragment):
    with pytest.raises(ValueError) as e:
        _cfg(tmp_path, tmp_path, **kwargs)
    assert fragment in str(e.value)


@pytest.mark.parametrize("pack", ["on", "off"])
def test_training_writes_outputs(manifest, cache_dir, tmp_path, pack):
    out = tmp_path / "out"
    summary = train(_cfg(cache_dir, out, pack=pack))
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0].keys()) == METRIC_COLUMNS
    assert len(rows) == 2 * 3 and [int(r["iteration"]) for r in rows] == list(range(6))
    for r in rows:
        assert abs(float(r["batch_time"]) - float(r["dataloading_time"]) - float(r["training_time"])) < 1e-5
    from pipeline.train.plots import GRID_PAD  # sizes follow the documented formula

    sizes = {name: Image.open(out / name).size for name in ("reconstructions.png", "samples.png", "loss.png")}
    assert sizes["loss.png"] == (800, 450)
    assert sizes["reconstructions.png"] == (8 * 32 * 4 + 9 * GRID_PAD, 2 * 32 * 4 + 3 * GRID_PAD)
    assert sizes["samples.png"] == (8 * 32 * 4 + 9 * GRID_PAD, 8 * 32 * 4 + 9 * GRID_PAD)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["images"] == 2 * N == summary.images and 0 <= saved["data_wait_share"] <= 1
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["epoch"] == 2 and ckpt["manifest_digest"] == saved["data_digest"]


def test_resume_continues_the_exact_loss_sequence(manifest, cache_dir, tmp_path):
    whole = tmp_path / "whole"
    train(_cfg(cache_dir, whole, epochs=3))
    split = tmp_path / "split"
    train(_cfg(cache_dir, split, epochs=1))
    train(_cfg(cache_dir, split, epochs=3, resume=True))

    def losses(out):
        with open(out / "metrics.csv", newline="") as f:
            return [(int(r["iteration"]), r["loss"]) for r in csv.DictReader(f)]

    assert len(losses(whole)) == 9
    assert losses(split) == losses(whole)


def test_resume_refuses_checkpoint_of_another_manifest(manifest, cache_dir, tmp_path):
    out = tmp_path / "out"
    train(_cfg(cache_dir, out, epochs=1))
    other = make_cache(cache_dir, 32, prefix="other/")
    with pytest.raises(ValueError) as e:
        train(_cfg(cache_dir, out, epochs=2, resume=True, manifest=str(other)))
    assert "pass --force-resume" in str(e.value)
    s = train(_cfg(cache_dir, out, epochs=2, resume=True, manifest=str(other), force_resume=True))
    assert s.epochs_run == 1


def test_corrupt_blob_stops_with_key_or_is_skipped(manifest, cache_dir, tmp_path):
    ds = CachedImageDataset(manifest, cache_dir=cache_dir)
    with open(ds.blob_path(9), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError) as e:
        train(_cfg(cache_dir, tmp_path / "a", pack="off"))
    assert "shapes/img-000009_9.png" in str(e.value) and "verify --repair" in str(e.value)
    with pytest.raises(ValueError) as e:
        train(_cfg(cache_dir, tmp_path / "b", pack="on"))
    assert "shapes/img-000009_9.png" in str(e.value)
    for pack in ("off", "on"):
        s = train(_cfg(cache_dir, tmp_path / f"skip-{pack}", pack=pack, on_bad_sample="skip", epochs=1))
        assert s.bad_samples_skipped == 1 and s.images == N - 1


def test_train_streams_from_s3(s3_server, bucket, tmp_path):
    seed_objects(bucket, demo_items(40, prefix="stream/"))
    out = tmp_path / "s3run"
    s = train(
        TrainConfig(
            epochs=1,
            batch=8,
            workers=2,
            clients=2,
            source="s3",
            prefix=f"s3://{bucket}/stream/",
            endpoint=s3_server.endpoint,
            out=str(out),
            progress=False,
            cache_dir=str(tmp_path / "nocache"),
        )
    )
    assert s.images == 40 and s.source == "s3" and s.iterations == 5
    assert (out / "reconstructions.png").is_file()
    assert not (tmp_path / "nocache").exists()  # streaming never touches the cache
