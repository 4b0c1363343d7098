"""The transport's S3 client: its SigV4 signer against botocore's, and its requests against a real server.

The signer must produce botocore's exact headers (same canonical request, same signature) for any key,
query and header set; moto and s3rver then check the signatures themselves in the end-to-end tests.
Framing and fault cases are ``tests/test_hostile.py``'s.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import urllib.parse

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from pipeline.config import ClientOptions
from pipeline.transport.client import BucketClient, S3Client
from pipeline.transport.errors import FailureKind, GetFailure
from pipeline.transport.signer import Signer, query_string

KEYS = ["plain/k_0.png", "sp ace/ünï çødé_2.png", "a+b=c&d.png", "100%.png", "tilde~/x.y-z_1", "a//b/../c", "?q#f"]


class _UnsignedPayload(S3SigV4Auth):
    """botocore's S3 signer with the payload left unsigned, as tess's GETs send it (botocore signs the
    empty body's SHA-256 on plain HTTP instead; S3 accepts both)."""

    def _should_sha256_sign_payload(self, request):
        return False


class _Static:
    def __init__(self, creds: Credentials) -> None:
        self._creds = creds

    def get_frozen_credentials(self):
        return self._creds.get_frozen_credentials()


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("extra", [{}, {"Range": "bytes=0-99", "If-Match": '"0123abcd"'}])
@pytest.mark.parametrize("token", [None, "session-token/with+chars="])
def test_signer_matches_botocore_byte_for_byte(key, extra, token):
    creds = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    host = "127.0.0.1:9000"
    path = "/bucket/" + urllib.parse.quote(key, safe="/~")
    req = AWSRequest(
        method="GET", url=f"http://{host}{path}", headers={"x-amz-content-sha256": "UNSIGNED-PAYLOAD", **extra}
    )
    _UnsignedPayload(creds, "s3", "eu-west-3").add_auth(req)
    when = dt.datetime.strptime(req.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    ours = Signer(_Static(creds), "eu-west-3").headers("GET", host, path, "", extra, now=when)
    assert ours["authorization"] == req.headers["Authorization"]
    assert ours["x-amz-date"] == req.headers["X-Amz-Date"]
    assert ours.get("x-amz-security-token") == (token and req.headers["X-Amz-Security-Token"])


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("prefix", ["", "p/", "sp ace/+plus&amp=%/ünï"])
def test_signer_matches_botocore_with_a_query(method, prefix):
    creds = Credentials("AKIDEXAMPLE", "secret")
    params = [
        ("list-type", "2"),
        ("prefix", prefix),
        ("max-keys", "1000"),
        ("encoding-type", "url"),
        ("continuation-token", "1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM="),
    ]
    query = query_string(params)
    req = AWSRequest(
        method=method,
        url=f"https://s3.example.com/bucket?{query}",
        headers={"x-amz-content-sha256": "UNSIGNED-PAYLOAD"},
    )
    _UnsignedPayload(creds, "s3", "us-east-1").add_auth(req)
    when = dt.datetime.strptime(req.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    ours = Signer(_Static(creds), "us-east-1").headers(method, "s3.example.com", "/bucket", query, now=when)
    assert ours["authorization"] == req.headers["Authorization"]


def test_the_signing_key_follows_the_day_and_the_secret():
    creds = Credentials("AK", "secret-1")
    signer = Signer(_Static(creds), "us-east-1")
    day1 = signer.headers("GET", "h", "/b/k", now=dt.datetime(2026, 1, 1, 23, 59, tzinfo=dt.UTC))["authorization"]
    day2 = signer.headers("GET", "h", "/b/k", now=dt.datetime(2026, 1, 2, 0, 1, tzinfo=dt.UTC))["authorization"]
    assert "20260101/us-east-1" in day1 and "20260102/us-east-1" in day2
    creds.secret_key = "secret-2"  # as a refresh would
    again = signer.headers("GET", "h", "/b/k", now=dt.datetime(2026, 1, 2, 0, 1, tzinfo=dt.UTC))["authorization"]
    assert again.split("Signature=")[1] != day2.split("Signature=")[1]


@pytest.mark.parametrize(
    ("endpoint", "bucket", "host", "path"),
    [
        ("http://127.0.0.1:9000", "b", "127.0.0.1:9000", "/b/k%20x"),  # custom endpoints: path style
        ("https://rgw.example.com/base", "b", "rgw.example.com", "/base/b/k%20x"),
        (None, "my-bucket", "my-bucket.s3.eu-west-1.amazonaws.com", "/k%20x"),  # AWS: virtual-hosted
        (
            None,
            "dotted.bucket",
            "s3.eu-west-1.amazonaws.com",
            "/dotted.bucket/k%20x",
        ),  # its TLS certificate needs path style
    ],
)
def test_addressing(endpoint, bucket, host, path):
    client = S3Client(ClientOptions(endpoint=endpoint, region="eu-west-1"), creds=_Static(Credentials("a", "b")))
    _, got_host, got_path = client._route(bucket, "k x")
    assert (got_host, got_path) == (host, path)


def _get(getter, key, **kw):
    async def run():
        body = await getter.get(key, **kw)
        if body.data is not None:
            return body.size, body.etag, bytes(body.data)
        return body.size, body.etag, b"".join([bytes(c) async for c in body.chunks()])

    return asyncio.run(run())


def test_gets_whole_streamed_and_ranged_bodies_from_moto(s3_server, s3_client, bucket):
    small, big = b"tiny body", bytes(range(256)) * 8192  # 2 MiB: streamed in chunks
    s3_client.put_object(Bucket=bucket, Key="h/small", Body=small)
    s3_client.put_object(Bucket=bucket, Key="h/odd key+%.bin", Body=big)
    getter = BucketClient(S3Client(ClientOptions(endpoint=s3_server.endpoint)), bucket)
    assert _get(getter, "h/small", size=len(small)) == (len(small), f'"{hashlib.md5(small).hexdigest()}"', small)
    size, etag, data = _get(getter, "h/odd key+%.bin", size=len(big))
    assert (size, data) == (len(big), big) and etag == f'"{hashlib.md5(big).hexdigest()}"'
    assert _get(getter, "h/odd key+%.bin", byte_range=(10, 30))[2] == big[10:30]
    head = asyncio.run(getter.head("h/odd key+%.bin"))
    assert (head.size, head.etag) == (len(big), etag)
    with pytest.raises(GetFailure) as missing:
        _get(getter, "h/absent")
    assert missing.value.kind is FailureKind.MISSING
    with pytest.raises(GetFailure) as changed:
        _get(getter, "h/small", if_match='"not-the-etag"')
    assert (
        changed.value.kind is FailureKind.CHANGED and "changed while it was being fetched (412" in changed.value.message
    )
    with pytest.raises(GetFailure) as longer:  # more bytes than the listing pinned: never read past it
        _get(getter, "h/small", size=len(small) - 1)
    assert longer.value.kind is FailureKind.TRANSIENT and "more than the 8 bytes expected" in longer.value.message


def test_an_unreachable_endpoint_is_transient_then_fatal():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    getter = BucketClient(S3Client(ClientOptions(endpoint=f"http://127.0.0.1:{port}")), "b")
    with pytest.raises(GetFailure) as e:
        _get(getter, "k")
    assert e.value.kind is FailureKind.TRANSIENT and "cannot reach the S3 endpoint" in e.value.message
    assert e.value.fatal_when_exhausted


@pytest.mark.parametrize("token", [None, "tok/en+="])
def test_environment_credentials_are_botocores_without_importing_it(monkeypatch, tmp_path, token):
    import botocore.session

    from pipeline.transport.client import credentials

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    shared = tmp_path / "credentials"
    shared.write_text("[someone-else]\naws_access_key_id = AKIDFILE\naws_secret_access_key = file-secret\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(shared))
    monkeypatch.setenv("AWS_PROFILE", "someone-else")  # env keys still win in botocore's chain
    if token:
        monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    else:
        monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    ours = credentials().get_frozen_credentials()
    theirs = botocore.session.get_session().get_credentials().get_frozen_credentials()
    assert (ours.access_key, ours.secret_key, ours.token) == (theirs.access_key, theirs.secret_key, theirs.token)
    assert type(ours).__name__ == "_EnvKeys"


def test_without_any_credentials_the_error_is_one_line(monkeypatch):
    from pipeline.transport.client import credentials
    from pipeline.transport.errors import StorageError

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageError, match="no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        credentials()
