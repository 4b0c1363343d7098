"""Benchmark 1a/1b of issue 5: cold fetch and no-op re-fetch of the demo prefix, tess vs the alternatives.

Cold fetch (1a): every tool copies ``s3://tess-demo/shapes-train/`` from moto's server (a separate
process) into an empty folder; per tool the median over interleaved rounds of wall time, client CPU
(user+sys of the tool's whole process tree), objects/s, MB/s, peak memory and the server's CPU.

No-op re-fetch (1b): tess, ``aws s3 sync`` and ``rclone copy`` run again over the folder their first
round filled; wall time and the requests they sent (a no-op should send zero GETs).

Tools: ``python -m pipeline fetch`` (default and -w/-c variants), ``aws s3 sync`` (AWS CLI v1 in its own
venv ``bench/.venv-awscli``, created when missing; default settings and ``max_concurrent_requests``
32), ``rclone copy --transfers 16 --checkers 16`` (Debian package), a plain boto3 thread pool
(``bench/tools/boto3_mirror.py``) and the research code's per-item DataLoader download
(``bench/tools/dataloader_download.py``). A tool that cannot be installed is skipped with a note.

Usage: python bench/fetch_bench.py [--n 5000] [--repeats 3] [--variants a,b,...] [--no-noop]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    PYTHON,
    ROOT,
    BenchServer,
    RunResult,
    ToolFailed,
    add_common_args,
    demo_server,
    interleave,
    log,
    median,
    run_measured,
    work_dir,
    write_table,
)

AWSCLI_VENV = ROOT / "bench" / ".venv-awscli"
AWSCLI_REQUIREMENT = "awscli==1.46.3"
TOOLS = ROOT / "bench" / "tools"
_FETCHED_RE = re.compile(r"fetched (\d+), already cached (\d+)")


# -- installing the other tools ---------------------------------------------------------------------------


def ensure_awscli() -> tuple[str | None, str]:
    """Path of ``aws`` in ``bench/.venv-awscli`` (created with pip when missing), or None and why."""
    aws = AWSCLI_VENV / "bin" / "aws"
    if not aws.is_file():
        log(f"installing {AWSCLI_REQUIREMENT} into {AWSCLI_VENV} (it pins its own botocore, so not into .venv)")
        try:
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(AWSCLI_VENV)], check=True, capture_output=True)
            subprocess.run(
                [str(AWSCLI_VENV / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", AWSCLI_REQUIREMENT],
                check=True,
                capture_output=True,
                text=True,
            )
        except subprocess.CalledProcessError as e:
            return (
                None,
                f"aws s3 sync skipped: installing {AWSCLI_REQUIREMENT} failed ({(e.stderr or '').strip()[-200:]})",
            )
    version = subprocess.run([str(aws), "--version"], capture_output=True, text=True).stdout.strip() or "aws"
    return str(aws), version.split()[0]


def ensure_rclone() -> tuple[str | None, str]:
    """Path of ``rclone`` (installed with apt-get when missing and running as root), or None and why."""
    path = shutil.which("rclone")
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        log("installing rclone with apt-get")
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "rclone"],
            capture_output=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
        path = shutil.which("rclone")
    if path is None:
        return None, "rclone skipped: not installed (apt-get install rclone)"
    version = subprocess.run([path, "version"], capture_output=True, text=True).stdout.split("\n", 1)[0].strip()
    return path, version


# -- the tools as commands ----------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Tool:
    """One way of mirroring the prefix: how to run it and how to count what it wrote."""

    name: str
    command: Callable[[Path, BenchServer], list[str]]
    env: Callable[[BenchServer, Path], dict[str, str]] = lambda server, scratch: server.env()
    counted_from_output: bool = False  # tess: the fetch summary line says how many objects it holds
    noop: bool = False  # measured again over its own filled folder (1b)


def tess_tool(name: str, *extra: str) -> Tool:
    def command(target: Path, server: BenchServer) -> list[str]:
        return [
            PYTHON,
            "-m",
            "pipeline",
            "fetch",
            server.prefix,
            "--endpoint",
            server.endpoint,
            "--cache-dir",
            str(target),
            "--no-progress",
            *extra,
        ]

    return Tool(name=name, command=command, counted_from_output=True, noop=not extra)


def aws_tool(name: str, aws: str, concurrency: int | None) -> Tool:
    def command(target: Path, server: BenchServer) -> list[str]:
        return [
            aws,
            "s3",
            "sync",
            server.prefix,
            str(target),
            "--endpoint-url",
            server.endpoint,
            "--only-show-errors",
            "--no-progress",
        ]

    def env(server: BenchServer, scratch: Path) -> dict[str, str]:
        config = scratch / f"aws-config-{concurrency or 'default'}"
        lines = ["[default]", "region = us-east-1", "s3 =", "  addressing_style = path"]
        if concurrency:
            lines.append(f"  max_concurrent_requests = {concurrency}")
        config.write_text("\n".join(lines) + "\n")
        return {
            **server.env(),
            "AWS_CONFIG_FILE": str(config),
            "AWS_SHARED_CREDENTIALS_FILE": str(scratch / "no-credentials"),
        }

    return Tool(name=name, command=command, env=env, noop=concurrency is None)


def rclone_tool(rclone: str) -> Tool:
    def command(target: Path, server: BenchServer) -> list[str]:
        bucket_prefix = server.prefix[len("s3://") :]
        return [rclone, "copy", f"bench:{bucket_prefix}", str(target), "--transfers", "16", "--checkers", "16", "-q"]

    def env(server: BenchServer, scratch: Path) -> dict[str, str]:
        base = server.env()
        config = scratch / "rclone.conf"
        config.touch()
        return {
            **base,
            "RCLONE_CONFIG": str(config),
            "RCLONE_CONFIG_BENCH_TYPE": "s3",
            "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
            "RCLONE_CONFIG_BENCH_ENDPOINT": server.endpoint,
            "RCLONE_CONFIG_BENCH_REGION": "us-east-1",
            "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": base["AWS_ACCESS_KEY_ID"],
            "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": base["AWS_SECRET_ACCESS_KEY"],
            "RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE": "true",
            "RCLONE_CONFIG_BENCH_NO_CHECK_BUCKET": "true",
        }

    return Tool(name="rclone copy (16/16)", command=command, env=env, noop=True)


def boto3_tool() -> Tool:
    return Tool(
        name="boto3 thread pool (16)",
        command=lambda target, server: [
            PYTHON,
            str(TOOLS / "boto3_mirror.py"),
            server.prefix,
            str(target),
            server.endpoint,
            "16",
        ],
    )


def dataloader_tool() -> Tool:
    return Tool(
        name="old per-item DataLoader (-w 4)",
        command=lambda target, server: [
            PYTHON,
            str(TOOLS / "dataloader_download.py"),
            server.prefix,
            str(target),
            server.endpoint,
            "4",
            "16",
        ],
    )


def all_tools(notes: list[str]) -> dict[str, Tool]:
    """Every tool that is (or can be made) available here, by short name; notes say what was skipped."""
    tools = {
        "tess": tess_tool("tess fetch (default: -w 0, 8 connections)"),
        "tess-w2": tess_tool("tess fetch -w 2", "-w", "2"),
        "tess-w1": tess_tool("tess fetch -w 1", "-w", "1"),
        "tess-w2c2": tess_tool("tess fetch -w 2 -c 2", "-w", "2", "-c", "2"),
    }
    aws, aws_note = ensure_awscli()
    if aws:
        tools["aws"] = aws_tool(f"aws s3 sync (default, {aws_note})", aws, None)
        tools["aws32"] = aws_tool("aws s3 sync (max_concurrent_requests 32)", aws, 32)
    else:
        notes.append(aws_note)
    rclone, rclone_note = ensure_rclone()
    if rclone:
        tools["rclone"] = rclone_tool(rclone)
        notes.append(f"rclone: {rclone_note}")
    else:
        notes.append(rclone_note)
    tools["boto3"] = boto3_tool()
    tools["dataloader"] = dataloader_tool()
    return tools


# -- measuring -------------------------------------------------------------------------------------------


def objects_in(target: Path, tool: Tool, result: RunResult) -> int:
    """How many objects the run left in ``target`` (tess: from its summary line, others: files)."""
    if tool.counted_from_output:
        m = _FETCHED_RE.search(result.output)
        return int(m.group(1)) + int(m.group(2)) if m else -1
    return sum(len(files) for _, _, files in os.walk(target))


def prefix_bytes(server: BenchServer) -> int:
    """Total size of the objects under the demo prefix (one listing)."""
    from pipeline.config import ClientOptions, S3Uri
    from pipeline.transport.listing import list_objects

    os.environ.update({k: v for k, v in server.env().items() if k.startswith("AWS_")})
    return sum(o.size for o in list_objects(S3Uri.parse(server.prefix), ClientOptions(endpoint=server.endpoint)))


def cold_row(name: str, runs: list[tuple[RunResult, int]], n: int, total_bytes: int) -> dict[str, object]:
    """Median figures of one tool's cold runs."""
    walls = [r.wall_s for r, _ in runs]
    wall = median(walls)
    cpu = median([r.cpu_s for r, _ in runs])
    server_cpu = median([r.server_cpu_s for r, _ in runs])
    return {
        "tool": name,
        "runs": len(runs),
        "wall s": wall,
        "objects/s": n / wall,
        "MB/s": total_bytes / 1e6 / wall,
        "client CPU s": cpu,
        "CPU ms/object": 1000 * cpu / n,
        "peak RSS MB (tree)": median([r.peak_rss_mb for r, _ in runs]),
        "peak PSS MB (tree)": median([r.peak_pss_mb for r, _ in runs]),
        "max RSS MB (1 proc)": median([r.max_rss_mb for r, _ in runs]),
        "procs": max(r.processes for r, _ in runs),
        "server CPU s": server_cpu,
        "server busy %": 100 * median([r.server_cpu_s / r.wall_s for r, _ in runs]),
        "GET": int(median([r.requests.get("GET", 0) for r, _ in runs])),
        "HEAD": int(median([r.requests.get("HEAD", 0) for r, _ in runs])),
        "LIST": int(median([r.requests.get("LIST", 0) for r, _ in runs])),
        "complete": "yes" if all(count == n for _, count in runs) else f"NO ({min(c for _, c in runs)}/{n})",
        "wall s (all runs)": " / ".join(f"{w:.1f}" for w in walls),
    }


def add_ratios(rows: list[dict[str, object]], names: dict[str, str]) -> None:
    """objects/s vs aws default and rclone, CPU per object vs aws default (same-run baselines)."""
    by_name = {r["tool"]: r for r in rows}
    aws = by_name.get(names.get("aws", ""))
    rclone = by_name.get(names.get("rclone", ""))
    for r in rows:
        r["x aws obj/s"] = r["objects/s"] / aws["objects/s"] if aws else float("nan")
        r["x rclone obj/s"] = r["objects/s"] / rclone["objects/s"] if rclone else float("nan")
        r["x aws CPU/obj"] = r["CPU ms/object"] / aws["CPU ms/object"] if aws else float("nan")


def run_cold(
    tools: dict[str, Tool], chosen: list[str], server: BenchServer, scratch: Path, repeats: int
) -> tuple[dict[str, list[tuple[RunResult, int]]], dict[str, Path]]:
    """Interleaved cold runs; keeps the first round's folder of each no-op-capable tool for 1b."""
    kept: dict[str, Path] = {}
    failures: dict[str, str] = {}

    def one(key: str, round_: int) -> tuple[RunResult, int] | None:
        if key in failures:
            return None
        tool = tools[key]
        target = scratch / f"{key}-{round_}"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        try:
            result = run_measured_tool(tool, target, server, scratch)
        except ToolFailed as e:
            failures[key] = str(e)
            log(f"{tool.name} failed: {e}")
            return None
        count = objects_in(target, tool, result)
        log(
            f"  {tool.name}: {result.wall_s:.1f} s wall, {result.cpu_s:.1f} CPU-s, {count} objects, "
            f"server {result.server_cpu_s:.1f} CPU-s, GET {result.requests.get('GET', 0)}"
        )
        if tool.noop and round_ == 0:
            kept[key] = target
        else:
            shutil.rmtree(target, ignore_errors=True)
        return result, count

    results = interleave(chosen, repeats, one)
    for key, msg in failures.items():
        log(f"FAILED {tools[key].name}: {msg}")
    return results, kept


def run_measured_tool(tool: Tool, target: Path, server: BenchServer, scratch: Path) -> RunResult:
    """Run ``tool`` into ``target`` and measure it."""
    return run_measured(tool.command(target, server), env=tool.env(server, scratch), server=server)


def run_noop(
    tools: dict[str, Tool], kept: dict[str, Path], server: BenchServer, scratch: Path, repeats: int
) -> list[dict[str, object]]:
    """Re-run each no-op-capable tool over its filled folder; median wall and request counts."""

    def one(key: str, round_: int) -> RunResult:
        return run_measured_tool(tools[key], kept[key], server, scratch)

    results = interleave(list(kept), repeats, one)
    rows = []
    for key, runs in results.items():
        rows.append(
            {
                "tool": tools[key].name,
                "runs": len(runs),
                "wall s": median([r.wall_s for r in runs]),
                "client CPU s": median([r.cpu_s for r in runs]),
                "GET": max(r.requests.get("GET", 0) for r in runs),
                "HEAD": max(r.requests.get("HEAD", 0) for r in runs),
                "LIST": max(r.requests.get("LIST", 0) for r in runs),
                "server CPU s": median([r.server_cpu_s for r in runs]),
                "wall s (all runs)": " / ".join(f"{r.wall_s:.2f}" for r in runs),
            }
        )
    aws = next((r for r in rows if r["tool"].startswith("aws")), None)
    for r in rows:
        r["x aws wall"] = r["wall s"] / aws["wall s"] if aws else float("nan")
    return rows


COLD_COLUMNS = (
    "tool",
    "wall s",
    "objects/s",
    "MB/s",
    "client CPU s",
    "CPU ms/object",
    "peak RSS MB (tree)",
    "peak PSS MB (tree)",
    "max RSS MB (1 proc)",
    "procs",
    "server CPU s",
    "server busy %",
    "GET",
    "HEAD",
    "LIST",
    "x aws obj/s",
    "x rclone obj/s",
    "x aws CPU/obj",
    "complete",
    "runs",
    "wall s (all runs)",
)
NOOP_COLUMNS = (
    "tool",
    "wall s",
    "x aws wall",
    "client CPU s",
    "GET",
    "HEAD",
    "LIST",
    "server CPU s",
    "runs",
    "wall s (all runs)",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument(
        "--variants",
        default="tess,tess-w2,tess-w1,tess-w2c2,aws,aws32,rclone,boto3,dataloader",
        help="comma-separated tools (default: all)",
    )
    parser.add_argument("--no-noop", action="store_true", help="skip the no-op re-fetch (1b)")
    args = parser.parse_args()
    notes: list[str] = []
    tools = all_tools(notes)
    chosen = [v for v in args.variants.split(",") if v in tools]
    unknown = [v for v in args.variants.split(",") if v not in tools]
    if unknown:
        notes.append(f"not run (unknown or not installed): {', '.join(unknown)}")
    with work_dir(args.work_dir, "fetch") as scratch, demo_server(args.n) as server:
        total_bytes = prefix_bytes(server)
        cold, kept = run_cold(tools, chosen, server, scratch, args.repeats)
        rows = [cold_row(tools[k].name, runs, args.n, total_bytes) for k, runs in cold.items() if runs]
        add_ratios(rows, {k: tools[k].name for k in ("aws", "rclone") if k in tools})
        notes += [
            f"N = {args.n} objects, {total_bytes / 1e6:.1f} MB, from moto's server (a separate process) on 127.0.0.1; "
            f"medians of {args.repeats} interleaved rounds; ratios against this run's baselines.",
            "client CPU = user+sys of the tool's process tree (os.wait4); peak RSS/PSS = peak of the sum over the "
            "tree, sampled every 0.1 s (RSS counts pages shared by forked workers once per process, PSS splits them).",
            "server busy % = server CPU-s / wall-s; near 100% means moto's single GIL-bound process is the bottleneck.",
        ]
        write_table(f"fetch_cold_n{args.n}", f"Cold fetch of {args.n} demo objects (1a)", rows, COLD_COLUMNS, notes)
        if not args.no_noop and kept:
            noop_rows = run_noop(tools, kept, server, scratch, args.repeats)
            write_table(
                f"fetch_noop_n{args.n}",
                f"No-op re-fetch of the unchanged prefix, N = {args.n} (1b)",
                noop_rows,
                NOOP_COLUMNS,
                [
                    f"each tool re-run over the folder its first cold round filled; medians of {args.repeats}; "
                    "GET/HEAD/LIST = the most any run sent"
                ],
            )


if __name__ == "__main__":
    main()
