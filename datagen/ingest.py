"""URL ingest: a CSV / TSV / Parquet / JSON / txt list of URLs -> image shards, with img2dataset.

    unicap ingest urls.csv --out data/shards [--caption-col caption] [--allow-private]
    unicap ingest urls.csv --out s3://bucket/shards      # --out may be a URI (img2dataset writes through fsspec)

img2dataset does the sharding, per-shard `_stats.json` and resume by shard (incremental mode).
unicap plugs three things into it:
- the list is read by unicap (`read_url_list`): a txt list is one URL per line (commas and quotes
  are part of the URL), other formats need the URL column; the list goes to img2dataset as Parquet;
- the download is unicap's guarded fetch (datagen.url_guard): http(s) only, every redirect hop
  checked, internal addresses refused (`--allow-private` lifts the address check only), the
  connection pinned to the checked address, one deadline per URL (`--timeout`). Every failure of
  one URL (refused, bad host name, timeout, HTTP error) is that URL's row, never its shard's end;
- the resizer is replaced by unicap's decoder: original bytes are kept as fetched (no resize, no
  re-encode), and bytes that do not decode are recorded with the decoder's reason
  (`status=failed_to_resize`, `error_message="undecodable_image: truncated: ..."`).
Every URL comes out as a row of the shard's Parquet index with `status` and `error_message`;
a shard that still ends incomplete is reported (exit 1) and redone by the next run.
What unicap itself reads and checks of the output (the output folder, the stats files, the index) goes
through unicap.storage; img2dataset writes the shards through fsspec (s3fs for s3://), from the same
environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import re
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations calls home on import

import importlib  # noqa: E402

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

# img2dataset/__init__ rebinds `img2dataset.main` to a function: fetch the modules themselves
img2dataset_main = importlib.import_module("img2dataset.main")
img2dataset_downloader = importlib.import_module("img2dataset.downloader")

from datagen.shards import ShardFolder  # noqa: E402
from datagen.url_guard import USER_AGENT, FetchError, fetch  # noqa: E402
from unicap import preflight, storage  # noqa: E402
from unicap.contract.shards import STATS_SUFFIX  # noqa: E402
from unicap.decode import decode_image  # noqa: E402

INPUT_FORMATS = {".txt": "txt", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".json": "json"}
_OUTPUT_NAME = re.compile(r"^\d+(\.tar|\.parquet|_stats\.json)$")  # what img2dataset writes per shard


class IngestIncomplete(RuntimeError):
    """Some shards did not complete: their URLs are not in the index yet (a re-run redoes them)."""


class DecoderResizer:
    """img2dataset resizer contract: stream -> (bytes, w, h, orig_w, orig_h, error). Keeps bytes."""

    def __call__(self, img_stream, blurring_bbox_list=None):
        try:
            data = img_stream.read()
            d = decode_image(data)
        except Exception as e:  # noqa: BLE001 - one image's failure is its row, not its shard's
            return None, None, None, None, None, f"undecodable_image: corrupt: {type(e).__name__}: {e}"[:500]
        if not d.ok:
            return None, None, None, None, None, f"undecodable_image: {d.error}"
        return data, d.width, d.height, d.width, d.height, None


def guarded_download_image(row, timeout, user_agent_token, disallowed_header_directives, *, allow_private):
    """img2dataset's download_image contract through the guarded fetch: (key, stream | None, error | None).
    Never raises: img2dataset drops a whole shard when one download raises."""
    key, url = row
    try:
        agent = USER_AGENT
        if user_agent_token:
            agent += f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"

        def robots(headers) -> None:
            if disallowed_header_directives and img2dataset_downloader.is_disallowed(
                headers, user_agent_token, disallowed_header_directives
            ):
                raise FetchError("Use of image disallowed by X-Robots-Tag directive")

        data = fetch(url, timeout=timeout, allow_private=allow_private, user_agent=agent, on_headers=robots)
        return key, io.BytesIO(data), None
    except FetchError as e:
        return key, None, str(e)[:1000]
    except Exception as e:  # noqa: BLE001
        return key, None, f"{type(e).__name__}: {e}"[:1000]


class GuardedDownloader(img2dataset_downloader.Downloader):
    """img2dataset's Downloader with the guarded fetch installed in whichever process runs it
    (img2dataset spawns its workers: they unpickle this class and run __call__ there)."""

    allow_private = False

    def __call__(self, row):
        img2dataset_downloader.download_image = functools.partial(
            guarded_download_image, allow_private=self.allow_private
        )
        return super().__call__(row)


def _make_downloader(allow_private: bool):
    def make(*args, **kwargs):
        d = GuardedDownloader(*args, **kwargs)
        d.allow_private = allow_private
        return d

    return make


@contextlib.contextmanager
def _patched_img2dataset(allow_private: bool):
    """Swap img2dataset's Downloader and Resizer for unicap's for the duration of one download."""
    saved = img2dataset_main.Downloader, img2dataset_main.Resizer
    img2dataset_main.Downloader = _make_downloader(allow_private)
    img2dataset_main.Resizer = lambda *a, **k: DecoderResizer()
    try:
        yield
    finally:
        img2dataset_main.Downloader, img2dataset_main.Resizer = saved


def _as_text(column: pa.ChunkedArray, name: str, source: Path) -> pa.ChunkedArray:
    try:
        return column.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise preflight.UsageError(f"{source}: column {name!r} is not text ({column.type}): {e}") from None


def read_url_list(
    path: str | os.PathLike | storage.Location, url_col: str = "url", caption_col: str | None = None
) -> pa.Table:
    """The URL list (a local file or a URI) as a table of `url` (and `caption`) strings, one row per URL, in
    list order."""
    path = storage.resolve(path)
    fmt = INPUT_FORMATS.get(os.path.splitext(path.name)[1].lower())
    if fmt is None:
        raise preflight.UsageError(f"unsupported URL list {path.name}: use one of {sorted(INPUT_FORMATS)}")
    if not path.is_local:
        storage.check_readable(path)  # one line for a missing bucket or refused credentials
    if not path.is_file():
        raise FileNotFoundError(f"URL list {path} does not exist (or is not a file)")
    if fmt == "txt":  # one URL per line; undecodable bytes become U+FFFD, so the line stays one row
        lines = (line.strip() for line in path.read_bytes().decode("utf-8", "replace").split("\n"))
        return pa.table({"url": pa.array([u for u in lines if u], pa.string())})
    try:
        if fmt in ("csv", "tsv"):
            from pyarrow import csv

            with path.open_input() as f:
                table = csv.read_csv(
                    f,
                    read_options=csv.ReadOptions(block_size=64 << 20),  # a long URL must fit in a block
                    parse_options=csv.ParseOptions(delimiter="\t" if fmt == "tsv" else ","),
                    convert_options=csv.ConvertOptions(
                        column_types={c: pa.string() for c in (url_col, caption_col) if c}
                    ),
                )
        elif fmt == "json":
            import pandas as pd

            table = pa.Table.from_pandas(pd.read_json(io.BytesIO(path.read_bytes())), preserve_index=False)
        else:
            table = path.read_parquet()
    except (pa.ArrowInvalid, ValueError, OSError) as e:
        raise preflight.UsageError(f"cannot read URL list {path}: {str(e).splitlines()[0]}") from None
    columns = {"url": url_col} | ({"caption": caption_col} if caption_col else {})
    missing = [c for c in columns.values() if c not in table.column_names]
    if missing:
        raise preflight.UsageError(
            f"URL list {path} has no column {missing[0]!r} (columns: {table.column_names[:20]}); "
            "name it with --url-col / --caption-col"
        )
    return pa.table({k: _as_text(table.column(c), c, path) for k, c in columns.items()})


def _is_ingest_output(rel: str, is_dir: bool) -> bool:
    if is_dir:
        return rel == "_tmp" or rel.startswith("_tmp/")
    return bool(_OUTPUT_NAME.match(rel)) or rel.startswith("_tmp/") and rel.endswith(".feather")


def check_ingest_args(shard_size: int, processes: int, threads: int, timeout: float, retries: int) -> None:
    preflight.at_least("shard_size", shard_size, 1)
    preflight.at_least("processes", processes, 1)
    preflight.at_least("threads", threads, 1)
    preflight.above("timeout", timeout, 0)
    preflight.at_least("retries", retries, 0)


def incomplete_shards(out: str | os.PathLike | storage.Location, n_urls: int, shard_size: int) -> dict[int, str]:
    """Shard id -> what is wrong, for every shard of an `n_urls` list that is not complete in `out`."""
    folder = ShardFolder(out)
    complete = {int(s): s for s in folder.list() if s.isdigit()}
    problems = {}
    for shard_id in range(-(-n_urls // shard_size)):
        want = min(shard_size, n_urls - shard_id * shard_size)
        if shard_id not in complete:
            problems[shard_id] = f"no {STATS_SUFFIX} ({want} URLs not recorded)"
            continue
        stats = folder.stats_file(complete[shard_id]).read_json()
        if stats.get("count") != want:
            problems[shard_id] = f"{stats.get('count')} rows, expected {want}"
    return problems


def _download(
    table: pa.Table,
    out: storage.Location,
    captions: bool,
    allow_private: bool,
    *,
    shard_size: int,
    processes: int,
    threads: int,
    timeout: float,
    retries: int,
) -> None:
    """img2dataset over the URL table (url, caption), into `out`, resuming by shard (its incremental mode)."""
    with tempfile.TemporaryDirectory(prefix="unicap-ingest-") as tmp, _patched_img2dataset(allow_private):
        listed = Path(tmp) / "urls.parquet"
        pq.write_table(table, listed)
        img2dataset_main.download(
            url_list=str(listed),
            output_folder=out.uri,  # a local path or a URI fsspec opens (s3fs, from the same environment)
            input_format="parquet",
            url_col="url",
            caption_col="caption" if captions else None,
            output_format="webdataset",
            resize_mode="no",
            number_sample_per_shard=shard_size,
            processes_count=processes,
            thread_count=threads,
            timeout=timeout,
            retries=retries,
            distributor="multiprocessing",
            incremental_mode="incremental",
            compute_hash="sha256",
            extract_exif=False,
            enable_wandb=False,
        )


def ingest_urls(
    url_list: str | Path,
    out: str | os.PathLike | storage.Location,
    *,
    url_col: str = "url",
    caption_col: str | None = None,
    allow_private: bool = False,
    shard_size: int = 10_000,
    processes: int = 1,
    threads: int = 16,
    timeout: float = 10,
    retries: int = 0,
) -> dict:
    """Download every URL of `url_list` into shards under `out` (a folder or a URI); returns counts by status.

    Raises UsageError (bad arguments, an unreadable list, an output folder with other files) before
    anything is fetched, and IngestIncomplete when shards are missing at the end."""
    check_ingest_args(shard_size, processes, threads, timeout, retries)
    out = storage.resolve(out)
    table = read_url_list(url_list, url_col, caption_col)
    if table.num_rows == 0:
        raise preflight.UsageError(f"URL list {url_list} holds no URLs")
    if not out.is_local:
        storage.check_writable(out)  # one line for a missing bucket or refused credentials
    preflight.check_output_folder(out, _is_ingest_output, "ingest")
    if incomplete_shards(out, table.num_rows, shard_size):  # a complete output starts no download processes
        settings = dict(shard_size=shard_size, processes=processes, threads=threads, timeout=timeout, retries=retries)
        _download(table, out, caption_col is not None, allow_private, **settings)
    problems = incomplete_shards(out, table.num_rows, shard_size)
    if problems:
        listed = "; ".join(f"shard {i}: {p}" for i, p in sorted(problems.items())[:5])
        raise IngestIncomplete(f"{len(problems)} shard(s) of {out} incomplete ({listed}); re-run to redo them")
    counts: dict[str, int] = {}
    folder = ShardFolder(out)
    for shard in folder.list():
        for status in folder.index(shard, columns=["status"]).column(0).to_pylist():
            counts[status] = counts.get(status, 0) + 1
    return counts


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("urls", help="URL list: .csv, .tsv, .parquet, .json or .txt (one URL per line)")
    p.add_argument("--out", required=True, help="output folder or URI for the shards")
    p.add_argument("--url-col", default="url", help="URL column name (default url)")
    p.add_argument("--caption-col", default=None, help="alt-text / caption column, if any")
    p.add_argument(
        "--allow-private",
        action="store_true",
        help="fetch from private/loopback addresses too (still http(s) only, every redirect checked)",
    )
    p.add_argument("--shard-size", type=int, default=10_000, help="URLs per shard (default 10000)")
    p.add_argument("--processes", type=int, default=1, help="download processes (default 1)")
    p.add_argument("--threads", type=int, default=16, help="download threads per process (default 16)")
    p.add_argument("--timeout", type=float, default=10, help="seconds per URL, redirects included (default 10)")
    p.add_argument("--retries", type=int, default=0, help="retries per URL (default 0)")


def run(args: argparse.Namespace) -> int:
    try:
        counts = ingest_urls(
            args.urls,
            args.out,
            url_col=args.url_col,
            caption_col=args.caption_col,
            allow_private=args.allow_private,
            shard_size=args.shard_size,
            processes=args.processes,
            threads=args.threads,
            timeout=args.timeout,
            retries=args.retries,
        )
    except IngestIncomplete as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"ingest: {sum(counts.values())} URLs -> {args.out}: {counts}")
    print(f"  index: datagen.shards.read_index({storage.resolve(args.out).uri!r})")
    return 0
