"""Scale, part ``manifest`` of :mod:`bench.scale_bench` (issue 5's 1e): a synthetic manifest of ``--records``
records (no blobs) written with ``cache.manifest.write_manifest`` and loaded with ``load_manifest`` (both times,
the bytes of the loaded arrays, the resident-memory growth of this process), then the DataLoader workers'
memory over ``--samples`` samples (RSS and the private part, where copy-on-read would show). Target: under 50
MB growth per worker. Tables ``scale_manifest_<records>`` and ``scale_workers_<records>``.
"""

from __future__ import annotations

import argparse
import functools
import gc
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from bench.common import log, proc_memory_mb, write_table
from cache.layout import CacheLayout
from cache.manifest import ManifestRecord, load_manifest, write_manifest
from pipeline.data.datasets import CachedImageDataset

TARGET_GROWTH_MB = 50.0  # per worker


def synthetic_records(n: int) -> Iterator[ManifestRecord]:
    """``n`` demo-like records with distinct keys, SHA-256s and MD5 ETags (no blobs behind them)."""
    for i in range(n):
        digest = hashlib.sha256(i.to_bytes(8, "little")).hexdigest()
        yield ManifestRecord(
            key=f"scale/train/img-{i:07d}_{i % 10}.png",
            sha256=digest,
            size=2000 + i % 1000,
            etag=f'"{digest[:32]}"',
            last_modified="2024-01-01T00:00:00.000+00:00",
            label=i % 10,
        )


class LookupOnly(CachedImageDataset):
    """The per-sample lookup of training (blob path from the SHA-256 array, label) without file I/O."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path = self.blob_path(i)
        if not path:
            raise AssertionError("empty blob path")
        return torch.zeros(3, 32, 32), int(self.manifest.label[i])


def record_worker(folder: str, worker_id: int) -> None:
    """worker_init_fn: leave this worker's pid and its memory at start in ``folder``."""
    mem = proc_memory_mb(os.getpid())
    Path(folder, f"worker{worker_id}").write_text(f"{os.getpid()} {mem['rss']} {mem['private']}\n")


def rss_now() -> float:
    gc.collect()
    return proc_memory_mb(os.getpid())["rss"]


def manifest_figures(layout: CacheLayout, n: int) -> tuple[Path, list[dict[str, object]]]:
    """Generate, write and load the manifest; return its path and the table rows."""
    t0 = time.perf_counter()
    for _ in synthetic_records(n):
        pass
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    path = write_manifest(
        layout, endpoint="http://127.0.0.1:9", bucket="scale", prefix="scale/train/", records=synthetic_records(n)
    )
    write_s = time.perf_counter() - t0
    log(f"wrote {n} records ({path.stat().st_size / 1e6:.0f} MB) in {write_s:.1f} s")
    rss0 = rss_now()
    t0 = time.perf_counter()
    manifest = load_manifest(path)
    load_s = time.perf_counter() - t0
    rss1 = rss_now()
    t0 = time.perf_counter()
    ds = LookupOnly(manifest, cache_dir=layout.root, check_blobs=False)
    build_s = time.perf_counter() - t0
    rss2 = rss_now()
    rows = [
        {"what": "records", "value": n, "unit": ""},
        {"what": "manifest file size", "value": path.stat().st_size / 1e6, "unit": "MB"},
        {"what": "write_manifest (record generation excluded)", "value": write_s - gen_s, "unit": "s"},
        {"what": "write_manifest incl. generating the records", "value": write_s, "unit": "s"},
        {"what": "load_manifest", "value": load_s, "unit": "s"},
        {"what": "ManifestArrays.nbytes", "value": manifest.nbytes / 1e6, "unit": "MB"},
        {"what": "RSS growth of load_manifest (after gc)", "value": rss1 - rss0, "unit": "MB"},
        {"what": "CachedImageDataset(check_blobs=False) construction", "value": build_s, "unit": "s"},
        {"what": "RSS growth of the dataset construction", "value": rss2 - rss1, "unit": "MB"},
        {"what": "bytes per record, loaded arrays", "value": manifest.nbytes / n, "unit": "B"},
    ]
    del ds, manifest
    return path, rows


def worker_growth(
    path: Path, layout: CacheLayout, samples: int, workers: int, scratch: Path
) -> list[dict[str, object]]:
    """Read ``samples`` shuffled samples with ``workers`` workers; memory of each worker at start and end."""
    from pipeline.data.batches import EpochBatchSampler, SampleBatches

    ds = LookupOnly(load_manifest(path), cache_dir=layout.root, check_blobs=False)
    indices = np.sort(np.random.default_rng(0).choice(len(ds), size=samples, replace=False))
    pid_dir = scratch / "workers"
    pid_dir.mkdir(exist_ok=True)
    loader = DataLoader(
        SampleBatches(ds, skip_bad=False),
        sampler=EpochBatchSampler(indices, batch=16, seed=0),
        batch_size=None,
        num_workers=workers,
        persistent_workers=True,
        prefetch_factor=4,
        worker_init_fn=functools.partial(record_worker, str(pid_dir)),
    )
    it = iter(loader)
    seen = len(next(it)[0])
    deadline = time.monotonic() + 120  # the first batch can come before every worker has run its init
    while not all((pid_dir / f"worker{wid}").is_file() for wid in range(workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    info = [(wid, *map(float, (pid_dir / f"worker{wid}").read_text().split())) for wid in range(workers)]
    first = {wid: proc_memory_mb(int(pid)) for wid, pid, _, _ in info}
    main_first = proc_memory_mb(os.getpid())
    t0 = time.perf_counter()
    for batch in it:
        seen += len(batch[0])
    pass_s = time.perf_counter() - t0
    end = {wid: proc_memory_mb(int(pid)) for wid, pid, _, _ in info}  # persistent workers are still alive
    main_end = proc_memory_mb(os.getpid())
    del it, loader
    log(f"read {seen} samples with -w {workers} in {pass_s:.1f} s")
    rows = []
    for wid, _pid, init_rss, init_private in info:
        a, b = first[wid], end[wid]
        growth = max(b["rss"] - a["rss"], b["private"] - a["private"])
        rows.append(
            {
                "process": f"worker {wid}",
                "RSS at init MB": init_rss,
                "RSS first batch MB": a["rss"],
                "RSS end MB": b["rss"],
                "RSS growth MB": b["rss"] - a["rss"],
                "private growth MB": b["private"] - a["private"],
                "private growth since init MB": b["private"] - init_private,
                "target": f"{'met' if growth < TARGET_GROWTH_MB else 'MISSED'} (< {TARGET_GROWTH_MB:.0f} MB)",
                "samples": seen,
                "pass s": pass_s,
            }
        )
    rows.append(
        {
            "process": "main",
            "RSS first batch MB": main_first["rss"],
            "RSS end MB": main_end["rss"],
            "RSS growth MB": main_end["rss"] - main_first["rss"],
            "private growth MB": main_end["private"] - main_first["private"],
            "samples": seen,
            "pass s": pass_s,
        }
    )
    return rows


# -- part fetch: 100,000 objects from s3rver, tess against s5cmd ---------------------------------------------


def manifest_part(args: argparse.Namespace, scratch: Path) -> None:
    """Issue 5's 1e: the manifest of ``--records`` records, and the workers' memory over ``--samples`` samples."""
    layout = CacheLayout.at(scratch / "cache").create()
    path, rows = manifest_figures(layout, args.records)
    write_table(
        f"scale_manifest_{args.records}", f"Manifest of {args.records:,} records (1e)", rows, ("what", "value", "unit")
    )
    growth = worker_growth(path, layout, min(args.samples, args.records), args.workers, scratch)
    write_table(
        f"scale_workers_{args.records}",
        f"Worker memory over {args.samples:,} samples, -w {args.workers} (1e)",
        growth,
        (
            "process",
            "RSS at init MB",
            "RSS first batch MB",
            "RSS end MB",
            "RSS growth MB",
            "private growth MB",
            "private growth since init MB",
            "target",
            "samples",
            "pass s",
        ),
        [
            "growth = end of the pass minus after the first batch; private = Private_Clean + Private_Dirty "
            "of /proc/<pid>/smaps_rollup (USS), where copy-on-read shows",
            "the target is judged on the larger of RSS growth and private growth (workers only); the main "
            "process's private growth is the parent writing into heap pages it still shares with the forked "
            "workers (copy-on-write in the parent), with its RSS unchanged",
        ],
    )
