"""``pip install .`` gives a ``tess`` command that is ``python -m pipeline``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from tests.helpers import ROOT


def test_pip_install_gives_a_tess_command(tmp_path):
    src = tmp_path / "src"
    # A copy, so the build leaves no build/ or egg-info folder in the checkout.
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "bench", "*.egg-info", "build"))
    site = tmp_path / "site"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    tess = site / "bin" / "tess"
    assert tess.is_file()
    env = {**os.environ, "PYTHONPATH": str(site)}
    helped = subprocess.run([str(tess), "--help"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert helped.returncode == 0 and "clean-cache" in helped.stdout and "fetch" in helped.stdout
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    refused = subprocess.run(
        [str(tess), "clean-cache", "--cache-dir", str(tmp_path / "mine")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert (
        refused.returncode == 2
        and refused.stderr.startswith("tess: error:")
        and "is not a tess cache" in refused.stderr
    )
    assert (tmp_path / "mine" / "keep.txt").read_text() == "x"
