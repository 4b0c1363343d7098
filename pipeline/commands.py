"""What each ``tess`` command does once its command line is parsed (:mod:`pipeline.cli` parses it).

Each command imports what it uses when it runs, so the parser answers ``--help`` and mistyped flags
without numpy, boto3, torch, tqdm or the mirror (tests/test_startup.py). Printing happens here and in
the entry points only.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys

from pipeline.config import EMBEDDED_DEMO, ClientOptions, FetchConfig, S3Uri, TrainConfig, resolve_endpoint
from pipeline.flags import FETCH_NOT_FLAGS, client_options, values


def cmd_fetch(args: argparse.Namespace) -> int:
    from cache.shard import resolve_shard

    # Resolved before any server starts, so a bad SHARD or NODE_RANK/NNODES fails at once.
    args.shard_spec, origin = resolve_shard(args.shard, os.environ)
    if args.shard_spec is not None:
        print(f"fetching shard {args.shard_spec} (from {origin})", file=sys.stderr)

    if args.prefix is None:
        from pipeline.demo.demo_set import DEMO_BUCKET, DEMO_PREFIX
        from pipeline.demo.server import DEMO_ACCESS_KEY, DEMO_SECRET_KEY, embedded_server

        # Demo-only keys for the embedded server; the user's own credentials never go to it.
        os.environ.update(AWS_ACCESS_KEY_ID=DEMO_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=DEMO_SECRET_KEY)
        os.environ.pop("AWS_SESSION_TOKEN", None)
        os.environ.pop("AWS_PROFILE", None)
        print(f"no PREFIX given: starting the embedded S3 server with {args.demo} demo images", file=sys.stderr)
        with embedded_server(demo=args.demo) as endpoint:
            return _run_fetch(
                args,
                str(S3Uri(bucket=DEMO_BUCKET, prefix=DEMO_PREFIX)),
                client_options(args, endpoint=endpoint),
                EMBEDDED_DEMO,
            )
    return _run_fetch(args, args.prefix, client_options(args), None)


def _run_fetch(args: argparse.Namespace, prefix: str, options: ClientOptions, label: str | None) -> int:
    from pipeline.fetch.stage import fetch

    given = values(args, FetchConfig, skip=FETCH_NOT_FLAGS)
    given.update(prefix=prefix, shard=getattr(args, "shard_spec", None))
    config = FetchConfig(**given, options=options, endpoint_label=label)
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
        print(
            f"cache cap: evicted {ev.blobs_removed} blobs, {ev.packs_removed} packs, "
            f"{len(ev.manifests_removed)} manifests "
            f"({ev.before_bytes / 1e6:.1f} MB -> {ev.after_bytes / 1e6:.1f} MB)"
        )
    if result.exit_code:
        print(
            f"tess: incomplete: {result.summary.missing + result.summary.failed} objects were not fetched "
            f"(exit {result.exit_code})",
            file=sys.stderr,
        )
    return result.exit_code


def cmd_serve(args: argparse.Namespace) -> int:
    from pipeline.demo.server import serve

    serve(host=args.host, port=args.port, demo=args.demo, seed=args.seed, until_stdin_closes=args.until_stdin_closes)
    return 0


def cmd_upload(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline.transport.upload import files_under, upload_folder

    root = Path(args.folder)
    files = files_under(root)
    uri = S3Uri.parse(args.prefix)
    options = client_options(args)
    if args.create_bucket:
        from pipeline.transport.boto import ensure_bucket

        ensure_bucket(uri, options)
    report = upload_folder(root, uri, options, files, force=args.force, progress=not args.no_progress)
    print(
        f"uploaded {report.uploaded} files ({report.uploaded_bytes / 1e6:.1f} MB) to {uri}; skipped {report.skipped} "
        f"already there with the same size and MD5{' (--force sends them all)' if report.skipped else ''}"
    )
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
    from cache.verify import BlobState, remove_corrupted, verify_cache
    from pipeline.hints import fetch_hint, verify_hint

    layout = CacheLayout.at(args.cache_dir)
    if not layout.manifests.is_dir():
        raise FileNotFoundError(
            f"no cache at {layout.root}; run "
            f"{fetch_hint('s3://bucket/prefix', endpoint=args.endpoint, cache_dir=args.cache_dir)} first, "
            "or pass the --cache-dir of an existing cache"
        )
    with tqdm(desc="verify", unit="blob", disable=args.no_progress, dynamic_ncols=True) as bar:
        report = verify_cache(layout, progress=bar.update)
    missing = sum(p.kind is BlobState.MISSING for p in report.problems)
    corrupted = len(report.problems) - missing
    print(
        f"verified {report.blobs_checked} blobs ({report.bytes_checked / 1e6:.1f} MB) referenced by "
        f"{report.manifests} manifests ({report.records} records): {missing} missing, {corrupted} corrupted"
    )
    for p in report.problems[:20]:
        print(f"  {p.kind}: key {p.key!r} (manifest {p.manifest.name})")
    if len(report.problems) > 20:
        print(f"  ... and {len(report.problems) - 20} more")
    if report.ok:
        return 0
    from pipeline.fetch.repair import missing_advice, repair

    if not args.repair:
        print("nothing was changed (verify only reads)")
        # Missing blobs have two causes with two fixes: only missing here (--repair), or deleted on the server.
        advice = missing_advice(layout, report.problems, endpoint=args.endpoint)
        fix = advice or f"run {verify_hint(repair=True, endpoint=args.endpoint, cache_dir=args.cache_dir)}"
        print(
            f"tess: error: {len(report.problems)} records point to missing or corrupted blobs; {fix}", file=sys.stderr
        )
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
        print(
            f"    {m['name']}: {m['uri']}{shard} at {m['endpoint']}, {m['count']} objects, "
            f"{m['bytes'] / 1e6:.1f} MB, {m['created']}"
        )
    print(f"  blobs: {s.blobs} ({s.blob_bytes / 1e6:.1f} MB; {s.unreferenced_blobs} referenced by no manifest)")
    print(f"  decoded packs: {s.pack_bytes / 1e6:.1f} MB")
    print(
        f"  dedup savings: {s.dedup_savings / 1e6:.1f} MB (manifests list {s.logical_bytes / 1e6:.1f} MB, "
        f"distinct blobs {s.unique_bytes / 1e6:.1f} MB)"
    )
    if s.last_fetch:
        lf = s.last_fetch
        print(
            f"  last fetch: {lf['manifest']} at {lf['created']}: fetched {lf.get('fetched', '?')}, "
            f"cached {lf.get('cached', '?')}, "
            f"{lf.get('wall_s', '?')} s wall"
        )
    return 0


def describe_os_error(e: OSError) -> str:
    """One line for a local file-system failure: what failed, where, and the fix."""
    where = f" {e.filename}" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return f"disk full while writing{where or ' the cache'}; free space or pass --cache-dir"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        what = "read-only file system" if e.errno == errno.EROFS else "permission denied"
        return (
            f"cannot write or read{where} ({what}); pass --cache-dir (CACHE_DIR=) or --out (OUT=) "
            "pointing to a folder you can write, or fix its permissions"
        )
    if e.errno == errno.EADDRINUSE:
        return f"address already in use ({e.strerror}); pass --port with a free port (0 picks one)"
    return f"{e.strerror or e}{':' + where if where else ''}"


def cmd_train(args: argparse.Namespace) -> int:
    """``tess train`` and ``train_vae.py``: train the VAE; one ``tess: error:`` line per rank on failure."""
    import logging
    import sqlite3

    logging.basicConfig(level=logging.WARNING, format="tess: %(levelname)s: %(message)s")
    if args.threads != 1:
        # Before torch loads OpenMP: waiting threads sleep instead of spinning, so several threads degrade
        # gracefully when another process competes for a core (measured: bench/contention_bench.py).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from pipeline.train.loop import train
    from pipeline.transport.errors import StorageError

    rank = int(os.environ.get("RANK", "0"))
    try:
        summary = train(TrainConfig(**values(args, TrainConfig)))
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


def cmd_demo(fetch_args: argparse.Namespace, train_args: argparse.Namespace) -> int:
    """``tess demo`` (``make demo``): fetch the embedded server's demo set, then train on it; the pictures."""
    from pipeline.fetch import stopping

    with stopping.deferred():  # Ctrl-C ends the fetch at a safe point, as in `tess fetch`; training as usual
        code = cmd_fetch(fetch_args)
    if code:
        return code
    code = cmd_train(train_args)
    if code == 0:
        pictures = " ".join(os.path.join(train_args.out, n) for n in ("reconstructions.png", "samples.png", "loss.png"))
        print(f"pictures: {pictures}")
    return code
