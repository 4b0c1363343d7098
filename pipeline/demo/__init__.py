"""The demo: a deterministic labelled image set and the embedded S3 server (moto) that serves it.

Rooms: :mod:`~pipeline.demo.demo_set` (the images, generated from a seed) and :mod:`~pipeline.demo.server`
(moto's server in a thread or a subprocess, seeded with the set).

May import :mod:`pipeline.config` only: ``fetch`` with no prefix, ``serve``, ``verify --repair`` and the
tests start it, and it knows nothing of them.
"""
