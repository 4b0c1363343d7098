"""Baseline: the research code's per-item download, one ``download_file`` per ``__getitem__``.

A map-style Dataset lists the prefix once; each item downloads its object with ``download_file``
(s3transfer: HEAD, then GET) into a per-worker temp folder under TARGET_DIR, with a boto3 client made
lazily in each worker. A DataLoader with 4 workers and batch 16 drives it, as the old loader did.

Usage: python bench/tools/dataloader_download.py s3://bucket/prefix TARGET_DIR ENDPOINT [WORKERS] [BATCH]
"""

from __future__ import annotations

import os
import sys

import boto3
from torch.utils.data import DataLoader, Dataset, get_worker_info


class PerItemDownload(Dataset):
    """Objects under ``bucket/prefix``; item ``i`` downloads object ``i`` and returns its size."""

    def __init__(self, bucket: str, prefix: str, target: str, endpoint: str) -> None:
        self.bucket, self.target, self.endpoint = bucket, target, endpoint
        client = boto3.client("s3", endpoint_url=endpoint)
        self.keys = [
            o["Key"]
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", ())
        ]
        self._client = None

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> int:
        if self._client is None:  # one client per worker process, made after the fork
            self._client = boto3.client("s3", endpoint_url=self.endpoint)
        info = get_worker_info()
        folder = os.path.join(self.target, f"worker{info.id if info else 0}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, os.path.basename(self.keys[i]))
        self._client.download_file(self.bucket, self.keys[i], path)
        return os.path.getsize(path)


def main() -> None:
    uri, target, endpoint = sys.argv[1:4]
    workers = int(sys.argv[4]) if len(sys.argv) > 4 else 4
    batch = int(sys.argv[5]) if len(sys.argv) > 5 else 16
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    loader = DataLoader(PerItemDownload(bucket, prefix, target, endpoint), batch_size=batch, num_workers=workers)
    n = sum(len(b) for b in loader)
    print(f"{n} objects")


if __name__ == "__main__":
    main()
