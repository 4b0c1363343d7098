"""Read-only file systems and permission errors: every entry point ends in one ``tess: error:`` line, exit 2.

Read-only paths are a real tmpfs remounted read-only; permission-denied paths are real too: the command
runs as ``nobody`` (``setpriv``) against folders owned by root. Both need root, as CI has; elsewhere the
tests skip and say why.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline.demo.server import seed_objects
from tests.conftest import png_bytes
from tests.helpers import ROOT
from tests.test_train import make_cache

NOBODY = 65534


def _run(args, *, as_nobody=False, home=None, module=True, timeout=300):
    cmd = [sys.executable, *(["-m", "pipeline"] if module else []), *args]
    env = {**os.environ, "HOME": str(home or tempfile.gettempdir()), "MPLCONFIGDIR": str(home or tempfile.gettempdir())}
    if as_nobody:
        cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _one_line(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("tess: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


class _Mount(type(Path())):
    def freeze(self) -> None:
        """Remount read-only."""
        subprocess.run(["mount", "-o", "remount,ro", str(self)], check=True)


@pytest.fixture
def ro_disk(tmp_path):
    """A tmpfs that the test fills, then :func:`freeze` remounts read-only."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs and remount it read-only")
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")

    yield _Mount(mnt)
    if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def root_owned():
    """A world-readable folder owned by root (``nobody`` may read it, not write it), with a home for nobody."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run a command as nobody")
    probe = subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            sys.executable,
            "-c",
            "import pipeline, train_vae",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        # e.g. a checkout under a 0700 folder (mktemp -d): nobody cannot even import tess there.
        pytest.skip(f"nobody cannot read this checkout ({probe.stderr.strip().splitlines()[-1][:120]})")
    base = Path(tempfile.mkdtemp(prefix="tess-perm-", dir="/tmp"))
    base.chmod(0o755)
    home = base / "nobody-home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def few_objects(s3_server, bucket):
    seed_objects(bucket, ((f"ro/img-{i}_{i % 2}.png", png_bytes(i)) for i in range(4)))
    return f"s3://{bucket}/ro/", s3_server.endpoint


def test_fetch_into_a_read_only_cache_dir(ro_disk, few_objects):
    prefix, endpoint = few_objects
    ro_disk.freeze()
    proc = _run(["fetch", prefix, "--endpoint", endpoint, "--cache-dir", str(ro_disk / "cache"), "--no-progress"])
    _one_line(proc, "read-only file system", "--cache-dir")


def test_fetch_into_a_cache_dir_without_permission(root_owned, few_objects):
    prefix, endpoint = few_objects
    proc = _run(
        ["fetch", prefix, "--endpoint", endpoint, "--cache-dir", str(root_owned / "cache"), "--no-progress"],
        as_nobody=True,
        home=root_owned / "nobody-home",
    )
    _one_line(proc, "permission denied", "--cache-dir")


def test_train_into_a_read_only_out(ro_disk, tmp_path):
    cache = tmp_path / "cache"
    make_cache(cache, 16)
    ro_disk.freeze()
    proc = _run(
        ["train_vae.py", "--cache-dir", str(cache), "--out", str(ro_disk / "run"), "--no-progress"], module=False
    )
    _one_line(proc, "read-only file system", "--out")


def test_train_into_an_out_without_permission(root_owned):
    cache = root_owned / "cache"
    make_cache(cache, 16)
    subprocess.run(["chmod", "-R", "a+rX", str(cache)], check=True)
    proc = _run(
        ["train_vae.py", "--cache-dir", str(cache), "--out", str(root_owned / "run"), "--no-progress"],
        module=False,
        as_nobody=True,
        home=root_owned / "nobody-home",
    )
    _one_line(proc, "permission denied", "--out")


def test_train_and_verify_read_a_read_only_cache(ro_disk, tmp_path):
    """A read-only cache (a shared mount) is still good to train from and to verify: both only read it."""
    make_cache(ro_disk / "cache", 16)
    ro_disk.freeze()
    proc = _run(
        [
            "train_vae.py",
            "--cache-dir",
            str(ro_disk / "cache"),
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
            "-e",
            "1",
        ],
        module=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "summary.json").is_file()
    proc = _run(["verify", "--cache-dir", str(ro_disk / "cache"), "--no-progress"])
    assert proc.returncode == 0, proc.stderr
    assert "0 missing, 0 corrupted" in proc.stdout


@pytest.mark.parametrize("command", ["verify", "stats", "clean-cache"])
def test_cache_commands_on_a_cache_without_permission(root_owned, command):
    cache = root_owned / "cache"
    make_cache(cache, 4)
    cache.chmod(0o700)  # root's alone: nobody may not even look inside
    extra = ["--no-progress"] if command == "verify" else []
    proc = _run([command, "--cache-dir", str(cache), *extra], as_nobody=True, home=root_owned / "nobody-home")
    _one_line(proc, "permission denied")
    assert len(list((cache / "objects").rglob("*.*"))) == 0 and (cache / "manifests").is_dir()  # nothing removed


def test_clean_cache_on_a_read_only_cache(ro_disk):
    make_cache(ro_disk / "cache", 4)
    ro_disk.freeze()
    proc = _run(["clean-cache", "--cache-dir", str(ro_disk / "cache")])
    _one_line(proc, "read-only file system")
    assert (ro_disk / "cache" / "manifests").is_dir()


def test_upload_of_a_folder_without_permission(root_owned, s3_server, bucket):
    folder = root_owned / "images"
    folder.mkdir()
    (folder / "a_0.png").write_bytes(png_bytes(1))
    folder.chmod(0o700)
    proc = _run(
        ["upload", str(folder), f"s3://{bucket}/up/", "--endpoint", s3_server.endpoint],
        as_nobody=True,
        home=root_owned / "nobody-home",
    )
    _one_line(proc, "permission denied")


def test_serve_on_a_port_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        proc = _run(["serve", "--port", str(s.getsockname()[1]), "--demo", "0", "--until-stdin-closes"])
    _one_line(proc, "address already in use", "--port")


def test_serve_on_a_privileged_port_without_permission(root_owned):
    if int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text()) <= 80:
        pytest.skip("ports below 1024 are open to every user here")
    proc = _run(
        ["serve", "--port", "80", "--demo", "0", "--until-stdin-closes"],
        as_nobody=True,
        home=root_owned / "nobody-home",
    )
    _one_line(proc, "permission denied")
