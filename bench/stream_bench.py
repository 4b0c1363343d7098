"""Streaming training from S3: tess's ``DSSDataset`` with and without read-ahead against s3torchconnector's
``S3MapDataset``, one VAE epoch each, on a loopback s3rver.

The set is :func:`bench.mirror_sets.small_set` (N random-noise PNGs of about 2.4 KB on a fresh s3rver).
Each run is a child process that builds its dataset (listing included, before the clock starts), then
times one epoch of the same loop: ``DataLoader`` with W workers, batch B, ``prefetch_factor=4``; per batch,
the wait for it, then one VAE step (``pipeline.train.model``, 32 px, one torch thread; ``--no-train``: none, the
input pipeline alone). Every image is decoded
the same way in every variant: ``pipeline.data.images.decode_rgb`` (Pillow), then ``DefaultTransform(32)``.

* ``tess read-ahead``: ``DataLoader(ds, batch_sampler=ds.sampler(batch_size=B))`` (a batch's GETs
  concurrent on the worker's event loop, its next ``--prefetch`` batches in flight);
* ``tess, prefetch 0``: the same, each batch's GETs only;
* ``S3MapDataset``: ``S3MapDataset.from_prefix`` in ``bench/.venv-peers`` (installed by
  :func:`bench.mirror_tools.ensure_peers`; Pillow added there), ``DataLoader(ds, batch_size=B,
  shuffle=True)``: one blocking GET per item.

Columns: images/s over the epoch wall (workers' start included), the data-wait share (time the loop
waited for its next batch / epoch wall), GETs the server counted, CPU of the run's process tree (start-up and
imports included) and of the server. The
ratio tess read-ahead / S3MapDataset is printed against the target (>= 1.5x) under the table, which goes to
``bench/results/stream_epoch.md`` (``stream_input.md`` with ``--no-train``) and ``.csv``.

Usage: .venv/bin/python bench/stream_bench.py [--n 2000] [--workers 2] [--batch 16] [--prefetch 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGET_RATIO = 1.5
VARIANTS = {
    "readahead": "tess DSSDataset, read-ahead",
    "plain": "tess DSSDataset, prefetch 0",
    "s3map": "s3torchconnector S3MapDataset",
}


# -- the child: one epoch (runs in tess's venv, or in bench/.venv-peers for S3MapDataset) ----------------------


def _s3map_loader(cfg: dict):
    from s3torchconnector import S3ClientConfig, S3MapDataset
    from torch.utils.data import DataLoader

    ds = S3MapDataset.from_prefix(
        cfg["prefix"],
        region="us-east-1",
        endpoint=cfg["endpoint"],
        transform=_S3MapItem(),
        s3client_config=S3ClientConfig(force_path_style=True),
    )
    n = len(ds)  # the listing, before the clock starts (forked workers inherit it)
    return DataLoader(
        ds,
        batch_size=cfg["batch"],
        shuffle=True,
        num_workers=cfg["workers"],
        prefetch_factor=4 if cfg["workers"] else None,
    ), n


class _S3MapItem:
    """S3MapDataset's transform: the object's bytes decoded as tess decodes them, and the key's label."""

    def __call__(self, reader):
        from pipeline.data.images import DefaultTransform, decode_rgb

        x = DefaultTransform(32)(decode_rgb(reader.read()))
        return x, int(reader.key.rsplit("_", 1)[1].split(".")[0])


def _tess_loader(cfg: dict):
    from torch.utils.data import DataLoader

    from pipeline.config import ClientOptions
    from pipeline.data.datasets import DSSDataset

    ds = DSSDataset(
        cfg["prefix"], options=ClientOptions(endpoint=cfg["endpoint"]), image_size=32, prefetch=cfg["prefetch"]
    )
    return DataLoader(
        ds,
        batch_sampler=ds.sampler(batch_size=cfg["batch"], shuffle=True, seed=0),
        num_workers=cfg["workers"],
        prefetch_factor=4 if cfg["workers"] else None,
    ), len(ds)


def child(cfg: dict) -> None:
    """One epoch: print its figures as one JSON line."""
    import torch

    from pipeline.train.model import VAE, VAEConfig

    torch.set_num_threads(1)
    torch.manual_seed(0)
    loader, n = _s3map_loader(cfg) if cfg["variant"] == "s3map" else _tess_loader(cfg)
    vae = VAE(VAEConfig(image_size=32, latent_dim=32, beta=1.0))
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    images, wait, first = 0, 0.0, None
    t_start = time.perf_counter()
    batches = iter(loader)
    while True:
        t0 = time.perf_counter()
        try:
            x, _ = next(batches)
        except StopIteration:
            break
        t1 = time.perf_counter()
        wait += t1 - t0
        first = t1 - t_start if first is None else first
        if cfg["train"]:
            parts = vae.loss(x)[1]
            parts.total.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        images += len(x)
    wall = time.perf_counter() - t_start
    print(
        json.dumps({"listed": n, "images": images, "wall_s": wall, "wait_s": wait, "first_batch_s": first}), flush=True
    )


# -- the parent ----------------------------------------------------------------------------------------------


def peers_python(notes: list[str]) -> str | None:
    """The python of bench/.venv-peers with s3torchconnector and Pillow, installed when missing."""
    from bench.mirror_tools import ensure_peers

    _, py, more = ensure_peers()
    notes.extend(more)
    if py is None:
        return None
    if subprocess.run([py, "-c", "import PIL, numpy, s3torchconnector"], capture_output=True).returncode != 0:
        import PIL

        res = subprocess.run(
            [py, "-m", "pip", "install", "-q", f"Pillow=={PIL.__version__}", "numpy"], capture_output=True, text=True
        )
        if res.returncode != 0:
            notes.append(f"S3MapDataset skipped: Pillow not installed in the peers venv ({res.stderr.strip()[-200:]})")
            return None
    return py


def measure(variant: str, python: str, target, args: argparse.Namespace) -> dict:
    from bench.common import proc_cpu_seconds, run_measured

    cfg = {
        "variant": variant,
        "prefix": target.prefix,
        "endpoint": target.endpoint,
        "batch": args.batch,
        "workers": args.workers,
        "prefetch": args.prefetch if variant == "readahead" else 0,
        "train": not args.no_train,
    }
    before, server_cpu = target.counts(), proc_cpu_seconds(target.server_pid)
    res = run_measured([python, __file__, "--child", json.dumps(cfg)], env=target.env(), cwd=ROOT)
    server_cpu = proc_cpu_seconds(target.server_pid) - server_cpu
    gets = target.counts()["GET"] - before["GET"]
    out = json.loads(res.output.strip().splitlines()[-1])
    out.update(gets=gets, cpu_s=res.cpu_s, server_cpu_s=server_cpu, peak_pss_mb=res.peak_pss_mb)
    return out


def main() -> None:
    from bench.common import PYTHON, interleave, log, median, work_dir, write_table
    from bench.mirror_sets import small_set

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000, help="PNGs on the server (default 2000)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of every variant (default 2)")
    p.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    p.add_argument(
        "--prefetch", type=int, default=2, help="tess read-ahead: batches in flight ahead per worker (default 2)"
    )
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument(
        "--no-train", action="store_true", help="no VAE step: the input pipeline alone (data-wait is then ~100%%)"
    )
    p.add_argument("--work-dir", default=None, help="scratch folder (default: a temp folder, removed at the end)")
    p.add_argument("--child", default=None, help="internal: run one epoch with this JSON config")
    args = p.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    notes: list[str] = []
    variants = [v for v in args.variants.split(",") if v]
    pythons = {v: PYTHON for v in variants}
    if "s3map" in variants:
        py = peers_python(notes)
        if py is None:
            variants.remove("s3map")
        else:
            pythons["s3map"] = py
    with work_dir(args.work_dir, "stream") as scratch, small_set(args.n, scratch) as target:
        # One epoch not counted: a fresh s3rver's first pass over its files costs it about 1.5x the CPU of
        # later ones (its JIT, the page cache), which would otherwise land on whichever variant runs first.
        log("warm-up epoch (not counted)")
        measure(variants[0], pythons[variants[0]], target, args)
        results = interleave(variants, args.repeats, lambda v, r: measure(v, pythons[v], target, args))
    rows = []
    for v in variants:
        runs = results[v]
        rows.append(
            {
                "loader": VARIANTS[v] + (f" {args.prefetch}" if v == "readahead" else ""),
                "images/s": median([r["images"] / r["wall_s"] for r in runs]),
                "data-wait %": 100 * median([r["wait_s"] / r["wall_s"] for r in runs]),
                "epoch s": median([r["wall_s"] for r in runs]),
                "first batch s": median([r["first_batch_s"] for r in runs]),
                "images": runs[0]["images"],
                "GETs": max(r["gets"] for r in runs),
                "images/s (each run)": " / ".join(f"{r['images'] / r['wall_s']:.0f}" for r in runs),
                "CPU s (tree)": median([r["cpu_s"] for r in runs]),
                "server CPU s": median([r["server_cpu_s"] for r in runs]),
                "peak PSS MB": median([r["peak_pss_mb"] for r in runs]),
            }
        )
    what = "The input pipeline alone (no VAE step)" if args.no_train else "One VAE epoch"
    rate = {v: row["images/s"] for v, row in zip(variants, rows)}
    if "readahead" in rate and "s3map" in rate:
        ratio = rate["readahead"] / rate["s3map"]
        notes.insert(
            0,
            f"target: tess read-ahead / S3MapDataset images/s >= {TARGET_RATIO}x: {ratio:.2f}x, "
            f"{'met' if ratio >= TARGET_RATIO else 'NOT met'}",
        )
    if "readahead" in rate and "plain" in rate:
        notes.insert(1, f"tess read-ahead / prefetch 0 images/s: {rate['readahead'] / rate['plain']:.2f}x")
    name = "stream_input" if args.no_train else "stream_epoch"
    write_table(
        name,
        f"{what} streamed from s3rver: N = {args.n}, -w {args.workers}, batch {args.batch}, medians of "
        f"{args.repeats} interleaved round(s) after one warm-up epoch",
        rows,
        (
            "loader",
            "images/s",
            "data-wait %",
            "epoch s",
            "first batch s",
            "images",
            "GETs",
            "CPU s (tree)",
            "server CPU s",
            "peak PSS MB",
            "images/s (each run)",
        ),
        notes,
    )
    log("done")


if __name__ == "__main__":
    main()
