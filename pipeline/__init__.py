"""tess's pipeline: S3 access, the fetch stage, the datasets, the VAE and its training, the ``tess`` command.

Rooms, arrows pointing down (tests/test_layers.py keeps them so; docs/architecture.md draws them):

* :mod:`pipeline.cli` (the ``tess`` parser), :mod:`pipeline.commands` (what each command does) and
  :mod:`pipeline.flags` (flags derived from the config dataclasses): the top; they may import anything.
* :mod:`pipeline.train`: the VAE, its loop, training sources, DDP, outputs.
* :mod:`pipeline.data`: datasets over the cache and over S3, decoding, packs, batches.
* :mod:`pipeline.fetch`: the mirror and the fetch stage (list, mirror, index, manifest), repair.
* :mod:`pipeline.demo`: the demo set and the embedded S3 server.
* :mod:`pipeline.transport`: every request to S3 (signing, HTTP, TLS, listing); boto3 for upload only.
* :mod:`pipeline.hints`, :mod:`pipeline.config` and :mod:`pipeline.modes`: suggested commands, the config
  dataclasses with every default, and the modes' enums; the bottom, beside :mod:`cache`.
"""
