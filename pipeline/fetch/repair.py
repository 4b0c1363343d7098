"""``verify --repair``: fetch again the blobs that verification found missing or corrupted.

Each manifest says where its objects came from (endpoint, bucket); the objects are downloaded through
the same mirror as ``fetch`` (:mod:`pipeline.fetch.mirror`) and accepted only if they hash to the digest the
manifest pinned. An object that changed on the server since then, or was deleted there, cannot repair that
manifest: a new fetch is needed, and the message names it (:func:`new_fetch_hint`). A blob only missing
locally is what ``--repair`` heals; :func:`missing_advice` tells plain ``verify`` users which is which.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cache.blobs import BlobStore, sync_filesystem
from cache.layout import CacheLayout
from cache.manifest import ManifestHeader, load_manifest, read_manifest_header
from cache.verify import BlobState, Problem
from pipeline.config import EMBEDDED_DEMO, ClientOptions, manifest_endpoint
from pipeline.fetch.mirror import MirrorStatus, ObjectRef
from pipeline.fetch.mirror_loop import mirror_all
from pipeline.fetch.mirrors import make_mirror
from pipeline.hints import fetch_hint, verify_hint

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class RepairReport:
    repaired: int = 0
    failed: list[str] = field(default_factory=list)


def new_fetch_hint(header: ManifestHeader, *, endpoint: str | None, layout: CacheLayout) -> str:
    """The fetch that pins a new manifest of ``header``'s prefix (and shard), in this cache, from this endpoint."""
    return fetch_hint(
        str(header.uri),
        endpoint=endpoint or header.endpoint,
        cache_dir=layout,
        shard=None if header.shard is None else str(header.shard),
    )


def missing_advice(layout: CacheLayout, problems: list[Problem], *, endpoint: str | None) -> str | None:
    """For plain ``verify``: what heals the missing blobs (``--repair``) and what it cannot (a deleted object)."""
    paths = list(dict.fromkeys(p.manifest for p in problems if p.kind is BlobState.MISSING))
    if not paths:
        return None
    fixes = [new_fetch_hint(read_manifest_header(path), endpoint=endpoint, layout=layout) for path in paths[:2]]
    more = f" (and {len(paths) - 2} more manifests)" if len(paths) > 2 else ""
    return (
        f"run {verify_hint(repair=True, endpoint=endpoint, cache_dir=layout)} to fetch them again from the server; "
        f"an object deleted on the server since the fetch cannot come back that way and needs a new fetch: "
        f"{' or '.join(fixes)}{more}"
    )


@contextlib.contextmanager
def _endpoint_for(header_endpoint: str, override: str | None, demo_count: int) -> Iterator[str | None]:
    """The URL to GET from: ``--endpoint``, the manifest's URL, AWS, or a fresh embedded demo server."""
    if header_endpoint == EMBEDDED_DEMO and not override:
        # The demo set is generated deterministically, so a new embedded server serves the same bytes.
        from pipeline.demo.server import embedded_server

        with embedded_server(demo=demo_count) as url:
            yield url
    else:
        yield manifest_endpoint(header_endpoint, override)


def repair(
    layout: CacheLayout, problems: list[Problem], *, options: ClientOptions, endpoint: str | None = None
) -> RepairReport:
    """Download every problem blob again; a blob is repaired only if it hashes to the pinned digest."""
    report = RepairReport()
    store = BlobStore(layout)
    by_manifest: dict[Path, list[Problem]] = defaultdict(list)
    for p in problems:
        by_manifest[p.manifest].append(p)
    done: set[str] = set()
    for path, probs in by_manifest.items():
        m = load_manifest(path)
        h = m.header
        probs = [p for p in probs if p.sha256 not in done]
        if not probs:
            continue
        refs = [
            ObjectRef(
                index=j,
                key=m.keys[p.index],
                size=int(m.size[p.index]),
                etag=m.etags[p.index],
                label=int(m.label[p.index]),
            )
            for j, p in enumerate(probs)
        ]
        demo_count = int((h.fetch or {}).get("listed", h.count))
        with _endpoint_for(h.endpoint, endpoint, demo_count) as url:
            opts = dataclasses.replace(options, endpoint=url)
            records = mirror_all([make_mirror(opts, h.bucket, store)], refs)
        for prob, rec in zip(probs, records):
            uri = h.uri.key_uri(prob.key)
            if rec.status is MirrorStatus.FETCHED and rec.sha256 == prob.sha256:
                report.repaired += 1
                done.add(prob.sha256)
            elif rec.status in (MirrorStatus.FETCHED, MirrorStatus.CHANGED):
                fix = new_fetch_hint(h, endpoint=endpoint, layout=layout)
                report.failed.append(
                    f"{uri} changed on the server since {path.name} was written; run {fix} for a new manifest"
                )
            elif rec.status is MirrorStatus.MISSING:
                # A 404: no repair brings it back; a new fetch pins the listing as it is now.
                fix = new_fetch_hint(h, endpoint=endpoint, layout=layout)
                report.failed.append(
                    f"{uri} was deleted on the server since {path.name} was written, so --repair cannot "
                    f"fetch it again; run {fix} for a new manifest without it"
                )
            else:
                report.failed.append(rec.error or f"{uri}: {rec.status.value}")
    if report.repaired:
        # Repaired blobs were not fsynced one by one (SyncPolicy.BEFORE_MANIFEST): make them durable now.
        sync_filesystem(layout.objects)
    return report
