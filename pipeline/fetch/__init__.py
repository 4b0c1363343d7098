"""The fetch stage: mirror a listing into the content-addressed cache and pin it in a manifest.

Rooms, arrows pointing down:

* :mod:`~pipeline.fetch.stage`: ``fetch(FetchConfig)``, the stage end to end (list, shard, mirror, index,
  manifest, eviction); :mod:`~pipeline.fetch.streaming`: its default path, the listing streamed into the
  mirror; :mod:`~pipeline.fetch.worker_dataset`: its ``-w N`` path, a DataLoader over ``MirrorDataset``.
* :mod:`~pipeline.fetch.fetch_types`: what a fetch tells (``FetchSummary``, ``FetchResult``).
* :mod:`~pipeline.fetch.mirror`: one object's GET, checks and commit into the blob store;
  :mod:`~pipeline.fetch.mirror_types`: its records, settings and failures; :mod:`~pipeline.fetch.mirror_loop`:
  many objects on the event loop; :mod:`~pipeline.fetch.mirrors`: the one place a mirror gets its client.
* :mod:`~pipeline.fetch.listing`: the pinned listing (keys, sizes, ETags, labels) as arrays;
  :mod:`~pipeline.fetch.labels`: the label rule applied to it.
* :mod:`~pipeline.fetch.repair`: ``verify --repair``.  :mod:`~pipeline.fetch.stopping`: Ctrl-C at a safe point.

May import :mod:`cache`, :mod:`pipeline.config`, :mod:`pipeline.hints`, :mod:`pipeline.transport` and
:mod:`pipeline.demo` (repair restarts the embedded demo server); nothing of ``data``, ``train`` or the CLI.
torch only in ``worker_dataset`` (the ``-w N`` path).
"""
