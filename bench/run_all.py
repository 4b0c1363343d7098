"""``make bench``: run every benchmark (issue 10's fetch engines first, then issue 5's) and collect their tables.

Each benchmark runs as its own process (``bench/mirror_bench.py``, ``bench/fetch_bench.py``, ``input_bench.py``,
``train_bench.py``, ``scale_bench.py``) with the same ``--n`` and ``--repeats``; each writes its tables to
``bench/results/*.md`` and ``.csv``. At the end this script joins the tables of this run into
``bench/results/summary_n<N>.md`` and prints where everything is.

Usage: python bench/run_all.py [--n 5000] [--repeats 3] [--only mirror,fetch,input,train,scale] [--collect]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PYTHON, RESULTS, ROOT, env_int, log, machine_line  # noqa: E402

BENCHES = ("mirror", "fetch", "input", "train", "scale")
# Extra runs of a benchmark: training once with torch's default threads and once with one thread
# (on a shared 2-core machine the default makes step times swing tenfold).
VARIANT_ARGS: dict[str, list[list[str]]] = {"train": [[], ["--threads", "1"]]}


def tables_for(name: str, n: int) -> list[str]:
    """The result files a benchmark writes for ``n`` objects (the scale benchmark ignores ``n``)."""
    return {
        "mirror": ["mirror_fetch", "mirror_targets"],
        "fetch": [f"fetch_cold_n{n}", f"fetch_noop_n{n}"],
        "input": [f"input_n{n}", f"decode_n{n}"],
        "train": [f"train_n{n}", f"train_n{n}_t1"],
        "scale": ["scale", "scale_targets", "scale_manifest_1000000", "scale_workers_1000000"],
    }[name]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=env_int("N", 5000), help="demo objects (default $N or 5000)")
    parser.add_argument(
        "--repeats", type=int, default=env_int("REPEATS", 3), help="interleaved runs per variant (default 3)"
    )
    parser.add_argument("--only", default=",".join(BENCHES), help=f"comma-separated subset of {', '.join(BENCHES)}")
    parser.add_argument(
        "--collect", action="store_true", help="run nothing; join the latest tables for --n into the summary"
    )
    args = parser.parse_args()
    chosen = [b for b in args.only.split(",") if b]
    unknown = [b for b in chosen if b not in BENCHES]
    if unknown:
        raise SystemExit(f"bench: unknown benchmark {unknown[0]!r}; use --only with {', '.join(BENCHES)}")
    failed = []
    started = 0.0 if args.collect else time.time()
    for name in [] if args.collect else chosen:
        for extra in VARIANT_ARGS.get(name, [[]]):
            cmd = [PYTHON, str(ROOT / "bench" / f"{name}_bench.py"), "--repeats", str(args.repeats), *extra]
            if name != "scale":
                cmd += ["--n", str(args.n)]
            log(f"running {' '.join(cmd[1:])}")
            t0 = time.perf_counter()
            rc = subprocess.run(cmd, cwd=ROOT).returncode
            log(f"{name} finished in {time.perf_counter() - t0:.0f} s (exit {rc})")
            if rc:
                failed.append(name)
    parts = [f"# Benchmarks, N = {args.n}", "", f"Machine: {machine_line()}.", ""]
    for name in chosen:
        for table in tables_for(name, args.n):
            path = RESULTS / f"{table}.md"
            if path.is_file() and path.stat().st_mtime >= started:  # only tables of this run
                parts += [path.read_text(), ""]
    summary = RESULTS / f"summary_n{args.n}.md"
    summary.write_text("\n".join(parts))
    print(f"tables: {RESULTS}/*.md and *.csv; all of them: {summary}")
    if failed:
        print(f"bench: {', '.join(failed)} failed (see the output above)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
