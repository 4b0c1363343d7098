"""Ceph's RADOS Gateway (RGW, Pacific 16.2), a production S3 server, for the end-to-end tests.

This module owns: installing Debian's Ceph packages when they are missing (:func:`ensure_installed`),
the lifetime of a mini cluster in one temporary folder (:class:`RgwCluster`): one monitor, one OSD (memstore) and
radosgw (beast frontend, HTTP and TLS), every address on 127.0.0.1. It also counts the requests that reached
RGW, from the access lines beast writes to RGW's log at ``debug rgw = 1`` (:meth:`RgwCluster.requests`,
:meth:`RgwCluster.get_count`).

Why a cluster: Pacific has no dbstore backend, so RGW needs RADOS; a mon and a memstore OSD with pools of
size 1 are the smallest RADOS there is (no mgr: nothing here needs one). Authentication inside the
cluster is off (``auth_* = none``); S3 requests are still SigV4-checked by RGW against the user that
:meth:`RgwCluster.start` creates with a fixed key pair.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from tests.certs import make_ca_and_cert

PACKAGES = ("ceph-mon", "ceph-osd", "radosgw", "ceph-common")
BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", "ceph")
ACCESS_KEY = "TESSRGWACCESSKEY0001"
SECRET_KEY = "tess-rgw-test-secret-not-a-real-key-0001"
USER = "tess"
START_TIMEOUT_S = 180.0  # a cold start here takes about 15 s; a loaded CI machine gets headroom
APT_TIMEOUT_S = 900.0


class RgwUnavailable(Exception):
    """The packages are missing and apt-get cannot install them: the one reason the RGW tests skip."""


class RgwError(RuntimeError):
    """The cluster did not start or misbehaved; the message ends with the last lines of every daemon log."""


def ensure_installed() -> None:
    """Install :data:`PACKAGES` with apt-get unless every binary of :data:`BINARIES` is on PATH.

    Raises:
        RgwUnavailable: not root, no apt-get, or apt-get failed or timed out (the message says why).
    """
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise RgwUnavailable(
            f"{', '.join(missing)} not installed and not root, so apt-get cannot install {' '.join(PACKAGES)}"
        )
    if shutil.which("apt-get") is None:
        raise RgwUnavailable(f"{', '.join(missing)} not installed and there is no apt-get")
    install = ("install", "-y", "--no-install-recommends", "-o", "Dpkg::Options::=--force-confold", *PACKAGES)
    # Missing or stale package lists fail the first install: then one update and one more try.
    why = _apt(*install) and (_apt("update") or _apt(*install))
    if why:
        raise RgwUnavailable(f"apt-get could not install {' '.join(PACKAGES)}: {why}")
    still = [b for b in BINARIES if shutil.which(b) is None]
    if still:
        raise RuntimeError(f"apt-get installed {' '.join(PACKAGES)} but {', '.join(still)} is still not on PATH")


def _apt(*args: str) -> str | None:
    """``apt-get ARGS`` (non-interactive, bounded): None when it worked, else the reason (its last error line)."""
    cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=120", *args]  # wait for another apt, within bounds
    try:
        proc = subprocess.run(
            cmd,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=APT_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return f"apt-get {args[0]} did not finish within {APT_TIMEOUT_S:.0f} s"
    if proc.returncode == 0:
        return None
    lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("E:")]
    return f"apt-get {args[0]} exited with {proc.returncode}: {(errors or lines or ['no output'])[-1]}"


def free_port() -> int:
    """A loopback port nothing listens on now (the daemon binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# $name and $id are expanded by Ceph itself ("mon.a", "osd.0", "client.rgw.a").
CONF = """\
[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{mon_port}
# Every daemon binds 127.0.0.1 only, msgr v2 only.
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
# radosgw's mon client asks for "secure" first, which auth none cannot give: without this line its
# session never authenticates ("get_initial_auth_request returned -13").
ms mon client mode = crc secure
keyring = /dev/null
# One OSD: pools of size 1, few PGs, a crush rule that picks OSDs, not hosts.
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
osd pool default pg num = 8
osd crush chooseleaf type = 0
# The mon stops below mon_data_avail_crit (5 %) free disk; the store here is a few MB.
mon data avail crit = 1
mon data avail warn = 2
run dir = {root}/run
admin socket = {root}/run/$name.asok
pid file = {root}/run/$name.pid
log file = {root}/log/$name.log
crash dir = {root}/crash
mon data = {root}/mon/$name
osd data = {root}/osd/$name
osd objectstore = memstore
memstore device bytes = {memstore_bytes}

[client.rgw.a]
rgw data = {root}/rgw
rgw frontends = {rgw_frontends}
# Level 1 writes one access line per request ("beast: ... "GET /bucket/key HTTP/1.1" 200 ..."); counted below.
debug rgw = 1
"""
# The value of ``rgw frontends`` (one line in the file), filled from the same values as CONF.
RGW_FRONTENDS = (
    "beast endpoint=127.0.0.1:{http_port} ssl_endpoint=127.0.0.1:{https_port} "
    "ssl_certificate={cert} ssl_private_key={key}"
)


def render_conf(**values: object) -> str:
    """CONF filled with ``values`` (its fields but ``rgw_frontends``, which comes from RGW_FRONTENDS)."""
    return CONF.format(rgw_frontends=RGW_FRONTENDS.format(**values), **values)


ACCESS_LINE = re.compile(
    r'beast: \S+: \S+ - \S+ \[[^\]]*\] "(?P<method>[A-Z]+) (?P<target>\S+) HTTP/[0-9.]+" '
    r'(?P<status>\d+) \d+ (?:-|"[^"]*") (?:-|"[^"]*") (?P<range>\S+) latency='
)
STARTED = "====== starting new request"  # logged when RGW takes a request, before its access line
SYNC_BUCKET = "tess-log-sync"
FOLDER_PREFIX = "tess-rgw-"


@dataclass(frozen=True)
class Request:
    """One request RGW answered, from its access line (path-style: ``/bucket/key?query``)."""

    method: str
    bucket: str
    key: str  # "" for bucket-level requests (listings, policies)
    status: int
    range: str | None  # the Range header, as sent


def parse_access_log(text: str) -> list[Request]:
    out = []
    for m in ACCESS_LINE.finditer(text):
        bucket, _, key = urllib.parse.unquote(m["target"].partition("?")[0]).removeprefix("/").partition("/")
        out.append(Request(m["method"], bucket, key, int(m["status"]), None if m["range"] == "-" else m["range"]))
    return out


def _remove_stale_folders() -> None:
    """Remove the folders of earlier runs whose pytest was killed (its daemons died with it, see below)."""
    for folder in Path(tempfile.gettempdir()).glob(FOLDER_PREFIX + "*"):
        try:
            os.kill(int((folder / "owner.pid").read_text()), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (OSError, ValueError):
            continue  # not ours to judge: no readable owner, or an owner we may not signal


def _die_with_parent() -> None:
    # A killed test run must not leave daemons behind: the kernel sends SIGTERM when pytest dies.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class RgwCluster:
    """mon + memstore OSD + radosgw on 127.0.0.1, everything under one temp folder, for one session.

    Attributes (after :meth:`start`): ``endpoint`` (http), ``https_endpoint``, ``ca_bundle`` (the CA's
    PEM path), ``access_key``, ``secret_key``, ``startup_s`` (seconds from nothing to both frontends
    answering a signed ListBuckets).
    """

    def __init__(self) -> None:
        _remove_stale_folders()
        self.root = Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX))
        (self.root / "owner.pid").write_text(str(os.getpid()))
        self.conf = self.root / "ceph.conf"
        self.access_key, self.secret_key = ACCESS_KEY, SECRET_KEY
        self.endpoint = self.https_endpoint = ""
        self.ca_bundle = self.root / "ca.pem"  # written by start()
        self.startup_s = 0.0
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._env = {k: v for k, v in os.environ.items() if k not in ("CEPH_ARGS", "CEPH_CONF")}

    def start(self) -> RgwCluster:
        t0 = time.monotonic()
        deadline = t0 + START_TIMEOUT_S
        try:
            self._write_config()
            self._start_mon()
            self._start_osd(deadline)
            # Creates RGW's pools (most of the start-up time) and the S3 user with the fixed key pair.
            self._ceph(
                "radosgw-admin",
                "user",
                "create",
                "--uid",
                USER,
                "--display-name",
                USER,
                "--access-key",
                self.access_key,
                "--secret",
                self.secret_key,
                timeout=deadline - time.monotonic(),
            )
            self._spawn("rgw", "radosgw", "-n", "client.rgw.a")
            self._wait_s3(deadline)
        except BaseException as e:
            tails = self.log_tail()
            self.stop()  # even on failure: no daemon and no folder is left behind
            if isinstance(e, Exception):
                raise RgwError(f"the RGW cluster did not start: {e}\n{tails}") from e
            raise
        self.startup_s = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """SIGTERM every daemon this object started (radosgw first), SIGKILL what is left, remove the folder."""
        for name in ("rgw", "osd", "mon"):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()  # a daemon stuck in shutdown
                proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> RgwCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _write_config(self) -> None:
        for sub in ("run", "log", "crash", "mon/mon.a", "osd/osd.0", "rgw"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        files = make_ca_and_cert(self.root)
        self.ca_bundle, cert, key = files.ca, files.cert, files.key
        self.fsid = str(uuid.uuid4())
        ports = {"mon_port": free_port(), "http_port": free_port(), "https_port": free_port()}
        self.conf.write_text(
            render_conf(fsid=self.fsid, root=self.root, cert=cert, key=key, memstore_bytes=4 << 30, **ports)
        )
        self.endpoint = f"http://127.0.0.1:{ports['http_port']}"
        self.https_endpoint = f"https://127.0.0.1:{ports['https_port']}"
        self.mon_port = ports["mon_port"]

    def _start_mon(self) -> None:
        monmap = self.root / "monmap"
        self._run(
            "monmaptool", "--create", "--fsid", self.fsid, "--addv", "a", f"[v2:127.0.0.1:{self.mon_port}]", str(monmap)
        )
        self._ceph("ceph-mon", "--mkfs", "-i", "a", "--monmap", str(monmap))
        self._spawn("mon", "ceph-mon", "-i", "a")

    def _start_osd(self, deadline: float) -> None:
        osd_uuid = str(uuid.uuid4())
        # `ceph osd new` also waits for the mon to answer (--connect-timeout bounds that wait).
        osd_id = self._ceph("ceph", "--connect-timeout", "30", "osd", "new", osd_uuid, timeout=60).strip()
        if osd_id != "0":
            raise RgwError(f"`ceph osd new` gave id {osd_id!r}, expected 0")
        self._ceph("ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", osd_uuid, timeout=60)
        self._spawn("osd", "ceph-osd", "-i", "0")
        while True:
            dump = json.loads(
                self._ceph("ceph", "--connect-timeout", "10", "osd", "dump", "--format", "json", timeout=30)
            )
            if any(o["osd"] == 0 and o["up"] == 1 for o in dump["osds"]):
                return
            self._check_alive(deadline, "osd.0 to be up")
            time.sleep(0.2)

    def _wait_s3(self, deadline: float) -> None:
        """Poll a signed ListBuckets on both frontends until both answer (curl --aws-sigv4 is refused by RGW)."""
        import botocore.exceptions

        for tls in (False, True):
            client = self.client(tls=tls, connect_timeout=1, read_timeout=5)
            while True:
                try:
                    client.list_buckets()
                    break
                except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
                    self._check_alive(deadline, f"radosgw to answer over {'TLS' if tls else 'HTTP'} (last: {e})")
                    time.sleep(0.2)

    def _check_alive(self, deadline: float, waiting_for: str) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise RgwError(f"{name} exited with {proc.returncode} while waiting for {waiting_for}")
        if time.monotonic() > deadline:
            raise RgwError(f"timed out after {START_TIMEOUT_S:.0f} s waiting for {waiting_for}")

    def _spawn(self, name: str, binary: str, *args: str) -> None:
        """Start a daemon in the foreground (-f) so that its pid is ours to stop; output to log/NAME.out."""
        with open(self.root / "log" / f"{name}.out", "ab") as out:
            self._procs[name] = subprocess.Popen(
                [binary, "-c", str(self.conf), "-f", *args],
                cwd=self.root,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )

    def _ceph(self, binary: str, *args: str, timeout: float = 30) -> str:
        return self._run(binary, "-c", str(self.conf), *args, timeout=timeout)

    def _run(self, *cmd: str, timeout: float = 30) -> str:
        proc = subprocess.run(
            cmd,
            cwd=self.root,
            env=self._env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=max(timeout, 1),
        )
        if proc.returncode != 0:
            raise RgwError(
                f"{' '.join(cmd[:4])} ... exited with {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-2000:]}"
            )
        return proc.stdout

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of every log in the folder (for error messages)."""
        parts = []
        for path in sorted((self.root / "log").glob("*")) if (self.root / "log").is_dir() else []:
            text = path.read_text("utf-8", "replace").splitlines()[-lines:]
            parts.append(f"--- {path.name} (last {len(text)} lines) ---\n" + "\n".join(text))
        return "\n".join(parts) or "(no daemon logs)"

    def env(self) -> dict[str, str]:
        """Environment for a tess child process: this cluster's user."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self, *, tls: bool = False, connect_timeout: float = 5, read_timeout: float = 60):
        """A boto3 S3 client of the tess user (path-style; over TLS it trusts only this cluster's CA)."""
        import boto3
        import botocore.config

        cfg = botocore.config.Config(
            s3={"addressing_style": "path"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": 1, "mode": "standard"},
        )
        return boto3.client(
            "s3",
            endpoint_url=self.https_endpoint if tls else self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            verify=str(self.ca_bundle) if tls else None,
            config=cfg,
        )

    def requests(self, timeout: float = 10) -> list[Request]:
        """Every request RGW has logged so far, in log order, including all answered before this call.

        RGW writes a request's access line after sending its answer, so a client can see the answer
        before the line exists. Hence: send a marker request, then read the log until the marker's line
        is there and every "starting new request" line has its access line (nothing is in flight). The
        marker lines (bucket :data:`SYNC_BUCKET`) are left out.
        """
        marker = uuid.uuid4().hex
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an HTTP_PROXY
        try:
            direct.open(f"{self.endpoint}/{SYNC_BUCKET}/{marker}", timeout=timeout).close()
        except urllib.error.HTTPError:
            pass  # anonymous GET of a missing bucket: 404, and logged like any request
        log = self.root / "log" / "client.rgw.a.log"
        deadline = time.monotonic() + timeout
        while True:
            text = log.read_text("utf-8", "replace")
            if f"/{SYNC_BUCKET}/{marker} " in text and text.count(STARTED) == text.count(" beast: "):
                parsed = parse_access_log(text)
                if len(parsed) != text.count(" beast: "):
                    raise RgwError(f"{text.count(' beast: ') - len(parsed)} access lines of {log} do not parse")
                return [r for r in parsed if r.bucket != SYNC_BUCKET]
            if time.monotonic() > deadline:
                raise RgwError(f"RGW did not log the marker request within {timeout} s\n{self.log_tail()}")
            time.sleep(0.02)

    def get_keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Keys of every object GET (not HEAD, not listings) RGW has served under ``bucket/prefix``, in order."""
        return [
            r.key
            for r in self.requests()
            if r.method == "GET" and r.bucket == bucket and r.key and r.key.startswith(prefix)
        ]

    def get_count(self, bucket: str, prefix: str = "") -> int:
        """How many object GETs of ``bucket/prefix`` reached RGW so far (tests compare two counts)."""
        return len(self.get_keys(bucket, prefix))

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self._procs.items() if p.poll() is None}
