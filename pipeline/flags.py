"""Command-line flags derived from the config dataclasses: one home for each default, the flag's help here.

A table maps each field of :class:`~pipeline.config.FetchConfig`, :class:`~pipeline.config.ClientOptions`
and :class:`~pipeline.config.TrainConfig` to its option strings and help; :func:`add_fields` makes the
flags, with the field's default, its type (``int``, ``float``, ``str``) and, for a ``StrEnum``, its values
as the choices. A boolean field becomes a switch away from its default (``--amp``, ``--no-progress``).
``%(default)s`` in a help text is argparse's own substitution. tests/test_config.py checks that every
field has a flag and every flag the field's default; tests/test_docs.py that docs/cli.md names every flag.

Imports only argparse and :mod:`pipeline.config` (``tess fetch --help`` answers in tens of milliseconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pipeline import config as cfg
from pipeline.config import CACHE_DIR_HELP, ClientOptions, FetchConfig, TrainConfig, resolve_endpoint


@dataclasses.dataclass(frozen=True)
class Flag:
    """How one config field is spelt on the command line."""

    names: tuple[str, ...]
    help: str
    type: Callable[[str], Any] | None = None  # None: from the field's annotation
    metavar: str | None = None


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return v


def byte_size(text: str) -> int:
    """``123``, ``500M``, ``20G`` (powers of 1024) -> bytes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        value = int(float(num) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; use bytes or a suffix, e.g. 500M or 20G") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1 byte")
    return value


CLIENT_FLAGS: dict[str, Flag] = {
    "endpoint": Flag(("--endpoint",), "S3 endpoint URL (default: $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, else AWS)"),
    "max_in_flight": Flag(
        ("--max-in-flight", "--max-connections"),
        "objects in flight per client, each on one connection at a time (default %(default)s; "
        "--max-connections is its older name)",
    ),
    "retry_mode": Flag(
        ("--retry-mode",),
        "botocore retry mode of upload's boto3 calls: adaptive adds client-side "
        "rate limiting (default %(default)s); fetch retries on its own (--max-attempts)",
    ),
    "max_attempts": Flag(("--max-attempts",), "attempts per request and per object (default %(default)s)"),
    "connect_timeout": Flag(("--connect-timeout",), "seconds to open a connection (default %(default)s)"),
    "read_timeout": Flag(
        ("--read-timeout",),
        "longest silence while an answer is awaited or read, in seconds; each "
        "such window must also bring 1 KiB/s (default %(default)s)",
    ),
    "region": Flag(("--region",), "signing region (default: botocore's choice; us-east-1 for a custom endpoint)"),
    "ca_bundle": Flag(
        ("--ca-bundle",),
        "CA certificates to trust for an https endpoint (default $AWS_CA_BUNDLE, "
        "then ca_bundle of the AWS profile, then botocore's bundle)",
        metavar="PEM",
    ),
    "verify_ssl": Flag(
        ("--no-verify-ssl",), "do not verify the endpoint's TLS certificate (the AWS CLI's flag; prints a warning)"
    ),
}

FETCH_FLAGS: dict[str, Flag] = {
    "prefix": Flag(("prefix",), "s3://bucket/prefix; omitted: start the embedded demo server and fetch its demo set"),
    "workers": Flag(
        ("-w", "--workers"),
        "DataLoader worker processes (default %(default)s: one event loop in this "
        "process, no torch import; each worker keeps --max-in-flight objects in flight)",
    ),
    "clients": Flag(("-c", "--clients"), "S3 clients per process; worker i uses client i %% c (default %(default)s)"),
    "batch": Flag(
        ("-b", "--batch"), "objects per DataLoader batch with -w N, fetched concurrently (default %(default)s)"
    ),
    "limit": Flag(("--limit",), "fetch only the first N listed objects", type=positive_int, metavar="N"),
    "cache_dir": Flag(("--cache-dir",), CACHE_DIR_HELP),
    "verify": Flag(("--verify",), "rehash local blobs instead of trusting the key index"),
    "progress": Flag(("--no-progress",), "no progress bar"),
    "max_cache_bytes": Flag(
        ("--max-cache-bytes",),
        "after the fetch, evict down to this size (e.g. 500M, 20G; default $CACHE_MAX_BYTES, else no cap)",
        type=byte_size,
        metavar="SIZE",
    ),
    "shard": Flag(
        ("--shard",),
        "mirror only shard k of N (stable hash of the key); default $NODE_RANK/$NNODES, "
        "else $RANK/$WORLD_SIZE, else the whole listing",
        type=str,
        metavar="k/N",
    ),
    "sync": Flag(
        ("--sync",),
        "when blobs become durable: fsync each, or one syncfs before the manifest "
        "(default %(default)s; docs/guarantees.md)",
    ),
    "labels": Flag(
        ("--labels",),
        "one label rule for the whole listing: auto (class folders when every image key "
        "lies in one, else the _<int> suffix when every image key has one, else none), "
        "folder, suffix or none (-1 for all); recorded in the manifest (default %(default)s)",
    ),
}
# FetchConfig fields the command line does not set: the options come from CLIENT_FLAGS, the label from the endpoint.
FETCH_NOT_FLAGS = ("options", "endpoint_label")

TRAIN_FLAGS: dict[str, Flag] = {
    "workers": Flag(("-w", "--workers"), "DataLoader worker processes (default %(default)s)"),
    "batch": Flag(("-b", "--batch"), "batch size (default %(default)s)"),
    "epochs": Flag(("-e", "--epochs"), "epochs (default %(default)s)"),
    "clients": Flag(("-c", "--clients"), "S3 clients per process for --source s3 (default %(default)s)"),
    "lr": Flag(("--lr",), "Adam learning rate (default %(default)s)"),
    "latent_dim": Flag(("--latent-dim",), "latent size (default %(default)s)"),
    "beta": Flag(("--beta",), "weight of the KL term (default %(default)s)"),
    "image_size": Flag(("--image-size",), "images are resized to this (power of two, default %(default)s)"),
    "seed": Flag(("--seed",), "seed for init, shuffling and sampling (default %(default)s)"),
    "device": Flag(("--device",), "auto (cuda, then mps, then cpu), cpu, cuda[:N] or mps (default %(default)s)"),
    "amp": Flag(("--amp",), "bfloat16 autocast on CUDA (ignored on CPU)"),
    "source": Flag(("--source",), "cache (read the local cache) or s3 (stream via DSSDataset) (default %(default)s)"),
    "prefix": Flag(("--prefix",), "s3://bucket/prefix: use its manifest (cache) or stream it (s3)"),
    "endpoint": Flag(("--endpoint",), "S3 endpoint for --source s3 (default $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL)"),
    "manifest": Flag(("--manifest",), "manifest .jsonl to train on (default: the newest in the cache)"),
    "cache_dir": Flag(("--cache-dir",), CACHE_DIR_HELP),
    "out": Flag(("--out",), "output folder (default %(default)s)"),
    "resume": Flag(("--resume",), "continue from OUT/checkpoint.pt"),
    "force_resume": Flag(("--force-resume",), "resume even if the checkpoint was made from another manifest"),
    "pack": Flag(
        ("--pack",),
        "decoded uint8 pack of the manifest, built once and memory-mapped (default %(default)s = on for the cache)",
    ),
    "on_bad_sample": Flag(
        ("--on-bad-sample",),
        "stop with the key of a corrupt or undecodable blob, or skip and count it (default %(default)s)",
    ),
    "progress": Flag(("--no-progress",), "no progress bars"),
    "threads": Flag(
        ("--threads",),
        "torch intra-op threads (default %(default)s: graceful when other processes "
        "compete for the cores; 0 = torch's default, one per core; above 1, OpenMP waits "
        "passively)",
    ),
    "extensions": Flag(
        ("--extensions",),
        "keys ending in these (comma-separated, case-insensitive) are images; others are ignored (default %(default)s)",
    ),
    "labels": Flag(
        ("--labels",),
        "one label rule for all keys: auto (class folders when every image key lies in one, "
        "else the _<int> suffix when every one has it, else none; with --source cache: the "
        "manifest's labels as recorded), folder, suffix or none; a rule other than the "
        "manifest's recomputes its labels from the keys (default %(default)s)",
    ),
    "prefetch": Flag(
        ("--prefetch",),
        "--source s3: batches each DataLoader process keeps in flight ahead of the one "
        "it is asked for, in the sampler's order (default %(default)s; 0 = no read-ahead)",
    ),
    "cache_as_you_go": Flag(
        ("--cache-as-you-go",),
        "--source s3: also store every streamed body in the cache (every "
        "check of tess fetch) and write its manifest after the first "
        "epoch; later epochs read from disk",
    ),
}


def _field_type(f: dataclasses.Field) -> tuple[Callable[[str], Any], list[str] | None]:
    """The parser of a field's text and its choices: a StrEnum's values, else int, float or str."""
    # The annotation is a string (``from __future__ import annotations``): "int | None" parses as int.
    name = str(f.type).split(" |")[0]
    kind = getattr(cfg, name, None)
    if isinstance(kind, type) and issubclass(kind, enum.StrEnum):
        return str, [m.value for m in kind]
    return {"int": int, "float": float}.get(name, str), None


def add_fields(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    table: Mapping[str, Flag],
    *,
    skip: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> None:
    """One flag per field of ``cls`` (all but ``skip``), spelt as ``table`` says, defaults from ``cls``."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = table[f.name]
        default = (defaults or {}).get(f.name, None if f.default is dataclasses.MISSING else f.default)
        if isinstance(default, bool):
            # A flag switches its default: --amp turns on what is off, --no-progress turns off what is on.
            parser.add_argument(
                *flag.names, dest=f.name, action="store_false" if default else "store_true", help=flag.help
            )
            continue
        kind, choices = _field_type(f)
        # A tuple is written as a comma-separated list; the config parses it back.
        default = ",".join(default) if isinstance(default, tuple) else default
        if not flag.names[0].startswith("-"):  # a positional, optional
            parser.add_argument(flag.names[0], nargs="?", default=default, help=flag.help)
            continue
        parser.add_argument(
            *flag.names,
            dest=f.name,
            type=flag.type or kind,
            default=default,
            choices=choices,
            metavar=flag.metavar,
            help=flag.help,
        )


def values(args: argparse.Namespace, cls: type, *, skip: Iterable[str] = ()) -> dict[str, Any]:
    """The parsed values of ``cls``'s fields, by name (for ``cls(**values(...))``)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name not in skip}


def add_client_args(p: argparse.ArgumentParser) -> None:
    """Flags of :class:`ClientOptions`, shared by every command that talks to S3."""
    add_fields(p.add_argument_group("S3 client"), ClientOptions, CLIENT_FLAGS)


def client_options(args: argparse.Namespace, *, endpoint: str | None = None) -> ClientOptions:
    """The :class:`ClientOptions` of parsed client flags (``endpoint``: a URL that overrides ``--endpoint``)."""
    if not args.verify_ssl:
        print(
            "tess: warning: TLS certificate verification is off (--no-verify-ssl): anyone between you and the "
            "endpoint can read and change what is fetched",
            file=sys.stderr,
        )
    given = values(args, ClientOptions)
    given["endpoint"] = endpoint if endpoint is not None else resolve_endpoint(args.endpoint)
    return ClientOptions(**given)


def add_fetch_args(p: argparse.ArgumentParser) -> None:
    add_fields(
        p,
        FetchConfig,
        FETCH_FLAGS,
        skip=FETCH_NOT_FLAGS,
        defaults={"max_cache_bytes": os.environ.get("CACHE_MAX_BYTES") or None},
    )


def add_train_args(p: argparse.ArgumentParser) -> None:
    add_fields(p, TrainConfig, TRAIN_FLAGS)


def train_parser(prog: str) -> argparse.ArgumentParser:
    """The parser of ``train_vae.py`` (``tess train`` adds the same flags to its subcommand)."""
    p = argparse.ArgumentParser(prog=prog, description="Train a VAE on images mirrored by `tess fetch` (`make fetch`).")
    add_train_args(p)
    return p
