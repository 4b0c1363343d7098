"""Benchmark 1d of issue 5: one VAE epoch from the cache vs streaming from S3, with data-wait share.

Each run is ``pipeline.train.loop.train(TrainConfig(epochs=1, ...))`` in a fresh child process (so worker
start-up, imports and memory are each run's own), over the demo manifest fetched into a cache; the
S3 variant is ``--source s3`` (``DSSDataset(load2memory=True)``) against moto's server. From the run's
``summary.json`` and ``metrics.csv``: images/s over the whole epoch (pictures and checkpoint included),
images/s over the steps alone, and the data-wait share (sum of ``dataloading_time`` / sum of
``batch_time``), at ``-w 0`` and ``-w 2``; interleaved, medians.

Usage: python bench/train_bench.py [--n 5000] [--repeats 3] [--workers 0,2] [--threads 1]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    PYTHON,
    BenchServer,
    add_common_args,
    demo_server,
    interleave,
    log,
    median,
    run_measured,
    work_dir,
    write_table,
)

SOURCES = {
    "cache": "cache (decoded pack, default)",
    "cache-blobs": "cache (--pack off)",
    "s3": "S3 streaming (--source s3)",
}


def run_one(config_json: str, threads: int) -> None:
    """Child process: train one epoch as configured (JSON of TrainConfig fields)."""
    import torch

    from pipeline.config import TrainConfig
    from pipeline.train.loop import train

    if threads:
        torch.set_num_threads(threads)
    summary = train(TrainConfig(**json.loads(config_json)))
    print(json.dumps({k: summary.to_json()[k] for k in ("images", "images_per_s", "data_wait_share", "epoch_times_s")}))


def step_figures(out: Path) -> dict[str, float]:
    """Images/s over the steps alone and the data-wait share, from ``metrics.csv``."""
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    wait = sum(float(r["dataloading_time"]) for r in rows)
    batch = sum(float(r["batch_time"]) for r in rows)
    return {"steps": len(rows), "wait_s": wait, "batch_s": batch, "wait_share": wait / max(batch, 1e-12)}


def measure(
    server: BenchServer,
    cache_dir: Path,
    manifest: Path,
    scratch: Path,
    source: str,
    workers: int,
    round_: int,
    threads: int,
) -> dict:
    """One epoch in a child process; its summary, step figures, CPU and memory."""
    out = scratch / f"run-{source}-w{workers}-{round_}"
    config = {
        "epochs": 1,
        "workers": workers,
        "device": "cpu",
        "out": str(out),
        "progress": False,
        "seed": 0,
        "cache_dir": str(cache_dir),
        "manifest": str(manifest),
    }
    if source == "s3":
        config.update(source="s3", prefix=server.prefix, endpoint=server.endpoint)
    else:
        config.update(pack="off" if source == "cache-blobs" else "auto")
    cmd = [PYTHON, __file__, "--one", json.dumps(config), "--threads", str(threads)]
    res = run_measured(cmd, env=server.env(), server=server)
    summary = json.loads((out / "summary.json").read_text())
    steps = step_figures(out)
    log(
        f"  {source} -w {workers}: {summary['images_per_s']:.0f} images/s, "
        f"data wait {100 * summary['data_wait_share']:.1f}%"
    )
    return {"summary": summary, "steps": steps, "run": res}


def rows_of(results: dict[str, list[dict]]) -> list[dict[str, object]]:
    """Median figures per (source, workers)."""
    rows = []
    for combo, runs in results.items():
        source, w = combo.split("@")
        if not runs:
            continue
        images = runs[0]["summary"]["images"]
        rows.append(
            {
                "source": SOURCES[source],
                "workers": int(w),
                "images/s (epoch)": median([r["summary"]["images_per_s"] for r in runs]),
                "images/s (steps)": median([images / r["steps"]["batch_s"] for r in runs]),
                "data-wait %": 100 * median([r["summary"]["data_wait_share"] for r in runs]),
                "epoch s": median([r["summary"]["epoch_times_s"][0] for r in runs]),
                "process wall s": median([r["run"].wall_s for r in runs]),
                "client CPU s": median([r["run"].cpu_s for r in runs]),
                "peak PSS MB (tree)": median([r["run"].peak_pss_mb for r in runs]),
                "GET": max(r["run"].requests.get("GET", 0) for r in runs),
                "runs": len(runs),
                "data-wait % (all runs)": " / ".join(f"{100 * r['summary']['data_wait_share']:.1f}" for r in runs),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--workers", default="0,2", help="DataLoader worker counts (default 0,2)")
    parser.add_argument(
        "--sources", default="cache,s3", help=f"comma-separated, of {', '.join(SOURCES)} (default cache,s3)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads of the training process (default 0: torch's default, one per core)",
    )
    parser.add_argument("--one", default=None, help="internal: run one epoch with this JSON config")
    args = parser.parse_args()
    if args.one:
        run_one(args.one, args.threads)
        return
    from bench.input_bench import fetch_demo, tess_source

    workers = [int(w) for w in args.workers.split(",")]
    sources = [s for s in args.sources.split(",") if s]
    with work_dir(args.work_dir, "train") as scratch, demo_server(args.n) as server:
        cache_dir = scratch / "cache"
        manifest = fetch_demo(server, cache_dir)
        tess_source(cache_dir, manifest, pack="on")  # the decoded pack, as the first training run builds it
        combos = [f"{s}@{w}" for w in workers for s in sources]
        results = interleave(
            combos,
            args.repeats,
            lambda combo, r: measure(
                server, cache_dir, manifest, scratch, combo.split("@")[0], int(combo.split("@")[1]), r, args.threads
            ),
        )
        threads = f"{args.threads} torch thread(s)" if args.threads else "torch's default threads"
        suffix = f"_t{args.threads}" if args.threads else ""
        write_table(
            f"train_n{args.n}{suffix}",
            f"One VAE epoch, N = {args.n}, batch 16, CPU, {threads} (1d)",
            rows_of(results),
            (
                "source",
                "workers",
                "images/s (epoch)",
                "images/s (steps)",
                "data-wait %",
                "epoch s",
                "process wall s",
                "client CPU s",
                "peak PSS MB (tree)",
                "GET",
                "runs",
                "data-wait % (all runs)",
            ),
            [
                f"medians of {args.repeats} interleaved runs, each a fresh process running pipeline.train.loop.train",
                "images/s (epoch) = the summary's figure (epoch wall time, pictures and checkpoint included); "
                "images/s (steps) = images / sum of batch_time; data-wait % = sum dataloading_time / sum batch_time",
                "the decoded pack is built before the runs (the first training run on a new manifest builds it once)",
                "torch's default is one intra-op thread per core; on a shared 2-core machine a busy core stalls every "
                "parallel op of the step (--threads 1 avoids that)",
            ],
        )


if __name__ == "__main__":
    main()
