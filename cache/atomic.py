"""Atomic file writes: temp file in the destination folder, fsync, ``os.replace``, fsync of the folder.

A reader sees either the old file or the complete new one, never a prefix, and a killed process leaves
at most a ``.tmp`` file that :func:`remove_stale_temp_files` cleans up on the next run.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

TEMP_SUFFIX = ".tmp"
# The writer's pid is part of every temp name so that a later run can tell a dead writer's leftovers
# from a live concurrent writer's file.
_TEMP_RE = re.compile(r"^\.(?P<pid>\d+)-[0-9a-f]{16}.*\.tmp$")


def temp_path_for(folder: Path, hint: str = "") -> Path:
    """Return a fresh temp file path in ``folder`` carrying this process's pid."""
    return folder / f".{os.getpid()}-{secrets.token_hex(8)}{hint}{TEMP_SUFFIX}"


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open a binary temp file beside ``path``; on clean exit fsync it and rename it over ``path``.

    On any exception the temp file is removed and ``path`` is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(target.parent)
    f = open(tmp, "xb")
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, target)
    except BaseException:
        f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_writer(path) as f:
        f.write(data)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A killed process whose parent died too can linger as a zombie (where nothing reaps orphans);
    # it will never finish its temp file.
    with contextlib.suppress(OSError, IndexError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False
    return True


def remove_stale_temp_files(folder: Path, *, recursive: bool = False) -> int:
    """Remove temp files left in ``folder`` by processes that no longer exist; return how many."""
    if not folder.is_dir():
        return 0
    removed = 0
    candidates = folder.rglob(f"*{TEMP_SUFFIX}") if recursive else folder.glob(f"*{TEMP_SUFFIX}")
    for p in candidates:
        m = _TEMP_RE.match(p.name)
        if m is None or _pid_alive(int(m.group("pid"))):
            continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed += 1
    return removed
