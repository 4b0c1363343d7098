"""DDP training as users launch it: ``torchrun --standalone --nproc_per_node=2 train_vae.py`` on CPU (gloo).

How "identical parameters on both ranks" is checked: at the end of training every rank hashes its
model's state dict (:func:`pipeline.train.distributed.state_digest`), the digests are all-gathered and rank 0
writes them to ``summary.json`` as ``param_sha256_by_rank``; the test compares rank 1's digest with
the digest of the model in rank 0's ``checkpoint.pt``, which the test recomputes itself. No test-only
switch is involved: the same check runs (and is reported) in every DDP run.

Every launch runs under a deadline: a rank that hangs in a collective fails the test instead of
blocking it, and the whole torchrun tree is stopped.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cache import BlobStore, CacheLayout, load_manifest, write_manifest
from cache.manifest import ManifestRecord
from cache.shard import ShardSpec, in_shard
from pipeline.config import TrainConfig
from pipeline.data.batches import EpochBatchSampler
from pipeline.demo.demo_set import demo_items
from pipeline.train.distributed import DistState, RankPlan, RankShare, check_shard_cover, plan_ranks, state_digest
from pipeline.train.model import VAE, VAEConfig
from pipeline.train.sources import DataSource, cache_layout, find_manifest
from tests.helpers import ROOT

DEADLINE_S = 240  # generous for a loaded 2-core machine; a hang is the only way to reach it


def make_cache(root: Path, n: int, *, shard: ShardSpec | None = None, prefix: str = "shapes/") -> Path:
    """A cache with ``n`` demo PNGs (or the keys of ``shard`` among them) and their manifest."""
    store = BlobStore(CacheLayout(root=root))
    recs = []
    for key, data in demo_items(n, prefix=prefix):
        if shard is not None and not in_shard(key, shard):
            continue
        sha, _ = store.put_bytes(data)
        recs.append(ManifestRecord(key=key, sha256=sha, size=len(data), etag="", last_modified="", label=int(key[-5])))
    return write_manifest(
        CacheLayout(root=root),
        endpoint="test",
        bucket="demo",
        prefix=prefix,
        records=recs,
        extra={"shard": str(shard)} if shard else None,
    )


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


# Stands in for N nodes with node-local caches on one machine: rank R trains from the R-th folder
# of TEST_NODE_CACHES (what --cache-dir on node R would name).
NODE_LAUNCHER = f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
import train_vae
caches = os.environ["TEST_NODE_CACHES"].split(os.pathsep)
sys.exit(train_vae.main([*sys.argv[1:], "--cache-dir", caches[int(os.environ["RANK"])]]))
"""


def torchrun(
    *args: str, nproc: int = 2, node_caches: list[Path] | None = None, tmp_path: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node=N train_vae.py ARGS`` with a deadline.

    With ``node_caches``, each rank gets its own cache folder (see ``NODE_LAUNCHER``).
    """
    script, extra_env = "train_vae.py", {}
    if node_caches is not None:
        assert tmp_path is not None
        script = str(tmp_path / "node_launcher.py")
        Path(script).write_text(NODE_LAUNCHER)
        extra_env["TEST_NODE_CACHES"] = os.pathsep.join(map(str, node_caches))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        script,
        "--no-progress",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra_env}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        # torchrun starts each worker in its own session: stop the agent (which stops its workers),
        # then kill whatever is left.
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        pytest.fail(f"torchrun did not finish in {DEADLINE_S} s (a rank hung):\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_two_ranks_train_to_identical_parameters(tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    make_cache(cache, 48)
    proc = torchrun("-e", "2", "-b", "8", "--cache-dir", str(cache), "--out", str(out), "--seed", "5")
    assert proc.returncode == 0, proc.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["data_shards"] == []
    # Each epoch's 48 images are split between the ranks: 24 each, 3 batches of 8, for 2 epochs.
    assert summary["images_by_rank"] == [48, 48] and summary["images"] == 96
    assert summary["images_per_s"] == pytest.approx(96 / summary["training_cost_s"], rel=0.01)

    digests = summary["param_sha256_by_rank"]
    assert summary["params_identical"] and len(digests) == 2 and digests[0] == digests[1]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    vae = VAE(VAEConfig.from_dict(ckpt["vae_config"]))
    vae.load_state_dict(ckpt["model"])
    assert state_digest(vae) == digests[1]  # rank 1's final model is exactly rank 0's checkpoint
    torch.manual_seed(5)
    assert state_digest(VAE(VAEConfig())) != digests[1]  # and training changed it

    # Metrics per rank; the ranks saw different images, so their losses differ.
    r0, r1 = _rows(out / "metrics.csv"), _rows(out / "metrics.rank1.csv")
    assert len(r0) == len(r1) == 6
    assert [r["loss"] for r in r0] != [r["loss"] for r in r1]
    # Only rank 0 writes the checkpoint, pictures and summary, and prints the report.
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "checkpoint.pt",
            "loss.png",
            "metrics.csv",
            "metrics.rank1.csv",
            "reconstructions.png",
            "samples.png",
            "summary.json",
        ]
    )
    assert proc.stdout.count("trained on ") == 1 and "parameters identical on all ranks" in proc.stdout


def test_node_local_shards_each_rank_samples_its_own(tmp_path):
    # Two "nodes" with node-local caches; the rendezvous numbered them the other way round (rank 0 on
    # the node that fetched shard 1/2), as torchrun's c10d rendezvous may.
    node0, node1, out = tmp_path / "node0", tmp_path / "node1", tmp_path / "out"
    sizes = [
        len(make_cache(c, 60, shard=ShardSpec(k, 2)).read_text().splitlines()) - 1 for k, c in enumerate((node0, node1))
    ]
    assert sizes[0] != sizes[1] and sum(sizes) == 60  # uneven shards: the case that would hang without padding
    proc = torchrun("-e", "2", "-b", "8", "--out", str(out), node_caches=[node1, node0], tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data_shards"] == ["1/2", "0/2"] and summary["params_identical"]
    # Both ranks take max(shard size) samples per epoch (the smaller shard wraps around).
    assert summary["images_by_rank"] == [2 * max(sizes)] * 2
    assert len(_rows(out / "metrics.csv")) == len(_rows(out / "metrics.rank1.csv"))


def test_missing_shard_fails_on_every_rank_without_hanging(tmp_path):
    node0, node1, out = tmp_path / "node0", tmp_path / "node1", tmp_path / "out"
    make_cache(node0, 30, shard=ShardSpec(0, 2))  # node 1 never ran its fetch
    proc = torchrun("-e", "1", "--out", str(out), node_caches=[node0, node1], tmp_path=tmp_path)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("tess: error:")]
    assert len(errors) == 2, proc.stderr[-3000:]
    (on0,) = [e for e in errors if e.endswith("(rank 0)")]
    (on1,) = [e for e in errors if e.endswith("(rank 1)")]
    # The hint names this node's own cache folder, ready to paste.
    assert on1.startswith(f"tess: error: no manifest in {node1 / 'manifests'}; run `make fetch CACHE_DIR={node1}`")
    assert on0.startswith(f"tess: error: rank 1 stopped: no manifest in {node1 / 'manifests'}")
    assert not (out / "checkpoint.pt").exists()


def test_skipped_bad_samples_leave_ranks_uneven_without_hanging(tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    m = load_manifest(make_cache(cache, 24))
    for i in (1, 2, 3, 5, 8):  # undecodable blobs: with -b 1 each is a whole batch a rank must skip
        CacheLayout(root=cache).blob_path(m.sha_hex(i)).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    proc = torchrun(
        "-e", "1", "-b", "1", "--pack", "off", "--on-bad-sample", "skip", "--cache-dir", str(cache), "--out", str(out)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bad_samples_skipped"] == 5 and summary["images"] == 19 and summary["params_identical"]
    assert summary["images_by_rank"][0] != summary["images_by_rank"][1]  # 5 bad of 2 x 12: uneven by parity


def test_rank_picks_its_shard_from_a_shared_cache(tmp_path):
    cache = tmp_path / "cache"
    for k in range(2):
        make_cache(cache, 20, shard=ShardSpec(k, 2))
    cfg = TrainConfig(cache_dir=str(cache), out=str(tmp_path / "o"))
    layout = cache_layout(cfg)
    pick = {
        r: load_manifest(find_manifest(cfg, layout, DistState(rank=r, world=2, local_world=2))).header.shard
        for r in (0, 1)
    }
    assert pick == {0: ShardSpec(0, 2), 1: ShardSpec(1, 2)}
    # Four ranks on two nodes: shard k/2 belongs to ranks 2k and 2k+1.
    assert load_manifest(
        find_manifest(cfg, layout, DistState(rank=3, world=4, local_rank=1, local_world=2))
    ).header.shard == ShardSpec(1, 2)
    # Shards of another count and none of them this rank's: say which fetch to run.
    other = tmp_path / "other"
    for k in range(2):
        make_cache(other, 20, shard=ShardSpec(k, 3))
    other_cfg = TrainConfig(cache_dir=str(other), out=str(tmp_path / "o"))
    with pytest.raises(FileNotFoundError) as e:
        find_manifest(
            other_cfg, cache_layout(other_cfg), DistState(rank=1, world=2, local_world=1)
        )  # two nodes: one shard per node
    assert "holds shards 0/3, 1/3 of s3://demo/shapes/, none for rank 1 of 2" in str(e.value)
    assert f"run `make fetch PREFIX=s3://demo/shapes/ SHARD=1/2 CACHE_DIR={other}` (or " in str(e.value)
    assert str(e.value).endswith("--shard 1/2 --cache-dir " + str(other) + "`) on this node or pass --manifest")
    with pytest.raises(FileNotFoundError) as e:
        find_manifest(
            other_cfg, cache_layout(other_cfg), DistState(rank=1, world=2, local_world=2)
        )  # one node: fetch it whole
    assert f"run `make fetch PREFIX=s3://demo/shapes/ CACHE_DIR={other}` (or " in str(e.value)
    assert "(the full prefix)" in str(e.value) and "SHARD=" not in str(e.value)
    # A full manifest, when present, wins: every rank samples it through DistributedSampler.
    make_cache(cache, 20)
    assert load_manifest(find_manifest(cfg, layout, DistState(rank=1, world=2, local_world=2))).header.shard is None


def test_shard_cover_check_names_the_missing_shard():
    def shares(*shards: ShardSpec, uri: str = "") -> list[RankShare]:
        return [RankShare(digest="d", shard=s, samples=1, description="", uri=uri) for s in shards]

    with pytest.raises(ValueError) as e:
        check_shard_cover(shares(ShardSpec(0, 3), ShardSpec(2, 3), ShardSpec(0, 3), uri="s3://b/p/"))
    assert str(e.value) == (
        "no rank holds shard 1/3 of s3://b/p/ (0/3 on rank(s) 0, 2; 2/3 on rank(s) 1); "
        "run `make fetch PREFIX=s3://b/p/ SHARD=1/3` (or `tess fetch s3://b/p/ --shard 1/3`) "
        "on the node that lacks it"
    )
    with pytest.raises(ValueError, match="different counts"):
        check_shard_cover(shares(ShardSpec(0, 2), ShardSpec(1, 3)))
    check_shard_cover(shares(ShardSpec(1, 2), ShardSpec(0, 2)))  # complete: no error


def _source(n: int, digest: str, shard: ShardSpec | None = None) -> DataSource:
    return DataSource(batches=None, indices=np.arange(n), digest=digest, description=f"{digest} ({n})", shard=shard)


def test_sampler_splits_an_epoch_and_pads_short_shards():
    # Full manifest over 3 ranks: the ranks' batches partition the epoch (DistributedSampler pads 10 -> 12).
    idx = np.arange(100, 110)
    orders = []
    for r in range(3):
        s = EpochBatchSampler(idx, batch=2, seed=1, split=(r, 3), num_samples=4)
        s.set_epoch(3)
        orders.append([i for b in s for i in b])
        assert len(s) == 2
    flat = sum(orders, [])
    assert len(flat) == 12 and set(flat) == set(idx.tolist())
    # A shard of 5 on a rank that must take 7 samples wraps its own order; epochs reshuffle.
    s = EpochBatchSampler(np.arange(5), batch=3, seed=1, split=(0, 1), num_samples=7)
    epoch0 = [i for b in s for i in b]
    s.set_epoch(1)
    epoch1 = [i for b in s for i in b]
    assert len(epoch0) == 7 and sorted(epoch0[:5]) == list(range(5)) and epoch0[5:] == epoch0[:2]
    assert epoch1 != epoch0 and len(s) == 3


def test_plan_without_ddp_is_the_single_process_plan():
    plan = plan_ranks(_source(7, "abc", ShardSpec(1, 2)).share(), DistState())
    assert plan == RankPlan(split=None, num_samples=None, digest="abc", shards=["1/2"])
    with pytest.raises(ValueError, match="no usable samples"):
        plan_ranks(_source(0, "abc").share(), DistState())
