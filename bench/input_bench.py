"""Benchmark 1c of issue 5 and point 6 of issue 3: images/s of the input pipeline alone (no model).

Over the demo manifest fetched into a cache, at ``-w 0, 1, 2`` and batch 16, each loader is iterated
for one full pass and every batch is touched (summed); images/s is counted from the first batch on
(worker start-up and the first batch's latency are reported separately):

* ``tess cache (decoded pack)``: ``pipeline.train.sources.build_source`` as training uses it (the default).
* ``tess cache (--pack off)``: ``CachedImageDataset`` decoding each blob.
* ``ImageFolder + ToTensor``: torchvision over the same images exported as PNG files in class folders.
* ``in-memory TensorDataset``: the decoded images as one float tensor (the upper bound).
* ``S3 streaming DSSDataset(load2memory=True)``: ``--source s3`` against moto's server.

The tess loaders use the DataLoader settings of ``pipeline.train.loop`` (batch sampler, persistent
workers, prefetch 4); the baselines use what a user would write (``DataLoader(ds, 16, shuffle=True,
num_workers=w)``). A second table times the decoder choice per image (PIL vs
``torchvision.io.decode_image``).

Usage: python bench/input_bench.py [--n 5000] [--repeats 3] [--workers 0,1,2] [--variants ...]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from bench.common import (  # noqa: E402
    BenchServer,
    add_common_args,
    demo_server,
    interleave,
    log,
    median,
    work_dir,
    write_table,
)

warnings.filterwarnings("ignore", category=DeprecationWarning)
# PIL's np.asarray is read-only; the decode table converts it without writing to it.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
BATCH = 16
VARIANTS = {
    "pack": "tess cache (decoded pack, default)",
    "blobs": "tess cache (--pack off)",
    "imagefolder": "ImageFolder + ToTensor (PNG files)",
    "memory": "in-memory TensorDataset (upper bound)",
    "s3": "S3 streaming DSSDataset(load2memory=True)",
}


# -- the data: cache, ImageFolder export, in-memory tensor ---------------------------------------------------


def fetch_demo(server: BenchServer, cache_dir: Path) -> Path:
    """Fetch the demo prefix into ``cache_dir`` with tess (default settings); return the manifest path."""
    from pipeline.config import ClientOptions
    from pipeline.fetch.stage import FetchConfig, fetch

    os.environ.update({k: v for k, v in server.env().items() if k.startswith("AWS_")})
    t0 = time.perf_counter()
    result = fetch(
        FetchConfig(
            prefix=server.prefix, options=ClientOptions(endpoint=server.endpoint), cache_dir=cache_dir, progress=False
        )
    )
    log(f"fetched the demo set into {cache_dir} in {time.perf_counter() - t0:.1f} s: {result.summary.line()}")
    assert result.manifest is not None
    return result.manifest


def export_image_folder(manifest_path: Path, cache_dir: Path, root: Path) -> Path:
    """Copy every blob of the manifest to ``root/<class>/<file name>`` (torchvision's ImageFolder layout)."""
    from cache.manifest import load_manifest
    from pipeline.data.datasets import CachedImageDataset
    from pipeline.demo.demo_set import CLASS_NAMES

    ds = CachedImageDataset(load_manifest(manifest_path), cache_dir=cache_dir)
    for i in range(len(ds)):
        label = int(ds.manifest.label[i])
        folder = root / (CLASS_NAMES[label] if 0 <= label < len(CLASS_NAMES) else f"class{label}")
        folder.mkdir(parents=True, exist_ok=True)
        name = ds.manifest.keys[i].rsplit("/", 1)[-1]
        with open(ds.blob_path(i), "rb") as src, open(folder / name, "wb") as dst:
            dst.write(src.read())
    return root


def in_memory(manifest_path: Path, cache_dir: Path) -> TensorDataset:
    """All images decoded into one float32 (N, 3, 32, 32) tensor plus labels."""
    from cache.manifest import load_manifest
    from pipeline.data.datasets import CachedImageDataset

    ds = CachedImageDataset(load_manifest(manifest_path), cache_dir=cache_dir)
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    return TensorDataset(xs, torch.from_numpy(np.asarray(ds.manifest.label)))


# -- loaders ----------------------------------------------------------------------------------------------


def train_like_loader(source: object, workers: int) -> DataLoader:
    """The DataLoader ``pipeline.train.loop`` builds around a ``DataSource`` (batch sampler, persistent workers)."""
    from pipeline.data.batches import EpochBatchSampler

    return DataLoader(
        source.batches,
        sampler=EpochBatchSampler(source.indices, batch=BATCH, seed=0),
        batch_size=None,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
    )


def tess_source(
    cache_dir: Path, manifest: Path, *, pack: str, source: str = "cache", server: BenchServer | None = None
):
    """``pipeline.train.sources.build_source`` for the cache (pack on/off) or for S3 streaming."""
    from pipeline.config import TrainConfig
    from pipeline.train.distributed import DistState
    from pipeline.train.sources import build_source

    config = TrainConfig(
        cache_dir=str(cache_dir),
        manifest=str(manifest),
        pack=pack,
        source=source,
        progress=False,
        prefix=server.prefix if server else None,
        endpoint=server.endpoint if server else None,
    )
    return build_source(config, DistState())


def make_loader_factory(
    key: str, cache_dir: Path, manifest: Path, image_root: Path, memory: TensorDataset, server: BenchServer
) -> Callable[[int], DataLoader]:
    """A function ``workers -> DataLoader`` for variant ``key``."""
    if key == "pack":
        return lambda w: train_like_loader(tess_source(cache_dir, manifest, pack="on"), w)
    if key == "blobs":
        return lambda w: train_like_loader(tess_source(cache_dir, manifest, pack="off"), w)
    if key == "s3":
        return lambda w: train_like_loader(tess_source(cache_dir, manifest, pack="off", source="s3", server=server), w)
    if key == "imagefolder":
        from torchvision import datasets, transforms

        return lambda w: DataLoader(
            datasets.ImageFolder(str(image_root), transform=transforms.ToTensor()),
            batch_size=BATCH,
            shuffle=True,
            num_workers=w,
        )
    if key == "memory":
        return lambda w: DataLoader(memory, batch_size=BATCH, shuffle=True, num_workers=w)
    raise ValueError(f"unknown variant {key!r}; use one of {', '.join(VARIANTS)}")


def time_pass(loader: Iterable) -> dict[str, float]:
    """One pass: images/s from the first batch on, the first batch's latency, images seen."""
    t0 = time.perf_counter()
    it = iter(loader)
    first = next(it)
    t_first = time.perf_counter()
    checksum = float(first[0].sum())
    n = 0
    for batch in it:
        checksum += float(batch[0].sum())  # touch every batch
        n += len(batch[0])
    t_end = time.perf_counter()
    del it
    return {
        "images_per_s": n / max(t_end - t_first, 1e-9),
        "first_batch_s": t_first - t0,
        "images": n + len(first[0]),
        "wall_s": t_end - t0,
        "checksum": checksum,
    }


# -- decoder choice -------------------------------------------------------------------------------------------


def decode_bench(manifest: Path, cache_dir: Path, repeats: int, count: int = 2000) -> list[dict[str, object]]:
    """Microseconds per image for each way of turning a cached PNG into a float tensor."""
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_image, read_file
    from torchvision.transforms import functional as TF

    from cache.manifest import load_manifest
    from pipeline.data.datasets import CachedImageDataset

    ds = CachedImageDataset(load_manifest(manifest), cache_dir=cache_dir)
    idx = list(range(min(count, len(ds))))
    paths = [ds.blob_path(i) for i in idx]
    blobs = [Path(p).read_bytes() for p in paths]
    ways: dict[str, Callable[[], None]] = {
        "PIL open+convert+ToTensor (bytes)": lambda: [
            TF.to_tensor(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs
        ],
        "PIL + np.asarray -> uint8 tensor (bytes)": lambda: [
            torch.from_numpy(np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))).permute(2, 0, 1) for b in blobs
        ],
        "torchvision.io.decode_image (bytes)": lambda: [
            decode_image(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.RGB) for b in blobs
        ],
        "PIL from file + ToTensor": lambda: [TF.to_tensor(Image.open(p).convert("RGB")) for p in paths],
        "read_file + decode_image (file)": lambda: [decode_image(read_file(p), mode=ImageReadMode.RGB) for p in paths],
        "CachedImageDataset[i] (file, decode, to float)": lambda: [ds[i] for i in idx],
    }
    times: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(repeats):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) / len(idx) * 1e6)
    return [{"decoder": k, "us/image": median(v), "runs": len(v), "images": len(idx)} for k, v in times.items()]


# -- main -------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--workers", default="0,1,2", help="DataLoader worker counts (default 0,1,2)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads of the measuring process (default 1; 0 = torch's default)",
    )
    args = parser.parse_args()
    if args.threads:
        # With one thread per core, a core busy with another process stalls every parallel op of the
        # main process (10x swings measured here); workers already run with one thread each.
        torch.set_num_threads(args.threads)
    workers = [int(w) for w in args.workers.split(",")]
    keys = [k for k in args.variants.split(",") if k]
    with work_dir(args.work_dir, "input") as scratch, demo_server(args.n) as server:
        cache_dir = scratch / "cache"
        manifest = fetch_demo(server, cache_dir)
        image_root = export_image_folder(manifest, cache_dir, scratch / "imagefolder")
        memory = in_memory(manifest, cache_dir)
        t0 = time.perf_counter()
        tess_source(cache_dir, manifest, pack="on")  # builds the decoded pack once, as the first training run would
        pack_build_s = time.perf_counter() - t0
        factories = {k: make_loader_factory(k, cache_dir, manifest, image_root, memory, server) for k in keys}
        combos = [f"{k}@{w}" for w in workers for k in keys]

        def one(combo: str, round_: int) -> dict[str, float]:
            key, w = combo.split("@")
            res = time_pass(factories[key](int(w)))
            log(f"  {combo}: {res['images_per_s']:.0f} images/s (first batch {res['first_batch_s']:.2f} s)")
            return res

        results = interleave(combos, args.repeats, one)
        rows = table_rows(results, keys, workers)
        write_table(
            f"input_n{args.n}",
            f"Input pipeline alone, N = {args.n}, batch {BATCH} (1c, issue 3 point 6)",
            rows,
            (
                "loader",
                "workers",
                "images/s",
                "x ImageFolder",
                "x in-memory",
                "first batch s",
                "runs",
                "images/s (all runs)",
            ),
            [
                f"images/s counted from the first batch on, every batch touched; "
                f"medians of {args.repeats} interleaved passes",
                f"decoded pack built once before the runs in {pack_build_s:.1f} s "
                "(reused by every later epoch and run)",
                f"torch threads in the main process: {args.threads or 'default'}; DataLoader workers use 1 each",
                "tess loaders: DataLoader settings of pipeline.train.loop "
                "(batch sampler, persistent workers, prefetch 4); "
                "baselines: DataLoader(ds, 16, shuffle=True, num_workers=w)",
            ],
        )
        write_table(
            f"decode_n{args.n}",
            "Decoder choice: microseconds per image (32x32 PNG)",
            decode_bench(manifest, cache_dir, args.repeats),
            ("decoder", "us/image", "images", "runs"),
            [
                f"median of {args.repeats} passes over the same images "
                "(bytes already in memory, or files in the page cache)",
                "CachedImageDataset[i] uses the decoder pipeline.data.datasets.decode_rgb uses at the time of the run",
            ],
        )


def table_rows(
    results: dict[str, list[dict[str, float]]], keys: list[str], workers: list[int]
) -> list[dict[str, object]]:
    """Median images/s per (variant, workers) with ratios against ImageFolder and in-memory at the same -w."""
    med = {combo: median([r["images_per_s"] for r in runs]) for combo, runs in results.items()}
    rows = []
    for w in workers:
        for k in keys:
            runs = results[f"{k}@{w}"]
            ips = med[f"{k}@{w}"]
            rows.append(
                {
                    "loader": VARIANTS[k],
                    "workers": w,
                    "images/s": ips,
                    "x ImageFolder": ips / med[f"imagefolder@{w}"] if f"imagefolder@{w}" in med else float("nan"),
                    "x in-memory": ips / med[f"memory@{w}"] if f"memory@{w}" in med else float("nan"),
                    "first batch s": median([r["first_batch_s"] for r in runs]),
                    "runs": len(runs),
                    "images/s (all runs)": " / ".join(f"{r['images_per_s']:.0f}" for r in runs),
                }
            )
    return rows


if __name__ == "__main__":
    main()
