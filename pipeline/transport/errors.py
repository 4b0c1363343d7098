"""What can go wrong with a request, classified once: :class:`GetFailure` and its :class:`FailureKind`.

Every answer and every exception of the transport ends here as one typed failure with one line for the
user (no credentials, the key and the fix named). The mirror decides what each kind means for an
object; the listing and the CLI turn fatal ones into ``StorageError``. Nothing here imports boto3.
"""

from __future__ import annotations

import enum

from pipeline.config import ClientOptions, redact_url

# S3 error codes that no retry fixes, with what they mean for the user.
CREDENTIAL_CODES = {
    "InvalidAccessKeyId": "the access key id is not known to the server",
    "SignatureDoesNotMatch": "the secret key does not match the access key",
    "ExpiredToken": "the session token has expired",
    "InvalidToken": "the session token is invalid",
}
DENIAL_CODES = {
    "AccessDenied": "access denied",
    "AllAccessDisabled": "all access to this object has been disabled",
}
MISSING_CODES = frozenset({"NoSuchKey", "NotFound"})
REGION_CODES = frozenset({"PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"})
# S3 answers these when it is overloaded or briefly failing; a later attempt can succeed.
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class StorageError(Exception):
    """S3 refused or failed a request in a way that retrying will not fix (one line, with the fix)."""


class FailureKind(enum.Enum):
    TRANSIENT = "transient"  # a later attempt may succeed
    MISSING = "missing"  # 404 NoSuchKey: never retried
    DENIED = "denied"  # 403 for this object only (a bucket policy): never retried, only this object fails
    CHANGED = "changed"  # the object is not the listed version any more: only this object fails
    FATAL = "fatal"  # never retried; stops the whole fetch (credentials, bucket, endpoint, TLS)
    PERMANENT = "permanent"  # never retried; only this object fails


class GetFailure(Exception):
    """A request's failure, classified.

    Attributes:
        kind: how the caller treats it.
        message: one line for the user (no credentials).
        fatal_when_exhausted: a TRANSIENT failure that outlives its retries stops everything (an endpoint
            that never answers) instead of failing only its object.
        no_answer: the server accepted the request and sent no byte within the read timeout.
        reconnects: 1 when the request had been sent again after a kept-alive connection the server had
            closed (no failed attempt, but a request sent: counted as a retry).
    """

    def __init__(
        self, kind: FailureKind, message: str, *, fatal_when_exhausted: bool = False, no_answer: bool = False
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.fatal_when_exhausted = fatal_when_exhausted
        self.no_answer = no_answer
        self.reconnects = 0


def where(options: ClientOptions) -> str:
    return redact_url(options.endpoint) if options.endpoint else "AWS S3"


def unreachable(options: ClientOptions, detail: str = "") -> GetFailure:
    """No connection to the endpoint: retried, and fatal once the retries are spent."""
    return GetFailure(
        FailureKind.TRANSIENT,
        f"cannot reach the S3 endpoint {where(options)}; check ENDPOINT / "
        f"AWS_ENDPOINT_URL and that the server is up{f' ({detail})' if detail else ''}",
        fatal_when_exhausted=True,
    )


def certificate_failure(options: ClientOptions, reason: str, trusted: str) -> GetFailure:
    """The server's TLS certificate was not accepted: fatal at once (no retry makes it trusted).

    ``trusted`` says which CA bundle was tried (``AWS_CA_BUNDLE``, ``--ca-bundle``, the default...).
    """
    return GetFailure(
        FailureKind.FATAL,
        f"the TLS certificate of {where(options)} was not accepted by {trusted} "
        f"({reason}); name the CA that signed it with AWS_CA_BUNDLE=/path/ca.pem or --ca-bundle "
        "/path/ca.pem (or skip the check with --no-verify-ssl)",
    )


def for_answer(status: int, code: str | None, *, uri: str, options: ClientOptions, location: str = "") -> GetFailure:
    """An HTTP error answer (its status and the S3 ``<Code>`` of its body, if any), classified."""
    label = f"{code} ({status})" if code else f"HTTP {status}"
    if code in CREDENTIAL_CODES:
        return GetFailure(
            FailureKind.FATAL,
            f"{uri}: {CREDENTIAL_CODES[code]} ({code}) at {where(options)}; check "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE",
        )
    if code == "NoSuchBucket":
        bucket = uri[5:].split("/", 1)[0]
        return GetFailure(
            FailureKind.FATAL,
            f"bucket {bucket!r} does not exist at {where(options)}; check PREFIX=s3://bucket/prefix and ENDPOINT",
        )
    if code in REGION_CODES:
        return GetFailure(
            FailureKind.FATAL, f"{uri}: the bucket is in another region ({code}); set AWS_REGION or AWS_DEFAULT_REGION"
        )
    if status == 404 or code in MISSING_CODES:
        return GetFailure(FailureKind.MISSING, f"{uri}: deleted since the listing (404)")
    if status == 403:
        what = DENIAL_CODES.get(code or "", "forbidden")
        return GetFailure(
            FailureKind.DENIED,
            f"{uri}: {what} ({code or 403}) at {where(options)}; check AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY / AWS_PROFILE and the bucket policy",
        )
    if status == 412 or code == "PreconditionFailed":
        return GetFailure(FailureKind.CHANGED, f"{uri}: changed while it was being fetched (412 to If-Match)")
    if status in RETRYABLE_STATUS or status >= 500:
        return GetFailure(FailureKind.TRANSIENT, f"{uri}: the server answered {label}")
    if 300 <= status < 400:
        to = f" to {location[:200]}" if location else ""
        return GetFailure(
            FailureKind.PERMANENT,
            f"{uri}: the server answered a redirect ({label}){to}; tess does not "
            "follow redirects: check ENDPOINT and the bucket's region",
        )
    return GetFailure(FailureKind.PERMANENT, f"{uri}: the server answered {label}")
