"""s3rver, a second S3 implementation (Node.js), for the end-to-end tests and the benchmarks.

moto is the tests' main server; s3rver catches S3 dialect differences (its listings, ETags and errors
are its own) and serves small objects about five times faster, so the fetch benchmarks measure the
client, not the server. :func:`install` puts npm's ``s3rver@3.7.1`` under ``.venv/s3rver`` once;
:class:`S3rverServer` runs it on 127.0.0.1 at a free port through ``s3rver_main.js``, which counts
requests by kind like the moto server (``GET /_tess/stats``).

Node 20 needs ``NODE_OPTIONS=--openssl-legacy-provider`` or listings over 1,000 keys fail, and s3rver
accepts only the key pair ``S3RVER`` / ``S3RVER``.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import ssl
import subprocess
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VERSION = "3.7.1"
INSTALL_DIR = ROOT / ".venv" / "s3rver"
MAIN_JS = Path(__file__).resolve().parent / "s3rver_main.js"
ACCESS_KEY = SECRET_KEY = "S3RVER"
READY_PREFIX = "TESS_S3_ENDPOINT="


def install(prefix: Path = INSTALL_DIR) -> Path:
    """``npm install s3rver@3.7.1`` into ``prefix`` unless it is there; return its ``node_modules``.

    Raises:
        RuntimeError: node or npm is missing, or npm failed (no registry); the message says which.
    """
    modules = prefix / "node_modules"
    if (modules / "s3rver" / "package.json").is_file():
        return modules
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed; s3rver needs Node.js 20 and npm")
    # One retry and bounded timeouts: an unreachable registry is reported in seconds (npm's defaults
    # retry for over a minute), and a black-holed one within about a minute.
    proc = subprocess.run(
        [
            "npm",
            "install",
            "--prefix",
            str(prefix),
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
            "--fetch-retries=1",
            "--fetch-retry-mintimeout=1000",
            "--fetch-retry-maxtimeout=5000",
            "--fetch-timeout=30000",
            f"s3rver@{VERSION}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0 or not (modules / "s3rver" / "package.json").is_file():
        raise RuntimeError(
            f"npm install s3rver@{VERSION} failed (exit {proc.returncode}): {_npm_reason(proc.stderr or proc.stdout)}"
        )
    return modules


def _npm_reason(output: str) -> str:
    """The line of npm's error output that says why (e.g. ``FetchError: ... ECONNREFUSED``)."""
    lines = [line.removeprefix("npm error").removeprefix("npm ERR!").strip() for line in output.strip().splitlines()]
    lines = [line for line in lines if line]
    for marker in ("reason:", "FetchError", "code "):
        for line in lines:
            if marker in line:
                return line
    return lines[-1] if lines else "no output"


class S3rverServer:
    """s3rver on 127.0.0.1 at a free port, storing its buckets in a temporary folder."""

    def __init__(
        self,
        *,
        modules: Path | None = None,
        directory: str | os.PathLike[str] | None = None,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        """``tls``: (certificate, key, CA) PEM files: serve HTTPS with that certificate."""
        self._modules = modules or install()
        self._tls = tls
        self._own_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="tess-s3rver-"))
        self._proc: subprocess.Popen[str] | None = None
        self.endpoint = ""

    def start(self) -> S3rverServer:
        env = {**os.environ, "NODE_PATH": str(self._modules), "NODE_OPTIONS": "--openssl-legacy-provider"}
        if self._tls is not None:
            env.update(TESS_TLS_CERT=str(self._tls[0]), TESS_TLS_KEY=str(self._tls[1]))
        # stdin is a pipe we never close until stop(): the server exits when it closes, so a killed
        # test run never leaves a server behind.
        self._proc = subprocess.Popen(
            ["node", str(MAIN_JS), str(self.directory)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        line = self._proc.stdout.readline() if self._proc.stdout else ""
        if not line.startswith(READY_PREFIX):
            self.stop()
            raise RuntimeError(f"s3rver did not start (printed {line.strip()!r})")
        self.endpoint = line.strip()[len(READY_PREFIX) :]
        return self

    @property
    def counts(self) -> collections.Counter[str]:
        """Requests served so far, by kind (``GET`` of an object, ``LIST``, ``PUT``, ...)."""
        with urllib.request.urlopen(self.endpoint + "/_tess/stats", timeout=10, context=self._context()) as r:
            return collections.Counter(json.load(r))

    def _context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=str(self._tls[2])) if self._tls is not None else None

    def reset_counts(self) -> None:
        req = urllib.request.Request(self.endpoint + "/_tess/stats", method="DELETE")
        urllib.request.urlopen(req, timeout=10, context=self._context()).close()

    def delete_after_next_list(self, bucket: str, key: str) -> None:
        """Arm a one-shot fault: the next listing of ``bucket`` still names ``key`` but deletes it just
        before the answer is sent, so a client lists ``key`` and then finds it gone."""
        query = urllib.parse.urlencode({"bucket": bucket, "key": key})
        req = urllib.request.Request(f"{self.endpoint}/_tess/delete-after-list?{query}", method="POST")
        urllib.request.urlopen(req, timeout=10, context=self._context()).close()

    def stop(self) -> None:
        if self._proc is not None:
            if self._proc.stdin:
                self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            if self._proc.stdout:
                self._proc.stdout.close()
            self._proc = None
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> S3rverServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
