"""The transport's listing (ListObjectsV2 parsed by ElementTree) gives exactly boto3's listing.

Checked on both servers: keys (odd ones included: spaces, ``+``, ``%``, empty segments, ``..``),
ETags, sizes and LastModified match object for object; folder markers are skipped, real zero-byte
objects kept; pages follow the continuation token; ``--limit`` stops early; errors are one line.
"""

from __future__ import annotations

import boto3
import pytest

from pipeline.config import ClientOptions, S3Uri
from pipeline.transport.listing import ObjectInfo, StorageError, iso_utc, list_objects

KEYS = [
    "n/a/img-001_0.png",
    "n/a/img-002_1.png",
    "n/b/x.y-z~_2.png",
    "n/top.png",
    "n/with space_0.png",
    "n/100%_1.png",
    "n/a//double_0.png",
    "n/a/../dots_1.png",
    "n/a+b=c&d.png",
    "n/ünï çødé_2.png",
    "n/a/img-001_0.png/",
    "n/b/",
]


def _boto3(client, bucket: str, prefix: str) -> list[ObjectInfo]:
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", ()):
            if o["Size"] == 0 and o["Key"].endswith("/"):
                continue
            out.append(
                ObjectInfo(key=o["Key"], etag=o["ETag"], size=o["Size"], last_modified=iso_utc(o["LastModified"]))
            )
    return out


def test_listing_equals_boto3_on_moto(s3_client, put, bucket, options):
    for i, key in enumerate(KEYS + ["other/k.png"]):
        put(key, b"x" * (i + 1))
    for marker in ("n/folder/", "n/empty_0.png"):
        put(marker, b"")
    ours = list(list_objects(S3Uri.parse(f"s3://{bucket}/n/"), options))
    assert ours == _boto3(s3_client, bucket, "n/")
    assert "n/folder/" not in [o.key for o in ours] and "n/empty_0.png" in [o.key for o in ours]
    assert len(ours) == len(KEYS) + 1
    assert list(list_objects(S3Uri.parse(f"s3://{bucket}/n/"), options, limit=2)) == ours[:2]
    # A prefix that is not a folder: S3 prefixes are literal.
    assert [o.key for o in list_objects(S3Uri.parse(f"s3://{bucket}/n/a"), options)] == sorted(
        k for k in KEYS if k.startswith("n/a")
    )


def test_listing_equals_boto3_on_s3rver_across_pages(s3rver_env):
    s3 = boto3.session.Session().client("s3", endpoint_url=s3rver_env, region_name="us-east-1")
    s3.create_bucket(Bucket="transport-list")
    keys = [f"p/k{i:05d}_{i % 3}.png" for i in range(1003)] + ["p/sp ace+plus.png"]
    for i, key in enumerate(keys):
        s3.put_object(Bucket="transport-list", Key=key, Body=b"y" * (i % 7 + 1))
    stats: dict[str, int] = {}
    ours = list(list_objects(S3Uri.parse("s3://transport-list/p/"), ClientOptions(endpoint=s3rver_env), stats=stats))
    assert ours == _boto3(s3, "transport-list", "p/")
    assert len(ours) == len(keys) and stats["pages"] == 2


def test_a_missing_bucket_is_one_line(s3_server, options):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist at http://127.0.0.1:"):
        list(list_objects(S3Uri.parse("s3://no-such-bucket/p/"), options))
