"""Baseline: the plain boto3 mirror a user would write in 20 lines (list, then get_object in 16 threads).

Usage: python bench/tools/boto3_mirror.py s3://bucket/prefix TARGET_DIR ENDPOINT [THREADS]
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor

import boto3
from botocore.config import Config


def main() -> None:
    uri, target, endpoint = sys.argv[1:4]
    threads = int(sys.argv[4]) if len(sys.argv) > 4 else 16
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    s3 = boto3.client("s3", endpoint_url=endpoint, config=Config(max_pool_connections=threads))
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for o in page.get("Contents", ())
    ]

    def get(key: str) -> None:
        path = os.path.join(target, key[len(prefix) :])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(s3.get_object(Bucket=bucket, Key=key)["Body"].read())

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(get, keys))
    print(f"{len(keys)} objects")


if __name__ == "__main__":
    main()
