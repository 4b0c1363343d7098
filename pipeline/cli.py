"""The ``tess`` command (``python -m pipeline``): fetch | train | demo | serve | verify | stats | clean-cache | upload.

This module builds the parser and turns failures into one line; :mod:`pipeline.commands` does the work
and :mod:`pipeline.flags` derives the flags from the config dataclasses. Every failure the user can fix
ends in one line on stderr (``tess: error: ...``) and a non-zero exit: 2 for bad input or refused access,
3 for a fetch that left some objects out.

Start-up: this module imports only what building the parser needs (stdlib, :mod:`pipeline.config`,
:mod:`pipeline.flags`); each command imports what it uses when it runs, so ``fetch --help`` or a mistyped
flag answers in tens of milliseconds, without numpy, boto3, torch, tqdm or the mirror (tests/test_startup.py).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Sequence

from pipeline import commands
from pipeline.config import CACHE_DIR_HELP
from pipeline.flags import add_client_args, add_fetch_args, add_train_args, positive_int

DEFAULT_DEMO_N = 5000
DEMO_EPOCHS = 2  # make demo: enough for reconstructions that resemble the inputs, in about a minute on 2 cores
DEMO_OUT = "runs/demo"


def _fetch_parser(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser("fetch", help="mirror an S3 prefix into the cache and write its manifest")
    add_fetch_args(f)
    f.add_argument(
        "--demo",
        type=positive_int,
        default=DEFAULT_DEMO_N,
        help=f"demo images for the embedded server when no prefix is given (default {DEFAULT_DEMO_N})",
    )
    add_client_args(f)


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "demo", help="fetch the embedded server's demo set, train on it, and name the pictures (make demo)"
    )
    d.add_argument("--cache-dir", default=None, help=CACHE_DIR_HELP)
    d.add_argument("--demo", type=positive_int, default=DEFAULT_DEMO_N, help=f"demo images (default {DEFAULT_DEMO_N})")
    d.add_argument("-e", "--epochs", type=positive_int, default=DEMO_EPOCHS, help=f"epochs (default {DEMO_EPOCHS})")
    d.add_argument("--out", default=DEMO_OUT, help=f"output folder (default {DEMO_OUT})")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tess", description="tess: mirror S3 prefixes into a content-addressed cache and train PyTorch from it."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _fetch_parser(sub)

    t = sub.add_parser("train", help="train the VAE from the cache, or stream from S3 (train_vae.py)")
    add_train_args(t)

    _demo_parser(sub)

    s = sub.add_parser("serve", help="run the embedded S3 server (moto) with the demo set in the foreground")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=9000, help="port (default 9000; 0 picks a free one)")
    s.add_argument(
        "--demo", type=int, default=DEFAULT_DEMO_N, help=f"demo images to seed (default {DEFAULT_DEMO_N}; 0 for none)"
    )
    s.add_argument("--seed", type=int, default=0, help="demo set seed (default 0)")
    s.add_argument("--until-stdin-closes", action="store_true", help=argparse.SUPPRESS)

    v = sub.add_parser("verify", help="rehash every blob a manifest references; report (and --repair) bad ones")
    v.add_argument("--cache-dir", default=None, help=CACHE_DIR_HELP)
    v.add_argument("--repair", action="store_true", help="fetch missing or corrupted blobs again")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_client_args(v)

    st = sub.add_parser("stats", help="manifests, blobs, bytes, dedup savings and the last fetch of the cache")
    st.add_argument("--cache-dir", default=None, help=CACHE_DIR_HELP)

    c = sub.add_parser("clean-cache", help="remove a tess cache (only tess's own entries) and say what was removed")
    c.add_argument("--cache-dir", default=None, help=CACHE_DIR_HELP)

    u = sub.add_parser("upload", help="upload a local folder of images to s3://bucket/prefix")
    u.add_argument("folder", help="local folder; keys are prefix + the path relative to it")
    u.add_argument("prefix", help="s3://bucket/prefix")
    u.add_argument("--create-bucket", action="store_true", help="create the bucket when it does not exist")
    u.add_argument(
        "--force", action="store_true", help="send every file, also those the prefix holds with the same size and MD5"
    )
    u.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_client_args(u)
    return parser


def _demo(args: argparse.Namespace) -> int:
    """``tess demo``: the fetch and the training it runs, parsed as their own command lines would be."""
    cache = ["--cache-dir", args.cache_dir] if args.cache_dir else []
    quiet = ["--no-progress"] if args.no_progress else []
    parser = build_parser()
    fetch_args = parser.parse_args(["fetch", "--demo", str(args.demo), *cache, *quiet])
    train_args = parser.parse_args(["train", "-e", str(args.epochs), "--out", args.out, *cache, *quiet])
    return commands.cmd_demo(fetch_args, train_args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "fetch": commands.cmd_fetch,
    "train": commands.cmd_train,
    "demo": _demo,
    "serve": commands.cmd_serve,
    "verify": commands.cmd_verify,
    "stats": commands.cmd_stats,
    "clean-cache": commands.cmd_clean_cache,
    "upload": commands.cmd_upload,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return commands.cmd_train(args)  # its own errors, one line per rank
    # Imported once the command line is parsed: ``--help`` and a bad flag exit above without them (logging,
    # sqlite3, the signal handling and cache.blobs' body checks cost ~45 ms of start-up; tests/test_startup.py).
    import logging
    import sqlite3

    from cache.blobs import BodyCheckError
    from pipeline.fetch import stopping
    from pipeline.transport.errors import StorageError

    logging.basicConfig(level=logging.WARNING, format="tess: %(levelname)s: %(message)s")
    # Ctrl-C and SIGTERM end a fetch at a safe point, so that what finished is kept.
    deferred = stopping.deferred() if args.command == "fetch" else contextlib.nullcontext()
    try:
        with deferred:
            return COMMANDS[args.command](args)
    except (StorageError, BodyCheckError, ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"tess: error: {e}", file=sys.stderr)
        return 2
    except sqlite3.Error as e:
        print(
            f"tess: error: the key index under the cache dir failed ({e}); free disk space or pass --cache-dir",
            file=sys.stderr,
        )
        return 2
    except OSError as e:
        print(f"tess: error: {commands.describe_os_error(e)}", file=sys.stderr)
        return 2
    except stopping.Terminated:
        print("tess: terminated (SIGTERM); the cache is valid and a rerun resumes", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("tess: interrupted; the cache is valid and a rerun resumes", file=sys.stderr)
        return 130
