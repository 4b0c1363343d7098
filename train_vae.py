"""Train the VAE from the local cache (or stream from S3 with ``--source s3``): ``make train EPOCHS=5``.

The same as ``tess train``: reads only the cache written by ``tess fetch`` (``make fetch``) unless told
otherwise, so network cost and training cost are measured apart. Outputs go to ``--out``: metrics.csv,
checkpoint.pt, reconstructions.png, samples.png, loss.png, summary.json. Under ``torchrun`` only rank 0
prints. Every flag comes from :class:`pipeline.config.TrainConfig` (:mod:`pipeline.flags`; docs/cli.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from pipeline.flags import train_parser

    return train_parser("train_vae.py")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.commands import cmd_train

    return cmd_train(args)


if __name__ == "__main__":
    raise SystemExit(main())
