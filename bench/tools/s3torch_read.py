"""Peer for the fetch benchmark: s3torchconnector's ``S3MapDataset`` reading every object of a prefix.

Run with the bench-local venv (``bench/.venv-peers``), never tess's: ``python s3torch_read.py ENDPOINT
s3://bucket/prefix/ THREADS``. Each item is read whole (``ds[i].read()``) from a thread pool, since one
``S3MapDataset`` item blocks its caller; the bytes are counted, not written to disk.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

from s3torchconnector import S3ClientConfig, S3MapDataset


def main() -> int:
    endpoint, uri, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ds = S3MapDataset.from_prefix(
        uri, region="us-east-1", endpoint=endpoint, s3client_config=S3ClientConfig(force_path_style=True)
    )
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(lambda i: len(ds[i].read()), range(len(ds))))
    print(f"read {len(ds)} objects, {total} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
