"""The plain key list beside each manifest (``<name>.keys``): one key per line, any key round-trips exactly.

``\\``, LF and CR are escaped as ``\\\\``, ``\\n`` and ``\\r``; every other character is written as is
(UTF-8). Tools that want only the keys of a pinned listing read this file instead of the manifest.
"""

from __future__ import annotations

import os

KEYS_SUFFIX = ".keys"


def escape_key(key: str) -> str:
    return key.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def _unescape_key(line: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(line):
        c = line[i]
        if c == "\\" and i + 1 < len(line):
            nxt = line[i + 1]
            out.append({"n": "\n", "r": "\r", "\\": "\\"}.get(nxt, "\\" + nxt))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def read_key_list(path: str | os.PathLike[str]) -> list[str]:
    """Read a ``.keys`` file back into the exact keys."""
    with open(path, encoding="utf-8", newline="\n") as f:
        return [_unescape_key(line[:-1] if line.endswith("\n") else line) for line in f]
