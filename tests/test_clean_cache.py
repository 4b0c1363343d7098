"""``clean-cache`` removes a tess cache and only what tess owns; the cache marks itself at creation."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys

import pytest

from cache.layout import MARKER_FORMAT, MARKER_NAME, OWNED_FOLDERS, CacheLayout
from cache.locks import GC_LOCK, cache_lock
from tests.helpers import ROOT, run_cli
from tests.test_train import make_cache


def _tree(root):
    """Every file under ``root`` with its bytes (what must survive a refused clean-cache)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_create_marks_the_cache(tmp_path):
    layout = CacheLayout.at(tmp_path / "c").create()
    meta = json.loads(layout.marker.read_text())
    assert meta["format"] == MARKER_FORMAT and meta["created"].endswith("Z")
    assert sorted(os.listdir(layout.root)) == sorted((*OWNED_FOLDERS, MARKER_NAME))
    assert list(layout.tmp.iterdir()) == []  # the marker's temp file was renamed, not left behind


def test_create_refuses_a_folder_of_someone_elses_files(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError) as e:
        CacheLayout.at(home).create()
    assert "thesis.tex" in str(e.value) and "--cache-dir" in str(e.value)
    assert os.listdir(home) == ["thesis.tex"]  # no tess folder was spread among the user's files


@pytest.mark.parametrize("setup", ["user-files", "empty-folder", "nested-user-tree"])
def test_clean_cache_refuses_a_folder_that_is_not_a_cache(tmp_path, setup):
    target = tmp_path / "notcache"
    target.mkdir()
    if setup == "user-files":
        (target / "notes.txt").write_text("mine")
    elif setup == "nested-user-tree":
        (target / "objects").mkdir()  # a tess-like name alone does not make a cache
        (target / "objects" / "photo.jpg").write_bytes(b"\xff\xd8 not tess's")
        (target / "src").mkdir()
    before = _tree(target)
    proc = run_cli("clean-cache", "--cache-dir", str(target))
    assert proc.returncode == 2, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tess: error:")
    assert "is not a tess cache" in lines[0] and str(target) in lines[0] and "nothing removed" in lines[0]
    assert target.is_dir() and _tree(target) == before and "removed" not in proc.stdout


def test_make_clean_cache_refuses_a_foreign_folder(tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "data.csv").write_text("1,2,3")
    proc = subprocess.run(
        ["make", "-s", "clean-cache", f"CACHE_DIR={target}"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0 and "is not a tess cache" in proc.stderr
    assert (target / "data.csv").read_text() == "1,2,3"


def test_clean_cache_removes_a_marked_cache_and_keeps_foreign_entries(tmp_path):
    root = tmp_path / "cache"
    make_cache(root, 8)
    CacheLayout.at(root).create()
    (root / "README-mine.txt").write_text("a user's note inside the cache folder")
    proc = run_cli("clean-cache", "--cache-dir", str(root))
    assert proc.returncode == 0, proc.stderr
    assert (
        "removed the tess cache" in proc.stdout and "kept 1 entries" in proc.stdout and "README-mine.txt" in proc.stdout
    )
    assert sorted(os.listdir(root)) == ["README-mine.txt"]
    assert (root / "README-mine.txt").read_text().startswith("a user's note")


def test_clean_cache_removes_the_whole_folder_when_only_tess_is_inside(tmp_path):
    root = tmp_path / "cache"
    make_cache(root, 8)
    (root / MARKER_NAME).unlink()  # as a cache made before the marker existed: tess's folders alone
    proc = run_cli("clean-cache", "--cache-dir", str(root))
    assert proc.returncode == 0, proc.stderr
    assert not root.exists()
    # 8 blobs, the manifest and its key list, and the GC lock file clean-cache itself held
    assert "(11 files" in proc.stdout, proc.stdout


@pytest.mark.parametrize("shared", [True, False], ids=["fetch-or-train-holds-it", "eviction-holds-it"])
def test_clean_cache_refuses_while_the_cache_is_in_use(tmp_path, shared):
    root = tmp_path / "cache"
    make_cache(root, 4)
    layout = CacheLayout.at(root).create()
    # Another process holds the GC lock, as a fetch, a training run or verify does.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from cache.layout import CacheLayout; from cache.locks import GC_LOCK, cache_lock\n"
            f"with cache_lock(CacheLayout.at({str(root)!r}), GC_LOCK, shared={shared}):\n"
            "    print('held', flush=True); sys.stdin.read()",
        ],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _tree(root)
        proc = run_cli("clean-cache", "--cache-dir", str(root))
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert proc.returncode == 2
    assert "in use by a fetch, a training run or verify" in proc.stderr and "nothing removed" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert _tree(root) == before
    # Once the holder is gone, the same command succeeds.
    with cache_lock(layout, GC_LOCK, shared=True, blocking=False):
        pass
    assert run_cli("clean-cache", "--cache-dir", str(root)).returncode == 0 and not root.exists()


def test_nonblocking_lock_raises_while_held(tmp_path):
    layout = CacheLayout.at(tmp_path / "c").create()
    with cache_lock(layout, GC_LOCK, shared=True):
        fd = os.open(next(layout.locks.iterdir()), os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
