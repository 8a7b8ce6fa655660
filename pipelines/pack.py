"""The pack job: a stage manifest -> the stage's own training shards (resized images + their captions).

    unicap pack --manifest data/stages/stage1.parquet --captions data/captions --shards data/shards \\
        --output data/packed/stage1 --resolution 256
    python -m pipelines.pack ... (also under `ray job submit`)

Why pack each stage: at stage scale the trainer would otherwise read originals (a 256 px JPEG is
~50x fewer bytes and decode time than a multi-megapixel original), join captions at train time,
and index the whole 100M-row pool to train on a 1M subset. A packed stage holds, per input shard,
only the manifest's rows: images resized and centre-cropped to their aspect-ratio bucket, the
captions beside them, rows sorted by bucket, so the loader (train.data) knows every batch's shape
from a small index and reads each sample with one pread. Format: unicap.contract.packed.

Per input shard, through the shared per-shard driver (pipelines.runner: one output per shard,
atomically; a killed run re-run redoes only the missing shards):
    OUTPUT/{shard}.tar, OUTPUT/{shard}.parquet, OUTPUT/_stats/{shard}.json
and OUTPUT/_pack.json (bucket table, manifest fingerprint, counts), OUTPUT/_summary.json.
Every manifest row comes out: failures (undecodable image, key missing in the tar, shard missing,
no caption row, no usable caption) are index rows with status "failed" and a reason, counted.

Only the manifest's shards are read. The manifest is first split by shard with DuckDB (bounded
memory, spills to a local disk) into OUTPUT/_work/manifest/{shard}.parquet, so the driver and each
actor read one shard's keys, never the 100M-row manifest (pipelines/pack_manifest.py).

Storage: --manifest, --captions, --shards and --output are local paths or URIs (unicap.storage). The
per-shard key files are written to OUTPUT/_work/ through storage, so an actor on another node reads its
shard's keys, captions and index from where they are; DuckDB's own files stay on the driver (beside a local
output, else in a temporary folder). A manifest's fingerprint is its files' sizes and mtimes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tarfile
import time
from collections import Counter
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from datagen.shards import ShardFolder
from pipelines.pack_manifest import fingerprint, manifest_keys, shards_dir_of, split_manifest
from pipelines.runner import IncompleteJobError, ShardJob, exit_status, run_sharded, summarise
from pipelines.sink import done_shards
from train.buckets import assign_bucket, bucket_table, resize_to_bucket
from unicap import storage
from unicap.contract import caption as caption_record
from unicap.contract import packed, shards
from unicap.decode import decode_image
from unicap.storage import Location

WORK_DIR = "_work"  # "_": invisible to readers of OUTPUT; removed when the pack is complete


# ---------------------------------------------------------------- schema of the rows in flight


def row_schema(levels, languages) -> pa.Schema:
    """A packed index row plus its JPEG bytes: what the actors return and the writer consumes."""
    return packed.packed_schema(levels, languages).append(pa.field("image", pa.binary()))


def failed_rows(keys: list[str], shard: str, error: str, schema: pa.Schema) -> pa.Table:
    row = {"shard": shard, "bucket": packed.FAILED_BUCKET, "status": "failed", "error": error[:2000]}
    return pa.Table.from_pylist([{"key": k, **row} for k in keys], schema=schema)


def caption_levels(captions: Location, names: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Levels and languages declared by the caption files (the first one found), else the defaults."""
    for s in names:
        p = captions.join(f"{s}.parquet")
        if p.exists():
            with p.open_input() as f:
                return caption_record.levels_languages(pq.read_schema(f))
    return caption_record.LEVELS, caption_record.LANGUAGES


# ---------------------------------------------------------------- the actor


class PackFailures:
    """Failure records (items the reader could not deliver, items that raised) -> packed failed rows,
    for the manifest's keys only (the actor drops the rest); reasons in the packed contract's words."""

    def __init__(self, work: str | Location, schema: pa.Schema):
        self.work, self.schema = storage.resolve(work), schema
        self.keys: dict[str, frozenset[str]] = {}  # the last shards' manifest keys (shards arrive in order)

    def _keys(self, shard: str) -> frozenset[str]:
        if shard not in self.keys:
            self.keys = {**dict(list(self.keys.items())[-3:]), shard: frozenset(manifest_keys(self.work, shard))}
        return self.keys[shard]

    def __call__(self, records: list[dict]) -> pa.Table:
        rows = []
        for r in records:
            if r["key"] not in self._keys(r["shard"]):
                continue
            error = r["error"]
            if error.startswith(shards.MISSING_FROM_TAR):
                error = "missing_in_tar: " + error[len("undecodable_image: ") :]
            elif packed.error_reason(error) not in packed.ERROR_REASONS:
                error = f"undecodable_image: {error}"
            failed = {"bucket": packed.FAILED_BUCKET, "status": "failed", "error": error[:2000]}
            rows.append({"key": r["key"], "shard": r["shard"], **failed})
        return pa.Table.from_pylist(rows, schema=self.schema)


class PackStage:
    """Ray Data actor: shard rows -> packed rows (bucket, resized JPEG, captions) for the manifest's keys."""

    def __init__(self, work: str | Location, captions: str | Location, buckets: list, levels: list, languages: list):
        self.work, self.captions = storage.resolve(work), storage.resolve(captions)
        self.buckets = [tuple(b) for b in buckets]
        self.text_columns = packed.text_columns(levels, languages)
        self.schema = row_schema(levels, languages)
        self._keys = lru_cache(maxsize=4)(lambda shard: frozenset(manifest_keys(self.work, shard)))
        self._caps = lru_cache(maxsize=2)(self._load_captions)

    def _load_captions(self, shard: str) -> dict[str, dict] | None:
        path = self.captions.join(f"{shard}.parquet")
        if not path.exists():
            return None
        with path.open_input() as f:
            names = pq.read_schema(f).names
        cols = ["key", *(c for c in self.text_columns if c in names)]
        return {r["key"]: r for r in path.read_parquet(columns=cols).to_pylist()}

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for it in batch.select(["key", "shard", "image", "original_caption"]).to_pylist():
            if it["key"] in self._keys(it["shard"]):
                rows.append(self.pack_one(it))
        return pa.Table.from_pylist(rows, schema=self.schema)

    def pack_one(self, it: dict) -> dict:
        key, shard = it["key"], it["shard"]
        failed = {"key": key, "shard": shard, "bucket": packed.FAILED_BUCKET, "status": "failed"}
        caps = self._caps(shard)
        if caps is None or key not in caps:
            where = f"captions/{shard}.parquet" + ("" if caps is not None else " (no such file)")
            return failed | {"error": f"no_caption_row: {key} not in {where}"}
        text = {c: caps[key].get(c) for c in self.text_columns}
        if not text.get("original_caption"):
            text["original_caption"] = it.get("original_caption")  # the shard's alt text
        if not any(v and v.strip() for v in text.values()):
            return failed | text | {"error": "no_usable_caption: no caption and no original caption"}
        d = decode_image(it["image"], min_side=1, max_aspect=1e9)
        if not d.ok:
            return failed | text | {"error": f"undecodable_image: {d.error}"}
        b = int(assign_bucket(d.width, d.height, self.buckets))
        w, h = self.buckets[b]
        buf = io.BytesIO()
        resize_to_bucket(d.image, (w, h)).save(buf, format="JPEG", quality=packed.JPEG_QUALITY)
        placed = {"bucket": b, "width": w, "height": h, "status": "ok"}
        return {"key": key, "shard": shard, **placed, **text, "image": buf.getvalue()}


# ---------------------------------------------------------------- the writer


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Append a member; returns the byte offset of its data in the tar (TarInfo.offset_data on read)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))
    return tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE  # data padded to 512 bytes


def write_packed_shard(output: Location, shard: str, table: pa.Table) -> None:
    """Rows of `row_schema` -> OUTPUT/{shard}.tar (image, then captions json, per ok row), then the
    index OUTPUT/{shard}.parquet (the completion mark), rows sorted by (bucket, key)."""
    table = table.sort_by([("bucket", "ascending"), ("key", "ascending")])
    levels, languages = packed.levels_languages(table.schema)
    text_columns = packed.text_columns(levels, languages)
    d = table.select(["key", "status", "image", *text_columns]).to_pydict()
    n = table.num_rows
    offset, size, json_offset, json_size = [None] * n, [None] * n, [None] * n, [None] * n
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i, key in enumerate(d["key"]):
            if d["status"][i] != "ok":
                continue
            image = d["image"][i]
            offset[i], size[i] = _add(tar, f"{key}.jpg", image), len(image)
            text = json.dumps({"key": key, **{c: d[c][i] for c in text_columns}}, ensure_ascii=False).encode()
            json_offset[i], json_size[i] = _add(tar, f"{key}.json", text), len(text)
    output.join(f"{shard}.tar").write_bytes(buffer.getvalue())
    located = {"offset": offset, "size": size, "json_offset": json_offset, "json_size": json_size}
    for name, values in located.items():
        i = table.schema.get_field_index(name)
        table = table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type))
    output.join(f"{shard}.parquet").write_parquet(table.drop_columns(["image"]))


def shard_stats(table: pa.Table) -> dict:
    reasons = Counter(packed.error_reason(e) for e in table.column("error").to_pylist() if e)
    status = Counter(table.column("status").to_pylist())
    return {"rows": table.num_rows, "status": dict(status), "failures_by_reason": dict(reasons)}


# ---------------------------------------------------------------- the job


def pack_stage(
    manifest: str | os.PathLike | Location,
    captions: str | os.PathLike | Location,
    output: str | os.PathLike | Location,
    *,
    shards_dir: str | os.PathLike | Location | None = None,
    resolution: int = 256,
    multiple: int = 16,
    batch_size: int = 32,
    concurrency: int = 1,
    address: str | None = None,
) -> dict:
    """Pack the manifest's rows into OUTPUT (each a local path or a URI); returns _pack.json's content.
    Re-running with nothing left to do writes nothing."""
    manifest, captions, output = storage.resolve(manifest), storage.resolve(captions), storage.resolve(output)
    for loc in (manifest, captions, *([storage.resolve(shards_dir)] if shards_dir else [])):
        if not loc.is_local:
            storage.check_readable(loc)  # a missing bucket or refused credentials: one line, before Ray starts
    if not output.is_local:
        storage.check_writable(output)
    shards_dir = storage.resolve(shards_dir or shards_dir_of(manifest))
    fp, buckets = fingerprint(manifest), bucket_table(resolution, multiple)
    meta_path = output.join(packed.PACK_META)
    meta = meta_path.read_json() if meta_path.exists() else None
    asked = [fp, resolution, multiple]
    if meta and [meta["manifest_fingerprint"], meta["resolution"], meta["multiple"]] != asked:
        raise ValueError(
            f"{output} was packed from {meta['manifest']} at {meta['resolution']} px (multiple "
            f"{meta['multiple']}); this run asks {manifest} at {resolution} px: use another --output"
        )
    if meta and meta["complete"] and set(meta["shards"]) <= done_shards(output):
        print(f"pack: {output} is up to date with {manifest}; nothing written")
        return meta
    work = output.join(WORK_DIR)
    rows_per_shard = split_manifest(manifest, work, fp)
    names = sorted(rows_per_shard)
    levels, languages = caption_levels(captions, names)
    meta = {
        "version": packed.PACKED_VERSION,
        "resolution": resolution,
        "multiple": multiple,
        "buckets": [list(b) for b in buckets],
        "manifest": _shown(manifest),
        "manifest_fingerprint": fp,
        "captions": _shown(captions),
        "shards_dir": _shown(shards_dir),
        "levels": list(levels),
        "languages": list(languages),
        "shards": names,
        "complete": False,
    }
    if not meta_path.exists():
        meta_path.write_json(meta)  # the bucket table is known before any shard is written
    schema = row_schema(levels, languages)
    source = ShardFolder(shards_dir)
    available = set(source.list())

    def initial_rows(shard: str) -> pa.Table | None:
        """Manifest rows no actor will see: the whole shard if it is missing, keys absent from its tar.
        Runs in the worker: it reads through Locations (they pickle), never a driver-local path."""
        keys = manifest_keys(work, shard)
        if shard not in available:
            return failed_rows(keys, shard, f"missing_shard: no complete {shard} in {source.uri}", schema)
        index = source.index(shard, columns=["key", "status"]).to_pydict()
        in_tar = {k for k, s in zip(index["key"], index["status"], strict=True) if s == shards.SUCCESS}
        lost = [k for k in keys if k not in in_tar]
        return failed_rows(lost, shard, f"missing_in_tar: not in {source.tar(shard).uri}", schema)

    job = ShardJob(
        name="pack",
        stage_cls=PackStage,
        stage_kwargs=dict(
            work=work, captions=captions, buckets=buckets, levels=list(levels), languages=list(languages)
        ),
        schema=schema,
        stats_fn=shard_stats,
        failure_table=PackFailures(work, schema),  # initial_rows replaces the index failures
        write_fn=write_packed_shard,
        expected_keys=lambda shard: set(manifest_keys(work, shard)),
        initial_rows=initial_rows,
    )
    t0 = time.time()
    ray_opts = dict(batch_size=batch_size, concurrency=concurrency, address=address)
    run = run_sharded(job, source.loc, output, shards=names, **ray_opts)
    summary = summarise(output, run)
    counts = {"rows": summary.get("rows", 0), "status": summary["status"]}
    counts["failures_by_reason"] = summary["failures_by_reason"]
    meta |= {"complete": True, "seconds": round(time.time() - t0, 2), "counts": counts}
    meta_path.write_json(meta)
    with contextlib.suppress(FileNotFoundError):
        work.fs.delete_dir(work.path)
    return meta


def _shown(loc: Location) -> str:
    """How _pack.json names an input: a local file by its resolved path (as before URIs), else its URI."""
    return str(Path(loc.path).resolve()) if loc.is_local else loc.uri


def add_arguments(p: argparse.ArgumentParser) -> None:
    where = "a local path or a URI (s3://, gs://, ...)"
    p.add_argument("--manifest", required=True, help=f"the stage manifest (unicap stages' stage1.parquet); {where}")
    p.add_argument("--captions", required=True, help=f"caption Parquet folder ({{shard}}.parquet); {where}")
    p.add_argument("--shards", default=None, help="image shard folder (default: the manifest's location column)")
    p.add_argument("--output", required=True, help=f"folder for the packed training shards; {where}")
    p.add_argument("--resolution", type=int, default=256, help="buckets hold about resolution^2 pixels")
    p.add_argument("--patch-multiple", type=int, default=16, help="bucket sides: multiples of VAE x patch")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=1, help="packing actors")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local instance)")


def run(args: argparse.Namespace) -> int:
    try:
        sizes = dict(resolution=args.resolution, multiple=args.patch_multiple, batch_size=args.batch_size)
        where = dict(shards_dir=args.shards, concurrency=args.concurrency, address=args.address)
        meta = pack_stage(args.manifest, args.captions, args.output, **sizes, **where)
    except IncompleteJobError as e:
        return exit_status(e)
    c = meta.get("counts", {})
    where = f"{len(meta['shards'])} shards -> {args.output}"
    print(f"pack: {c.get('rows')} rows {c.get('status')} in {where}; failures {c.get('failures_by_reason')}")
    index = f"unicap.contract.packed.read_index({str(args.output)!r}).to_pandas()"
    print(f"  index: {index}; buckets {meta['buckets']}")
    return 0


if __name__ == "__main__":
    from unicap.cli import module_main

    sys.exit(module_main("pipelines.pack"))
