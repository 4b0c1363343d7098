"""Where a large object's client CPU goes, per MB: each stage of tess's ranged fetch measured alone, then the
whole fetch (``python -m pipeline fetch`` as a user runs it), on one s3rver object of ``--mb`` MB.

Stages (user+sys CPU of this process, best of ``--repeats``, divided by the MB = 10^6 bytes):

* ``receive``: the ranged GETs of the object through tess's transport (socket reads, h11 framing, the
  checks of each answer) with the bodies dropped;
* ``sha256``, ``md5``, ``crc64nvme``: hashlib's / awscrt's digest of the same bytes in 1 MiB pieces;
* ``write``: the bytes written to a temp file in the bench folder, then fsynced;
* ``fetch``: the whole command (start-up, listing, HEAD, ranged GETs, every check, write, fsync, manifest),
  user+sys of the child process, minus nothing.

The sum of the stages against ``fetch`` is what tess adds around them. Usage:
``python bench/large_cpu.py [--mb 256] [--repeats 3]``; writes ``bench/results/large_cpu.md`` and ``.csv``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import log, work_dir, write_table  # noqa: E402
from bench.mirror_sets import large_set  # noqa: E402

PYTHON = str(Path(sys.executable))
PIECE = 1 << 20


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def best_cpu(fn: Callable[[], object], repeats: int) -> float:
    """The least user+sys CPU seconds of ``repeats`` calls of ``fn``."""
    best = float("inf")
    for _ in range(repeats):
        c0 = _cpu()
        fn()
        best = min(best, _cpu() - c0)
    return best


def receive(endpoint: str, bucket: str, key: str, size: int) -> None:
    """The object's ranged GETs as the mirror sends them (part size, parts in flight), bodies dropped."""
    from pipeline.config import ClientOptions
    from pipeline.fetch.mirror_types import MirrorSettings
    from pipeline.transport import loop
    from pipeline.transport.client import client_for

    client = client_for(ClientOptions(endpoint=endpoint))
    part, in_flight = MirrorSettings.part_size, MirrorSettings.parts_in_flight

    async def one(start: int, gate: asyncio.Semaphore) -> None:
        async with gate:
            body = await client.get(bucket, key, byte_range=(start, min(start + part, size)))
            async for _ in body.chunks():
                pass

    async def main() -> None:
        gate = asyncio.Semaphore(in_flight)
        await asyncio.gather(*(one(s, gate) for s in range(0, size, part)))

    loop.run(main())


def digest(name: str, data: memoryview) -> None:
    if name == "crc64nvme":
        from awscrt import checksums

        v = 0
        for i in range(0, len(data), PIECE):
            v = checksums.crc64nvme(data[i : i + PIECE], v)
        return
    h = hashlib.new(name)
    for i in range(0, len(data), PIECE):
        h.update(data[i : i + PIECE])


def write(folder: Path, data: memoryview) -> None:
    path = folder / "write.tmp"
    with open(path, "wb") as f:
        for i in range(0, len(data), PIECE):
            f.write(data[i : i + PIECE])
        f.flush()
        os.fsync(f.fileno())
    path.unlink()


def whole_fetch(target, scratch: Path, repeats: int) -> tuple[float, float]:
    """(least CPU, its wall) of ``python -m pipeline fetch`` of the object into a fresh cache."""
    best = (float("inf"), 0.0)
    for r in range(repeats):
        cache = scratch / f"cache-{r}"
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(
            [
                PYTHON,
                "-m",
                "pipeline",
                "fetch",
                target.prefix,
                "--endpoint",
                target.endpoint,
                "--cache-dir",
                str(cache),
                "--no-progress",
            ],
            env=target.env(),
            check=True,
            capture_output=True,
        )
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
        best = min(best, (cpu, wall))
        shutil.rmtree(cache, ignore_errors=True)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    subprocess.run(
        [PYTHON, "-m", "compileall", "-q", "cache", "pipeline"], check=False
    )  # what an installed package has
    rows: list[dict[str, object]] = []
    with work_dir(None, "large-cpu") as scratch, large_set(args.mb, 1, scratch) as t:
        os.environ.update(t.env())
        bucket, prefix = t.prefix[len("s3://") :].split("/", 1)
        key, size = f"{prefix}blob-0.bin", t.total_bytes
        mb = size / 1e6
        data = memoryview(os.urandom(size))

        def row(stage: str, cpu: float, what: str) -> None:
            rows.append({"stage": stage, "CPU s": cpu, "CPU ms/MB": cpu * 1000 / mb, "what": what})
            log(f"{stage}: {cpu * 1000 / mb:.2f} ms/MB")

        row(
            "receive",
            best_cpu(lambda: receive(t.endpoint, bucket, key, size), args.repeats),
            "ranged GETs through tess's transport, bodies dropped",
        )
        for name in ("sha256", "md5", "crc64nvme"):
            row(name, best_cpu(lambda n=name: digest(n, data), args.repeats), f"{name} of the bytes in 1 MiB pieces")
        row("write", best_cpu(lambda: write(scratch, data), args.repeats), "write to a temp file, fsync")
        stages = sum(float(r["CPU s"]) for r in rows if r["stage"] != "crc64nvme")  # s3rver offers no CRC64NVME
        row("sum of stages", stages, "receive + sha256 + md5 + write (what any verifying client must do)")
        cpu, wall = whole_fetch(t, scratch, args.repeats)
        row("fetch", cpu, f"python -m pipeline fetch, the whole process ({wall:.2f} s wall, {mb / wall:.0f} MB/s)")
        row("fetch - stages", cpu - stages, "start-up, listing, HEAD, thread hand-offs, manifest: tess's overhead")
    write_table(
        "large_cpu",
        f"Client CPU of one {args.mb} MB object, by stage (best of {args.repeats})",
        rows,
        ["stage", "CPU s", "CPU ms/MB", "what"],
        [f"s3rver on 127.0.0.1; MB = 10^6 bytes; {os.cpu_count()} cores"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
