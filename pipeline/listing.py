"""A pinned listing held as compact arrays, and the label convention for keys.

Labels: ``<stem>_<int>.<ext>`` gives ``int`` (the research loader's convention); otherwise the first
folder below the prefix names the class (torchvision ImageFolder convention, classes sorted by name);
otherwise -1.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from cache.manifest import StringArray
from pipeline.mirror import ObjectRef
from pipeline.transport.listing import ObjectInfo

_LABEL_RE = re.compile(r"_(\d{1,9})\.[A-Za-z0-9]+$")


def label_from_name(key: str) -> int | None:
    """The ``_<int>`` label of the key's file name, or None."""
    name = key.rsplit("/", 1)[-1]
    m = _LABEL_RE.search(name)
    return int(m.group(1)) if m else None


def folder_class(key: str, prefix: str) -> str | None:
    """The first folder of ``key`` below ``prefix`` (ImageFolder's class), or None."""
    rel = key[len(prefix) :] if key.startswith(prefix) else key
    rel = rel.lstrip("/")
    head, sep, _ = rel.partition("/")
    return head if sep and head else None


def assign_labels(keys: Iterable[str], prefix: str) -> tuple[np.ndarray, list[str]]:
    """Labels for ``keys`` and the sorted folder class names (empty when the name convention covers all)."""
    keys = list(keys)
    named = [label_from_name(k) for k in keys]
    folders = [None if n is not None else folder_class(k, prefix) for k, n in zip(keys, named)]
    classes = sorted({f for f in folders if f is not None})
    index = {c: i for i, c in enumerate(classes)}
    labels = np.fromiter(
        (n if n is not None else (index[f] if f is not None else -1) for n, f in zip(named, folders)),
        dtype=np.int64,
        count=len(keys),
    )
    return labels, classes


@dataclass(frozen=True, kw_only=True)
class Listing:
    """Listed objects as arrays (no per-key Python objects), in listing order."""

    prefix: str
    keys: StringArray
    etags: StringArray
    last_modified: StringArray
    size: np.ndarray
    label: np.ndarray
    classes: tuple[str, ...] = ()

    @classmethod
    def from_objects(cls, objects: Iterable[ObjectInfo], *, prefix: str) -> Listing:
        objs = list(objects)
        keys = [o.key for o in objs]
        labels, classes = assign_labels(keys, prefix)
        return cls(
            prefix=prefix,
            keys=StringArray.from_strings(keys),
            etags=StringArray.from_strings([o.etag for o in objs]),
            last_modified=StringArray.from_strings([o.last_modified for o in objs]),
            size=np.array([o.size for o in objs], dtype=np.int64),
            label=labels,
            classes=tuple(classes),
        )

    def __len__(self) -> int:
        return len(self.size)

    def object_ref(self, i: int, *, index: int | None = None) -> ObjectRef:
        """Listed object ``i`` as the mirror's :class:`ObjectRef` (``index``: the number it goes by, default ``i``)."""
        return ObjectRef(index=int(i if index is None else index), key=self.keys[i], size=int(self.size[i]),
                         etag=self.etags[i], last_modified=self.last_modified[i], label=int(self.label[i]))

    def subset(self, indices: np.ndarray) -> Listing:
        """The listing restricted to ``indices`` (in that order)."""
        idx = [int(i) for i in indices]
        return Listing(
            prefix=self.prefix,
            keys=StringArray.from_strings([self.keys[i] for i in idx]),
            etags=StringArray.from_strings([self.etags[i] for i in idx]),
            last_modified=StringArray.from_strings([self.last_modified[i] for i in idx]),
            size=self.size[idx] if idx else np.zeros(0, dtype=np.int64),
            label=self.label[idx] if idx else np.zeros(0, dtype=np.int64),
            classes=self.classes,
        )
