"""A real S3-compatible server for tests: moto's server mode over HTTP on 127.0.0.1.

It is reachable from other processes (subprocesses, Ray workers), unlike an in-process `mock_aws`, which
pyarrow's C++ S3 client never sees. Every request is counted on the server side by (method, kind), so a
test can assert how many lists, heads, gets and puts a job made, whichever process made them.

Use from a test module:

    pytest_plugins = ["tests.s3_server"]  # the fixtures s3_server, bucket, s3

    def test_x(s3):  # "s3://<a fresh bucket>", with the AWS_* variables set for this test
        ...

(or `from tests.s3_server import bucket, s3, s3_server`, which ruff flags: F401 and F811 on each use).
Only the session's first process runs the server; other processes reach it through `env` (AWS_ENDPOINT_URL).
"""

from __future__ import annotations

import atexit
import json
import logging
import re
import threading
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import parse_qs

import pytest

KINDS = ("list", "head", "get", "put", "multipart", "delete", "other")


def request_kind(method: str, path: str, query: str) -> str:
    """The kind of an S3 request (path-style addressing: /bucket/key?query); one of KINDS."""
    params = parse_qs(query, keep_blank_values=True)
    bucket, _, key = path.lstrip("/").partition("/")
    if not bucket or bucket == "moto-api" or method == "POST" and "Action" in params:
        return "other"  # moto's own API, IAM and STS (form-encoded Action=... requests)
    if "uploads" in params or "uploadId" in params:
        return "multipart"
    if method == "HEAD":
        return "head"
    if method == "DELETE" or method == "POST" and "delete" in params:
        return "delete"
    if not key:  # a request on the bucket itself
        bucket_reads = {"list-type", "prefix", "delimiter", "max-keys", "marker", "continuation-token"}
        listing = method == "GET" and (not params or bucket_reads & set(params))
        return "list" if listing else "other"
    return {"GET": "get", "PUT": "put"}.get(method, "other")


class CountingApp:
    """WSGI middleware that counts every request by (method, kind) before moto answers it."""

    def __init__(self, app):
        self.app = app
        self.counts: Counter[tuple[str, str]] = Counter()
        self.lock = threading.Lock()

    def __call__(self, environ, start_response):
        method = environ["REQUEST_METHOD"]
        kind = request_kind(method, environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", ""))
        with self.lock:
            self.counts[method, kind] += 1
        return self.app(environ, start_response)


class S3Server:
    """moto's ThreadedMotoServer on a free port of 127.0.0.1, with a request counter."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not one log line per request
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        # ThreadedMotoServer keeps its werkzeug server in `_server` (moto 5.2.6); its `app` is the WSGI
        # callable every request goes through, so wrapping it counts requests from any process.
        self._counter = CountingApp(self._server._server.app)
        self._server._server.app = self._counter
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",  # never wait on an instance-metadata lookup
        }

    def requests(self) -> Counter[tuple[str, str]]:
        """Requests served since the last reset(), by (method, kind), e.g. {("PUT", "put"): 2}."""
        with self._counter.lock:
            return Counter(self._counter.counts)

    def reset(self) -> None:
        with self._counter.lock:
            self._counter.counts.clear()

    def client(self, service: str = "s3"):
        """A boto3 client for this server with the test credentials (for setting up, not for the code under test)."""
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name=self.env["AWS_REGION"],
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
        )

    def create_user(self, actions: list[str]) -> tuple[str, str]:
        """An IAM user allowed `actions` (e.g. ["s3:GetObject", "s3:ListBucket"]) on everything: (key id, secret)."""
        iam = self.client("iam")
        name = f"user-{uuid.uuid4().hex[:8]}"
        iam.create_user(UserName=name)
        statement = {"Effect": "Allow", "Action": actions, "Resource": "*"}
        policy = json.dumps({"Version": "2012-10-17", "Statement": [statement]})
        iam.put_user_policy(UserName=name, PolicyName="test", PolicyDocument=policy)
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    @contextmanager
    def iam_enforced(self) -> Iterator[None]:
        """While inside, the server checks signatures and IAM policies (moto accepts anything by default).

        The test credentials ("testing") are not an IAM user: only keys from create_user() work inside.
        Create buckets and users before entering."""
        self._set_auth("0")
        try:
            yield
        finally:
            self._set_auth("inf")

    def _set_auth(self, initial_no_auth_action_count: str) -> None:
        url = f"{self.endpoint}/moto-api/reset-auth"
        body = initial_no_auth_action_count.encode()  # text/plain: moto reads a form-encoded body as an AWS call
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=10).close()

    def stop(self) -> None:
        self._server.stop()


_SERVER: S3Server | None = None
_SERVER_LOCK = threading.Lock()


def shared_server() -> S3Server:
    """The process's one S3 server, started on first use and stopped at exit."""
    global _SERVER
    with _SERVER_LOCK:
        if _SERVER is None:
            _SERVER = S3Server()
            atexit.register(_SERVER.stop)
        return _SERVER


def bucket_name(test_name: str) -> str:
    """A valid, fresh bucket name (3-63 of [a-z0-9-]) that says which test made it."""
    stem = re.sub(r"[^a-z0-9]+", "-", test_name.lower()).strip("-")[:50]
    return f"{stem}-{uuid.uuid4().hex[:8]}".strip("-")


@pytest.fixture(scope="session")
def s3_server() -> S3Server:
    """The S3 server: .endpoint, .env, .requests(), .reset(), .client(), .create_user(), .iam_enforced()."""
    return shared_server()


@pytest.fixture
def bucket(request, monkeypatch) -> str:
    """A fresh bucket named after the test, with the server's AWS_* variables set for the test; yields its name."""
    from unicap import storage

    server = shared_server()
    for name in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL_S3",
        "AWS_DEFAULT_REGION",
        "UNICAP_STORAGE_RETRIES",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in server.env.items():
        monkeypatch.setenv(name, value)
    storage.clear_filesystem_cache()
    name = bucket_name(request.node.name)
    server.client().create_bucket(Bucket=name)
    yield name
    storage.clear_filesystem_cache()


@pytest.fixture
def s3(bucket) -> str:
    """ "s3://<bucket>": a fresh, empty bucket on the test server, the AWS_* variables set."""
    return f"s3://{bucket}"
