"""URL ingest: a CSV / TSV / Parquet / txt list of URLs -> image shards, with img2dataset.

    unicap ingest urls.csv --out data/shards [--caption-col caption] [--allow-private]

img2dataset does the downloading, sharding, per-shard `_stats.json` and resume by shard
(incremental mode). unicap plugs two things into it:
- the URL guard (datagen.url_guard): internal addresses are refused, recorded as rows;
- the resizer is replaced by unicap's decoder: original bytes are kept as fetched (no resize, no
  re-encode), and bytes that do not decode are recorded with the decoder's reason
  (`status=failed_to_resize`, `error_message="undecodable_image: truncated: ..."`).
Every URL comes out as a row of the shard's Parquet index with `status` and `error_message`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations calls home on import

import importlib  # noqa: E402

# img2dataset/__init__ rebinds `img2dataset.main` to a function: fetch the modules themselves
img2dataset_main = importlib.import_module("img2dataset.main")
img2dataset_downloader = importlib.import_module("img2dataset.downloader")

from datagen.shards import read_index  # noqa: E402
from datagen.url_guard import refusal_reason  # noqa: E402
from unicap.decode import decode_image  # noqa: E402

INPUT_FORMATS = {".txt": "txt", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".json": "json"}


class DecoderResizer:
    """img2dataset resizer contract: stream -> (bytes, w, h, orig_w, orig_h, error). Keeps bytes."""

    def __call__(self, img_stream, blurring_bbox_list=None):
        data = img_stream.read()
        d = decode_image(data)
        if not d.ok:
            return None, None, None, None, None, f"undecodable_image: {d.error}"
        return data, d.width, d.height, d.width, d.height, None


def _guarded_download_image(
    row, timeout, user_agent_token, disallowed_header_directives, *, allow_private, original
):
    key, url = row
    reason = refusal_reason(url, allow_private=allow_private)
    if reason is not None:
        return key, None, reason
    return original(row, timeout, user_agent_token, disallowed_header_directives)


class GuardedDownloader(img2dataset_downloader.Downloader):
    """img2dataset's Downloader with the URL guard installed in whichever process runs it
    (img2dataset spawns its workers: they unpickle this class and run __call__ there)."""

    allow_private = False

    def __call__(self, row):
        dl = img2dataset_downloader
        original = getattr(dl.download_image, "unicap_original", dl.download_image)
        guarded = functools.partial(
            _guarded_download_image, allow_private=self.allow_private, original=original
        )
        guarded.unicap_original = original
        dl.download_image = guarded
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


def ingest_urls(
    url_list: str | Path,
    out: str | Path,
    *,
    url_col: str = "url",
    caption_col: str | None = None,
    allow_private: bool = False,
    shard_size: int = 10_000,
    processes: int = 1,
    threads: int = 16,
    timeout: int = 10,
    retries: int = 0,
) -> dict:
    """Download every URL of `url_list` into shards under `out`; returns counts by status."""
    url_list = Path(url_list)
    fmt = INPUT_FORMATS.get(url_list.suffix.lower())
    if fmt is None:
        raise ValueError(f"unsupported URL list {url_list.name}: use one of {sorted(INPUT_FORMATS)}")
    if not url_list.exists():
        raise FileNotFoundError(url_list)
    with _patched_img2dataset(allow_private):
        img2dataset_main.download(
            url_list=str(url_list),
            output_folder=str(out),
            input_format=fmt,
            url_col=url_col,
            caption_col=caption_col,
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
    index = read_index(out)
    return index["status"].value_counts().to_dict()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("urls", help="URL list: .csv, .tsv, .parquet, .json or .txt (one URL per line)")
    p.add_argument("--out", required=True, help="output folder for the shards")
    p.add_argument("--url-col", default="url", help="URL column name (default url)")
    p.add_argument("--caption-col", default=None, help="alt-text / caption column, if any")
    p.add_argument("--allow-private", action="store_true", help="fetch from private/loopback addresses too")
    p.add_argument("--shard-size", type=int, default=10_000, help="URLs per shard (default 10000)")
    p.add_argument("--processes", type=int, default=1, help="download processes (default 1)")
    p.add_argument("--threads", type=int, default=16, help="download threads per process (default 16)")
    p.add_argument("--timeout", type=int, default=10, help="seconds per request (default 10)")
    p.add_argument("--retries", type=int, default=0, help="retries per URL (default 0)")


def run(args: argparse.Namespace) -> int:
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
    print(f"ingest: {sum(counts.values())} URLs -> {args.out}: {counts}")
    print(f"  index: datagen.shards.read_index({str(args.out)!r})")
    return 0
