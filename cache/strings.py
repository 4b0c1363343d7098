"""Many strings in two numpy arrays (UTF-8 bytes + offsets): keys and ETags of manifests and listings.

A list of a million Python strings costs about 70 bytes of object header per string and is copied,
page by page, into every forked DataLoader worker that touches it (reference counts are writes).
Two flat arrays have no per-string objects, so the pages stay shared.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class StringArray:
    """Many strings in two numpy arrays (UTF-8 bytes + offsets): no per-string Python objects."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray) -> None:
        self.data = data
        self.offsets = offsets

    @classmethod
    def from_strings(cls, strings: Sequence[str]) -> StringArray:
        return cls.from_encoded([s.encode("utf-8") for s in strings])

    @classmethod
    def from_encoded(cls, encoded: Sequence[bytes]) -> StringArray:
        """From already UTF-8-encoded strings."""
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        if encoded:
            np.cumsum(np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
        return cls(np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        start, end = self.offsets[i], self.offsets[i + 1]
        return self.data[start:end].tobytes().decode("utf-8")

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + self.offsets.nbytes)
