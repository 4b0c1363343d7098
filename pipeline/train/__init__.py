"""Training: the VAE, its loop, the training sources, DDP and what a run leaves behind.

Rooms:

* :mod:`~pipeline.train.loop`: ``train(TrainConfig)``, epochs, timing of data-loading against training.
* :mod:`~pipeline.train.sources`: what an epoch reads (the cache through a manifest, or S3 streamed) and
  which manifest and shard each rank trains on.
* :mod:`~pipeline.train.model`: the VAE and its loss (its shape, ``VAEConfig``, lives in :mod:`pipeline.config`).
* :mod:`~pipeline.train.distributed`: torch.distributed set-up, collectives and rank shares.
* :mod:`~pipeline.train.outputs`: metrics.csv, checkpoint, summary.json, pictures;
  :mod:`~pipeline.train.plots`: the pictures themselves (matplotlib).

May import :mod:`cache`, :mod:`pipeline.config`, :mod:`pipeline.hints`, :mod:`pipeline.transport`,
:mod:`pipeline.fetch` and :mod:`pipeline.data`; nothing of the CLI.
"""
