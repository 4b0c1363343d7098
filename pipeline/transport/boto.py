"""The boto3 calls that remain: uploads (multipart through s3transfer) and bucket creation.

They are rare and complex (multipart, checksums of parts), and not on the fetch path: LIST, HEAD and GET
go through :mod:`pipeline.transport`. This module and :func:`pipeline.transport.tls.ca_bundle` share
the TLS choice (``--ca-bundle``, ``AWS_CA_BUNDLE``, ``--no-verify-ssl``); clients are made on first use
per process and never pickled.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from pipeline.config import ClientOptions, S3Uri
from pipeline.transport.client import PerProcess
from pipeline.transport.errors import CREDENTIAL_CODES, DENIAL_CODES, StorageError, where
from pipeline.transport.tls import boto3_verify

log = logging.getLogger(__name__)

__all__ = ["StorageError", "describe_error", "ensure_bucket", "get_client", "upload_file"]


def _make_client(options: ClientOptions) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        max_pool_connections=options.max_in_flight,
        retries={"mode": options.retry_mode, "total_max_attempts": options.max_attempts},
        connect_timeout=options.connect_timeout,
        read_timeout=options.read_timeout,
        # Custom endpoints (MinIO, Ceph, DSS, moto) rarely have wildcard DNS for virtual hosts.
        s3={"addressing_style": "path" if options.endpoint else "auto"},
        # Newer botocore sends and checks CRC checksums by default; many S3-compatible stores do not
        # support them.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = boto3.session.Session()
    region = options.region or session.region_name or "us-east-1"
    return session.client(
        "s3", endpoint_url=options.endpoint, region_name=region, config=config, verify=boto3_verify(options)
    )


_clients: PerProcess[Any] = PerProcess()


def get_client(options: ClientOptions, index: int = 0) -> Any:
    """boto3 client number ``index`` for ``options`` in this process, created on first use."""
    return _clients.get((options, index), lambda: _make_client(options))


def describe_error(exc: BaseException, *, uri: str, options: ClientOptions) -> str | None:
    """A one-line message with the fix for a boto3 error that retrying cannot fix, else None."""
    import botocore.exceptions

    at = where(options)
    code = None
    if isinstance(exc, botocore.exceptions.ClientError):
        code = str(
            exc.response.get("Error", {}).get("Code") or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        )
    if code in CREDENTIAL_CODES or code in DENIAL_CODES:
        what = CREDENTIAL_CODES.get(code) or DENIAL_CODES[code]
        return (
            f"{uri}: {what} ({code}) at {at}; "
            "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE and the bucket policy"
        )
    if code == "NoSuchBucket":
        return (
            f"bucket {uri[5:].split('/', 1)[0]!r} does not exist at {at}; check PREFIX=s3://bucket/prefix and ENDPOINT"
        )
    if code in ("403", "Forbidden"):
        return f"{uri}: forbidden (403) at {at}; check the credentials and the bucket policy"
    if isinstance(exc, botocore.exceptions.SSLError):
        return (
            f"the TLS certificate of {at} was not accepted ({exc}); name its CA with AWS_CA_BUNDLE=/path/ca.pem or "
            "--ca-bundle (or --no-verify-ssl)"
        )
    if isinstance(exc, (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError)):
        return f"cannot reach the S3 endpoint {at}; check ENDPOINT / AWS_ENDPOINT_URL and that the server is up"
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return "no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
    return None


def _storage_error(e: Exception, uri: str, options: ClientOptions, what: str) -> StorageError:
    return StorageError(describe_error(e, uri=uri, options=options) or f"{what} {uri} failed: {type(e).__name__}: {e}")


def ensure_bucket(uri: S3Uri, options: ClientOptions) -> None:
    """Create the bucket of ``uri`` unless it exists."""
    import botocore.exceptions

    client = get_client(options)
    try:
        client.head_bucket(Bucket=uri.bucket)
        return
    except botocore.exceptions.ClientError as e:
        if str(e.response.get("Error", {}).get("Code")) not in ("404", "NoSuchBucket", "NotFound"):
            raise _storage_error(e, str(uri), options, "HEAD bucket") from None
    except botocore.exceptions.BotoCoreError as e:
        raise _storage_error(e, str(uri), options, "HEAD bucket") from None
    client.create_bucket(Bucket=uri.bucket)


MULTIPART_ABOVE = 64 << 20  # bytes; larger files go up in parts (s3transfer)


def upload_file(
    path: os.PathLike[str] | str, bucket: str, key: str, options: ClientOptions, *, uri_for_errors: str
) -> None:
    """PUT one local file (multipart through s3transfer above :data:`MULTIPART_ABOVE`)."""
    import botocore.exceptions

    client = get_client(options)
    try:
        if os.path.getsize(path) > MULTIPART_ABOVE:
            client.upload_file(str(path), bucket, key)
        else:
            with open(path, "rb") as f:
                client.put_object(Bucket=bucket, Key=key, Body=f.read())
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
        raise _storage_error(e, uri_for_errors, options, "PUT") from None
