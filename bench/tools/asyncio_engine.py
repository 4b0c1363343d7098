"""A pure-Python asyncio GET engine, measured against tess's engines (issue 10, point 2); bench only.

botocore's SigV4 signer, HTTP/1.1 over ``asyncio`` streams (one persistent connection per worker
coroutine, ``--conns`` of them), every body hashed with SHA-256 and written to a temp file renamed to
its digest: the same work as tess's small-object path, with no native code but hashlib. Lists with
boto3 first. Prints ``objects bytes seconds``.

Usage: python bench/tools/asyncio_engine.py ENDPOINT s3://bucket/prefix/ DEST [--conns 64]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
import time
import urllib.parse

import boto3
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest


def list_keys(endpoint: str, bucket: str, prefix: str) -> list[str]:
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", ())]


async def worker(
    host: str, port: int, endpoint: str, bucket: str, keys: asyncio.Queue, dest: str, signer: SigV4Auth, done: list[int]
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while not keys.empty():
            key = keys.get_nowait()
            path = f"/{bucket}/{urllib.parse.quote(key, safe='/~')}"
            req = AWSRequest(method="GET", url=endpoint + path, headers={"x-amz-content-sha256": "UNSIGNED-PAYLOAD"})
            signer.add_auth(req)
            head = "".join(f"{k}: {v}\r\n" for k, v in req.headers.items())
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{head}\r\n".encode())
            status = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            body = await reader.readexactly(length)
            if not status.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"{key}: {status!r}")
            sha = hashlib.sha256(body).hexdigest()
            tmp = f"{dest}/.{sha}.tmp"
            with open(tmp, "wb") as f:
                f.write(body)
            os.replace(tmp, f"{dest}/{sha}")
            done[0] += 1
            done[1] += length
    finally:
        writer.close()


async def run(endpoint: str, bucket: str, keys: list[str], dest: str, conns: int) -> list[int]:
    u = urllib.parse.urlsplit(endpoint)
    creds = boto3.session.Session().get_credentials().get_frozen_credentials()
    signer = SigV4Auth(creds, "s3", "us-east-1")
    queue: asyncio.Queue = asyncio.Queue()
    for k in keys:
        queue.put_nowait(k)
    done = [0, 0]
    await asyncio.gather(
        *(worker(u.hostname, u.port, endpoint, bucket, queue, dest, signer, done) for _ in range(conns))
    )
    return done


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("endpoint")
    p.add_argument("prefix")
    p.add_argument("dest")
    p.add_argument("--conns", type=int, default=64)
    a = p.parse_args()
    bucket, _, prefix = a.prefix.removeprefix("s3://").partition("/")
    os.makedirs(a.dest, exist_ok=True)
    t0 = time.perf_counter()
    n, size = asyncio.run(run(a.endpoint, bucket, list_keys(a.endpoint, bucket, prefix), a.dest, a.conns))
    print(n, size, round(time.perf_counter() - t0, 3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
