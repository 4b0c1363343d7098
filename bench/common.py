"""Shared machinery of the benchmarks: the S3 server process, measured subprocess runs, tables.

The S3 side is moto's server started as a *separate* process (``python -m pipeline serve``), seeded
with the demo set, so its CPU time can be read from ``/proc/<pid>/stat`` and its request counts from
``GET {endpoint}/_tess/stats``. Every tool under test runs as a child process of the benchmark: its CPU
time comes from ``os.wait4`` (the child plus every descendant it waited for) and its memory from a
poller that sums RSS and PSS over the whole process tree (DataLoader workers included) every 0.1 s.

Figures are medians of interleaved runs (tool A, tool B, ..., tool A, tool B, ...), because the machine
is shared and noisy; ratios are always taken against a baseline measured in the same invocation.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import datetime as _dt
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
DEFAULT_N = 5000
DEFAULT_REPEATS = 3

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# -- command line shared by every script ------------------------------------------------------------------


def env_int(name: str, default: int) -> int:
    """Integer from the environment (``N=20000 make bench``), else ``default``."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise SystemExit(f"bench: {name}={text!r} is not an integer; use e.g. {name}={default}") from None


def add_common_args(parser: Any) -> None:
    """``--n`` (objects, default ``$N`` or 5000) and ``--repeats`` (default ``$REPEATS`` or 3)."""
    parser.add_argument(
        "--n", type=int, default=env_int("N", DEFAULT_N), help="demo objects on the server (default $N or 5000)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=env_int("REPEATS", DEFAULT_REPEATS),
        help="interleaved runs per variant (default 3)",
    )
    parser.add_argument("--work-dir", default=None, help="scratch folder (default: a temp folder, removed at the end)")


@contextlib.contextmanager
def work_dir(path: str | None, name: str) -> Iterator[Path]:
    """``path`` (kept) or a fresh temp folder (removed afterwards)."""
    if path:
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        yield p
        return
    tmp = Path(tempfile.mkdtemp(prefix=f"tess-bench-{name}-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- /proc readers --------------------------------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # Fields after the command: state(0) ppid(1) ... utime(11) stime(12).
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MB (0 when it has exited)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE_KB / 1024
    except (FileNotFoundError, ProcessLookupError):
        return 0.0


def proc_memory_mb(pid: int) -> dict[str, float]:
    """``rss``, ``pss`` and ``private`` (USS: pages only this process maps) of ``pid`` in MB.

    Copy-on-read in forked workers shows as growth of ``private``: a page the parent shared turns private
    when the worker writes a refcount on it, while ``rss`` barely moves (forked page tables already
    count the shared pages).
    """
    out = {"rss": 0.0, "pss": 0.0, "private": 0.0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name == "Rss":
                    out["rss"] = int(rest.split()[0]) / 1024
                elif name == "Pss":
                    out["pss"] = int(rest.split()[0]) / 1024
                elif name in ("Private_Clean", "Private_Dirty"):
                    out["private"] += int(rest.split()[0]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def process_tree(root: int) -> list[int]:
    """``root`` and all its living descendants (scans /proc once)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
            continue
        children[ppid].append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


class TreeMemoryPoller:
    """Background thread: peak of the summed RSS and PSS of a process tree, sampled every ``interval``."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_rss_mb = 0.0
        self.peak_pss_mb = 0.0
        self.max_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-memory", daemon=True)

    def _sample(self) -> None:
        pids = process_tree(self.pid)
        mems = [proc_memory_mb(p) for p in pids]
        self.peak_rss_mb = max(self.peak_rss_mb, sum(m["rss"] for m in mems))
        self.peak_pss_mb = max(self.peak_pss_mb, sum(m["pss"] for m in mems))
        self.max_processes = max(self.max_processes, len(pids))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> TreeMemoryPoller:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- the S3 server ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchServer:
    """The moto server process: its endpoint, pid, request counts and CPU time."""

    endpoint: str
    pid: int
    n: int

    def stats(self) -> collections.Counter[str]:
        """Requests served so far, by kind (``GET``, ``LIST``, ``HEAD``, ``PUT``...)."""
        from pipeline.demo.server import STATS_PATH

        with urllib.request.urlopen(self.endpoint + STATS_PATH, timeout=10) as r:
            return collections.Counter(json.load(r))

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def env(self) -> dict[str, str]:
        """Environment for a client of this server: demo-only keys, no profile, path-style endpoint."""
        from pipeline.demo.server import DEMO_ACCESS_KEY, DEMO_SECRET_KEY

        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RCLONE_"))}
        env.update(
            AWS_ACCESS_KEY_ID=DEMO_ACCESS_KEY,
            AWS_SECRET_ACCESS_KEY=DEMO_SECRET_KEY,
            AWS_DEFAULT_REGION="us-east-1",
            AWS_EC2_METADATA_DISABLED="true",
        )
        return env

    @property
    def prefix(self) -> str:
        from cache.uri import S3Uri
        from pipeline.demo.demo_set import DEMO_BUCKET, DEMO_PREFIX

        return str(S3Uri(bucket=DEMO_BUCKET, prefix=DEMO_PREFIX))


@contextlib.contextmanager
def demo_server(n: int, *, seed: int = 0) -> Iterator[BenchServer]:
    """Start ``python -m pipeline serve --demo n`` as a separate process; yield it once it is ready."""
    from pipeline.demo.server import embedded_server_process

    t0 = time.perf_counter()
    with embedded_server_process(demo=n, seed=seed) as (endpoint, pid):
        server = BenchServer(endpoint=endpoint, pid=pid, n=n)
        log(f"S3 server {server.endpoint} (pid {pid}) seeded with {n} demo objects in {time.perf_counter() - t0:.1f} s")
        yield server


# -- measured runs ----------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class RunResult:
    """What one measured child process cost."""

    wall_s: float
    user_s: float
    sys_s: float
    max_rss_mb: float  # ru_maxrss: the largest single process of the tree
    peak_rss_mb: float  # peak of the RSS summed over the tree (shared pages counted in each process)
    peak_pss_mb: float  # peak of the PSS summed over the tree (shared pages split fairly)
    processes: int
    server_cpu_s: float
    requests: collections.Counter[str] = field(default_factory=collections.Counter)
    returncode: int = 0
    output: str = ""

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s


class ToolFailed(RuntimeError):
    """A tool under test exited non-zero."""


def run_measured(
    cmd: Sequence[str],
    *,
    env: dict[str, str],
    server: BenchServer | None = None,
    cwd: Path = ROOT,
    timeout: float = 1800,
) -> RunResult:
    """Run ``cmd`` as a child process and measure it (wall, CPU of its tree, memory, server side).

    Raises:
        ToolFailed: the command exited non-zero (the message holds the tail of its output).
    """
    before = server.stats() if server else collections.Counter()
    server_cpu0 = server.cpu_seconds() if server else 0.0
    out = tempfile.TemporaryFile(mode="w+")
    t0 = time.perf_counter()
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    with TreeMemoryPoller(proc.pid) as mem:
        deadline = time.monotonic() + timeout
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, ru = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    server_cpu = (server.cpu_seconds() - server_cpu0) if server else 0.0
    after = server.stats() if server else collections.Counter()
    out.seek(0)
    text = out.read()
    out.close()
    if proc.returncode != 0:
        tail = "\n".join(text.strip().splitlines()[-8:])
        raise ToolFailed(f"{' '.join(cmd[:4])}... exited {proc.returncode}:\n{tail}")
    return RunResult(
        wall_s=wall,
        user_s=ru.ru_utime,
        sys_s=ru.ru_stime,
        max_rss_mb=ru.ru_maxrss / 1024,
        peak_rss_mb=mem.peak_rss_mb,
        peak_pss_mb=mem.peak_pss_mb,
        processes=mem.max_processes,
        server_cpu_s=server_cpu,
        requests=after - before,
        returncode=proc.returncode,
        output=text,
    )


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def interleave(variants: Sequence[str], repeats: int, run: Callable[[str, int], Any]) -> dict[str, list[Any]]:
    """Run every variant once per round, ``repeats`` rounds; return the results per variant."""
    results: dict[str, list[Any]] = {v: [] for v in variants}
    for r in range(repeats):
        for v in variants:
            log(f"round {r + 1}/{repeats}: {v}")
            res = run(v, r)
            if res is not None:
                results[v].append(res)
    return results


# -- output -----------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    """Progress line on stderr (tables go to stdout)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine_line() -> str:
    """CPU model, core count, memory and Python/torch versions, for the table captions."""
    model = platform.processor() or "cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({model}), {mem_gb:.0f} GiB, Python {platform.python_version()}"


def fmt(value: Any) -> str:
    """Numbers with a sensible number of digits; everything else as is."""
    if isinstance(value, float):
        if value != value:
            return "n/a"
        a = abs(value)
        return (
            f"{value:.0f}"
            if a >= 100
            else f"{value:.1f}"
            if a >= 10
            else f"{value:.2f}"
            if a >= 0.1
            else f"{value:.3f}"
        )
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def write_table(
    name: str, title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str], notes: Sequence[str] = ()
) -> str:
    """Write ``bench/results/<name>.md`` and ``.csv``, print the markdown, return it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    md = (
        "\n".join(
            [
                f"### {title}",
                "",
                f"_{stamp}; {machine_line()}_",
                "",
                markdown_table(rows, columns),
                "",
                *[f"- {n}" for n in notes],
            ]
        ).rstrip()
        + "\n"
    )
    (RESULTS / f"{name}.md").write_text(md)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({c: (f"{row[c]:.6g}" if isinstance(row.get(c), float) else row.get(c, "")) for c in columns})
    (RESULTS / f"{name}.csv").write_text(buf.getvalue())
    print(md, flush=True)
    return md
