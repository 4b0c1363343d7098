"""Deterministic shards of a listing: which keys node ``k`` of ``N`` mirrors (``fetch --shard k/N``).

Pure (hashlib and numpy): the fetch splits listings with it, the manifest header parses its ``shard``
field into a :class:`ShardSpec`, and training matches shards to ranks.

A key belongs to shard ``h(key) mod N`` where ``h`` is the first 8 bytes (big-endian) of the SHA-256 of
the key's UTF-8 bytes. The hash depends on the key alone, so adding or removing other keys never moves
a key to another shard (a position-based split such as "every N-th listed key" would reshuffle every
shard whenever one key is added near the front), and every process, node and Python version computes
the same split (Python's ``hash()`` is salted per process, so it is not used).

Where the shard comes from (:func:`resolve_shard`): the explicit ``--shard k/N`` (``make fetch
SHARD=k/N``) wins; otherwise ``NODE_RANK``/``NNODES`` (one fetch per node, the usual case: every GPU
process of a node then shares the node's shard); otherwise ``RANK``/``WORLD_SIZE`` (a fetch run under
torchrun itself, one shard per process). ``N = 1`` means the whole listing.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
_FIX = "use k/N with 0 <= k < N"
# (index variable, count variable) pairs, strongest first.
ENV_PAIRS: tuple[tuple[str, str], ...] = (("NODE_RANK", "NNODES"), ("RANK", "WORLD_SIZE"))


def _check(index: int, count: int, label: str) -> None:
    if count < 1:
        raise ValueError(f"{label}: count must be >= 1; {_FIX}")
    if index < 0:
        raise ValueError(f"{label}: index must be >= 0; {_FIX}")
    if index >= count:
        raise ValueError(f"{label}: index must be < count; {_FIX}")


@dataclass(frozen=True)
class ShardSpec:
    """Shard ``index`` of ``count`` (written ``index/count``, as in manifests and ``--shard``)."""

    index: int
    count: int

    def __post_init__(self) -> None:
        _check(self.index, self.count, f"SHARD '{self.index}/{self.count}'")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def whole(self) -> bool:
        """True for ``0/1``: the shard is the whole listing."""
        return self.count == 1


def parse_shard(text: str, *, source: str = "SHARD") -> ShardSpec:
    """Parse ``"k/N"``.

    Args:
        text: The shard, e.g. ``"2/8"``.
        source: How the user spelled the setting, for the error message.

    Raises:
        ValueError: one line naming the value and the fix.
    """
    m = _SHARD_RE.match(str(text))
    if not m:
        raise ValueError(f"{source} {str(text)!r}: not of the form k/N; {_FIX} (e.g. 0/4)")
    index, count = int(m.group(1)), int(m.group(2))
    _check(index, count, f"{source} {str(text).strip()!r}")
    return ShardSpec(index, count)


def shard_from_env(environ: Mapping[str, str]) -> ShardSpec | None:
    """The shard named by ``NODE_RANK``/``NNODES``, else by ``RANK``/``WORLD_SIZE``, else None.

    Half a pair (``NODE_RANK`` without ``NNODES``) is an error rather than silently falling through to
    the next pair, because it almost always means a launcher script forgot one variable.

    Raises:
        ValueError: a variable that is not an integer, half a pair, or an index out of range.
    """
    for index_var, count_var in ENV_PAIRS:
        raw_index, raw_count = environ.get(index_var), environ.get(count_var)
        if raw_index is None and raw_count is None:
            continue
        if raw_index is None or raw_count is None:
            given, missing = (
                (f"{count_var}={raw_count}", index_var)
                if raw_index is None
                else (f"{index_var}={raw_index}", count_var)
            )
            raise ValueError(f"{given} but {missing} is not set; set both or pass --shard k/N (SHARD=k/N)")
        label = f"{index_var}={raw_index}, {count_var}={raw_count}"
        try:
            index, count = int(raw_index), int(raw_count)
        except ValueError:
            raise ValueError(f"{label}: both must be integers; set them or pass --shard k/N (SHARD=k/N)") from None
        _check(index, count, label)
        return ShardSpec(index, count)
    return None


def resolve_shard(flag: str | None, environ: Mapping[str, str]) -> tuple[ShardSpec | None, str]:
    """The shard to fetch and where it came from: ``--shard`` > NODE_RANK/NNODES > RANK/WORLD_SIZE.

    Returns:
        ``(spec, origin)``; ``spec`` is None (whole listing) when nothing names a shard or it is ``k/1``.
    """
    spec: ShardSpec | None
    if flag:
        spec, origin = parse_shard(flag), "--shard"
    else:
        spec = shard_from_env(environ)
        origin = next((f"{i}/{c}" for i, c in ENV_PAIRS if i in environ or c in environ), "")
    return (None if spec is None or spec.whole else spec), origin


def key_hash(key: str) -> int:
    """The stable 64-bit hash of ``key`` that places it in a shard."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")


def shard_of(key: str, count: int) -> int:
    """The shard index (``0 <= i < count``) that holds ``key``."""
    return key_hash(key) % count


def in_shard(key: str, spec: ShardSpec) -> bool:
    """Whether ``key`` belongs to shard ``spec``."""
    return shard_of(key, spec.count) == spec.index


def shard_indices(keys: Iterable[str], count: int) -> np.ndarray:
    """Shard index of every key, as an int64 array (one hash per key, no per-key objects kept)."""
    hashes = np.fromiter((key_hash(k) for k in keys), dtype=np.uint64)
    return (hashes % np.uint64(count)).astype(np.int64)


def shard_mask(keys: Iterable[str], spec: ShardSpec) -> np.ndarray:
    """Boolean mask over ``keys``: True where the key belongs to ``spec``."""
    return shard_indices(keys, spec.count) == spec.index
