"""Training throughput when another process competes for the cores (issue 9, point 8).

Builds a demo cache of ``--n`` images (no network: blobs and manifest written directly), builds its
decoded pack once, then trains one CPU epoch per run in a child process (``train_vae.py``) for each
thread setting, on a quiet machine and beside ``--busy`` processes that spin on the same cores. Runs are
interleaved and repeated; the table gives median images/s from each run's ``summary.json``.

``--cpus 0,1`` pins everything (the runs and the busy processes) to those cores with ``taskset``, so a
many-core machine can stand in for a 2-core one.

Usage: python bench/contention_bench.py [--n 3000] [--repeats 3] [--busy 1] [--cpus 0,1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# name -> (extra train_vae.py flags, extra environment). train_vae.py sets OMP_WAIT_POLICY=PASSIVE for
# --threads other than 1 unless the environment names a policy, so the spinning variants ask for ACTIVE.
VARIANTS: dict[str, tuple[list[str], dict[str, str]]] = {
    "tess default (--threads 1)": ([], {}),
    "--threads 2 (passive waits)": (["--threads", "2"], {}),
    "--threads 2 spinning (OMP_WAIT_POLICY=ACTIVE)": (["--threads", "2"], {"OMP_WAIT_POLICY": "ACTIVE"}),
    "--threads 0 = torch's one per core (spinning)": (["--threads", "0"], {"OMP_WAIT_POLICY": "ACTIVE"}),
}


def build_cache(root: Path, n: int) -> None:
    from cache import BlobStore, CacheLayout, write_manifest
    from cache.manifest import ManifestRecord
    from pipeline.demo.demo_set import demo_items

    layout = CacheLayout.at(root).create()
    store = BlobStore(layout)
    records = []
    for key, data in demo_items(n, prefix="bench/"):
        sha, _ = store.put_bytes(data)
        records.append(
            ManifestRecord(key=key, sha256=sha, size=len(data), etag="", last_modified="", label=int(key[-5]))
        )
    write_manifest(layout, endpoint="bench", bucket="demo", prefix="bench/", records=records)


def train_once(cache: Path, out: Path, flags: list[str], env: dict[str, str], taskset: list[str]) -> dict:
    cmd = [
        *taskset,
        sys.executable,
        str(ROOT / "train_vae.py"),
        "-e",
        "1",
        "--device",
        "cpu",
        "--no-progress",
        "--cache-dir",
        str(cache),
        "--out",
        str(out),
        *flags,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")
    return json.loads((out / "summary.json").read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--busy", type=int, default=1, help="spinning processes beside the busy runs (default 1)")
    p.add_argument("--cpus", default=None, help="pin runs and busy processes to these cores, e.g. 0,1")
    p.add_argument(
        "--variants", default=";".join(VARIANTS), help="semicolon-separated subset of: " + "; ".join(VARIANTS)
    )
    args = p.parse_args()
    taskset = ["taskset", "-c", args.cpus] if args.cpus else []
    names = [v.strip() for v in args.variants.split(";") if v.strip()]
    with tempfile.TemporaryDirectory(prefix="tess-contention-") as tmp:
        cache = Path(tmp) / "cache"
        build_cache(cache, args.n)
        train_once(cache, Path(tmp) / "warm", [], {}, taskset)  # builds the decoded pack once
        results: dict[tuple[str, str], list[float]] = {}
        for r in range(args.repeats):
            for load in ("quiet", f"{args.busy} busy"):
                spinners = []
                if load != "quiet":
                    spinners = [
                        subprocess.Popen([*taskset, sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)
                    ]
                    time.sleep(0.5)  # let the spinners reach the run queue (load, not synchronisation)
                try:
                    for name in names:
                        flags, env = VARIANTS[name]
                        s = train_once(cache, Path(tmp) / f"run-{r}-{load}-{len(results)}", flags, env, taskset)
                        results.setdefault((name, load), []).append(s["images_per_s"])
                        print(f"  round {r + 1} {load:>7} {name:<40} {s['images_per_s']:8.0f} img/s", flush=True)
                finally:
                    for sp in spinners:
                        sp.kill()
                        sp.wait()
    cores = args.cpus or str(os.cpu_count())
    print(
        f"\n| threads ({args.n} images, 1 epoch, cores {cores}, medians of {args.repeats}) | quiet img/s | "
        f"beside {args.busy} busy process img/s | busy / quiet |"
    )
    print("|---|---|---|---|")
    for name in names:
        q = statistics.median(results[(name, "quiet")])
        b = statistics.median(results[(name, f"{args.busy} busy")])
        print(f"| {name} | {q:,.0f} | {b:,.0f} | {b / q:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
