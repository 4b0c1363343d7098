"""Train the VAE from the local cache (or stream from S3 with ``--source s3``): ``make train EPOCHS=5``.

Reads only the cache written by ``make fetch`` unless told otherwise, so network cost and training
cost are measured apart. Outputs go to ``--out``: metrics.csv, checkpoint.pt, reconstructions.png,
samples.png, loss.png, summary.json. Under ``torchrun`` only rank 0 prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sqlite3
import sys
from collections.abc import Sequence


# Flag names and help of every TrainConfig field; defaults, types and choices come from TrainConfig
# itself, so each default has one home. "%(default)s" in a help text is argparse's own substitution.
FLAGS: dict[str, tuple[tuple[str, ...], str]] = {
    "workers": (("-w", "--workers"), "DataLoader worker processes (default %(default)s)"),
    "batch": (("-b", "--batch"), "batch size (default %(default)s)"),
    "epochs": (("-e", "--epochs"), "epochs (default %(default)s)"),
    "clients": (("-c", "--clients"), "S3 clients per process for --source s3 (default %(default)s)"),
    "lr": (("--lr",), "Adam learning rate (default %(default)s)"),
    "latent_dim": (("--latent-dim",), "latent size (default %(default)s)"),
    "beta": (("--beta",), "weight of the KL term (default %(default)s)"),
    "image_size": (("--image-size",), "images are resized to this (power of two, default %(default)s)"),
    "seed": (("--seed",), "seed for init, shuffling and sampling (default %(default)s)"),
    "device": (("--device",), "auto (cuda, then mps, then cpu), cpu, cuda[:N] or mps (default %(default)s)"),
    "amp": (("--amp",), "bfloat16 autocast on CUDA (ignored on CPU)"),
    "source": (("--source",), "cache (read the local cache) or s3 (stream via DSSDataset) (default %(default)s)"),
    "prefix": (("--prefix",), "s3://bucket/prefix: use its manifest (cache) or stream it (s3)"),
    "endpoint": (("--endpoint",), "S3 endpoint for --source s3 (default $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL)"),
    "manifest": (("--manifest",), "manifest .jsonl to train on (default: the newest in the cache)"),
    "cache_dir": (("--cache-dir",), "cache root (default $TESS_CACHE_DIR or ~/.cache/tess)"),
    "out": (("--out",), "output folder (default %(default)s)"),
    "resume": (("--resume",), "continue from OUT/checkpoint.pt"),
    "force_resume": (("--force-resume",), "resume even if the checkpoint was made from another manifest"),
    "pack": (("--pack",), "decoded uint8 pack of the manifest, built once and memory-mapped (default %(default)s = on for the cache)"),
    "on_bad_sample": (("--on-bad-sample",), "stop with the key of a corrupt or undecodable blob, or skip and count it (default %(default)s)"),
    "progress": (("--no-progress",), "no progress bars"),
    "threads": (("--threads",), "torch intra-op threads (default %(default)s: graceful when other processes compete for "
                                "the cores; 0 = torch's default, one per core; above 1, OpenMP waits passively)"),
    "extensions": (("--extensions",), "keys ending in these (comma-separated, case-insensitive) are images; others are "
                                      "ignored (default %(default)s)"),
    "labels": (("--labels",), "one label rule for all keys: auto (class folders when every image key lies in one, else "
                              "the _<int> suffix when every one has it, else none; with --source cache: the manifest's "
                              "labels as recorded), folder, suffix or none; a rule other than the manifest's recomputes "
                              "its labels from the keys (default %(default)s)"),
    "prefetch": (("--prefetch",), "--source s3: batches each DataLoader process keeps in flight ahead of the one it "
                                  "is asked for, in the sampler's order (default %(default)s; 0 = no read-ahead)"),
    "cache_as_you_go": (("--cache-as-you-go",), "--source s3: also store every streamed body in the cache (every check "
                                                "of make fetch) and write its manifest after the first epoch; later "
                                                "epochs read from disk"),
}


def build_parser() -> argparse.ArgumentParser:
    from pipeline.config import BAD_SAMPLE_MODES, PACK_MODES, SOURCES, LabelRule, TrainConfig

    choices = {"source": SOURCES, "pack": PACK_MODES, "on_bad_sample": BAD_SAMPLE_MODES, "labels": [r.value for r in LabelRule]}
    p = argparse.ArgumentParser(prog="train_vae.py", description="Train a VAE on images mirrored by `make fetch`.")
    for f in dataclasses.fields(TrainConfig):
        flags, text = FLAGS[f.name]
        if isinstance(f.default, bool):
            # A flag switches its default: --amp turns on what is off, --no-progress turns off what is on.
            p.add_argument(*flags, dest=f.name, action="store_false" if f.default else "store_true", help=text)
            continue
        # The annotation is a string (``from __future__ import annotations``): "int | None" parses as int.
        kind = {"int": int, "float": float}.get(str(f.type).split(" |")[0], str)
        # A tuple is written as a comma-separated list; TrainConfig parses it back.
        default = ",".join(f.default) if isinstance(f.default, tuple) else f.default
        p.add_argument(*flags, dest=f.name, type=kind, default=default, choices=choices.get(f.name), help=text)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="tess: %(levelname)s: %(message)s")
    if args.threads != 1:
        # Before torch loads OpenMP: waiting threads sleep instead of spinning, so several threads degrade
        # gracefully when another process competes for a core (measured: bench/contention_bench.py).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from pipeline.cli import describe_os_error
    from pipeline.config import TrainConfig
    from pipeline.s3 import StorageError
    from pipeline.train import train

    rank = int(os.environ.get("RANK", "0"))
    try:
        config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
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
        print(summary.report(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
