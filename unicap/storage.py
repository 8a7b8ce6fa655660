"""Every path a user gives, a local folder or an object-store URI, as one `Location` on pyarrow.fs.

    resolve("out/run1")                 -> LocalFileSystem, "/abs/out/run1"
    resolve("s3://bucket/run1")         -> S3FileSystem built here (endpoint, region, retries from the environment)
    resolve("gs://..."), "hdfs://...", "abfs://..."   -> pyarrow's own filesystems (FileSystem.from_uri)
    resolve("memory://...")             -> any other fsspec protocol, through pyarrow's FSSpecHandler

Ray Data, Parquet and DuckDB's Arrow scans speak pyarrow.fs, and a Location pickles, so the same object
travels to Ray workers. Credentials come from the environment only (the standard AWS chain: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, instance roles); they are never shipped, printed or logged.

A file that exists is complete, on every backend:
- on a local disk a write goes to a hidden temporary beside the target (unicap.atomic's ".name.tmp-1a2b3c4d",
  which remove_stale_temporaries recognises) and is renamed onto it;
- on an object store the bytes are produced in memory first and then uploaded to the final key: an object
  becomes visible only when its upload completes, and an upload that dies half-way leaves nothing visible.

Environment: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (an S3-compatible server), AWS_REGION or AWS_DEFAULT_REGION
(default us-east-1), UNICAP_STORAGE_RETRIES (attempts per S3 request, with backoff; default 8).
"""

from __future__ import annotations

import functools
import json
import os
import posixpath
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from unicap import atomic, storage_errors
from unicap.storage_errors import StorageError, first_line, with_retries

RETRIES_ENV = "UNICAP_STORAGE_RETRIES"
DEFAULT_RETRIES = 8
PREFLIGHT_RETRIES = 3
FROM_URI_SCHEMES = ("gs", "hdfs", "viewfs", "abfs", "abfss")  # pyarrow's own filesystems, via FileSystem.from_uri
OBJECT_STORES = ("s3", "gcs")  # pyarrow type_names whose folders are only key prefixes: mkdir is a no-op


# ---------------------------------------------------------------- filesystems


class S3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3FileSystem that pickles as its settings, so a Ray worker rebuilds it with the same retry
    strategy (pyarrow's own pickle drops retry_strategy) and reads credentials from its own environment."""

    settings: tuple[str, str, str, int]  # (endpoint_override, scheme, region, max_attempts)

    def __reduce__(self):
        return s3_filesystem, self.settings


@functools.cache
def s3_filesystem(endpoint: str, scheme: str, region: str, retries: int) -> S3FileSystem:
    """One S3FileSystem per (endpoint, scheme, region, retries) in this process."""
    fs = S3FileSystem(
        endpoint_override=endpoint or None,
        scheme=scheme,
        region=region,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=retries),  # 503 SlowDown, resets: backoff
        allow_delayed_open=True,  # a small file is one PutObject, not create + part + complete
    )
    fs.settings = (endpoint, scheme, region, retries)
    return fs


def s3_settings() -> tuple[str, str, str, int]:
    """(endpoint_override, scheme, region, retries) from the environment; endpoint "" means AWS itself."""
    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    scheme, _, host = url.rstrip("/").rpartition("://")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return host, scheme or "https", region, storage_retries()


def storage_retries() -> int:
    value = os.environ.get(RETRIES_ENV, "") or str(DEFAULT_RETRIES)
    if not value.isdigit() or int(value) < 1:
        raise StorageError(f"{RETRIES_ENV} must be a whole number >= 1, not {value!r}")
    return int(value)


_OTHER_FILESYSTEMS: dict[tuple[str, str], pafs.FileSystem] = {}
_LOCK = threading.Lock()


def clear_filesystem_cache() -> None:
    """Forget the filesystems built so far (after the environment changed, e.g. in tests)."""
    s3_filesystem.cache_clear()
    with _LOCK:
        _OTHER_FILESYSTEMS.clear()


def _cached(key: tuple[str, str], build: Callable[[], pafs.FileSystem]) -> pafs.FileSystem:
    with _LOCK:
        if key not in _OTHER_FILESYSTEMS:
            _OTHER_FILESYSTEMS[key] = build()
        return _OTHER_FILESYSTEMS[key]


def resolve(path_or_uri: str | os.PathLike | Location) -> Location:
    """The Location a user's path or URI names; a StorageError for a scheme unicap cannot open."""
    if isinstance(path_or_uri, Location):
        return path_or_uri
    text = os.fspath(path_or_uri)
    scheme = text.partition("://")[0].lower() if "://" in text else ""
    uri = text if text.endswith("://") else text.rstrip("/")
    if scheme in ("", "file"):
        return _local(unquote(urlsplit(text).path) if scheme else text)
    if scheme == "s3":
        return _s3(uri)
    if scheme in FROM_URI_SCHEMES:
        return _from_uri(uri, scheme)
    return _fsspec(uri, scheme)


def _local(path: str) -> Location:
    path = os.path.abspath(os.path.expanduser(path))
    return Location(pafs.LocalFileSystem(), path, path)


def _s3(uri: str) -> Location:
    bucket_and_key = uri.split("://", 1)[1].strip("/")
    if not bucket_and_key:
        raise StorageError(f"{uri}: an S3 URI needs a bucket, as in s3://bucket/prefix")
    return Location(s3_filesystem(*s3_settings()), bucket_and_key, f"s3://{bucket_and_key}")


def _from_uri(uri: str, scheme: str) -> Location:
    parts = urlsplit(uri)
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (OSError, pa.ArrowException) as e:
        raise StorageError(f"{uri}: cannot open the {scheme}:// filesystem: {first_line(e)}") from None
    return Location(_cached((scheme, parts.netloc), lambda: fs), path, uri)


def _fsspec(uri: str, scheme: str) -> Location:
    import fsspec

    if scheme not in fsspec.available_protocols():
        supported = "a local path, file://, s3://, " + ", ".join(f"{s}://" for s in FROM_URI_SCHEMES)
        raise StorageError(f"{uri}: unknown storage scheme '{scheme}://'; use {supported} or an fsspec protocol")
    try:
        spec = fsspec.filesystem(scheme)
    except (ImportError, ValueError) as e:
        raise StorageError(f"{uri}: {scheme}:// needs a package that is not installed: {first_line(e)}") from None
    fs = _cached((scheme, ""), lambda: pafs.PyFileSystem(pafs.FSSpecHandler(spec)))
    return Location(fs, spec._strip_protocol(uri), uri)


# ---------------------------------------------------------------- locations


@dataclass(frozen=True)
class Location:
    """A file or folder on some filesystem: `fs` and its own `path` (no scheme), `uri` to show the user."""

    fs: pafs.FileSystem
    path: str
    uri: str

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"

    def __hash__(self) -> int:  # pyarrow filesystems are unhashable; equal Locations have equal URIs
        return hash(self.uri)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def local_path(self) -> Path:
        """The pathlib.Path of a local Location; a StorageError for an object-store one."""
        if not self.is_local:
            raise StorageError(f"{self.uri}: this step needs a local folder, not a URI")
        return Path(self.path)

    def join(self, *parts: str) -> Location:
        parts = [p.strip("/") for p in parts if p.strip("/")]
        if self.is_local:
            return _local(os.path.join(self.path, *parts))
        return Location(self.fs, "/".join([self.path, *parts]), "/".join([self.uri, *parts]))

    @property
    def parent(self) -> Location:
        """The folder holding this one (a bucket's root is its own parent)."""
        if self.is_local:
            return _local(os.path.dirname(self.path))
        head = self.path.rstrip("/").rpartition("/")[0]
        if not head.strip("/"):
            return self
        return Location(self.fs, head, self.uri.rpartition("/")[0])

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    # -- what is there

    def info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        """A folder; on an object store, a prefix with at least one object under it."""
        return self.info().type == pafs.FileType.Directory

    def size(self) -> int:
        info = self.info()
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"{self.uri}: no such file")
        return info.size

    def _children(self, recursive: bool) -> list[pafs.FileInfo]:
        return self.fs.get_file_info(pafs.FileSelector(self.path, recursive=recursive, allow_not_found=True))

    def listdir(self) -> list[str]:
        """Names directly under this folder, files and folders, sorted; [] when it does not exist."""
        return sorted(posixpath.basename(i.path.rstrip("/")) for i in self._children(recursive=False))

    def files(self, suffix: str | None = None, recursive: bool = False) -> list[Location]:
        """The files under this folder (ending with `suffix` if given), sorted by relative path.

        Hidden names (".x", unicap.atomic's temporaries) are left out, as Parquet readers do."""
        base = self.path.rstrip("/") + "/"
        found = []
        for info in self._children(recursive):
            relative = info.path[len(base) :] if info.path.startswith(base) else posixpath.basename(info.path)
            hidden = any(part.startswith(".") for part in relative.split("/"))
            if info.type == pafs.FileType.File and not hidden and relative.endswith(suffix or ""):
                found.append(relative)
        return [self.join(relative) for relative in sorted(found)]

    def glob(self, suffix: str) -> list[Location]:
        """files(suffix); a leading "*" is allowed: glob("*.parquet") == glob(".parquet")."""
        return self.files(suffix.lstrip("*"))

    # -- reading

    def open_input(self) -> pa.NativeFile:
        """A random-access file, for pq.ParquetFile and other readers that seek."""
        return self.fs.open_input_file(self.path)

    def read_bytes(self) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()

        return self._whole_file(read, f"read {self.uri}")

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def read_json(self):
        return json.loads(self.read_bytes())

    def read_parquet(self, columns: list[str] | None = None) -> pa.Table:
        """A Parquet file, or a folder of them (hidden and "_" names skipped), as one table."""
        return pq.read_table(self.path, filesystem=self.fs, columns=columns)

    # -- writing (a file that exists is complete)

    def mkdir(self) -> None:
        """Create this folder and its parents; a no-op on object stores, where folders are prefixes."""
        if self.fs.type_name not in OBJECT_STORES:
            self.fs.create_dir(self.path, recursive=True)

    def delete(self) -> None:
        """Delete this file; a missing one is fine."""
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            pass

    def write_bytes(self, data: bytes) -> None:
        if self.is_local:
            with atomic.atomic_path(self.path) as tmp:
                tmp.write_bytes(data)
        else:
            self._upload(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def write_json(self, obj) -> None:
        """JSON as unicap.atomic.write_json writes it: indent 2, sorted keys, a final newline."""
        self.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")

    def write_parquet(self, table: pa.Table, **kwargs) -> None:
        """A Parquet file (zstd by default); the schema metadata is kept."""
        kwargs.setdefault("compression", "zstd")
        if self.is_local:
            atomic.write_parquet(table, self.path, **kwargs)
            return
        buffer = pa.BufferOutputStream()  # a failure while encoding uploads nothing
        pq.write_table(table, buffer, **kwargs)
        self._upload(buffer.getvalue())

    def _upload(self, data) -> None:
        """One upload of complete bytes to the final key: visible only once it has all arrived."""

        def upload() -> None:
            out = self.fs.open_output_stream(self.path)
            out.write(data)
            out.close()

        self._whole_file(upload, f"write {self.uri}")

    def _whole_file(self, operation: Callable, what: str):
        # pyarrow's own clients (S3, GCS, Azure) retry each request; an fsspec backend gets whole-file retries
        if isinstance(self.fs, pafs.PyFileSystem):
            return with_retries(operation, what=what)
        return operation()


# ---------------------------------------------------------------- preflight and pandas


def check_readable(loc: str | os.PathLike | Location) -> None:
    """Fail fast, before a cluster starts, when `loc` cannot be read: a StorageError saying why."""
    storage_errors.check_readable(_for_preflight(resolve(loc)))


def check_writable(loc: str | os.PathLike | Location) -> None:
    """Fail fast when `loc` cannot be written (on a bucket a small probe object is put under it, then deleted)."""
    storage_errors.check_writable(_for_preflight(resolve(loc)))


def _for_preflight(loc: Location) -> Location:
    """`loc` on a filesystem that gives up sooner: an unreachable endpoint fails the check in about a second,
    not after UNICAP_STORAGE_RETRIES attempts with backoff (about 30 s at 8)."""
    if not isinstance(loc.fs, S3FileSystem):
        return loc
    endpoint, scheme, region, retries = loc.fs.settings
    return Location(s3_filesystem(endpoint, scheme, region, min(retries, PREFLIGHT_RETRIES)), loc.path, loc.uri)


def storage_options(loc: str | os.PathLike | Location) -> dict:
    """The storage_options pandas/s3fs need to reach `loc` from the same environment:
    pandas.read_parquet("s3://...", storage_options=storage_options("s3://...")). Never any credentials."""
    loc = resolve(loc)
    if not isinstance(loc.fs, S3FileSystem):
        return {}
    endpoint, scheme, region, retries = loc.fs.settings
    client = {"region_name": region} | ({"endpoint_url": f"{scheme}://{endpoint}"} if endpoint else {})
    return {"client_kwargs": client, "config_kwargs": {"retries": {"max_attempts": retries, "mode": "standard"}}}
