"""Secrets: sentinel credentials go through fetch, train, verify and their error paths, and leak nowhere.

The subprocesses run with a sentinel access key id, secret key and session token in their environment
(``python -m pipeline ...`` and ``python train_vae.py``, as a user would run them). No sentinel may
appear in any stdout or stderr, in any file of the cache (manifests, key lists, the key index, locks,
packs; blobs are the objects' own bytes and are skipped) or of the training output folder (metrics,
summary, checkpoint bytes, pictures), nor in the text of the exceptions tess raises. An endpoint URL
with ``user:password@`` is refused with a message that does not echo the password.
"""

from __future__ import annotations

import subprocess
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cache import CacheLayout, load_manifest
from pipeline.config import ClientOptions, resolve_endpoint
from pipeline.demo.server import seed_objects
from pipeline.fetch.stage import FetchConfig, fetch
from pipeline.transport.boto import StorageError
from tests.conftest import png_bytes
from tests.faultproxy import FaultProxy
from tests.helpers import closed_port, run_cli, server_process

# Letters, digits and '-' only: the same bytes in UTF-8, JSON, URLs, pickles and sqlite text.
SECRET = "SENTINEL-SECRET-7f3a9c5e1b2d4f60a8c7"
ACCESS = "SENTINELAKID7F3A9C5E1B"
TOKEN = "SENTINEL-TOKEN-7f3a9c5e1b2d4f60"
PASSWORD = "SENTINEL-PASSWORD-7f3a9c"
SENTINELS = (SECRET, ACCESS, TOKEN, PASSWORD)
ENV = {
    "AWS_ACCESS_KEY_ID": ACCESS,
    "AWS_SECRET_ACCESS_KEY": SECRET,
    "AWS_SESSION_TOKEN": TOKEN,
    "PYTHONUNBUFFERED": "1",
}


def _leaks(data: str | bytes) -> list[str]:
    raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    return [s for s in SENTINELS if s.encode() in raw]


def _leaky_files(root: Path) -> dict[str, list[str]]:
    """Files under ``root`` holding a sentinel, skipping blobs (``objects/``: the objects' own bytes)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and "objects" not in rel.parts and (found := _leaks(p.read_bytes())):
            out[str(rel)] = found
    return out


def _run(label: str, *args: str, env: dict[str, str] | None = None) -> tuple[str, subprocess.CompletedProcess[str]]:
    """``python -m pipeline ARGS`` (or ``python train_vae.py ARGS``) with the sentinel credentials."""
    module = "" if args[0].endswith(".py") else "pipeline"
    return label, run_cli(*args, module=module, env={**ENV, **(env or {})}, timeout=240)


def test_no_secret_in_outputs_files_or_errors(s3_server, bucket, tmp_path, monkeypatch):
    from pipeline import cli

    seed_objects(bucket, ((f"img/x-{i:03d}_{i % 4}.png", png_bytes(i, size=8)) for i in range(48)))
    cache = tmp_path / "cache"
    out = tmp_path / "run"
    ep = s3_server.endpoint
    common = ("--cache-dir", str(cache), "--no-progress")
    runs: list[tuple[str, subprocess.CompletedProcess[str]]] = []

    # The happy path first: the cache and manifest the other commands use.
    runs.append(_run("fetch", "fetch", f"s3://{bucket}/img/", "--endpoint", ep, "-w", "2", *common))
    assert runs[-1][1].returncode == 0, runs[-1][1].stderr
    manifest = next((cache / "manifests").glob("*.jsonl"))
    assert len(load_manifest(manifest)) == 48

    # A worker process meets a 403 on one object (through the fault proxy, with transient faults
    # around it): that object fails with the server's refusal in one line, the others are fetched.
    victim = f"img/x-{7:03d}_3.png"
    with FaultProxy(
        ep,
        seed=5,
        rates={"500": 0.1, "reset": 0.1, "truncate": 0.1},
        always={f"/{bucket}/{victim}": "403"},
        watch=SENTINELS,
    ) as proxy:
        runs.append(
            _run(
                "fetch, 403 on one object",
                "fetch",
                f"s3://{bucket}/img/",
                "--endpoint",
                proxy.endpoint,
                "-w",
                "2",
                "--max-attempts",
                "8",
                "--cache-dir",
                str(tmp_path / "cache-proxy"),
                "--no-progress",
            )
        )
    assert runs[-1][1].returncode == 3 and "access denied (AccessDenied)" in runs[-1][1].stderr, runs[-1][1].stderr
    assert [line for line in runs[-1][1].stderr.splitlines() if "AccessDenied" in line] == [
        line for line in runs[-1][1].stderr.splitlines() if victim in line
    ], runs[-1][1].stderr
    # The sentinels were really in use: the key id and the token travel in every signed request (as
    # SigV4 requires); the secret key itself never goes on the wire.
    assert proxy.watched[ACCESS] == proxy.watched[TOKEN] == proxy.requests > 0, proxy.watched
    assert proxy.watched[SECRET] == 0 and proxy.watched[PASSWORD] == 0

    with server_process(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as auth_ep:
        # Error paths, two processes at a time (each spends most of its time importing torch).
        jobs = [
            (
                "fetch, unreachable endpoint",
                "fetch",
                "s3://bkt/p/",
                "--endpoint",
                f"http://127.0.0.1:{closed_port()}",
                "--connect-timeout",
                "1",
                "--max-attempts",
                "2",
                *common,
            ),
            ("fetch, missing bucket", "fetch", "s3://no-such-bucket-secrets/p/", "--endpoint", ep, *common),
            ("fetch, empty prefix", "fetch", f"s3://{bucket}/nothing-here/", "--endpoint", ep, *common),
            ("fetch, unknown credentials (403)", "fetch", f"s3://{bucket}/img/", "--endpoint", auth_ep, *common),
            (
                "fetch, password in --endpoint",
                "fetch",
                "s3://bkt/p/",
                "--endpoint",
                f"http://{ACCESS}:{PASSWORD}@127.0.0.1:1",
                *common,
            ),
        ]
        with ThreadPoolExecutor(2) as pool:
            errors = list(pool.map(lambda job: _run(*job), jobs))

        # In this process: the exceptions themselves, with their whole traceback text.
        for k, v in ENV.items():
            monkeypatch.setenv(k, v)
        raised = []
        with pytest.raises(StorageError) as info:
            fetch(
                FetchConfig(
                    prefix=f"s3://{bucket}/img/",
                    options=ClientOptions(endpoint=auth_ep, max_attempts=1),
                    cache_dir=tmp_path / "inproc",
                    workers=0,
                    progress=False,
                )
            )
        raised.append(info.value)
    with pytest.raises(ValueError) as info:
        ClientOptions(endpoint=f"http://{ACCESS}:{PASSWORD}@127.0.0.1:1")
    raised.append(info.value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{ACCESS}:{PASSWORD}@127.0.0.1:1")
    with pytest.raises(ValueError) as info:
        resolve_endpoint(None)
    raised.append(info.value)
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    for exc in raised:
        text = "".join(traceback.format_exception(exc)) + repr(exc)
        assert _leaks(text) == [], text
    assert "contains credentials" in str(raised[-1])

    runs += errors
    for label, proc in errors:
        assert proc.returncode == 2, (label, proc.returncode, proc.stderr)
        assert "tess: error: " in proc.stderr and "Traceback" not in proc.stderr, (label, proc.stderr)
    assert "contains credentials" in errors[-1][1].stderr and "***@127.0.0.1:1" in errors[-1][1].stderr

    # Training on the fetched cache, one epoch, with every output file written.
    runs.append(
        _run(
            "train",
            "train_vae.py",
            "--epochs",
            "1",
            "-b",
            "16",
            "--device",
            "cpu",
            "--no-progress",
            "--cache-dir",
            str(cache),
            "--manifest",
            str(manifest),
            "--out",
            str(out),
        )
    )
    assert runs[-1][1].returncode == 0, runs[-1][1].stderr
    assert {"checkpoint.pt", "metrics.csv", "summary.json"} <= {p.name for p in out.iterdir()}

    runs.append(_run("stats", "stats", "--cache-dir", str(cache)))
    assert runs[-1][1].returncode == 0, runs[-1][1].stderr

    # verify: a corrupted blob is reported, then repaired from the server with the sentinel keys.
    has_verify = "verify" in cli.COMMANDS
    if has_verify:
        m = load_manifest(manifest)
        CacheLayout(root=cache).blob_path(m.sha_hex(3)).write_bytes(b"bit rot")
        runs.append(_run("verify, corrupted blob", "verify", *common))
        assert runs[-1][1].returncode != 0 and m.keys[3] in runs[-1][1].stdout + runs[-1][1].stderr, runs[-1][1]
        runs.append(_run("verify --repair", "verify", "--repair", "--endpoint", ep, *common))
        assert runs[-1][1].returncode == 0, runs[-1][1].stderr

    for label, proc in runs:
        assert _leaks(proc.stdout) == [] and _leaks(proc.stderr) == [], (label, proc.stdout, proc.stderr)
    # Every file the runs wrote: caches (but their blobs), training outputs, pictures, checkpoint.
    assert (cache / "index").is_dir() and (out / "checkpoint.pt").stat().st_size > 0
    assert _leaky_files(tmp_path) == {}
    if not has_verify:
        pytest.skip("everything but `python -m pipeline verify` was checked: that command does not exist yet")
