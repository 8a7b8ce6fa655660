"""What can go wrong with storage, for unicap.storage: retries of transient errors, the preflight checks, and
each failure as one line a user can act on.

Use them through unicap.storage (check_readable, check_writable, StorageError); this module sees a Location
only through its methods, so that it need not import unicap.storage.

pyarrow reports S3 failures as OSErrors whose text carries the AWS error name, e.g. (pyarrow 26, moto 5.2.6):

    When listing objects under key 'p/' in bucket 'nob': AWS Error NO_SUCH_BUCKET during ListObjectsV2
        operation: The specified bucket does not exist (Request ID: ...)
    ... AWS Error INVALID_ACCESS_KEY_ID during ListObjectsV2 operation: The AWS Access Key Id you provided ...
    ... AWS Error SIGNATURE_DOES_NOT_MATCH during ListObjectsV2 operation: The request signature we calculated ...
    ... AWS Error ACCESS_DENIED during PutObject operation: Access Denied (Request ID: ...)

HEAD requests carry no body, so a HeadObject refused for bad credentials says only ACCESS_DENIED: the checks
list (ListObjectsV2) before anything else. A missing bucket is no error at all to get_file_info (NotFound).
Without credentials pyarrow sends unsigned requests, which S3 refuses with AccessDenied (and moto, enforcing
IAM, answers 500): so where no credentials can exist the checks say so before asking the server.
Messages name the variables to set, never their values.
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs as pafs

log = logging.getLogger("unicap.storage")

CREDENTIAL_VARIABLES = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"

_BUCKET_MISSING = re.compile(r"NO_SUCH_BUCKET|NoSuchBucket|bucket does not exist", re.IGNORECASE)
_CREDENTIALS_REFUSED = re.compile(
    r"INVALID_ACCESS_KEY_ID|InvalidAccessKeyId|SIGNATURE_DOES_NOT_MATCH|SignatureDoesNotMatch"
    r"|InvalidClientTokenId|INVALID_CLIENT_TOKEN_ID|ExpiredToken|EXPIRED_TOKEN|InvalidToken"
)
_ACCESS_DENIED = re.compile(r"ACCESS_DENIED|AccessDenied|HTTP status 403|Forbidden", re.IGNORECASE)
_UNREACHABLE = re.compile(r"curlCode|connect to server|connection refused|resolve host|NETWORK_CONNECTION")


class StorageError(ValueError):
    """A path or URI unicap cannot use, with a one-line message for the user (the CLI prints it, exits 2)."""


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def aws_credentials_configured() -> bool:
    """Whether the standard AWS chain has somewhere to find credentials, short of the instance metadata."""
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return True
    sources = ("AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
    if any(env.get(name) for name in (*sources, "AWS_CONTAINER_CREDENTIALS_FULL_URI")):
        return True
    files = env.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"), env.get("AWS_CONFIG_FILE", "~/.aws/config")
    return any(Path(f).expanduser().is_file() for f in files)


def instance_metadata_disabled() -> bool:
    return os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true"


def no_credentials(uri: str) -> StorageError:
    return StorageError(f"{uri}: no storage credentials found: set {CREDENTIAL_VARIABLES} in the environment")


def explain(uri: str, error: OSError, action: str, endpoint: str = "") -> StorageError:
    """The StorageError for `error`, raised while checking that `uri` can be read or written (action)."""
    text = str(error)
    if _BUCKET_MISSING.search(text):
        bucket = uri.split("://", 1)[-1].split("/", 1)[0]
        return StorageError(f"{uri}: the bucket '{bucket}' does not exist")
    if _CREDENTIALS_REFUSED.search(text):
        code = _CREDENTIALS_REFUSED.search(text)[0]
        return StorageError(f"{uri}: the server refused the credentials ({code}): check {CREDENTIAL_VARIABLES}")
    if _ACCESS_DENIED.search(text):
        if not aws_credentials_configured():
            return no_credentials(uri)
        if action == "write":
            return StorageError(f"{uri}: read-only: the credentials in use may not write here (AccessDenied)")
        return StorageError(f"{uri}: access denied: the credentials in use may not list or read here")
    if _UNREACHABLE.search(text) or isinstance(error, ConnectionError):
        where = endpoint or "the storage service"
        return StorageError(f"{uri}: cannot reach {where} (AWS_ENDPOINT_URL?): {first_line(error)}")
    return StorageError(f"{uri}: cannot {action}: {first_line(error)}")


_TRANSIENT = re.compile(
    r"connection (reset|aborted|closed)|broken pipe|timed? ?out|slow ?down|throttl|service ?unavailable"
    r"|internal ?(error|failure)|request ?timeout|temporar|\b50[0234]\b",
    re.IGNORECASE,
)
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_transient(error: BaseException) -> bool:
    """An OSError worth retrying: a dropped connection, a timeout, a 500/503, SlowDown."""
    if isinstance(error, _PERMANENT) or not isinstance(error, OSError):
        return False
    return isinstance(error, ConnectionError | TimeoutError) or bool(_TRANSIENT.search(str(error)))


def with_retries(fn: Callable, *, attempts: int = 5, base_s: float = 0.2, what: str = ""):
    """fn(), retried on transient OSErrors with exponential backoff and jitter; anything else raised at once."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except OSError as e:
            if attempt == attempts or not is_transient(e):
                raise
            delay = base_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
            log.warning("%s: %s; retry %d/%d in %.1fs", what or "storage", first_line(e), attempt, attempts, delay)
            time.sleep(delay)


def check_readable(loc) -> None:
    """`loc` (a unicap.storage.Location) exists and can be read, or a StorageError saying why."""
    if loc.is_local:
        if not os.path.exists(loc.path):
            raise StorageError(f"{loc.uri}: no such file or folder")
        if not os.access(loc.path, os.R_OK):
            raise StorageError(f"{loc.uri}: no permission to read")
        return
    with _Explained(loc, "read"):
        _probe_listing(loc)
        if not loc.exists():
            raise StorageError(f"{loc.uri}: no such file or folder")


def check_writable(loc) -> None:
    """Files can be written under `loc`: locally its nearest existing folder is writable; on a bucket a small
    probe object is put under the prefix and deleted (pyarrow's delete then leaves an empty "prefix/" marker,
    as after every delete: the prefix lists as an empty folder)."""
    if loc.is_local:
        existing = loc.local_path
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise StorageError(f"{loc.uri}: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise StorageError(f"{loc.uri}: read-only: no permission to write in {existing}")
        return
    with _Explained(loc, "write"):
        _probe_listing(loc)
        probe = loc.join(f".unicap-write-probe-{uuid.uuid4().hex[:8]}")
        probe.write_bytes(b"")
        probe.delete()


class _Explained:
    """Turns the OSErrors of a remote check into StorageErrors; refuses S3 at once when no credentials can exist."""

    def __init__(self, loc, action: str):
        self.loc, self.action = loc, action
        self.s3 = isinstance(loc.fs, pafs.S3FileSystem)

    def __enter__(self) -> None:
        if self.s3 and not aws_credentials_configured() and instance_metadata_disabled():
            raise no_credentials(self.loc.uri)

    def __exit__(self, kind, error, traceback) -> None:
        if isinstance(error, OSError):
            endpoint = getattr(self.loc.fs, "settings", ("",))[0] if self.s3 else ""
            raise explain(self.loc.uri, error, self.action, endpoint) from None


def _probe_listing(loc) -> None:
    """List a prefix that holds nothing: one cheap request, whatever the size of the folder, that fails the way
    the bucket and the credentials do (a HEAD refused for bad credentials would only say 403)."""
    selector = pafs.FileSelector(loc.join(f".unicap-probe-{uuid.uuid4().hex[:8]}").path, allow_not_found=False)
    try:
        loc.fs.get_file_info(selector)
    except FileNotFoundError:
        pass
