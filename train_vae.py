"""Train the VAE from the local cache (or stream from S3 with ``--source s3``): ``make train EPOCHS=5``.

Reads only the cache written by ``make fetch`` unless told otherwise, so network cost and training
cost are measured apart. Outputs go to ``--out``: metrics.csv, checkpoint.pt, reconstructions.png,
samples.png, loss.png, summary.json. Under ``torchrun`` only rank 0 prints.
"""

from __future__ import annotations

import argparse
import logging
import os
import sqlite3
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from pipeline.images import IMG_EXTENSIONS

    p = argparse.ArgumentParser(prog="train_vae.py", description="Train a VAE on images mirrored by `make fetch`.")
    p.add_argument("-w", "--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    p.add_argument("-b", "--batch", type=int, default=16, help="batch size (default 16)")
    p.add_argument("-e", "--epochs", type=int, default=1, help="epochs (default 1)")
    p.add_argument("-c", "--clients", type=int, default=1, help="S3 clients per process for --source s3 (default 1)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--latent-dim", type=int, default=32, help="latent size (default 32)")
    p.add_argument("--beta", type=float, default=1.0, help="weight of the KL term (default 1.0)")
    p.add_argument("--image-size", type=int, default=32, help="images are resized to this (power of two, default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed for init, shuffling and sampling (default 0)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda[:N] or mps")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast on CUDA (ignored on CPU)")
    p.add_argument("--source", default="cache", choices=("cache", "s3"), help="cache (default) or s3 (stream via DSSDataset)")
    p.add_argument("--prefix", default=None, help="s3://bucket/prefix: use its manifest (cache) or stream it (s3)")
    p.add_argument("--endpoint", default=None, help="S3 endpoint for --source s3 (default $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL)")
    p.add_argument("--manifest", default=None, help="manifest .jsonl to train on (default: the newest in the cache)")
    p.add_argument("--cache-dir", default=None, help="cache root (default $TESS_CACHE_DIR or ~/.cache/tess)")
    p.add_argument("--out", default="runs/latest", help="output folder (default runs/latest)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--force-resume", action="store_true", help="resume even if the checkpoint was made from another manifest")
    p.add_argument("--pack", default="auto", choices=("auto", "on", "off"),
                   help="decoded uint8 pack of the manifest, built once and memory-mapped (default auto = on for the cache)")
    p.add_argument("--on-bad-sample", default="stop", choices=("stop", "skip"),
                   help="stop with the key of a corrupt or undecodable blob (default) or skip and count it")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's, one per core; 1 is faster on a busy shared machine)")
    p.add_argument("--extensions", default=",".join(IMG_EXTENSIONS),
                   help="keys ending in these (comma-separated, case-insensitive) are images; others are ignored "
                        f"(default {','.join(IMG_EXTENSIONS)})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="tess: %(levelname)s: %(message)s")
    from pipeline.cli import describe_os_error
    from pipeline.s3 import StorageError
    from pipeline.train import TrainConfig, report, train

    rank = int(os.environ.get("RANK", "0"))
    try:
        config = TrainConfig(
            epochs=args.epochs, batch=args.batch, workers=args.workers, clients=args.clients, lr=args.lr,
            latent_dim=args.latent_dim, beta=args.beta, image_size=args.image_size, seed=args.seed, device=args.device,
            amp=args.amp, source=args.source, prefix=args.prefix, endpoint=args.endpoint, manifest=args.manifest,
            cache_dir=args.cache_dir, out=args.out, resume=args.resume, force_resume=args.force_resume, pack=args.pack,
            on_bad_sample=args.on_bad_sample, progress=not args.no_progress, threads=args.threads,
            extensions=args.extensions,
        )
        summary = train(config)
    except (ValueError, FileNotFoundError, StorageError, FloatingPointError, sqlite3.Error, OSError) as e:
        text = describe_os_error(e) if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) else str(e)
        line = f"tess: error: {text}" + (f" (rank {rank})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "")
        # One write() per line: under torchrun every rank shares stderr, and a line split over two
        # writes can interleave with another rank's.
        sys.stderr.flush()
        os.write(sys.stderr.fileno(), (line + "\n").encode())
        return 2
    if rank == 0:
        print(report(summary, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
