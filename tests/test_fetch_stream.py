"""The listing streams into the mirror: objects of page 1 are fetched while page 2 is listed, and the
manifest, labels, shards and limits are still those of the whole listing, in listing order."""

from __future__ import annotations

import asyncio

import pytest

from cache import load_manifest
from cache.shard import ShardSpec
from pipeline.fetch.mirror import Mirror, MirrorStatus
from pipeline.fetch.stage import FetchConfig, fetch
from pipeline.transport.listing import Lister
from tests.conftest import png_bytes

PAGE = 4  # keys per listing page in these tests


@pytest.fixture
def small_pages(monkeypatch):
    monkeypatch.setattr(Lister, "PAGE_KEYS", PAGE)


def _config(bucket, options, cache_dir, prefix, **kw):
    return FetchConfig(
        prefix=f"s3://{bucket}/{prefix}", options=options, cache_dir=cache_dir, workers=0, progress=False, **kw
    )


def test_page_one_is_fetched_before_page_two_is_listed(monkeypatch, small_pages, put, bucket, options, cache_dir):
    for i in range(3 * PAGE):
        put(f"st/k{i:03d}_{i % 3}.png", png_bytes(i))
    fetched: list[str] = []
    one_fetched = asyncio.Event()
    seen_before_page: list[list[str]] = []
    real_one, real_page = Mirror.one, Lister.next_page

    async def one(self, ref):
        rec = await real_one(self, ref)
        fetched.append(rec.key)
        one_fetched.set()
        return rec

    async def next_page(self):
        if self.stats.get("pages"):  # page 2 and later: hold it until some object of page 1 is in the cache
            await asyncio.wait_for(one_fetched.wait(), 30)
            seen_before_page.append(list(fetched))
        return await real_page(self)

    monkeypatch.setattr(Mirror, "one", one)
    monkeypatch.setattr(Lister, "next_page", next_page)
    r = fetch(_config(bucket, options, cache_dir, "st/"))
    assert r.exit_code == 0 and r.summary.fetched == 3 * PAGE
    first_page = {f"st/k{i:03d}_{i % 3}.png" for i in range(PAGE)}
    assert seen_before_page and set(seen_before_page[0]) <= first_page and seen_before_page[0]
    m = load_manifest(r.manifest)
    assert list(m.keys) == sorted(f"st/k{i:03d}_{i % 3}.png" for i in range(3 * PAGE))  # listing order
    assert [int(x) for x in m.label] == [i % 3 for i in range(3 * PAGE)]


def test_labels_are_decided_over_pages_not_per_page(small_pages, put, bucket, options, cache_dir):
    # Page 1 holds only cat/, the last page only dog/: folder classes are numbered over the whole listing.
    keys = [f"lab/cat/IMG_{i:04d}.jpg" for i in range(PAGE + 1)] + [f"lab/dog/IMG_{i:04d}.jpg" for i in range(PAGE + 1)]
    for i, k in enumerate(keys):
        put(k, png_bytes(i))
    r = fetch(_config(bucket, options, cache_dir, "lab/"))
    m = load_manifest(r.manifest)
    assert r.label_choice is not None and "folder" in str(r.label_choice.rule).lower()
    assert {k: int(lbl) for k, lbl in zip(m.keys, m.label)} == {k: int("/dog/" in k) for k in keys}
    assert m.header.extra["classes"] == ["cat", "dog"]


def test_limit_and_shard_span_pages(small_pages, put, bucket, options, cache_dir):
    for i in range(5 * PAGE):
        put(f"sp/k{i:03d}_0.png", png_bytes(i))
    r = fetch(_config(bucket, options, cache_dir, "sp/", limit=2 * PAGE + 1))
    assert r.summary.listed == 2 * PAGE + 1 and r.summary.fetched == 2 * PAGE + 1
    whole = set()
    for k in range(2):
        part = fetch(_config(bucket, options, cache_dir, "sp/", shard=ShardSpec(k, 2)))
        keys = set(load_manifest(part.manifest).keys)
        assert not keys & whole
        whole |= keys
        assert part.summary.listed == 5 * PAGE
    assert whole == {f"sp/k{i:03d}_0.png" for i in range(5 * PAGE)}


def test_cached_objects_of_later_pages_make_no_get(monkeypatch, small_pages, put, bucket, options, cache_dir):
    for i in range(3 * PAGE):
        put(f"nc/k{i:03d}_0.png", png_bytes(i))
    assert fetch(_config(bucket, options, cache_dir, "nc/")).summary.fetched == 3 * PAGE
    put("nc/k999_0.png", png_bytes(999))  # one new object, on the last page
    gets: list[str] = []
    real_one = Mirror.one

    async def one(self, ref):
        gets.append(ref.key)
        return await real_one(self, ref)

    monkeypatch.setattr(Mirror, "one", one)
    r = fetch(_config(bucket, options, cache_dir, "nc/"))
    assert gets == ["nc/k999_0.png"]
    assert (r.summary.cached, r.summary.fetched) == (3 * PAGE, 1)
    assert all(rec.status in (MirrorStatus.CACHED, MirrorStatus.FETCHED) for rec in r.records)


def test_a_listing_failure_on_a_later_page_keeps_what_was_fetched(
    monkeypatch, small_pages, put, bucket, options, cache_dir
):
    from pipeline.transport.errors import StorageError

    for i in range(3 * PAGE):
        put(f"lf/k{i:03d}_0.png", png_bytes(i))
    real_one, real_page = Mirror.one, Lister.next_page
    one_fetched = asyncio.Event()

    async def one(self, ref):
        rec = await real_one(self, ref)
        one_fetched.set()
        return rec

    async def next_page(self):
        if self.stats.get("pages"):
            await asyncio.wait_for(one_fetched.wait(), 30)
            raise StorageError("listing s3://b/lf/ failed: access denied on page 2 (test)")
        return await real_page(self)

    monkeypatch.setattr(Mirror, "one", one)
    monkeypatch.setattr(Lister, "next_page", next_page)
    with pytest.raises(StorageError, match="page 2"):
        fetch(_config(bucket, options, cache_dir, "lf/"))
    monkeypatch.setattr(Lister, "next_page", real_page)
    again = fetch(_config(bucket, options, cache_dir, "lf/"))
    # What page 1 brought in before the failure was indexed: the re-fetch counts it as cached.
    assert again.summary.cached >= 1 and again.summary.cached + again.summary.fetched == 3 * PAGE
