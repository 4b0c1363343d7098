"""Streaming with read-ahead (``DSSDataset`` + ``pipeline.data.readahead``): the same items as plain ``__getitem__``,
one GET per object per epoch, a bounded window, failures as before, and ``--cache-as-you-go``.

The GETs are counted at the server (moto behind tess's counting middleware) or by a fake getter that also
records how many objects were started and not yet handed to the caller (the window)."""

from __future__ import annotations

import hashlib
import pickle

import pytest
import torch
from torch.utils.data import DataLoader

from cache.checks import Expected
from cache.layout import CacheLayout
from cache.manifest import load_manifest, manifests_of
from pipeline.config import S3Uri, TrainConfig
from pipeline.data.datasets import DSSDataset
from pipeline.data.images import UndecodableImage
from pipeline.data.readahead import ReadAheadPlan, StreamBatches, TaggedBatch
from pipeline.fetch.listing import Listing
from pipeline.fetch.mirror import Mirror, MirrorSettings
from pipeline.transport.errors import StorageError
from pipeline.transport.listing import ObjectInfo
from tests.conftest import png_bytes

BUCKET = "fake-bucket"


def _keep(batch):
    return batch


def _etag(data: bytes) -> str:
    return f'"{hashlib.md5(data).hexdigest()}"'


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data, self.size, self.etag, self.reconnects = data, len(data), _etag(data), 0

    async def chunks(self):
        yield self.data

    def close(self) -> None:
        pass


class CountingGetter:
    """Objects in a dict. Every GET is logged, with the window at that moment: objects started and not yet
    handed to the caller (``consumed`` is advanced by the test as batches come out of the loader)."""

    bucket = BUCKET

    def __init__(self, objects: dict[str, bytes]) -> None:
        self.objects = objects
        self.gets: list[str] = []
        self.consumed = 0
        self.windows: list[int] = []

    async def get(self, key, *, byte_range=None, if_match=None, size=None):
        self.gets.append(key)
        self.windows.append(len(self.gets) - self.consumed)
        return _Body(self.objects[key])

    async def head(self, key):
        return Expected(size=len(self.objects[key]), etag=_etag(self.objects[key]))


class FakeDSS(DSSDataset):
    """A DSSDataset over a :class:`CountingGetter` (no server); workers=0 only (the getter lives here)."""

    def __init__(self, getter: CountingGetter, **kw) -> None:
        self.getter = getter
        objs = [
            ObjectInfo(key=k, etag=_etag(v), size=len(v), last_modified="") for k, v in sorted(getter.objects.items())
        ]
        super().__init__(f"s3://{BUCKET}/p/", listing=Listing.from_objects(objs, prefix="p/"), image_size=None, **kw)

    def _mirrors(self, store):
        return [Mirror(store, self.getter, MirrorSettings(backoff_base_s=0.001, backoff_cap_s=0.002))]


def _fake(n: int, **kw) -> FakeDSS:
    return FakeDSS(CountingGetter({f"p/img-{i:03d}_{i % 5}.png": png_bytes(i) for i in range(n)}), **kw)


def _epoch(ds: FakeDSS, loader) -> list[tuple[list[int], list]]:
    out = []
    for batch in loader:
        ds.getter.consumed += len(batch)
        out.append(batch)
    return out


@pytest.mark.parametrize("prefetch", [0, 3])
def test_one_get_per_object_and_the_window_stays_within_prefetch_batches(prefetch):
    n, b = 50, 4
    ds = _fake(n, prefetch=prefetch)
    sampler = ds.sampler(batch_size=b, shuffle=True, seed=1)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=_keep)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        got = _epoch(ds, loader)
        assert sum(len(x) for x in got) == n
        # Exactly one GET per object per epoch: nothing fetched twice, nothing fetched past the epoch's end.
        assert len(ds.getter.gets) == n * (epoch + 1)
        assert sorted(ds.getter.gets[n * epoch :]) == sorted(ds.getter.objects)
        assert ds._stream().prefetcher.held() == 0
    # In flight (or arrived and not yet asked for): never more than `prefetch` batches, and read-ahead really
    # filled them; with the batch being handed over, `prefetch + 1` batches of bytes at most.
    assert ds._stream().prefetcher.peak == max(prefetch, 1) * b
    assert max(ds.getter.windows) == (prefetch + 1) * b


def test_read_ahead_keeps_the_next_batches_in_flight_before_they_are_asked_for():
    ds = _fake(24, prefetch=2)
    sampler = ds.sampler(batch_size=4, shuffle=True, seed=5)
    batches = [list(x) for x in sampler]
    it = iter(DataLoader(ds, batch_sampler=sampler, collate_fn=_keep))
    next(it)
    # After the first batch, the GETs of batches 1 and 2 (this process's next two) were sent already.
    keys = ds.listing.keys
    assert ds.getter.gets[4:12] == [keys[i] for i in batches[1] + batches[2]]
    assert len(ds.getter.gets) == 12


def test_other_samplers_fall_back_to_concurrent_gets_per_batch():
    n = 30
    ds = _fake(n, prefetch=4)
    loader = DataLoader(ds, batch_size=4, shuffle=True, collate_fn=_keep, generator=torch.Generator().manual_seed(0))
    labels = [y for batch in _epoch(ds, loader) for _, y in batch]
    assert sorted(labels) == sorted(int(ds.listing.label[i]) for i in range(n))
    assert len(ds.getter.gets) == n
    assert max(ds.getter.windows) == 4  # no read-ahead: only the batch asked for


def test_a_batch_the_plan_does_not_predict_gets_no_read_ahead_and_stale_gets_are_dropped():
    ds = _fake(40, prefetch=2)
    sampler = ds.sampler(batch_size=4, shuffle=False)
    first = next(iter(sampler))
    ds.__getitems__(first)
    assert ds._stream().prefetcher.held() == 8  # batches 1 and 2 in flight
    wrong = TaggedBatch([39, 38], token=first.token, epoch=0, number=1)  # not batch 1 of the order
    assert [y for _, y in ds.__getitems__(wrong)] == [int(ds.listing.label[39]), int(ds.listing.label[38])]
    assert ds._stream().prefetcher.held() == 0


def test_the_plan_names_this_workers_next_batches_and_tags_survive_pickling():
    ds = _fake(20)
    sampler = ds.sampler(batch_size=2, shuffle=True, seed=7)
    sampler.set_epoch(3)
    batches = [list(x) for x in sampler]
    tagged = pickle.loads(pickle.dumps(list(sampler)[4]))
    assert (tagged.token, tagged.epoch, tagged.number, list(tagged)) == (sampler.token, 3, 4, batches[4])
    plan: ReadAheadPlan = ds._plan
    # Round robin over 2 workers: the worker that got batch 4 gets 6 and 8 next.
    assert plan.ahead(tagged, workers=2, prefetch=2) == batches[6] + batches[8]
    assert plan.ahead(TaggedBatch(batches[8], token=sampler.token, epoch=3, number=8), workers=2, prefetch=2) == []
    assert plan.ahead(batches[4], workers=2, prefetch=2) is None  # untagged: no read-ahead


# -- against moto's server --------------------------------------------------------------------------------


class Probe(DSSDataset):
    """Adds the process's read-ahead peak to each item, so a test sees what happened inside the workers."""

    def __getitems__(self, indices):
        items = super().__getitems__(indices)
        return [(x, y, self._stream().prefetcher.peak) for x, y in items]


@pytest.mark.parametrize("workers", [0, 2])
def test_read_ahead_items_are_those_of_plain_getitem(s3_server, put, bucket, options, workers):
    n, b, prefetch = 37, 4, 2
    for i in range(n):
        put(f"ra/img-{i:03d}_{i % 3}.png", png_bytes(i, size=6 + i % 3))
    ds = Probe(f"s3://{bucket}/ra/", options=options, client_num=2, image_size=None, prefetch=prefetch)
    plain = [DSSDataset.__getitems__(ds, [i])[0] for i in range(n)]
    sampler = ds.sampler(batch_size=b, shuffle=True, seed=2)
    loader = DataLoader(
        ds, batch_sampler=sampler, num_workers=workers, collate_fn=_keep, persistent_workers=workers > 0
    )
    orders = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        order = [list(x) for x in sampler]
        s3_server.reset_counts()
        got = list(loader)
        assert s3_server.counts["GET"] == n  # one GET per object, read-ahead included
        assert len(got) == len(order)
        for idx, batch in zip(order, got):
            assert len(batch) == len(idx)
            for i, (x, y, _) in zip(idx, batch):
                assert torch.equal(x, plain[i][0]) and y == plain[i][1]
        orders.append(order)
        peaks = [peak for batch in got for _, _, peak in batch]
        assert max(peaks) == prefetch * b  # read ahead in every process, never more than `prefetch` batches in flight
    assert orders[0] != orders[1] and sorted(sum(orders[0], [])) == list(range(n))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_missing_object_fails_as_before(s3_client, put, bucket, options, workers):
    for i in range(12):
        put(f"gone/img-{i:02d}_1.png", png_bytes(i))
    ds = DSSDataset(f"s3://{bucket}/gone/", options=options, image_size=None)
    key = ds.listing.keys[7]
    s3_client.delete_object(Bucket=bucket, Key=key)
    with pytest.raises(StorageError) as plain:
        ds[7]
    assert key in str(plain.value)
    loader = DataLoader(
        StreamBatches(ds, skip_bad=True), sampler=ds.sampler(batch_size=4, seed=0), batch_size=None, num_workers=workers
    )
    with pytest.raises(StorageError) as streamed:  # not skipped by --on-bad-sample skip: a GET failure stops, as always
        list(loader)
    assert plain.value.args[0] in str(streamed.value)


def test_an_undecodable_image_is_skipped_or_stops_as_before(put, bucket, options):
    for i in range(6):
        put(f"bad/img-{i}_0.png", png_bytes(i) if i != 4 else b"not a png at all")
    ds = DSSDataset(f"s3://{bucket}/bad/", options=options, image_size=None)
    batch = next(iter(ds.sampler(batch_size=6, shuffle=False)))
    x, y, bad = StreamBatches(ds, skip_bad=True)[batch]
    assert bad == [4] and x.shape == (5, 3, 8, 8) and y.tolist() == [0] * 5
    with pytest.raises(UndecodableImage, match="img-4_0.png"):
        StreamBatches(ds, skip_bad=False)[batch]


def test_cache_as_you_go_pins_a_manifest_after_epoch_one_and_epoch_two_reads_the_disk(s3_server, put, bucket, tmp_path):
    from pipeline.train.loop import train

    n = 24
    data = {f"cg/img-{i:03d}_{i % 2}.png": png_bytes(i) for i in range(n)}
    for k, v in data.items():
        put(k, v)
    cache = tmp_path / "cache"
    s3_server.reset_counts()
    s = train(
        TrainConfig(
            epochs=2,
            batch=8,
            workers=2,
            source="s3",
            prefix=f"s3://{bucket}/cg/",
            cache_as_you_go=True,
            endpoint=s3_server.endpoint,
            out=str(tmp_path / "run"),
            progress=False,
            cache_dir=str(cache),
        )
    )
    assert s.images == 2 * n
    assert s3_server.counts["GET"] == n  # epoch 2 and the pictures read the cache
    (path,) = manifests_of(CacheLayout.at(cache), S3Uri.parse(f"s3://{bucket}/cg/"))
    m = load_manifest(path)
    assert m.header.incomplete is None and len(m) == n
    for i in range(n):
        assert m.sha_hex(i) == hashlib.sha256(data[m.keys[i]]).hexdigest() and m.label[i] == int(m.keys[i][-5])
    # ... and the cache trains on its own.
    again = train(
        TrainConfig(
            epochs=1,
            batch=8,
            prefix=f"s3://{bucket}/cg/",
            cache_dir=str(cache),
            progress=False,
            out=str(tmp_path / "run2"),
        )
    )
    assert again.images == n and again.source == "cache"


def test_an_abandoned_epoch_drops_what_it_read_ahead():
    from pipeline.transport import loop

    ds = _fake(40, prefetch=2)
    it = iter(DataLoader(ds, batch_sampler=ds.sampler(batch_size=4, seed=0), collate_fn=_keep))
    next(it)
    assert ds._stream().prefetcher.held() == 8
    del it  # closes the sampler's iteration: the drop is queued on the event loop

    async def after_queued_callbacks():
        return ds._stream().prefetcher.held()

    assert loop.run(after_queued_callbacks()) == 0
