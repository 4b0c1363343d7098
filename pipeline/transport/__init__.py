"""The transport: every request tess sends to S3 (LIST, HEAD, GET) goes through here.

Rooms, each owning one concern, arrows pointing down:

* :mod:`~pipeline.transport.client`: the S3 client (addressing, signing, HEAD/GET/LIST, per process).
* :mod:`~pipeline.transport.listing`: a prefix's listing, page by page, retried.
* :mod:`~pipeline.transport.http`: HTTP/1.1 framed by h11, bounded reads, strict connection reuse;
  :mod:`~pipeline.transport.wire`: the bytes of one connection and the read-timeout watch.
* :mod:`~pipeline.transport.tls`: the ``ssl.SSLContext`` from boto3's conventions (``AWS_CA_BUNDLE``...).
* :mod:`~pipeline.transport.signer`: SigV4.  :mod:`~pipeline.transport.s3xml`: S3's XML answers.
* :mod:`~pipeline.transport.errors`: every failure classified once.  :mod:`~pipeline.transport.loop`:
  the process's event loop.  :mod:`~pipeline.transport.retry`: backoff.
* :mod:`~pipeline.transport.boto`: the boto3 calls that remain (upload, bucket creation);
  :mod:`~pipeline.transport.upload`: ``tess upload``.

It may import :mod:`cache` (the checks' vocabulary) and :mod:`pipeline.config`; nothing of the mirror,
the datasets or torch. boto3 and botocore are imported here only: botocore for credentials and the CA bundle
(``client``, ``tls``), boto3 for what is rare and complex (``boto``).
"""
