"""The native (obstore) listing of a ``-w 0`` fetch gives exactly boto3's listing, or is boto3's listing.

Checked on both servers: keys, ETags, sizes and LastModified text match object for object; prefixes
and keys obstore cannot list as they are fall back to boto3 (counted), as do errors, which then carry
boto3's one-line message.
"""

from __future__ import annotations

import boto3
import pytest

import pipeline.native_listing as native_listing
from pipeline.config import ClientOptions, S3Uri
from pipeline.s3 import StorageError, list_objects

SAFE = ["n/a/img-001_0.png", "n/a/img-002_1.png", "n/b/x.y-z~_2.png", "n/top.png"]


@pytest.fixture
def fallbacks(monkeypatch) -> list[str]:
    """Counts the listings that went through boto3 instead of obstore."""
    calls: list[str] = []

    def counting(uri, options, **kw):
        calls.append(str(uri))
        return list_objects(uri, options, **kw)

    monkeypatch.setattr(native_listing, "list_objects", counting)
    return calls


def _both(uri: str, options: ClientOptions, **kw):
    native = list(native_listing.list_objects_native(S3Uri.parse(uri), options, **kw))
    return native, list(list_objects(S3Uri.parse(uri), options, **kw))


def test_native_listing_equals_boto3_on_moto(s3_server, put, bucket, options, fallbacks):
    for i, key in enumerate(SAFE + ["other/k.png"]):
        put(key, b"x" * (i + 1))
    native, boto = _both(f"s3://{bucket}/n/", options)
    assert fallbacks == []
    assert [o.key for o in native] == SAFE
    assert native == boto
    native, boto = _both(f"s3://{bucket}/n/", options, limit=2)  # boto3's, which stops early
    assert native == boto and len(native) == 2 and fallbacks == [f"s3://{bucket}/n/"]


def test_native_listing_equals_boto3_on_s3rver(s3rver_env, fallbacks):
    s3 = boto3.session.Session().client("s3", endpoint_url=s3rver_env, region_name="us-east-1")
    s3.create_bucket(Bucket="native-list")
    for i, key in enumerate(SAFE):
        s3.put_object(Bucket="native-list", Key=key, Body=b"y" * (i + 3))
    native, boto = _both("s3://native-list/n/", ClientOptions(endpoint=s3rver_env))
    assert fallbacks == [] and [o.key for o in native] == SAFE
    assert native == boto


@pytest.mark.parametrize(
    ("extra_key", "prefix"),
    [
        ("n/with space_0.png", "n/"),  # a character object_store would encode
        ("n/100%_1.png", "n/"),
        ("n/a//double_0.png", "n/"),  # an empty path segment
        ("n/a/img-001_0.png/", "n/"),  # a non-empty key ending in "/": obstore lists it as a duplicate
        ("n/b/", "n/"),  # a non-empty "folder" object: obstore lists it as "n/b"
        (None, "n/a"),  # a prefix that is not a folder: S3 prefixes are literal, object_store's are paths
    ],
)
def test_keys_or_prefixes_obstore_cannot_list_as_they_are_fall_back_to_boto3(s3_server, put, bucket, options,
                                                                               fallbacks, extra_key, prefix):
    for key in SAFE:
        put(key, b"data")
    if extra_key is not None:
        put(extra_key, b"odd")
    native, boto = _both(f"s3://{bucket}/{prefix}", options)
    assert fallbacks == [f"s3://{bucket}/{prefix}"]
    assert native == boto and native


@pytest.mark.parametrize(
    "extra_keys",
    [
        ["n/folder/"],  # a zero-byte folder marker (obstore lists it as "n/folder"): skipped, as boto3 does
        ["n/a/"],  # the same, beside keys under it
        ["n/empty_0.png"],  # a real zero-byte object: kept
        ["n/a", "n/a/"],  # a zero-byte object and a marker of the same name (listed twice by obstore)
    ],
)
def test_zero_byte_objects_and_folder_markers_are_resolved_exactly(s3_server, put, bucket, options, fallbacks, extra_keys):
    for key in SAFE + extra_keys:
        put(key, b"data" if key in SAFE else b"")
    native, boto = _both(f"s3://{bucket}/n/", options)
    assert native == boto
    assert fallbacks == ([f"s3://{bucket}/n/"] if extra_keys == ["n/a", "n/a/"] else [])


def test_many_ambiguous_keys_fall_back_to_one_boto3_listing(s3_server, put, bucket, options, fallbacks):
    for i in range(native_listing.MAX_AMBIGUOUS + 1):
        put(f"n/empty-{i:02d}", b"")
    native, boto = _both(f"s3://{bucket}/n/", options)
    assert native == boto and len(native) == native_listing.MAX_AMBIGUOUS + 1
    assert fallbacks == [f"s3://{bucket}/n/"]


def test_a_missing_bucket_is_reported_by_boto3s_message(s3_server, options, fallbacks):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        list(native_listing.list_objects_native(S3Uri.parse("s3://no-such-bucket/p/"), options))
    assert fallbacks == ["s3://no-such-bucket/p/"]


def test_with_another_engine_the_listing_is_boto3s(s3_server, put, bucket, options, fallbacks, monkeypatch):
    put("n/only_0.png", b"z")
    monkeypatch.setenv("TESS_ENGINE", "urllib3")
    native, boto = _both(f"s3://{bucket}/n/", options)
    assert native == boto and fallbacks == [f"s3://{bucket}/n/"]
