"""The manifest header as a typed contract: optional fields parsed once, the file format unchanged."""

import json

import pytest

from cache import CacheLayout, S3Uri, ShardSpec, load_manifest, read_manifest_header, write_manifest
from cache.manifest import ManifestHeader, ManifestRecord, manifests_of

FETCH = {
    "listed": 3,
    "fetched": 2,
    "cached": 1,
    "missing": 0,
    "failed": 0,
    "bytes_fetched": 10,
    "bytes_total": 15,
    "retries": 0,
    "list_s": 0.01,
    "wall_s": 1.5,
}
RECORDS = [
    ManifestRecord(key=f"p/k{i}_1.png", sha256=f"{i:064x}", size=5, etag='"e"', last_modified="", label=1)
    for i in range(3)
]


def _write(tmp_path, extra=None, *, bucket="bkt", prefix="p/"):
    return write_manifest(
        CacheLayout(root=tmp_path),
        endpoint="http://127.0.0.1:9",
        bucket=bucket,
        prefix=prefix,
        records=RECORDS,
        extra=extra,
    )


def test_optional_fields_are_typed_and_the_header_line_is_unchanged(tmp_path):
    extra = {"fetch": FETCH, "classes": ["cat", "dog"], "incomplete": 2, "shard": "1/4"}
    path = _write(tmp_path, extra)
    h = read_manifest_header(path)
    assert h.shard == ShardSpec(1, 4) and h.classes == ("cat", "dog") and h.incomplete == 2
    assert h.fetch == FETCH and h.unknown == {}
    # A first fetch that downloaded: the network cost is this fetch's, recorded in the header.
    assert h.network == h.network_cost == {"bytes": 10, "seconds": 1.5, "objects": 2, "runs": 1}
    assert h.uri == S3Uri(bucket="bkt", prefix="p/") and str(h.uri) == "s3://bkt/p/"
    # tess-manifest/1 byte for byte: the required fields in their order, then the optional ones as given.
    first = path.read_bytes().split(b"\n", 1)[0]
    expected = {
        "endpoint": "http://127.0.0.1:9",
        "bucket": "bkt",
        "prefix": "p/",
        "created": h.created,
        "count": 3,
        "total_bytes": 15,
        "records_sha256": h.records_sha256,
        "format": "tess-manifest/1",
        **extra,
        "network": h.network,
    }
    assert first == json.dumps(expected, ensure_ascii=False, separators=(",", ":")).encode()
    assert "shard1of4" in path.name
    assert load_manifest(path).header == h


def test_header_without_optional_fields(tmp_path):
    h = read_manifest_header(_write(tmp_path))
    assert (h.shard, h.classes, h.fetch, h.incomplete, h.network, h.network_cost) == (None,) * 6
    assert h.extra == {} and set(h.to_json()) == {
        "endpoint",
        "bucket",
        "prefix",
        "created",
        "count",
        "total_bytes",
        "records_sha256",
        "format",
    }


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("shard", "4/4", "header field shard '4/4': index must be < count"),
        ("shard", "two of three", "not of the form k/N"),
        ("shard", "1/0", "count must be >= 1"),
        ("classes", "cat", "is not a list of names"),
        ("incomplete", -1, "is not a count"),
        ("fetch", [1, 2], "is not an object"),
        ("network", 3.5, "header field network 3.5 is not an object"),
    ],
)
def test_bad_optional_field_is_refused_with_the_file_and_the_fix(tmp_path, field, value, fragment):
    path = _write(tmp_path)
    lines = path.read_text().split("\n")
    header = json.loads(lines[0])
    header[field] = value
    path.write_text("\n".join([json.dumps(header), *lines[1:]]))
    with pytest.raises(ValueError) as e:
        read_manifest_header(path)
    assert fragment in str(e.value) and str(path) in str(e.value) and "make fetch" in str(e.value)
    # The writer checks the same way: a bad value never reaches a file.
    with pytest.raises(ValueError, match=fragment.split(":")[0].split("'")[0]):
        _write(tmp_path / "w", {field: value})


def test_manifests_of_matches_bucket_and_prefix_exactly(tmp_path):
    a = _write(tmp_path, prefix="p/")
    b = _write(tmp_path, {"shard": "0/2"}, prefix="p/")
    _write(tmp_path, prefix="p/sub/")
    _write(tmp_path, bucket="other", prefix="p/")
    assert manifests_of(CacheLayout(root=tmp_path), S3Uri(bucket="bkt", prefix="p/")) == [a, b]
    assert manifests_of(CacheLayout(root=tmp_path), S3Uri(bucket="bkt", prefix="q/")) == []


def test_header_round_trips_through_json():
    h = ManifestHeader.from_json(
        {
            "endpoint": "aws",
            "bucket": "b",
            "prefix": "",
            "created": "t",
            "count": 0,
            "total_bytes": 0,
            "records_sha256": "0" * 64,
            "format": "tess-manifest/1",
            "shard": "0/3",
            "classes": [],
            "future": {"x": 1},
        }
    )
    assert ManifestHeader.from_json(h.to_json()) == h and h.to_json()["shard"] == "0/3" and h.classes == ()
    assert h.unknown == {"future": {"x": 1}} and h.to_json()["future"] == {"x": 1}  # kept for tools that know it
