"""TLS as AWS users expect: one ``ssl.SSLContext`` per process and setting, from boto3's conventions.

The CA bundle is, in order: ``--ca-bundle`` (``ClientOptions.ca_bundle``), ``AWS_CA_BUNDLE``, ``ca_bundle``
in the AWS config profile (both read by botocore, as the AWS CLI does), else botocore's default bundle
(certifi's). ``--no-verify-ssl`` (``ClientOptions.verify_ssl=False``) turns verification off; the CLI
then warns. The boto3 calls that remain (upload, bucket creation) get the same choice via :func:`boto3_verify`.
"""

from __future__ import annotations

import os
import ssl
import threading

from pipeline.config import ClientOptions

_contexts: dict[tuple[int, str | None, bool], ssl.SSLContext] = {}
_lock = threading.Lock()


def ca_bundle(options: ClientOptions) -> tuple[str | None, str]:
    """The CA bundle to trust and where that choice came from (for messages); (None, ...) for the default."""
    if options.ca_bundle:
        return options.ca_bundle, "--ca-bundle"
    if os.environ.get("AWS_CA_BUNDLE"):
        return os.environ["AWS_CA_BUNDLE"], "AWS_CA_BUNDLE"
    import botocore.session

    configured = botocore.session.Session().get_config_variable("ca_bundle")
    return (str(configured), "ca_bundle in the AWS config profile") if configured else (None, "the default CA bundle")


def boto3_verify(options: ClientOptions) -> bool | str | None:
    """botocore's ``verify`` argument for the same choice (False, a bundle path, or None for its default)."""
    if not options.verify_ssl:
        return False
    return ca_bundle(options)[0]


def ssl_context(options: ClientOptions) -> ssl.SSLContext:
    """The client context for ``options`` (made once per process and setting).

    Raises:
        ValueError: the CA bundle named does not exist or holds no certificate, with where it was named.
    """
    bundle, origin = ca_bundle(options) if options.verify_ssl else (None, "")
    key = (os.getpid(), bundle, options.verify_ssl)
    with _lock:
        ctx = _contexts.get(key)
        if ctx is None:
            ctx = _contexts[key] = _make(bundle, origin, options.verify_ssl)
    return ctx


def _make(bundle: str | None, origin: str, verify: bool) -> ssl.SSLContext:
    if not verify:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    if bundle is None:
        from botocore.httpsession import get_cert_path

        bundle, origin = get_cert_path(True), "the default CA bundle"
    try:
        return ssl.create_default_context(cafile=bundle)
    except FileNotFoundError:
        raise ValueError(
            f"the CA bundle {bundle!r} (from {origin}) does not exist; pass the path of a PEM file "
            "with the CA that signed the server's certificate"
        ) from None
    except ssl.SSLError as e:
        raise ValueError(
            f"the CA bundle {bundle!r} (from {origin}) holds no usable certificate ({e.reason or e}); "
            "pass a PEM file with the CA that signed the server's certificate"
        ) from None
