"""The asyncio engine: its SigV4 signer against botocore's, and its GETs against real servers.

The signer must produce botocore's exact headers (same canonical request, same signature) for any key
and header set; moto and s3rver then check the signatures themselves in the end-to-end tests.
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
from pipeline.engines import engine_name, getter_for
from pipeline.httpengine import Signer
from pipeline.mirror_types import FailureKind, GetFailure

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
    req = AWSRequest(method="GET", url=f"http://{host}{path}", headers={"x-amz-content-sha256": "UNSIGNED-PAYLOAD", **extra})
    _UnsignedPayload(creds, "s3", "eu-west-3").add_auth(req)
    when = dt.datetime.strptime(req.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc)
    ours = Signer(_Static(creds), "eu-west-3", host).headers(path, extra, now=when)
    assert ours["authorization"] == req.headers["Authorization"]
    assert ours["x-amz-date"] == req.headers["X-Amz-Date"]
    assert ours.get("x-amz-security-token") == (token and req.headers["X-Amz-Security-Token"])


def test_the_signing_key_follows_the_day_and_the_secret():
    creds = Credentials("AK", "secret-1")
    signer = Signer(_Static(creds), "us-east-1", "h")
    day1 = signer.headers("/b/k", {}, now=dt.datetime(2026, 1, 1, 23, 59, tzinfo=dt.timezone.utc))["authorization"]
    day2 = signer.headers("/b/k", {}, now=dt.datetime(2026, 1, 2, 0, 1, tzinfo=dt.timezone.utc))["authorization"]
    assert "20260101/us-east-1" in day1 and "20260102/us-east-1" in day2
    creds.secret_key = "secret-2"  # as a refresh would
    again = signer.headers("/b/k", {}, now=dt.datetime(2026, 1, 2, 0, 1, tzinfo=dt.timezone.utc))["authorization"]
    assert again.split("Signature=")[1] != day2.split("Signature=")[1]


@pytest.mark.parametrize(("endpoint", "proxy", "want"), [
    ("http://127.0.0.1:9000", None, "asyncio"),
    ("https://s3.example.com", None, "obstore"),  # TLS stays with obstore
    (None, None, "obstore"),  # AWS
    ("http://127.0.0.1:9000", "http://proxy:3128", "obstore"),  # proxies stay with obstore
])
def test_engine_choice(monkeypatch, endpoint, proxy, want):
    monkeypatch.delenv("TESS_ENGINE", raising=False)
    for var in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    if proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy)
    assert engine_name(ClientOptions(endpoint=endpoint)) == want


def _get(getter, key, **kw):
    async def run():
        body = await getter.get(key, **kw)
        if body.data is not None:
            return body.size, body.etag, bytes(body.data)
        return body.size, body.etag, b"".join([bytes(c) async for c in body.chunks()])

    return asyncio.run(run())


def test_gets_whole_streamed_and_ranged_bodies_from_moto(s3_server, s3_client, bucket, monkeypatch):
    monkeypatch.delenv("TESS_ENGINE", raising=False)
    small, big = b"tiny body", bytes(range(256)) * 8192  # 2 MiB: streamed in chunks
    s3_client.put_object(Bucket=bucket, Key="h/small", Body=small)
    s3_client.put_object(Bucket=bucket, Key="h/odd key+%.bin", Body=big)
    getter = getter_for(ClientOptions(endpoint=s3_server.endpoint), bucket, index=7)
    assert type(getter).__name__ == "AsyncioGetter"
    assert _get(getter, "h/small") == (len(small), f'"{hashlib.md5(small).hexdigest()}"', small)
    size, etag, data = _get(getter, "h/odd key+%.bin")
    assert (size, data) == (len(big), big) and etag == f'"{hashlib.md5(big).hexdigest()}"'
    assert _get(getter, "h/odd key+%.bin", byte_range=(10, 30))[2] == big[10:30]
    with pytest.raises(GetFailure) as missing:
        _get(getter, "h/absent")
    assert missing.value.kind is FailureKind.MISSING
    with pytest.raises(GetFailure) as changed:
        _get(getter, "h/small", if_match='"not-the-etag"')
    assert changed.value.kind is FailureKind.TRANSIENT and "changed while it was being fetched" in changed.value.message


def test_an_unreachable_endpoint_is_transient_then_fatal():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    getter = getter_for(ClientOptions(endpoint=f"http://127.0.0.1:{port}"), "b", index=8)
    with pytest.raises(GetFailure) as e:
        _get(getter, "k")
    assert e.value.kind is FailureKind.TRANSIENT and "cannot reach the S3 endpoint" in e.value.message
    assert e.value.exhausted.value == "fatal"
