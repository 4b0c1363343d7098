"""Command line of the pipeline: ``python -m pipeline fetch|serve|upload|verify|stats|clean-cache``.

Every failure the user can fix ends in one line on stderr (``tess: error: ...``) and a non-zero exit:
2 for bad input or refused access, 3 for a fetch that left some objects out.

Start-up: this module imports only what building the parser needs (stdlib, :mod:`pipeline.config`); each
command imports what it uses when it runs, so ``fetch --help`` or a mistyped flag answers in tens of
milliseconds, without numpy, boto3, torch, tqdm or the mirror (tests/test_startup.py).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
from collections.abc import Sequence

from pipeline.config import (
    DEFAULT_LABELS, DEFAULT_SYNC, EMBEDDED_DEMO, ClientOptions, LabelRule, S3Uri, SyncPolicy, resolve_endpoint,
)

DEFAULT_DEMO_N = 5000


def add_client_args(p: argparse.ArgumentParser) -> None:
    """Flags of :class:`ClientOptions`, shared by every command that talks to S3."""
    d = ClientOptions()
    g = p.add_argument_group("S3 client")
    g.add_argument("--endpoint", default=None, help="S3 endpoint URL (default: $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, else AWS)")
    g.add_argument("--max-connections", type=int, default=d.max_connections, help=f"requests in flight per client (default {d.max_connections})")
    g.add_argument("--retry-mode", default=d.retry_mode, choices=("standard", "adaptive"),
                   help="botocore retry mode of upload's boto3 calls: standard, or adaptive (client-side rate limiting; "
                        "default standard); fetch retries on its own (--max-attempts)")
    g.add_argument("--max-attempts", type=int, default=d.max_attempts, help=f"attempts per request and per object (default {d.max_attempts})")
    g.add_argument("--connect-timeout", type=float, default=d.connect_timeout, help=f"seconds (default {d.connect_timeout})")
    g.add_argument("--read-timeout", type=float, default=d.read_timeout,
                   help=f"longest silence while an answer is awaited or read, in seconds; each such window must also "
                        f"bring 1 KiB/s (default {d.read_timeout})")
    g.add_argument("--ca-bundle", default=None, metavar="PEM",
                   help="CA certificates to trust for an https endpoint (default $AWS_CA_BUNDLE, then ca_bundle of the "
                        "AWS profile, then botocore's bundle)")
    g.add_argument("--no-verify-ssl", action="store_true",
                   help="do not verify the endpoint's TLS certificate (the AWS CLI's flag; prints a warning)")


def client_options(args: argparse.Namespace, *, endpoint: str | None = None) -> ClientOptions:
    if args.no_verify_ssl:
        print("tess: warning: TLS certificate verification is off (--no-verify-ssl): anyone between you and the "
              "endpoint can read and change what is fetched", file=sys.stderr)
    return ClientOptions(
        endpoint=endpoint if endpoint is not None else resolve_endpoint(args.endpoint),
        max_connections=args.max_connections,
        retry_mode=args.retry_mode,
        max_attempts=args.max_attempts,
        connect_timeout=args.connect_timeout,
        read_timeout=args.read_timeout,
        ca_bundle=args.ca_bundle,
        verify_ssl=not args.no_verify_ssl,
    )


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return v


def _byte_size(text: str) -> int:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tess", description="tess: mirror S3 prefixes into a content-addressed cache.")
    sub = parser.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fetch", help="mirror an S3 prefix into the cache and write its manifest")
    f.add_argument("prefix", nargs="?", default=None, help="s3://bucket/prefix; omitted: start the embedded demo server and fetch its demo set")
    f.add_argument("-w", "--workers", type=int, default=0, help="DataLoader worker processes (default 0: one event loop in this process, no torch import; each worker runs --max-connections requests)")
    f.add_argument("-c", "--clients", type=int, default=1, help="S3 clients per process; worker i uses client i %% c (default 1)")
    f.add_argument("-b", "--batch", type=int, default=64, help="objects per DataLoader batch, fetched concurrently (default 64)")
    f.add_argument("--limit", type=_positive_int, default=None, help="fetch only the first N listed objects")
    f.add_argument("--cache-dir", default=None, help="cache root (default $TESS_CACHE_DIR or ~/.cache/tess)")
    f.add_argument("--verify", action="store_true", help="rehash local blobs instead of trusting the key index")
    f.add_argument("--demo", type=_positive_int, default=DEFAULT_DEMO_N, help=f"demo images for the embedded server (default {DEFAULT_DEMO_N})")
    f.add_argument("--shard", default=None, metavar="k/N",
                   help="mirror only shard k of N (stable hash of the key); default $NODE_RANK/$NNODES, "
                        "else $RANK/$WORLD_SIZE, else the whole listing")
    f.add_argument("--max-cache-bytes", type=_byte_size, default=os.environ.get("CACHE_MAX_BYTES") or None,
                   help="after the fetch, evict down to this size (e.g. 500M, 20G; default $CACHE_MAX_BYTES, no cap)")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    f.add_argument("--sync", choices=[p.value for p in SyncPolicy], default=DEFAULT_SYNC.value,
                   help=f"when blobs become durable: fsync each, or one syncfs before the manifest (default {DEFAULT_SYNC.value}; README Guarantees)")
    f.add_argument("--labels", choices=[r.value for r in LabelRule], default=DEFAULT_LABELS.value,
                   help="one label rule for the whole listing: auto (class folders when every image key lies in one, "
                        "else the _<int> suffix when every image key has one, else none), folder, suffix or none "
                        f"(-1 for all); recorded in the manifest (default {DEFAULT_LABELS.value})")
    add_client_args(f)

    s = sub.add_parser("serve", help="run the embedded S3 server (moto) with the demo set in the foreground")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=9000, help="port (default 9000; 0 picks a free one)")
    s.add_argument("--demo", type=int, default=DEFAULT_DEMO_N, help=f"demo images to seed (default {DEFAULT_DEMO_N}; 0 for none)")
    s.add_argument("--seed", type=int, default=0, help="demo set seed (default 0)")
    s.add_argument("--until-stdin-closes", action="store_true", help=argparse.SUPPRESS)

    u = sub.add_parser("upload", help="upload a local folder of images to s3://bucket/prefix")
    u.add_argument("folder", help="local folder; keys are prefix + the path relative to it")
    u.add_argument("prefix", help="s3://bucket/prefix")
    u.add_argument("--create-bucket", action="store_true", help="create the bucket when it does not exist")
    u.add_argument("--force", action="store_true", help="send every file, also those the prefix holds with the same size and MD5")
    u.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_client_args(u)

    v = sub.add_parser("verify", help="rehash every blob a manifest references; report (and --repair) bad ones")
    v.add_argument("--cache-dir", default=None, help="cache root (default $TESS_CACHE_DIR or ~/.cache/tess)")
    v.add_argument("--repair", action="store_true", help="fetch missing or corrupted blobs again")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_client_args(v)

    st = sub.add_parser("stats", help="manifests, blobs, bytes, dedup savings and the last fetch of the cache")
    st.add_argument("--cache-dir", default=None, help="cache root (default $TESS_CACHE_DIR or ~/.cache/tess)")

    c = sub.add_parser("clean-cache", help="remove a tess cache (only tess's own entries) and say what was removed")
    c.add_argument("--cache-dir", default=None, help="cache root (default $TESS_CACHE_DIR or ~/.cache/tess)")
    return parser


def cmd_fetch(args: argparse.Namespace) -> int:
    from cache.shard import resolve_shard

    # Resolved before any server starts, so a bad SHARD or NODE_RANK/NNODES fails at once.
    args.shard_spec, origin = resolve_shard(args.shard, os.environ)
    if args.shard_spec is not None:
        print(f"fetching shard {args.shard_spec} (from {origin})", file=sys.stderr)

    if args.prefix is None:
        from pipeline.demo import DEMO_BUCKET, DEMO_PREFIX
        from pipeline.server import DEMO_ACCESS_KEY, DEMO_SECRET_KEY, embedded_server

        # Demo-only keys for the embedded server; the user's own credentials never go to it.
        os.environ.update(AWS_ACCESS_KEY_ID=DEMO_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=DEMO_SECRET_KEY)
        os.environ.pop("AWS_SESSION_TOKEN", None)
        os.environ.pop("AWS_PROFILE", None)
        print(f"no PREFIX given: starting the embedded S3 server with {args.demo} demo images", file=sys.stderr)
        with embedded_server(demo=args.demo) as endpoint:
            return _run_fetch(args, str(S3Uri(bucket=DEMO_BUCKET, prefix=DEMO_PREFIX)), client_options(args, endpoint=endpoint),
                              EMBEDDED_DEMO)
    return _run_fetch(args, args.prefix, client_options(args), None)


def _run_fetch(args: argparse.Namespace, prefix: str, options: ClientOptions, label: str | None) -> int:
    # SyncPolicy as the fetch stage imports it (pipeline.mirror), whatever module defines it.
    from pipeline.fetch import FetchConfig, SyncPolicy, fetch

    config = FetchConfig(
        prefix=prefix, options=options, cache_dir=args.cache_dir, workers=args.workers, clients=args.clients,
        batch=args.batch, limit=args.limit, verify=args.verify, endpoint_label=label, progress=not args.no_progress,
        max_cache_bytes=args.max_cache_bytes, shard=getattr(args, "shard_spec", None), sync=SyncPolicy(args.sync),
        labels=LabelRule(args.labels),
    )
    result = fetch(config)
    if result.label_choice is not None:
        print(result.label_choice.line())
    print(result.summary.line())
    for err in result.summary.errors[:10]:
        print(f"  {err}", file=sys.stderr)
    if len(result.summary.errors) > 10:
        print(f"  ... and {len(result.summary.errors) - 10} more objects not fetched", file=sys.stderr)
    print(f"manifest: {result.manifest}")
    ev = result.summary.evicted
    if ev is not None and (ev.blobs_removed or ev.manifests_removed or ev.packs_removed):
        print(f"cache cap: evicted {ev.blobs_removed} blobs, {ev.packs_removed} packs, {len(ev.manifests_removed)} manifests "
              f"({ev.before_bytes / 1e6:.1f} MB -> {ev.after_bytes / 1e6:.1f} MB)")
    if result.exit_code:
        print(f"tess: incomplete: {result.summary.missing + result.summary.failed} objects were not fetched (exit {result.exit_code})", file=sys.stderr)
    return result.exit_code


def cmd_serve(args: argparse.Namespace) -> int:
    from pipeline.server import serve

    serve(host=args.host, port=args.port, demo=args.demo, seed=args.seed, until_stdin_closes=args.until_stdin_closes)
    return 0


def cmd_upload(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.upload import files_under, upload_folder

    root = Path(args.folder)
    files = files_under(root)
    uri = S3Uri.parse(args.prefix)
    options = client_options(args)
    if args.create_bucket:
        from pipeline.s3 import ensure_bucket

        ensure_bucket(uri, options)
    report = upload_folder(root, uri, options, files, force=args.force, progress=not args.no_progress)
    print(f"uploaded {report.uploaded} files ({report.uploaded_bytes / 1e6:.1f} MB) to {uri}; skipped {report.skipped} "
          f"already there with the same size and MD5{' (--force sends them all)' if report.skipped else ''}")
    return 0


def cmd_clean_cache(args: argparse.Namespace) -> int:
    from cache.clean import clean_cache
    from cache.layout import CacheLayout

    layout = CacheLayout.at(args.cache_dir)
    if not layout.root.exists():
        print(f"nothing to remove: {layout.root} does not exist")
        return 0
    report = clean_cache(layout)
    print(f"removed the tess cache at {layout.root} ({report.files} files, {report.bytes / 1e6:.1f} MB)")
    if report.kept:
        shown = ", ".join(repr(n) for n in report.kept[:5]) + (" ..." if len(report.kept) > 5 else "")
        print(f"kept {len(report.kept)} entries that are not tess's ({shown}) and the folder that holds them")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cache.layout import CacheLayout
    from cache.verify import remove_corrupted, verify_cache
    from pipeline.hints import fetch_hint, verify_hint

    layout = CacheLayout.at(args.cache_dir)
    if not layout.manifests.is_dir():
        raise FileNotFoundError(f"no cache at {layout.root}; run "
                                f"{fetch_hint('s3://bucket/prefix', endpoint=args.endpoint, cache_dir=args.cache_dir)} first, "
                                "or pass the --cache-dir of an existing cache")
    with tqdm(desc="verify", unit="blob", disable=args.no_progress, dynamic_ncols=True) as bar:
        report = verify_cache(layout, progress=bar.update)
    missing = sum(p.kind == "missing" for p in report.problems)
    corrupted = len(report.problems) - missing
    print(f"verified {report.blobs_checked} blobs ({report.bytes_checked / 1e6:.1f} MB) referenced by "
          f"{report.manifests} manifests ({report.records} records): {missing} missing, {corrupted} corrupted")
    for p in report.problems[:20]:
        print(f"  {p.kind}: key {p.key!r} (manifest {p.manifest.name})")
    if len(report.problems) > 20:
        print(f"  ... and {len(report.problems) - 20} more")
    if report.ok:
        return 0
    from pipeline.repair import missing_advice, repair

    if not args.repair:
        print("nothing was changed (verify only reads)")
        # Missing blobs have two causes with two fixes: only missing here (--repair), or deleted on the server.
        advice = missing_advice(layout, report.problems, endpoint=args.endpoint)
        fix = advice or f"run {verify_hint(repair=True, endpoint=args.endpoint, cache_dir=args.cache_dir)}"
        print(f"tess: error: {len(report.problems)} records point to missing or corrupted blobs; {fix}", file=sys.stderr)
        return 1

    result = repair(layout, report.problems, options=client_options(args), endpoint=resolve_endpoint(args.endpoint))
    # What could not be fetched again and is still corrupted can never be right: remove it, and say so.
    removed = remove_corrupted(layout, report.problems)
    print(f"repaired {result.repaired} blobs (fetched again and checked against the pinned sha256)")
    if removed:
        print(f"removed {removed} corrupted blobs that could not be fetched again")
    for err in result.failed[:20]:
        print(f"  {err}", file=sys.stderr)
    if result.failed:
        print(f"tess: error: {len(result.failed)} blobs could not be repaired (see above)", file=sys.stderr)
        return 1
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from cache.gc import cache_stats
    from cache.layout import CacheLayout

    s = cache_stats(CacheLayout.at(args.cache_dir))
    print(f"cache {s.root}")
    print(f"  manifests: {len(s.manifests)}")
    for m in s.manifests:
        shard = f" shard {m['shard']}" if m.get("shard") else ""
        print(f"    {m['name']}: {m['uri']}{shard} at {m['endpoint']}, {m['count']} objects, {m['bytes'] / 1e6:.1f} MB, {m['created']}")
    print(f"  blobs: {s.blobs} ({s.blob_bytes / 1e6:.1f} MB; {s.unreferenced_blobs} referenced by no manifest)")
    print(f"  decoded packs: {s.pack_bytes / 1e6:.1f} MB")
    print(f"  dedup savings: {s.dedup_savings / 1e6:.1f} MB (manifests list {s.logical_bytes / 1e6:.1f} MB, distinct blobs {s.unique_bytes / 1e6:.1f} MB)")
    if s.last_fetch:
        lf = s.last_fetch
        print(f"  last fetch: {lf['manifest']} at {lf['created']}: fetched {lf.get('fetched', '?')}, cached {lf.get('cached', '?')}, "
              f"{lf.get('wall_s', '?')} s wall")
    return 0


def describe_os_error(e: OSError) -> str:
    """One line for a local file-system failure: what failed, where, and the fix."""
    where = f" {e.filename}" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return f"disk full while writing{where or ' the cache'}; free space or pass --cache-dir"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        what = "read-only file system" if e.errno == errno.EROFS else "permission denied"
        return (f"cannot write or read{where} ({what}); pass --cache-dir (CACHE_DIR=) or --out (OUT=) "
                "pointing to a folder you can write, or fix its permissions")
    if e.errno == errno.EADDRINUSE:
        return f"address already in use ({e.strerror}); pass --port with a free port (0 picks one)"
    return f"{e.strerror or e}{':' + where if where else ''}"


COMMANDS = {"fetch": cmd_fetch, "serve": cmd_serve, "upload": cmd_upload, "verify": cmd_verify, "stats": cmd_stats,
            "clean-cache": cmd_clean_cache}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported once the command line is parsed: ``--help`` and a bad flag exit above without them (logging,
    # sqlite3, the signal handling and cache.blobs' body checks cost ~45 ms of start-up; tests/test_startup.py).
    import logging
    import sqlite3

    from cache.blobs import BlobWriteError
    from pipeline import stopping
    from pipeline.transport.errors import StorageError

    logging.basicConfig(level=logging.WARNING, format="tess: %(levelname)s: %(message)s")
    # Ctrl-C and SIGTERM end a fetch at a safe point, so that what finished is kept.
    deferred = stopping.deferred() if args.command == "fetch" else contextlib.nullcontext()
    try:
        with deferred:
            return COMMANDS[args.command](args)
    except (StorageError, BlobWriteError, ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"tess: error: {e}", file=sys.stderr)
        return 2
    except sqlite3.Error as e:
        print(f"tess: error: the key index under the cache dir failed ({e}); free disk space or pass --cache-dir", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"tess: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except stopping.Terminated:
        print("tess: terminated (SIGTERM); the cache is valid and a rerun resumes", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("tess: interrupted; the cache is valid and a rerun resumes", file=sys.stderr)
        return 130
