"""A pinned listing held as compact arrays, labelled by one rule decided over all of it.

The label rule (class folders, the ``_<int>`` suffix, or none) is :mod:`pipeline.fetch.labels`; a listing
decides it once, when it is made from the LIST answer, so a shard (:meth:`Listing.subset`) keeps the
whole listing's labels, classes and choice.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from cache.strings import StringArray
from pipeline.config import LabelRule
from pipeline.fetch.labels import LabelChoice, assign_labels

# The mirror's vocabulary, not pipeline.fetch.mirror: a listing is also made where nothing is mirrored (a re-fetch
# of a prefix the cache holds), and the mirror's algorithm would be imported for nothing.
from pipeline.fetch.mirror_types import ObjectRef
from pipeline.transport.listing import ObjectInfo


@dataclass(frozen=True, kw_only=True)
class Listing:
    """Listed objects as arrays (no per-key Python objects), in listing order."""

    prefix: str
    keys: StringArray
    etags: StringArray
    last_modified: StringArray
    size: np.ndarray
    label: np.ndarray
    label_choice: LabelChoice
    classes: tuple[str, ...] = ()

    @classmethod
    def from_objects(cls, objects: Iterable[ObjectInfo], *, prefix: str, labels: LabelRule = LabelRule.AUTO) -> Listing:
        """The listing of ``objects``, labelled by the rule ``labels`` decided over all of them."""
        objs = list(objects)
        keys = [o.key for o in objs]
        labelled = assign_labels(keys, prefix, labels)
        return cls(
            prefix=prefix,
            keys=StringArray.from_strings(keys),
            etags=StringArray.from_strings([o.etag for o in objs]),
            last_modified=StringArray.from_strings([o.last_modified for o in objs]),
            size=np.array([o.size for o in objs], dtype=np.int64),
            label=labelled.values,
            label_choice=labelled.choice,
            classes=labelled.classes,
        )

    def __len__(self) -> int:
        return len(self.size)

    def object_ref(self, i: int, *, index: int | None = None) -> ObjectRef:
        """Listed object ``i`` as the mirror's :class:`ObjectRef` (``index``: the number it goes by, default ``i``)."""
        return ObjectRef(
            index=int(i if index is None else index),
            key=self.keys[i],
            size=int(self.size[i]),
            etag=self.etags[i],
            last_modified=self.last_modified[i],
            label=int(self.label[i]),
        )

    def index_items(self, indices: Iterable[int]) -> list[tuple[str, str, int]]:
        """``(key, etag, size)`` of each of ``indices``: what the key index is asked about an object."""
        return [(self.keys[i], self.etags[i], int(self.size[i])) for i in indices]

    def header_fields(self) -> dict[str, object]:
        """The manifest header fields this listing decides: the label rule applied and its classes."""
        fields: dict[str, object] = {"labels": str(self.label_choice.rule)}
        if self.classes:
            fields["classes"] = list(self.classes)
        return fields

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
            label_choice=self.label_choice,
            classes=self.classes,
        )
