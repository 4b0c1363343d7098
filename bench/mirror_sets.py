"""The object sets of the fetch bench (:mod:`bench.mirror_bench`): each one seeded on its own fresh
server, then handed over as a :class:`Target` for as long as that server runs.

* :func:`small_set`: random-noise PNGs of about 2.5 KB on s3rver;
* :func:`tls_set`: the same PNGs on s3rver serving HTTPS with a certificate of a private CA
  (:func:`tests.certs.make_ca_and_cert`); :attr:`Target.ca_bundle` names that CA;
* :func:`latency_set`: the same PNGs on s3rver behind :class:`bench.latency_proxy.LatencyProxy` (+20 ms);
* :func:`large_set`: a few objects of random bytes, ``mb`` MB each, on s3rver (the bench's ``large``,
  ``large4`` and ``one100`` sets, each under its own name and prefix);
* :func:`png_set`: ``n`` of the PNGs under any prefix on a fresh s3rver, seeded by many threads, plus an
  optional second prefix holding the first few of them (:mod:`bench.scale_bench`: 100,000 objects and a
  5,000-object baseline);
* :func:`moto_set`: the demo set on moto's server (``python -m pipeline serve --demo``).

Every client gets :meth:`Target.env`: the bench's environment without any ``AWS_``/``RCLONE_`` variable
and without the variables that name CA bundles (:data:`CA_VARIABLES`; this machine sets several to the
system bundle), so on the TLS set only the CA a tool is explicitly handed can make it accept the server.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import io
import os
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench.common import log

if TYPE_CHECKING:
    from tests.s3rver import S3rverServer

BUCKET = "bench"
# Variables through which some client could find a CA bundle on its own (AWS_* are dropped by prefix).
CA_VARIABLES = (
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "NIX_SSL_CERT_FILE",
    "NODE_EXTRA_CA_CERTS",
    "HTTPLIB2_CA_CERTS",
    "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
    "PIP_CERT",
    "CLOUDSDK_CORE_CUSTOM_CA_CERTS_FILE",
    "GIT_SSL_CAINFO",
)


@dataclass(frozen=True, kw_only=True)
class Target:
    """Where the objects are: endpoint, ``s3://bucket/prefix/``, count, bytes, credentials, CA (HTTPS only)."""

    endpoint: str
    prefix: str
    n: int
    total_bytes: int
    access_key: str
    secret_key: str
    server_pid: int
    keys: tuple[str, ...] = ()
    counts: Callable[[], Mapping[str, int]] | None = None  # requests served so far, by kind (s3rver only)
    ca_bundle: str = ""  # PEM of the CA that signed an HTTPS server's certificate; "" for http (or to leave it out)

    def env(self) -> dict[str, str]:
        """Credentials and region, ``AWS_CA_BUNDLE`` when :attr:`ca_bundle` is set, no other CA variable."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RCLONE_")) and k not in CA_VARIABLES}
        env.update(
            AWS_ACCESS_KEY_ID=self.access_key,
            AWS_SECRET_ACCESS_KEY=self.secret_key,
            AWS_DEFAULT_REGION="us-east-1",
            AWS_REGION="us-east-1",
            AWS_EC2_METADATA_DISABLED="true",
        )
        if self.ca_bundle:
            env["AWS_CA_BUNDLE"] = self.ca_bundle
        return env


Item = tuple[str, Callable[[], bytes | Path]]  # key under the prefix, and what makes its body


def noise_png(i: int, side: int = 28) -> bytes:
    """A random-noise RGB PNG of about 2.4 KB (noise does not compress)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def png_items(n: int) -> list[Item]:
    return [(f"img-{i:05d}_{i % 10}.png", lambda i=i: noise_png(i)) for i in range(n)]


def seed(endpoint: str, prefix: str, items: list[Item], ca_bundle: str = "", threads: int = 8) -> int:
    """PUT every item under ``bench/<prefix>`` on the s3rver at ``endpoint`` from ``threads`` threads (one
    boto3 client, as many pooled connections); return the bytes sent.

    ``ca_bundle``: the CA that signed an HTTPS server's certificate (boto3 checks it).
    """
    import boto3
    from botocore.config import Config

    from tests.s3rver import ACCESS_KEY, SECRET_KEY

    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        verify=ca_bundle or None,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(max_pool_connections=max(10, threads)),
    )
    try:
        s3.create_bucket(Bucket=BUCKET)
    except s3.exceptions.ClientError:
        pass

    def put(item: Item) -> int:
        key, make = item
        data = make()
        if isinstance(data, Path):
            with open(data, "rb") as f:
                s3.put_object(Bucket=BUCKET, Key=prefix + key, Body=f)
            return data.stat().st_size
        s3.put_object(Bucket=BUCKET, Key=prefix + key, Body=data)
        return len(data)

    with cf.ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(put, items))


@contextlib.contextmanager
def _s3rver(scratch: Path, name: str, tls: tuple[Path, Path, Path] | None = None) -> Iterator[S3rverServer]:
    """A fresh s3rver storing under ``scratch``; ``tls``: (certificate, key, CA) to serve HTTPS."""
    from tests.s3rver import S3rverServer, install

    with S3rverServer(modules=install(), directory=scratch / f"s3rver-{name}", tls=tls) as srv:
        yield srv


def _s3rver_target(
    srv: S3rverServer, prefix: str, items: list[Item], total: int, endpoint: str = "", ca_bundle: str = ""
) -> Target:
    from tests.s3rver import ACCESS_KEY, SECRET_KEY

    return Target(
        endpoint=endpoint or srv.endpoint,
        prefix=f"s3://{BUCKET}/{prefix}",
        n=len(items),
        total_bytes=total,
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        server_pid=srv._proc.pid if srv._proc else 0,
        keys=tuple(prefix + k for k, _ in items),
        counts=lambda: srv.counts,
        ca_bundle=ca_bundle,
    )


@contextlib.contextmanager
def small_set(n: int, scratch: Path) -> Iterator[Target]:
    with _s3rver(scratch, "small") as srv:
        items = png_items(n)
        total = seed(srv.endpoint, "small/", items)
        log(f"small set: {n} objects, {total / n:.0f} bytes each on s3rver {srv.endpoint}")
        yield _s3rver_target(srv, "small/", items, total)


@contextlib.contextmanager
def tls_set(n: int, scratch: Path) -> Iterator[Target]:
    """The small set's PNGs on an s3rver serving HTTPS; the target's ``ca_bundle`` is the private CA."""
    from tests.certs import make_ca_and_cert

    certs = make_ca_and_cert(scratch / "tls-certs")
    with _s3rver(scratch, "tls", tls=(certs.cert, certs.key, certs.ca)) as srv:
        items = png_items(n)
        total = seed(srv.endpoint, "tls/", items, ca_bundle=str(certs.ca))
        log(f"tls set: {n} objects, {total / n:.0f} bytes each on s3rver {srv.endpoint} (private CA {certs.ca})")
        yield _s3rver_target(srv, "tls/", items, total, ca_bundle=str(certs.ca))


@contextlib.contextmanager
def latency_set(n: int, scratch: Path, delay_s: float = 0.02) -> Iterator[Target]:
    from bench.latency_proxy import LatencyProxy

    with _s3rver(scratch, "latency") as srv:
        items = png_items(n)
        total = seed(srv.endpoint, "lat/", items)
        log(f"latency set: {n} objects on s3rver {srv.endpoint}, +{delay_s * 1000:.0f} ms a request")
        with LatencyProxy(int(srv.endpoint.rsplit(":", 1)[1]), delay_s) as proxy:
            yield _s3rver_target(srv, "lat/", items, total, endpoint=proxy.endpoint)


@contextlib.contextmanager
def large_set(mb: int, count: int, scratch: Path, name: str = "large") -> Iterator[Target]:
    """``count`` objects of ``mb`` MB of random bytes under ``name/`` on a fresh s3rver (its own folder ``name``)."""
    with _s3rver(scratch, name) as srv:
        files = [scratch / f"{name}-{i}.bin" for i in range(count)]
        for i, f in enumerate(files):
            with open(f, "wb") as out:
                rng = random.Random(i)
                for _ in range(mb):
                    out.write(rng.randbytes(1_000_000))
        items: list[Item] = [(f"blob-{i}.bin", lambda f=f: f) for i, f in enumerate(files)]
        total = seed(srv.endpoint, f"{name}/", items)
        for f in files:
            f.unlink()
        log(f"{name} set: {count} object(s) of {mb} MB on s3rver {srv.endpoint}")
        yield _s3rver_target(srv, f"{name}/", items, total)


@contextlib.contextmanager
def png_set(
    n: int, scratch: Path, *, name: str = "scale", threads: int = 32, baseline_n: int = 0
) -> Iterator[tuple[Target, Target | None]]:
    """``n`` PNGs under ``name/`` on a fresh s3rver, PUT by ``threads`` threads; with ``baseline_n``, the first
    ``baseline_n`` of them again under ``name-base/`` (the same bytes, a prefix of their own).

    Yields (the set, the baseline set or None); both share the server and its counts.
    """
    import time

    with _s3rver(scratch, name) as srv:
        t0 = time.perf_counter()
        items = png_items(n)
        total = seed(srv.endpoint, f"{name}/", items, threads=threads)
        log(
            f"{name} set: {n} objects, {total / max(n, 1):.0f} bytes each on s3rver {srv.endpoint}, "
            f"seeded by {threads} "
            f"threads in {time.perf_counter() - t0:.0f} s"
        )
        base = None
        if baseline_n:
            base_items = items[:baseline_n]
            base_total = seed(srv.endpoint, f"{name}-base/", base_items, threads=threads)
            base = _s3rver_target(srv, f"{name}-base/", base_items, base_total)
        yield _s3rver_target(srv, f"{name}/", items, total), base


@contextlib.contextmanager
def moto_set(n: int) -> Iterator[Target]:
    import boto3

    from bench.common import demo_server
    from pipeline.demo.server import DEMO_ACCESS_KEY, DEMO_SECRET_KEY

    with demo_server(n) as server:
        s3 = boto3.client(
            "s3",
            endpoint_url=server.endpoint,
            region_name="us-east-1",
            aws_access_key_id=DEMO_ACCESS_KEY,
            aws_secret_access_key=DEMO_SECRET_KEY,
        )
        b, p = server.prefix[5:].split("/", 1)
        objs = [
            o
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket=b, Prefix=p)
            for o in page.get("Contents", [])
        ]
        yield Target(
            endpoint=server.endpoint,
            prefix=server.prefix,
            n=len(objs),
            total_bytes=sum(o["Size"] for o in objs),
            access_key=DEMO_ACCESS_KEY,
            secret_key=DEMO_SECRET_KEY,
            server_pid=server.pid,
            keys=tuple(o["Key"] for o in objs),
        )
