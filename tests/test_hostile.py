"""A fetch against a hostile server: right LIST and HEAD answers, GETs wrong in one way per case.

``tests/hostile_server.py`` is the server (raw sockets, 127.0.0.1), ``tests/hostile_cases.py`` says how
each case's GETs misbehave; this module owns what tess must make of each case (:data:`EXPECT`, one
row per case) and the checks that apply to every case. Each case is fetched as a user would:
``tess fetch s3://hostile/<case>/`` in a child process with fake credentials, a short
read timeout and two attempts (``TESS_ENGINE``, when set, is passed through, so any engine can be
put through the same cases). For every case:

(a) no ``Traceback`` in the output; (b) the exit code of the table; (c) every key has a manifest record
whose sha256 is that of its true bytes, or is absent from the manifest and named in exactly one stderr
line; (d) every blob under ``objects/`` hashes to its name and equals the true bytes of some key of the
server; (e) the child's peak RSS (``VmHWM``) stays under :data:`RSS_LIMIT_BYTES`; (f) the wall time
stays under :func:`wall_bound`, derived from the flags. Problems are collected and reported together.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.fetch.mirror_types import MirrorSettings
from tests.helpers import ROOT
from tests.hostile_cases import CASES, REDIRECT_TARGETS, SELFTEST_KEYS, SLOW_STEADY_SIZE, STEADY_RATE, build_server
from tests.hostile_server import BUCKET, HostileServer

READ_TIMEOUT = 2.0
MAX_ATTEMPTS = 2
# The longest wait tess's backoff may add: full jitter, uniform(0, min(cap, base * 2**n)) before retry n.
BACKOFF_S = sum(min(MirrorSettings.backoff_cap_s, MirrorSettings.backoff_base_s * 2**n) for n in range(1, MAX_ATTEMPTS))
# Start-up, listing and manifest: 0.4-0.6 s for a whole fetch of a right case here; 5 s leaves room for a
# loaded machine (this one has 2 shared cores) without hiding a client that waits a read timeout too many.
SLACK_S = 5.0
RSS_LIMIT_BYTES = 400 * 10**6
RSS_KILL_BYTES = 1500 * 10**6  # the test kills a child above this (it already failed (e)), to protect the machine
HARD_EXTRA_S = 20.0  # a child still running this long after its wall bound is killed (it already failed (f))
_PROXY_VARS = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")

ALL, NONE, ALL_BUT_FIRST = "all", "none", "all but the first"


@dataclass(frozen=True)
class Expect:
    """What tess must make of a case.

    exit: the exit code. fetched: which keys end in the manifest (the others must fail, one line each).
    reason: a regex the failure line of each failed key must match. max_retries: the most retries the
    summary may count (``close-each``: each request is sent again at most once after the server closed
    its kept-alive connection, and no attempt fails).
    max_gets: GETs each failed key may receive (403/404 are not retried). extra_s: seconds the case
    needs beyond the general bound (a body slow by design). never: keys that must get no request.
    flags: extra fetch flags. The connection cases pass a ``--max-in-flight`` below their object
    count: with the default of 128 every object of a small case gets a connection of its own, and no
    connection would ever be reused, which is what these cases are about.
    """

    exit: int
    fetched: str
    reason: str | None = None
    max_retries: int | None = None
    max_gets: int | None = None
    extra_s: float = 0.0
    never: str | None = None
    flags: tuple[str, ...] = ()


RIGHT, FAILED = Expect(0, ALL), Expect(3, NONE)
EXPECT: dict[str, Expect] = {
    "interim": RIGHT,  # 100 Continue / 102 Processing / 103 Early Hints before the real 200
    "garbage": Expect(0, ALL, flags=("--max-in-flight", "2")),  # a right answer, then junk on the connection
    # A right answer, then a second complete 200 with another key's bytes and ETag (same size).
    "double": Expect(0, ALL, flags=("--max-in-flight", "2")),
    "chunked-ok": RIGHT,
    "chunked-long": FAILED,  # up to 2 GiB of chunks for a few KB object
    "chunked-cut": FAILED,  # clean close at a chunk boundary, no 0-chunk; ETag "<md5>-2"
    "chunked-badsize": FAILED,
    "cl-short": FAILED,
    "cl-huge": FAILED,  # Content-Length 10^12: close or stall after the true bytes
    "cl-dup": FAILED,
    "cl-negative": FAILED,
    "cl-nonnumeric": FAILED,
    "http10": RIGHT,  # HTTP/1.0, no Content-Length, body until close
    "close-nolength": RIGHT,  # HTTP/1.1, Connection: close, no Content-Length, no ETag
    "header-2mib": FAILED,
    "headers-10k": FAILED,
    "status-garbage": FAILED,
    "byte-per-second": FAILED,  # a read window of read_timeout that brings almost nothing fails
    # 300 KB at 64 KiB/s: longer than the read timeout, never silent for long.
    "slow-steady": Expect(0, ALL, extra_s=SLOW_STEADY_SIZE / STEADY_RATE),
    # 40 objects over 4 connections: a stale kept-alive connection is retried once, fresh, not counted.
    "close-each": Expect(0, ALL, max_retries=40, flags=("--max-in-flight", "4")),
    "reset-once": RIGHT,
    "reset-always": FAILED,
    "gzip-fly": FAILED,  # tess never decodes: the body must match the listing
    "gzip-stored": RIGHT,  # the stored bytes are gzip data: kept as they are
    "changed-etag": FAILED,
    "changed-noetag": FAILED,
    "err-500-big": FAILED,
    "err-500-big-chunked": FAILED,
    "err-503-big": FAILED,
    "err-503-big-chunked": FAILED,
    "err-404-big": Expect(3, NONE, reason=r"deleted|missing|404|not found", max_gets=1),
    "err-403-one": Expect(3, ALL_BUT_FIRST, reason=r"access denied", max_gets=1),
    "err-403-all": Expect(2, NONE, reason=r"access denied"),  # a denial of everything: one line
    "redirect-301": Expect(3, NONE, never=REDIRECT_TARGETS),
    "redirect-307": Expect(3, NONE, never=REDIRECT_TARGETS),
}


def wall_bound(exp: Expect) -> float:
    """Each attempt may wait one read timeout of silence (or of a window bringing almost nothing), the
    objects are fetched concurrently, and backoff comes between attempts; plus start-up slack."""
    return MAX_ATTEMPTS * READ_TIMEOUT + BACKOFF_S + exp.extra_s + SLACK_S


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str
    wall_s: float
    maxrss_bytes: int
    killed: str | None


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS and not k.startswith("AWS_")}
    env.update(
        AWS_ACCESS_KEY_ID="hostile-access-key",
        AWS_SECRET_ACCESS_KEY="hostile-secret-key",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
    )
    return env


def _status_bytes(pid: int, field: str) -> int:
    """``VmRSS:`` or ``VmHWM:`` of ``pid`` in bytes (0 once it has exited)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_fetch(server: HostileServer, case: str, cache_dir: Path, hard_s: float, flags: tuple[str, ...] = ()) -> Run:
    """The fetch of ``case`` in a child; its peak RSS from ``VmHWM`` in ``/proc`` (the high-water mark of the
    program since its exec, sampled every 20 ms). Not ``wait4``'s ``ru_maxrss``: Linux folds the forking
    parent's RSS into it (the copy the child had before its exec), so under a pytest that has imported
    torch every child would read ~700 MB."""
    cmd = [
        sys.executable,
        "-m",
        "pipeline",
        "fetch",
        f"s3://{BUCKET}/{case}/",
        "--endpoint",
        server.endpoint,
        "--cache-dir",
        str(cache_dir),
        "--no-progress",
        "--read-timeout",
        str(READ_TIMEOUT),
        "--max-attempts",
        str(MAX_ATTEMPTS),
        *flags,
    ]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=err)
        killed = None
        peak = 0
        while True:
            pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, _status_bytes(proc.pid, "VmHWM:"))
            if killed is None:
                rss, elapsed = _status_bytes(proc.pid, "VmRSS:"), time.monotonic() - t0
                if rss > RSS_KILL_BYTES or elapsed > hard_s:
                    killed = (
                        f"RSS {rss / 1e6:.0f} MB" if rss > RSS_KILL_BYTES else f"still running after {elapsed:.0f} s"
                    )
                    os.kill(proc.pid, signal.SIGKILL)
            time.sleep(0.02)
        wall = time.monotonic() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Run(
            proc.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
            wall,
            peak,
            killed,
        )


def manifest_records(cache_dir: Path) -> dict[str, str] | None:
    """key -> sha256 of the one manifest the fetch wrote (None: no manifest)."""
    found = sorted((cache_dir / "manifests").glob("*.jsonl")) if (cache_dir / "manifests").is_dir() else []
    if not found:
        return None
    assert len(found) == 1, found
    lines = found[0].read_text(encoding="utf-8").splitlines()
    return {r["key"]: r["sha256"] for r in map(json.loads, lines[1:])}


def check_keys(server: HostileServer, case: str, exp: Expect, run: Run, records: dict[str, str] | None) -> list[str]:
    """(c) and the table's ``fetched``/``reason``/``max_gets``, key by key."""
    problems = []
    lines = run.stderr.splitlines()
    for i, obj in enumerate(server.case_objects(case)):
        should = exp.fetched == ALL or (exp.fetched == ALL_BUT_FIRST and i > 0)
        named = [line for line in lines if f"s3://{BUCKET}/{obj.key}" in line]
        if records is not None and obj.key in records:
            if records[obj.key] != obj.sha256:
                problems.append(
                    f"{obj.key}: WRONG BYTES in the manifest (sha256 {records[obj.key][:12]}, true {obj.sha256[:12]})"
                )
            elif not should:
                problems.append(f"{obj.key}: fetched (right bytes), expected to fail")
            continue
        if should:
            problems.append(f"{obj.key}: not fetched: {named[-1].strip() if named else 'no line names it'}")
        if exp.exit != 2 and len(named) != 1:
            problems.append(f"{obj.key}: failed and named in {len(named)} stderr lines, not 1")
        if exp.reason and exp.exit != 2 and named and not re.search(exp.reason, named[-1], re.I):
            problems.append(f"{obj.key}: its line does not match /{exp.reason}/: {named[-1].strip()}")
        if not should and exp.max_gets is not None and server.gets(obj.key) > exp.max_gets:
            problems.append(f"{obj.key}: {server.gets(obj.key)} GETs (at most {exp.max_gets}: not to be retried)")
    return problems


def check_blobs(server: HostileServer, cache_dir: Path) -> list[str]:
    """(d): every blob is named by its SHA-256 and holds the true bytes of some key of the server."""
    truth = {o.sha256 for o in server.objects.values()}
    problems = []
    objects = cache_dir / "objects"
    for path in sorted(p for p in objects.rglob("*") if p.is_file()) if objects.is_dir() else []:
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        if sha != path.name:
            problems.append(f"blob {path.name[:12]} hashes to {sha[:12]}")
        elif sha not in truth:
            problems.append(f"WRONG BYTES in the cache: blob {sha[:12]} ({len(data)} bytes) is no key's true bytes")
    return problems


def check_run(server: HostileServer, case: str, exp: Expect, run: Run, cache_dir: Path) -> list[str]:
    problems = [f"killed by the test: {run.killed}"] if run.killed else []
    if "Traceback" in run.stdout + run.stderr:
        tail = (run.stdout + run.stderr).strip().splitlines()[-1:]
        problems.append(f"a Traceback in the output (last line: {tail[0] if tail else ''})")
    if run.code != exp.exit:
        problems.append(f"exit {run.code}, expected {exp.exit}")
    records = manifest_records(cache_dir)
    problems += check_keys(server, case, exp, run, records)
    problems += check_blobs(server, cache_dir)
    if run.maxrss_bytes >= RSS_LIMIT_BYTES:
        problems.append(f"peak RSS {run.maxrss_bytes / 1e6:.0f} MB >= {RSS_LIMIT_BYTES / 1e6:.0f} MB")
    if run.wall_s > wall_bound(exp):
        problems.append(f"wall {run.wall_s:.1f} s > bound {wall_bound(exp):.1f} s")
    if exp.max_retries is not None:
        m = re.search(r"; (\d+) retries;", run.stdout)
        if not m or int(m.group(1)) > exp.max_retries:
            problems.append(
                f"summary retries {m.group(1) if m else '(no summary line)'}, expected <= {exp.max_retries}"
            )
    if exp.exit == 2:
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        if (
            len(lines) != 1
            or not lines[0].startswith("tess: error:")
            or not re.search(exp.reason or "", lines[0], re.I)
        ):
            problems.append(f"expected one 'tess: error:' line matching /{exp.reason}/, got {len(lines)}: {lines[:3]}")
        if records:
            problems.append(f"a manifest with {len(records)} records after a denial of everything")
    if exp.never:
        hits = {k: server.gets(k) for k in server.objects if k.startswith(f"{exp.never}/") and server.gets(k)}
        if hits:
            problems.append(f"followed: {hits}")
    return problems


@pytest.fixture
def hostile():
    """A fresh hostile server per test (clean counts); it must stop with no thread left and no bug seen."""
    server = build_server().start()
    try:
        yield server
    finally:
        server.stop()
    assert not server.threads_left, f"server threads still alive after stop: {server.threads_left}"
    assert not server.errors, server.errors


def test_every_case_has_one_expectation():
    assert sorted(EXPECT) == sorted(CASES)


@pytest.mark.parametrize("case", list(EXPECT), ids=list(EXPECT))
def test_hostile_case(hostile, tmp_path, case):
    exp = EXPECT[case]
    cache_dir = tmp_path / "cache"
    run = run_fetch(hostile, case, cache_dir, hard_s=wall_bound(exp) + HARD_EXTRA_S, flags=exp.flags)
    problems = check_run(hostile, case, exp, run, cache_dir)
    gets = {o.key.rsplit("/", 1)[1]: hostile.gets(o.key) for o in hostile.case_objects(case)}
    context = (
        f"exit {run.code}, {run.wall_s:.1f} s, peak RSS {run.maxrss_bytes / 1e6:.0f} MB, GETs {gets}\n"
        f"stdout: {run.stdout.strip()[-600:]}\nstderr: {run.stderr.strip()[-1500:]}"
    )
    assert not problems, "\n".join(problems) + "\n" + context


# -- the server itself --------------------------------------------------------------------------------------


def test_listing_and_head_parse_with_boto3_as_s3_answers(hostile):
    import boto3

    s3 = boto3.client(
        "s3", endpoint_url=hostile.endpoint, region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s"
    )
    want = sorted(SELFTEST_KEYS, key=str.encode)
    pages = list(
        s3.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix="selftest/", PaginationConfig={"PageSize": 2}
        )
    )
    assert [o["Key"] for p in pages for o in p.get("Contents", [])] == want  # boto3 asks encoding-type=url
    assert len(pages) == 3 and pages[0]["IsTruncated"] and not pages[-1]["IsTruncated"]
    after = s3.list_objects_v2(Bucket=BUCKET, Prefix="selftest/", StartAfter=want[1])
    assert [o["Key"] for o in after["Contents"]] == want[2:]
    folders = s3.list_objects_v2(Bucket=BUCKET, Prefix="selftest/", Delimiter="/")
    assert [p["Prefix"] for p in folders["CommonPrefixes"]] == ["selftest/sub/", "selftest/ünï/"]
    for key in (*want, *(o.key for o in hostile.case_objects("chunked-cut"))):
        obj, head = hostile.objects[key], s3.head_object(Bucket=BUCKET, Key=key)
        listed = s3.list_objects_v2(Bucket=BUCKET, Prefix=key)["Contents"][0]
        assert head["ContentLength"] == listed["Size"] == len(obj.data)
        assert head["ETag"] == listed["ETag"] == obj.etag
        assert head["LastModified"] == listed["LastModified"]
    assert hostile.objects[want[0]].etag == f'"{hashlib.md5(hostile.objects[want[0]].data).hexdigest()}"'
    for key in (want[-1], *(o.key for o in hostile.case_objects("chunked-ok"))):  # chunked-ok is right too
        assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == hostile.objects[key].data, key
    assert hostile.gets(want[-1]) == 1 and hostile.requests_of("HEAD", want[0]) == 1


def test_encoding_type_url_is_honoured_on_the_wire(hostile):
    import urllib.request

    def listing(query: str) -> ET.Element:
        with urllib.request.urlopen(f"{hostile.endpoint}/{BUCKET}?list-type=2&prefix=selftest%2F{query}") as r:
            return ET.fromstring(r.read())

    ns = "{http://s3.amazonaws.com/doc/2006-03-01/}"
    plain, encoded = listing(""), listing("&encoding-type=url")
    assert plain.find(f"{ns}EncodingType") is None and encoded.find(f"{ns}EncodingType").text == "url"
    raw = [k.text for k in plain.iter(f"{ns}Key")]
    assert "selftest/a b+c.bin" in raw
    assert [k.text for k in encoded.iter(f"{ns}Key")][raw.index("selftest/a b+c.bin")] == "selftest/a+b%2Bc.bin"


def test_gets_follow_their_schedule_and_connections_are_counted(hostile):

    key = hostile.case_objects("reset-once")[0].key
    host, port = hostile.endpoint.rsplit("/", 1)[1].split(":")

    def get() -> bytes:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(
                f"GET /{BUCKET}/{key} HTTP/1.1\r\nHost: x\r\nAuthorization: AWS4-HMAC-SHA256 junk\r\n\r\n".encode()
            )
            data = b""
            try:
                while chunk := s.recv(65536):
                    data += chunk
                    if data.endswith(hostile.objects[key].data):
                        break
            except ConnectionResetError:
                return b"RESET:" + data
            return data

    first, second = get(), get()
    assert first.startswith(b"RESET:HTTP/1.1 200 OK") and not first.endswith(hostile.objects[key].data)
    assert second.startswith(b"HTTP/1.1 200 OK") and second.endswith(hostile.objects[key].data)
    assert hostile.gets(key) == 2 and hostile.connection_requests() == [1, 1]


def test_a_slow_sender_stops_when_the_client_hangs_up_and_stop_leaves_no_thread():

    server = build_server().start()
    host, port = server.endpoint.rsplit("/", 1)[1].split(":")
    slow, long = server.case_objects("byte-per-second")[0].key, server.case_objects("chunked-long")[0].key
    for key in (slow, long):
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(f"GET /{BUCKET}/{key} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert s.recv(4096).startswith(b"HTTP/1.1 200 OK")
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and any(t.name.startswith("hostile-conn") for t in threading.enumerate()):
        time.sleep(0.02)
    senders = [t.name for t in threading.enumerate() if t.name.startswith("hostile-conn")]
    with socket.create_connection((host, int(port)), timeout=5) as s:  # one left in a 1 byte/s answer
        s.sendall(f"GET /{BUCKET}/{slow} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        s.recv(4096)
        t0 = time.monotonic()
        server.stop()
        stop_s = time.monotonic() - t0
    assert senders == [], f"senders still running 3 s after their clients hung up: {senders}"
    assert stop_s < 2 and server.threads_left == [] and server.errors == [], (
        stop_s,
        server.threads_left,
        server.errors,
    )
