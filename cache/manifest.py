"""The key-list manifest: one pinned listing of (endpoint, bucket, prefix), and its compact loader.

File format (``manifests/<name>.jsonl``, UTF-8 JSON Lines, written atomically):

* line 1, the header: ``{"format": "tess-manifest/1", "endpoint", "bucket", "prefix", "created",
  "count", "total_bytes", "records_sha256", ...}`` plus optional ``labels`` (the label rule the records
  follow: ``folder``, ``suffix`` or ``none``; absent in manifests written before it was recorded),
  ``classes``, ``shard``, ``fetch`` (the fetch summary) and ``incomplete`` (keys that could not be fetched).
* every further line, one record: ``{"key", "sha256", "size", "etag", "last_modified", "label"}``,
  in listing order (S3 lists keys in UTF-8 binary order).

``records_sha256`` is the SHA-256 of the record lines exactly as written; it identifies the pinned
listing (checkpoints and decoded packs refer to it). Beside the manifest, ``<name>.keys`` holds the
plain key list, one key per line, with ``\\``, LF and CR escaped as ``\\\\``, ``\\n`` and ``\\r`` so that
any key round-trips exactly (:mod:`cache.keylist`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cache.atomic import atomic_writer
from cache.keylist import KEYS_SUFFIX, escape_key
from cache.keylist import read_key_list as read_key_list  # re-exported: its home before cache.keylist
from cache.layout import CacheLayout
from cache.shard import ShardSpec, parse_shard
from cache.strings import StringArray
from cache.uri import S3Uri

MANIFEST_FORMAT = "tess-manifest/1"
MANIFEST_SUFFIX = ".jsonl"
_SLUG_RE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True, kw_only=True)
class ManifestRecord:
    """One object of a pinned listing."""

    key: str
    sha256: str
    size: int
    etag: str
    last_modified: str
    label: int = -1


# The header fields every manifest has, and the optional ones, in the order they are written.
_REQUIRED = ("endpoint", "bucket", "prefix", "created", "count", "total_bytes", "records_sha256", "format")
_OPTIONAL = ("fetch", "labels", "classes", "incomplete", "shard", "network")


@dataclass(frozen=True, kw_only=True)
class ManifestHeader:
    """Line 1 of a manifest, parsed once (:meth:`from_json`) into typed fields.

    Attributes:
        fetch: the fetch summary as written by ``pipeline.fetch.stage`` (listed, fetched, cached, missing,
            failed, bytes, retries, list_s, wall_s); None for manifests written by other tools.
        labels: the label rule the records' labels follow (``folder``, ``suffix`` or ``none``; see
            ``pipeline.fetch.labels``); None for a manifest written before the rule was recorded, whose
            labels are read as they are.
        classes: folder class names, when labels come from folders.
        incomplete: listed objects that are not in the manifest.
        shard: the shard ``k/N`` of a sharded fetch; None for the whole listing.
        network: what bringing this listing's data cost, summed over the fetch runs that downloaded
            (``bytes``, ``seconds``, ``objects``, ``runs``); written by ``write_manifest``.
        unknown: fields this version does not know, kept so a header round-trips byte for byte.
    """

    endpoint: str
    bucket: str
    prefix: str
    created: str
    count: int
    total_bytes: int
    records_sha256: str
    format: str = MANIFEST_FORMAT
    fetch: dict[str, Any] | None = None
    labels: str | None = None
    classes: tuple[str, ...] | None = None
    incomplete: int | None = None
    shard: ShardSpec | None = None
    network: dict[str, Any] | None = None
    unknown: dict[str, Any] = field(default_factory=dict)

    @property
    def extra(self) -> dict[str, Any]:
        """The optional fields as the file holds them (``shard`` as ``"k/N"``), in the order written."""
        values = {
            "fetch": self.fetch,
            "labels": self.labels,
            "classes": None if self.classes is None else list(self.classes),
            "incomplete": self.incomplete,
            "shard": None if self.shard is None else str(self.shard),
            "network": self.network,
        }
        return {**{k: v for k, v in values.items() if v is not None}, **self.unknown}

    def to_json(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in _REQUIRED}, **self.extra}

    @classmethod
    def from_json(cls, d: dict[str, Any], *, source: str = "manifest") -> ManifestHeader:
        """Check and parse a header (the ``shard`` string into a :class:`ShardSpec`).

        Raises:
            ValueError: another format, a missing field, or a malformed optional field; the message
                names ``source`` and the fix.
        """
        if d.get("format") != MANIFEST_FORMAT:
            raise ValueError(
                f"{source}: format {d.get('format')!r} is not {MANIFEST_FORMAT!r}; "
                "re-run `make fetch` (or `tess fetch`) to rewrite it"
            )
        missing = sorted(set(_REQUIRED) - d.keys())
        if missing:
            raise ValueError(f"{source}: header lacks {missing}; re-run `make fetch` (or `tess fetch`) to rewrite it")
        fix = "re-run `make fetch` (or `tess fetch`) to rewrite it"
        fetch, labels, classes, incomplete, shard, network = (d.get(k) for k in _OPTIONAL)
        for name, value in (("fetch", fetch), ("network", network)):
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"{source}: header field {name} {value!r} is not an object; {fix}")
        if labels is not None and not isinstance(labels, str):
            raise ValueError(f"{source}: header field labels {labels!r} is not a rule name; {fix}")
        if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            raise ValueError(f"{source}: header field classes {classes!r} is not a list of names; {fix}")
        if incomplete is not None and (
            not isinstance(incomplete, int) or isinstance(incomplete, bool) or incomplete < 0
        ):
            raise ValueError(f"{source}: header field incomplete {incomplete!r} is not a count; {fix}")
        try:
            spec = None if shard is None else parse_shard(shard, source=f"{source}: header field shard")
        except ValueError as e:
            raise ValueError(f"{e}; {fix}") from None
        return cls(
            **{k: d[k] for k in _REQUIRED},
            fetch=fetch,
            labels=labels,
            classes=None if classes is None else tuple(classes),
            incomplete=incomplete,
            shard=spec,
            network=network,
            unknown={k: v for k, v in d.items() if k not in _REQUIRED and k not in _OPTIONAL},
        )

    @property
    def uri(self) -> S3Uri:
        """The listed location, ``s3://bucket/prefix``."""
        return S3Uri(bucket=self.bucket, prefix=self.prefix)

    @property
    def network_cost(self) -> dict[str, Any] | None:
        """What it cost to bring this manifest's data over the network: ``{"bytes", "seconds", "objects",
        "runs"}`` summed over the fetch runs that downloaded anything (a no-op re-fetch costs nothing and
        adds nothing). None when unknown (a manifest not written by fetch)."""
        if self.network is not None:
            return self.network
        fetch = self.fetch or {}
        if not fetch.get("fetched"):
            return None
        # A manifest from before ``network`` existed: its own fetch is all that is known.
        return {
            "bytes": int(fetch.get("bytes_fetched", 0)),
            "seconds": float(fetch.get("wall_s", 0.0)),
            "objects": int(fetch["fetched"]),
            "runs": 1,
        }

    @property
    def name(self) -> str:
        return manifest_name(
            self.endpoint, self.bucket, self.prefix, shard=None if self.shard is None else str(self.shard)
        )


def manifest_name(endpoint: str, bucket: str, prefix: str, *, shard: str | None = None) -> str:
    """File stem of the manifest of (endpoint, bucket, prefix[, shard]): readable slug + short hash."""
    ident = "\n".join([endpoint, bucket, prefix, shard or ""])
    digest = hashlib.sha256(ident.encode("utf-8")).hexdigest()[:12]
    slug = _SLUG_RE.sub("_", f"{bucket}-{prefix}").strip("_.-")[:60] or "root"
    tail = f"-shard{shard.replace('/', 'of')}" if shard else ""
    return f"{slug}{tail}-{digest}"


def _record_line(r: ManifestRecord) -> bytes:
    # The fields by hand, in declaration order: dataclasses.asdict deep-copies each value (~20 us a record).
    fields = {
        "key": r.key,
        "sha256": r.sha256,
        "size": r.size,
        "etag": r.etag,
        "last_modified": r.last_modified,
        "label": r.label,
    }
    return (json.dumps(fields, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


def write_manifest(
    layout: CacheLayout,
    *,
    endpoint: str,
    bucket: str,
    prefix: str,
    records: Iterable[ManifestRecord],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``<name>.jsonl`` and ``<name>.keys`` atomically; return the manifest path.

    ``endpoint`` must already be free of credentials (the caller strips them). ``extra`` holds the
    optional header fields in their file form (``fetch``, ``labels``, ``classes``, ``incomplete``, ``shard``
    as ``"k/N"``). When it holds the fetch summary (``fetch``), the header also gets ``network``: the cost
    of bringing this listing's data, carried over from the manifest it replaces
    (:attr:`ManifestHeader.network_cost`).
    """
    extra = dict(extra or {})
    lines: list[bytes] = []
    keys: list[str] = []
    total = 0
    h = hashlib.sha256()
    for r in records:
        line = _record_line(r)
        h.update(line)
        lines.append(line)
        keys.append(r.key)
        total += r.size
    # Through from_json, so a written header is checked exactly as it will be read back.
    header = ManifestHeader.from_json(
        {
            **extra,
            "endpoint": endpoint,
            "bucket": bucket,
            "prefix": prefix,
            "created": utc_now(),
            "count": len(lines),
            "total_bytes": total,
            "records_sha256": h.hexdigest(),
            "format": MANIFEST_FORMAT,
        },
        source="new manifest",
    )
    layout.manifests.mkdir(parents=True, exist_ok=True)
    stem = header.name
    path = layout.manifests / f"{stem}{MANIFEST_SUFFIX}"
    if header.fetch is not None and header.network is None:
        header = dataclasses.replace(header, network=_next_network_cost(path, header.fetch))
    # Key list first: a reader that finds the manifest can rely on its key list being at least as new.
    with atomic_writer(layout.manifests / f"{stem}{KEYS_SUFFIX}") as f:
        f.write("".join(escape_key(k) + "\n" for k in keys).encode("utf-8"))
    with atomic_writer(path) as f:
        f.write((json.dumps(header.to_json(), ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8"))
        f.writelines(lines)
    return path


def _next_network_cost(path: Path, fetch: dict[str, Any]) -> dict[str, Any] | None:
    """The replaced manifest's network cost plus this fetch's, if it downloaded anything."""
    previous = None
    if path.is_file():
        with contextlib.suppress(ValueError, OSError):
            previous = read_manifest_header(path).network_cost
    if not fetch.get("fetched"):
        return previous
    total = dict(previous or {"bytes": 0, "seconds": 0.0, "objects": 0, "runs": 0})
    total["bytes"] += int(fetch.get("bytes_fetched", 0))
    total["seconds"] = round(total["seconds"] + float(fetch.get("wall_s", 0.0)), 3)
    total["objects"] += int(fetch["fetched"])
    total["runs"] += 1
    return total


def read_manifest_header(path: str | os.PathLike[str]) -> ManifestHeader:
    """Parse only line 1 of a manifest."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"manifest {str(p)!r} not found; "
            "run `make fetch PREFIX=s3://bucket/prefix` (or `tess fetch s3://bucket/prefix`) first"
        )
    with open(p, "rb") as f:
        first = f.readline()
    try:
        d = json.loads(first)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{p}: line 1 is not JSON ({e}); re-run `make fetch` (or `tess fetch`) to rewrite it"
        ) from None
    return ManifestHeader.from_json(d, source=str(p))


@dataclass(frozen=True, kw_only=True)
class ManifestArrays:
    """A loaded manifest as compact arrays, cheap to share with DataLoader workers."""

    path: Path
    header: ManifestHeader
    keys: StringArray
    etags: StringArray
    sha256: np.ndarray  # (N, 32) uint8
    size: np.ndarray  # (N,) int64
    label: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.size)

    def sha_hex(self, i: int) -> str:
        return self.sha256[i].tobytes().hex()

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.etags.nbytes + self.sha256.nbytes + self.size.nbytes + self.label.nbytes)


def load_manifest(path: str | os.PathLike[str]) -> ManifestArrays:
    """Load a manifest into :class:`ManifestArrays`, checking the header and the records digest."""
    p = Path(path)
    header = read_manifest_header(p)
    n = int(header.count)
    sha = np.empty((n, 32), dtype=np.uint8)
    size = np.empty(n, dtype=np.int64)
    label = np.empty(n, dtype=np.int64)
    key_bytes: list[bytes] = []
    etag_bytes: list[bytes] = []
    h = hashlib.sha256()
    loads = json.loads
    i = -1
    with open(p, "rb") as f:
        f.readline()
        for i, line in enumerate(f):
            if i >= n:
                raise ValueError(
                    f"{p}: more records than the header's count {n}; re-run `make fetch` (or `tess fetch`)"
                )
            h.update(line)
            r = loads(line)
            key_bytes.append(r["key"].encode("utf-8"))
            etag_bytes.append(r["etag"].encode("utf-8"))
            sha[i] = np.frombuffer(bytes.fromhex(r["sha256"]), dtype=np.uint8)
            size[i] = r["size"]
            label[i] = r["label"]
    if i + 1 != n:
        raise ValueError(
            f"{p}: {i + 1} records but the header says {n}; re-run `make fetch` (or `tess fetch`) to rewrite it"
        )
    if h.hexdigest() != header.records_sha256:
        raise ValueError(
            f"{p}: records do not match records_sha256 (edited or damaged); re-run `make fetch` (or `tess fetch`)"
        )
    return ManifestArrays(
        path=p,
        header=header,
        keys=StringArray.from_encoded(key_bytes),
        etags=StringArray.from_encoded(etag_bytes),
        sha256=sha,
        size=size,
        label=label,
    )


def list_manifests(layout: CacheLayout) -> list[Path]:
    """All manifests of the cache, oldest first (by modification time)."""
    if not layout.manifests.is_dir():
        return []
    paths = [p for p in layout.manifests.glob(f"*{MANIFEST_SUFFIX}") if not p.name.startswith(".")]
    return sorted(paths, key=lambda p: (p.stat().st_mtime_ns, p.name))


def latest_manifest(layout: CacheLayout) -> Path:
    """The most recently written manifest; FileNotFoundError with the fix when there is none."""
    paths = list_manifests(layout)
    if not paths:
        raise FileNotFoundError(
            f"no manifest in {layout.manifests}; run `make fetch` (demo; or `tess fetch`) or "
            "`make fetch PREFIX=s3://bucket/prefix` (or `tess fetch s3://bucket/prefix`)"
        )
    return paths[-1]


def manifests_of(layout: CacheLayout, uri: S3Uri) -> list[Path]:
    """The manifests of one ``s3://bucket/prefix`` (any endpoint, any shard), oldest first."""
    return [p for p in list_manifests(layout) if read_manifest_header(p).uri == uri]
