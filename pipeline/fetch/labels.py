"""The label rule of a listing: one rule for all its keys, chosen once, recorded in the manifest.

Two conventions meet in real buckets: class folders (torchvision ``ImageFolder``: the first folder below
the prefix, sorted names -> 0..K-1) and the research loader's ``<stem>_<int>.<ext>`` suffix. Camera and
phone names (``IMG_1234.jpg``, ``DSC_0042.JPG``, ``PXL_20240101_123456.jpg``) carry a suffix that is no
label, so the rule is decided over the whole listing, never per key (:class:`~pipeline.config.LabelRule`):

* ``auto``: ``folder`` when every image key lies in a class folder, else ``suffix`` when every image key
  has one, else ``none``;
* ``folder`` / ``suffix``: that rule, keys that do not fit get -1; ``none``: -1 everywhere.

Only image keys (:data:`~pipeline.config.IMG_EXTENSIONS`) decide the rule and get labels: a README, a
``_SUCCESS`` marker or a label CSV gets -1 and names no class. The choice and its reason
(:class:`LabelChoice`) are printed by the fetch and written to the manifest header as ``labels``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from pipeline.config import IMG_EXTENSIONS, LabelRule

__all__ = ["LabelChoice", "LabelRule", "Labelled", "assign_labels", "folder_class", "label_from_name"]

_SUFFIX_RE = re.compile(r"_(\d{1,9})\.[A-Za-z0-9]+$")
# Class names shown in the fetch's line; the manifest header lists them all.
_SHOWN_CLASSES = 8


def label_from_name(key: str) -> int | None:
    """The ``_<int>`` suffix of the key's file name, or None."""
    m = _SUFFIX_RE.search(key.rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


def folder_class(key: str, prefix: str) -> str | None:
    """The first folder of ``key`` below ``prefix`` (ImageFolder's class), or None.

    A prefix that ends inside a name (``data/tr``) counts from its last folder: ``data/train/cat/x.png``
    is of class ``train``, not ``ain``.
    """
    base = prefix[: prefix.rfind("/") + 1]
    rel = key[len(base) :] if key.startswith(base) else key
    head, sep, _ = rel.lstrip("/").partition("/")
    return head if sep and head else None


@dataclass(frozen=True, kw_only=True)
class LabelChoice:
    """The rule a listing's labels follow and why.

    Attributes:
        rule: the rule applied (``folder``, ``suffix`` or ``none``; never ``auto``): the manifest's ``labels``.
        reason: why, in words (what the image keys look like, or that the rule was forced).
        requested: what was asked for (``--labels``).
    """

    rule: LabelRule
    reason: str
    requested: LabelRule = LabelRule.AUTO

    def line(self) -> str:
        """``labels: folder (3 classes: cat, dog, fox; every image key lies in a class folder)``."""
        return f"labels: {self.rule} ({self.reason})"


@dataclass(frozen=True, kw_only=True)
class Labelled:
    """Labels of a key list: one per key (-1: none), the folder class names, the choice."""

    values: np.ndarray  # (N,) int64
    classes: tuple[str, ...]
    choice: LabelChoice


@dataclass(frozen=True)
class _Survey:
    """What the image keys look like: how many, and how many fit neither convention."""

    images: int
    others: int
    no_folder: int
    no_suffix: int


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _decide(requested: LabelRule, s: _Survey) -> tuple[LabelRule, str]:
    """The rule to apply and the start of its reason (the class list or label range is added after)."""
    if requested is LabelRule.NONE:
        return LabelRule.NONE, "forced by --labels none: every key gets -1"
    if s.images == 0:
        return LabelRule.NONE, (
            f"no image keys: none of the {_n(s.others, 'key')} ends in an image extension such "
            "as .jpg or .png, so every key gets -1"
        )
    forced = f"forced by --labels {requested}; " if requested is not LabelRule.AUTO else ""
    if requested is LabelRule.FOLDER or (requested is LabelRule.AUTO and s.no_folder == 0):
        fit = (
            "every image key lies in a class folder"
            if s.no_folder == 0
            else f"{s.no_folder} of {s.images} image keys lie in no class folder and get -1"
        )
        return LabelRule.FOLDER, forced + fit
    if requested is LabelRule.SUFFIX or s.no_suffix == 0:
        fit = (
            "every image key has a _<int> suffix"
            if s.no_suffix == 0
            else f"{s.no_suffix} of {s.images} image keys have no _<int> suffix and get -1"
        )
        if not forced:  # auto: say why not folders
            fit += (
                " and none lies in a class folder"
                if s.no_folder == s.images
                else f" and {s.no_folder} of {s.images} lie in no class folder"
            )
        return LabelRule.SUFFIX, forced + fit
    return LabelRule.NONE, (
        f"{s.no_folder} of {s.images} image keys lie in no class folder and {s.no_suffix} have no "
        "_<int> suffix; pass --labels folder or suffix to force one"
    )


def assign_labels(
    keys: Iterable[str],
    prefix: str,
    rule: LabelRule | str = LabelRule.AUTO,
    *,
    extensions: tuple[str, ...] = IMG_EXTENSIONS,
) -> Labelled:
    """Labels for ``keys`` (listed under ``prefix``) by one rule, decided over all of them.

    ``extensions``: which keys are images (case-insensitive, as :func:`pipeline.data.images.image_indices`).
    """
    requested = LabelRule(rule)
    keys = list(keys)
    exts = tuple(e.lower() for e in extensions)
    is_image = [k.lower().endswith(exts) for k in keys]
    folders = [folder_class(k, prefix) if img else None for k, img in zip(keys, is_image)]
    suffixes = [label_from_name(k) if img else None for k, img in zip(keys, is_image)]
    images = sum(is_image)
    survey = _Survey(
        images=images,
        others=len(keys) - images,
        no_folder=sum(img and f is None for img, f in zip(is_image, folders)),
        no_suffix=sum(img and n is None for img, n in zip(is_image, suffixes)),
    )
    chosen, reason = _decide(requested, survey)
    classes: list[str] = []
    if chosen is LabelRule.FOLDER:
        classes = sorted({f for f in folders if f is not None})
        index = {c: i for i, c in enumerate(classes)}
        values = [-1 if f is None else index[f] for f in folders]
        shown = ", ".join(classes[:_SHOWN_CLASSES]) + (", ..." if len(classes) > _SHOWN_CLASSES else "")
        reason = (
            f"{len(classes)} class{'es' if len(classes) != 1 else ''}: {shown}; {reason}"
            if classes
            else f"no class folders; {reason}"
        )
    elif chosen is LabelRule.SUFFIX:
        values = [-1 if n is None else n for n in suffixes]
        found = [n for n in suffixes if n is not None]
        reason = (
            f"{_n(len(set(found)), 'distinct label')} in {min(found)}..{max(found)}; {reason}"
            if found
            else f"no _<int> suffixes; {reason}"
        )
    else:
        values = [-1] * len(keys)
    if survey.others and chosen is not LabelRule.NONE:
        reason += (
            f"; {_n(survey.others, 'key')} without an image extension {'gets' if survey.others == 1 else 'get'} -1"
        )
    return Labelled(
        values=np.array(values, dtype=np.int64).reshape(len(keys)),
        classes=tuple(classes),
        choice=LabelChoice(rule=chosen, reason=reason, requested=requested),
    )
