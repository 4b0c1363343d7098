"""Scale: tess's fetch of 100,000 small objects from s3rver against s5cmd (part ``fetch``), and issue 5's
1,000,000-record manifest (part ``manifest``, 1e). Not part of ``make test``.

Part ``fetch`` (tables ``bench/results/scale`` and ``scale_targets``, ``.md`` and ``.csv``): one fresh s3rver
seeded once by :func:`bench.mirror_sets.png_set` (``--seed-threads`` 32 threads; about 8 minutes for 100,000
objects) with ``--n`` (default 100,000) random-noise PNGs of about 2.4 KB under ``scale/``, and the first
``--baseline-n`` (default 5,000) of them again under ``scale-base/``. Then, each run into a fresh folder that is
removed only at the end (see :data:`bench.mirror_bench.KEPT_COPIES_NOTE`):

* the baseline: tess fetch of ``scale-base/`` once (its peak RSS);
* ``--repeats`` (default 1) interleaved rounds of tess fetch of ``scale/`` (``python -m pipeline fetch``, tess's
  venv, the fetch bench's command line) and ``s5cmd cp 's3://bench/scale/*' DEST/``: wall, client CPU (user+sys
  of the process tree), peak RSS (summed over the tree), GETs the server counted; for tess also the time of the
  first object GET after the start (:class:`FirstGetPoller`: the server's GET count, ``Target.counts``, read every
  20 ms from the moment the process starts; when the first read that sees it above the count at start was sent,
  and the bracket: after the last read that saw none was sent, before the first that saw one was answered) and
  the fetch's own figures from the manifest header it wrote (``fetch: {list_s, mirror_s, wall_s}``,
  :func:`cache.manifest.read_manifest_header`);
* the no-op: tess again over its last round's complete cache, ``s5cmd sync`` onto its last round's complete
  folder (wall, GETs).

Targets (printed last): tess's peak RSS <= the 5,000-object run's + 50 MB; tess's wall (the process's, start-up
included) <= its listing time (``list_s``) + 10%; objects/s >= 1.5x s5cmd's (the same wall ratio); the first GET
within 1 s of the start; the no-op no slower than ``s5cmd sync`` (both with 0 GETs).

Part ``manifest`` (:mod:`bench.scale_manifest`; tables ``scale_manifest_<records>`` and ``scale_workers_<records>``):
a synthetic manifest (no blobs) is written with ``cache.manifest.write_manifest`` and loaded with ``load_manifest``;
the table gives both times, the bytes of the loaded arrays (``ManifestArrays.nbytes``) and the resident-memory growth
of this process. Then a ``CachedImageDataset(check_blobs=False)`` whose items do the per-sample lookup work of
training (blob path and label) but return a zero tensor is read for 100,000 samples by a DataLoader with ``-w 2``, set
up as ``pipeline.train.loop`` sets it up (batch sampler over shuffled indices, persistent workers, prefetch 4). Each
worker's memory is read from ``/proc/<pid>`` after the first batch and after the pass: RSS, and the private (USS)
part, which is where copy-on-read would show (a forked worker's RSS already counts the pages it shares with the
parent). Target: under 50 MB growth per worker.

Usage: python bench/scale_bench.py [--parts fetch,manifest] [--n 100000] [--baseline-n 5000] [--repeats 1]
       [--seed-threads 32] [--records 1000000] [--samples 100000] [--workers 2]
       (a smoke run: --parts fetch --n 2000 --baseline-n 500)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    RunResult,
    ToolFailed,
    interleave,
    log,
    median,
    run_measured,
    work_dir,
    write_table,
)
from bench.scale_manifest import manifest_part  # noqa: E402
from cache.manifest import read_manifest_header  # noqa: E402

if TYPE_CHECKING:
    from bench.mirror_sets import Target
    from bench.mirror_tools import Tool

PARTS = ("fetch", "manifest")
RSS_OVER_BASELINE_MB = 50.0  # fetch part: tess's peak RSS over the 5,000-object run's
WALL_OVER_LISTING = 1.10  # fetch part: tess's wall <= its listing time + 10%
S5CMD_RATIO = 1.5  # fetch part: objects/s >= 1.5x s5cmd's
FIRST_GET_S = 1.0  # fetch part: the first GET within 1 s of the start
POLL_S = 0.02  # how often the server's GET count is read while tess starts
NOOP_RUNS = 3


class FirstGetPoller:
    """Background thread, started just before the measured process: the server's object-GET count read every
    :data:`POLL_S` (one read at a time), from the start until the first read above the count at start.

    A read is sent at one moment and answered later (much later while the server is flooded by the GETs
    themselves), so the first GET lies after :attr:`none_before_s` (when the last read that saw none was sent)
    and before :attr:`answered_s` (when the first read that saw one was answered). :attr:`first_get_s` is when
    that read was sent: the server counts requests as it reads them, so the GET it had counted came in about
    then (within one poll and the server's own queue). All None if no GET came before :meth:`stop`.
    """

    def __init__(self, counts: Callable[[], object]) -> None:
        self._counts = counts
        self._start_count = self._gets()
        self._stop = threading.Event()
        self.first_get_s: float | None = None
        self.answered_s: float | None = None
        self.none_before_s: float | None = None
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="first-get", daemon=True)

    def _gets(self) -> int:
        return int(self._counts().get("GET", 0))  # type: ignore[attr-defined]

    def _run(self) -> None:
        last_none = 0.0
        while not self._stop.is_set():
            sent = time.perf_counter() - self._t0
            try:
                seen = self._gets()
            except OSError:
                seen = self._start_count
            if seen > self._start_count:
                self.first_get_s, self.answered_s, self.none_before_s = sent, time.perf_counter() - self._t0, last_none
                return
            last_none = sent
            self._stop.wait(POLL_S)

    def start(self) -> FirstGetPoller:
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def fetch_header(cache_dir: Path, prefix: str) -> dict[str, object]:
    """The ``fetch`` summary of the manifest tess wrote in ``cache_dir`` for ``prefix`` (``s3://bench/scale/``)."""
    want = prefix[5:].split("/", 1)[1]
    for path in sorted((cache_dir / "manifests").glob("*.jsonl")):
        header = read_manifest_header(path)
        if header.prefix == want:
            return dict(header.fetch or {})
    return {}


@dataclass(kw_only=True)
class Run:
    """One measured run of the fetch part: the process's figures, GETs, and tess's own (first GET, header)."""

    res: RunResult
    gets: int
    first_get: tuple[float, float, float] | None = None  # (sent, none before, answered), :class:`FirstGetPoller`
    header: dict[str, object] = field(default_factory=dict)


def measured_run(tool: Tool, command: list[str], target: Target, scratch: Path, *, poll: bool) -> Run:
    """Run ``command`` (of ``tool``) against ``target``; with ``poll``, time its first GET (:class:`FirstGetPoller`)."""
    gets0 = int(target.counts().get("GET", 0))  # type: ignore[misc]
    poller = FirstGetPoller(target.counts).start() if poll else None  # type: ignore[arg-type]
    try:
        res = run_measured(command, env=tool.env(target, scratch), cwd=tool.cwd, timeout=3600)
    finally:
        if poller:
            poller.stop()
    first = None
    if poller and poller.first_get_s is not None:
        first = (poller.first_get_s, poller.none_before_s or 0.0, poller.answered_s or 0.0)
    return Run(res=res, gets=int(target.counts().get("GET", 0)) - gets0, first_get=first)  # type: ignore[misc]


def _row(label: str, tool: str, key: str, n: int, runs: list[Run]) -> dict[str, object]:
    if not runs:
        return {"run": label, "tool": tool, "key": key, "objects": n, "runs": 0}
    wall = median([r.res.wall_s for r in runs])
    row: dict[str, object] = {
        "run": label,
        "tool": tool,
        "key": key,
        "objects": n,
        "runs": len(runs),
        "wall s": wall,
        "client CPU s": median([r.res.cpu_s for r in runs]),
        "peak RSS MB": median([r.res.peak_rss_mb for r in runs]),
        "GETs": max(r.gets for r in runs),
    }
    if not key.startswith("noop-"):
        row["objects/s"] = n / wall
    firsts = [r.first_get for r in runs if r.first_get is not None]
    if any(r.header or r.first_get is not None for r in runs):
        row["first GET s"] = median([f[0] for f in firsts]) if firsts else "none"
        if firsts:
            row["first GET in s"] = f"{median([f[1] for f in firsts]):.2f}-{median([f[2] for f in firsts]):.2f}"
    for k, col in (("list_s", "list s"), ("mirror_s", "mirror s"), ("wall_s", "fetch wall s")):
        values = [float(r.header[k]) for r in runs if k in r.header]  # type: ignore[arg-type]
        if values:
            row[col] = median(values)
    return row


def fetch_part(args: argparse.Namespace, scratch: Path) -> tuple[list[dict[str, object]], list[str]]:
    """Seed, then measure the baseline, the cold rounds and the no-op; the rows and notes of the ``scale`` table."""
    from bench.mirror_sets import png_set
    from bench.mirror_tools import ensure_peers, s5cmd_tool, tess_tool

    notes: list[str] = []
    s5cmd, _, peer_notes = ensure_peers()
    notes += peer_notes
    tools: dict[str, Tool] = {"tess": tess_tool("tess fetch (-w 0, 128 in flight)")}
    if s5cmd:
        tools["s5cmd"] = s5cmd_tool(s5cmd)
    copies = scratch / "copies"
    copies.mkdir(exist_ok=True)
    baseline_n = min(args.baseline_n, args.n)
    rows: list[dict[str, object]] = []
    t_seed = time.perf_counter()
    with png_set(args.n, scratch, name="scale", threads=args.seed_threads, baseline_n=baseline_n) as (target, base):
        notes.append(
            f"s3rver seeded once with {args.n:,} PNGs of {target.total_bytes / args.n:.0f} bytes under scale/ and "
            f"the first {baseline_n:,} again under scale-base/, by {args.seed_threads} threads in "
            f"{time.perf_counter() - t_seed:.0f} s"
        )
        tess = tools["tess"]

        def tess_run(t: Target, dest: Path) -> Run:
            run = measured_run(tess, tess.command(t, dest), t, scratch, poll=True)
            run.header = fetch_header(dest, t.prefix)
            return run

        assert base is not None
        log(f"baseline: tess fetch of {base.prefix} ({base.n:,} objects)")
        try:
            rows.append(
                _row(
                    f"baseline: {base.n:,} objects",
                    tess.name,
                    "tess-base",
                    base.n,
                    [tess_run(base, copies / "baseline-tess")],
                )
            )
        except ToolFailed as e:
            log(f"baseline failed: {e}")
            rows.append(_row(f"baseline: {base.n:,} objects", tess.name, "tess-base", base.n, []))

        def cold(name: str, r: int) -> Run | None:
            dest = copies / f"cold-{name}-{r}"
            dest.mkdir()
            try:
                run = (
                    tess_run(target, dest)
                    if name == "tess"
                    else measured_run(tools[name], tools[name].command(target, dest), target, scratch, poll=False)
                )
            except ToolFailed as e:
                log(f"{name} failed: {e}")
                return None
            log(
                f"  {name}: {run.res.wall_s:.1f} s wall, {run.res.cpu_s:.1f} CPU-s, {run.res.peak_rss_mb:.0f} MB, "
                f"{run.gets} GETs" + (f", first GET at {run.first_get[0]:.2f} s" if run.first_get else "")
            )
            return run

        results = interleave(list(tools), args.repeats, cold)
        for name, runs in results.items():
            rows.append(_row(f"cold: {target.n:,} objects", tools[name].name, name, target.n, runs))
        for name, tool in tools.items():
            dest = copies / f"cold-{name}-{args.repeats - 1}"
            if not results[name] or not dest.is_dir():
                continue
            command = (tool.noop_command or tool.command)(target, dest)
            label = "tess again over its complete cache" if name == "tess" else "s5cmd sync onto its complete folder"
            runs: list[Run] = []
            log(f"no-op: {label}")
            for _ in range(NOOP_RUNS):
                try:
                    runs.append(measured_run(tool, command, target, scratch, poll=False))
                except ToolFailed as e:
                    log(f"no-op {name} failed: {e}")
                    break
            rows.append(_row(f"no-op: {target.n:,} unchanged", label, f"noop-{name}", target.n, runs))
    notes += [
        f"medians of {args.repeats} interleaved round(s) (the no-op: of {NOOP_RUNS} runs); "
        "client CPU = user+sys of the "
        "process tree, peak RSS summed over it; GETs = object GETs the server counted (the most any run sent)",
        f"first GET s: from the process's start to the sending of the first read of the server's GET count (one read "
        f"every {POLL_S * 1000:.0f} ms) that saw it grow; first GET in s: after the last read that saw none was sent, "
        "before that read was answered (answers are late while the server is flooded by the GETs); list s / mirror s / "
        "fetch wall s: the fetch summary in the manifest header tess wrote (list_s, mirror_s, wall_s)",
        "copies are kept until the end (ext4 slows new inodes for about a minute after thousands of files are deleted)",
    ]
    log(f"removing the copies in {copies}")
    shutil.rmtree(copies, ignore_errors=True)
    return rows, notes


def _find(rows: list[dict[str, object]], key: str) -> dict[str, object] | None:
    return next((r for r in rows if r.get("key") == key and r.get("runs")), None)


def scale_targets(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """The fetch part's targets, each with its measured value and status (met, NOT met, not measured)."""
    tess, s5, base = _find(rows, "tess"), _find(rows, "s5cmd"), _find(rows, "tess-base")
    ntess, ns5 = _find(rows, "noop-tess"), _find(rows, "noop-s5cmd")
    n = f"{int(tess['objects']):,}" if tess else "N"  # type: ignore[arg-type]
    out: list[dict[str, object]] = []

    def add(name: str, ok: bool | None, measured: str) -> None:
        out.append(
            {
                "target": name,
                "measured": measured,
                "status": "not measured" if ok is None else "met" if ok else "NOT met",
            }
        )

    base_n = int(base["objects"]) if base else 5000  # type: ignore[arg-type]
    name = f"peak RSS ({n} objects) <= the {base_n:,}-object run's + {RSS_OVER_BASELINE_MB:.0f} MB"
    if tess and base:
        t, b = float(tess["peak RSS MB"]), float(base["peak RSS MB"])  # type: ignore[arg-type]
        add(name, t <= b + RSS_OVER_BASELINE_MB, f"{t:.0f} MB vs {b:.0f} MB (+{t - b:.0f} MB)")
    else:
        add(name, None, "n/a")
    name = f"wall (process, start-up included) <= listing time + {100 * (WALL_OVER_LISTING - 1):.0f}%"
    if tess and "list s" in tess:
        w, ls = float(tess["wall s"]), float(tess["list s"])  # type: ignore[arg-type]
        fw = f"; the fetch's own wall {float(tess['fetch wall s']):.2f} s" if "fetch wall s" in tess else ""  # type: ignore[arg-type]
        add(
            name,
            w <= WALL_OVER_LISTING * ls,
            f"{w:.2f} s vs listing {ls:.2f} s ({w / ls if ls else float('inf'):.2f}x){fw}",
        )
    else:
        add(name, None, "n/a (no list_s in the manifest header)" if tess else "n/a")
    name = f"objects/s >= {S5CMD_RATIO}x s5cmd cp"
    if tess and s5:
        tw, sw = float(tess["wall s"]), float(s5["wall s"])  # type: ignore[arg-type]
        add(name, sw / tw >= S5CMD_RATIO, f"{sw / tw:.2f}x ({tw:.2f} s vs {sw:.2f} s)")
    else:
        add(name, None, "n/a")
    name = f"first GET within {FIRST_GET_S:.0f} s of the start"
    first = tess.get("first GET s") if tess else None
    if isinstance(first, float):
        add(name, first <= FIRST_GET_S, f"{first:.2f} s (in {tess['first GET in s']} s)")  # type: ignore[index]
    else:
        add(name, None if tess is None else False, "n/a" if tess is None else "no GET seen")
    name = "no-op re-fetch: tess (0 GETs) no slower than s5cmd sync (0 GETs)"
    if ntess and ns5:
        tw, sw = float(ntess["wall s"]), float(ns5["wall s"])  # type: ignore[arg-type]
        measured = f"tess {tw:.2f} s, {ntess['GETs']} GETs; s5cmd sync {sw:.2f} s, {ns5['GETs']} GETs ({tw / sw:.2f}x)"
        if ns5["GETs"] != 0:
            add(name, None, measured + ": s5cmd sync was not a no-op")
        else:
            add(name, ntess["GETs"] == 0 and tw <= sw, measured)
    else:
        add(name, None, "n/a")
    return out


SCALE_COLUMNS = (
    "run",
    "tool",
    "runs",
    "wall s",
    "objects/s",
    "client CPU s",
    "peak RSS MB",
    "GETs",
    "first GET s",
    "first GET in s",
    "list s",
    "mirror s",
    "fetch wall s",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--n", type=int, default=100_000, help="fetch part: objects on s3rver (default 100,000)")
    parser.add_argument(
        "--baseline-n",
        type=int,
        default=5000,
        help="fetch part: objects of the baseline prefix, the first of the set (default 5,000)",
    )
    parser.add_argument(
        "--seed-threads", type=int, default=32, help="fetch part: threads that seed s3rver (default 32)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="fetch part: interleaved cold rounds (default 1)")
    parser.add_argument("--work-dir", default=None, help="scratch folder (default: a temp folder, removed at the end)")
    parser.add_argument("--records", type=int, default=1_000_000, help="manifest part: records (default 1,000,000)")
    parser.add_argument(
        "--samples", type=int, default=100_000, help="manifest part: samples read by the workers (default 100,000)"
    )
    parser.add_argument("--workers", type=int, default=2, help="manifest part: DataLoader workers (default 2)")
    args = parser.parse_args()
    parts = [x for x in args.parts.split(",") if x]
    unknown = [x for x in parts if x not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    with work_dir(args.work_dir, "scale") as scratch:
        if "fetch" in parts:
            rows, notes = fetch_part(args, scratch)
            write_table(
                "scale",
                f"Fetch of {args.n:,} small objects from s3rver: tess against s5cmd",
                rows,
                SCALE_COLUMNS,
                notes,
            )
        if "manifest" in parts:
            manifest_part(args, scratch)
        if "fetch" in parts:  # last, so the targets are what a run prints at its end
            write_table(
                "scale_targets",
                f"Targets of the scale fetch ({args.n:,} objects)",
                scale_targets(rows),
                ["target", "measured", "status"],
            )


if __name__ == "__main__":
    main()
