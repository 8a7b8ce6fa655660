"""Folder ingest: a folder tree of local images -> image shards, in the URL ingest's format.

    unicap ingest-folder photos/ --out data/shards

Keys are stable: the first 16 hex digits of sha1(relative path), so the same file gets the same
key on every run. A `name.txt` beside `name.jpg` is taken as its original caption. Every image
file comes out as an index row; undecodable ones with the decoder's reason. Files without an
image extension are listed in `_ingest.json` (not silently dropped). Re-running resumes by shard;
if the folder's file list changed since the first run, ingest refuses and asks for a new --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from datagen.shards import ShardItem, is_complete, shard_name, write_shard
from unicap.atomic import write_json
from unicap.contract.shards import IMAGE_EXTENSIONS
from unicap.decode import decode_image

MANIFEST = "_ingest.json"


def folder_key(relpath: str) -> str:
    return hashlib.sha1(relpath.encode()).hexdigest()[:16]


def _scan(root: Path) -> tuple[list[str], list[str]]:
    images, others = [], []
    for p in sorted(root.rglob("*")):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(root).parts):
            continue
        rel = p.relative_to(root).as_posix()
        ext = p.suffix.lower().lstrip(".")
        if ext in IMAGE_EXTENSIONS:
            images.append(rel)
        elif not (ext == "txt" and any(p.with_suffix("." + e).exists() for e in IMAGE_EXTENSIONS)):
            others.append(rel)
    return images, others


def _item(root: Path, rel: str) -> ShardItem:
    path = root / rel
    data = path.read_bytes()
    side = path.with_suffix(".txt")
    caption = side.read_text(errors="replace").strip() if side.exists() else None
    d = decode_image(data)
    ext = path.suffix.lower().lstrip(".")
    return ShardItem(
        key=folder_key(rel),
        source=str(path.resolve()),
        caption=caption,
        image=data if d.ok else None,
        ext="jpg" if ext == "jpeg" else ext,
        width=d.width,
        height=d.height,
        sha256=hashlib.sha256(data).hexdigest(),
        error=None if d.ok else f"undecodable_image: {d.error}",
    )


def ingest_folder(root: str | Path, out: str | Path, shard_size: int = 10_000) -> dict:
    """Shard every image under `root` into `out`; returns {"images", "shards", "skipped_files"}."""
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder")
    images, others = _scan(root)
    listing = hashlib.sha256("\n".join(images).encode()).hexdigest()
    manifest_path = out / MANIFEST
    if manifest_path.exists():
        previous = json.loads(manifest_path.read_text())
        if previous["listing_sha256"] != listing or previous["shard_size"] != shard_size:
            raise RuntimeError(
                f"{root} changed since {out} was first written (or --shard-size differs): "
                "resume would mix shard assignments; ingest into a new --out"
            )
    else:
        write_json(
            {"root": str(root.resolve()), "listing_sha256": listing, "shard_size": shard_size,
             "images": len(images), "skipped_files": others},
            manifest_path,
        )  # fmt: skip
    shards = []
    for shard_id, start in enumerate(range(0, len(images), shard_size)):
        shard = shard_name(shard_id)
        shards.append(shard)
        if not is_complete(out, shard):
            write_shard(out, shard, (_item(root, rel) for rel in images[start : start + shard_size]))
    return {"images": len(images), "shards": len(shards), "skipped_files": others}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="output folder for the shards")
    p.add_argument("--shard-size", type=int, default=10_000, help="images per shard (default 10000)")


def run(args: argparse.Namespace) -> int:
    res = ingest_folder(args.folder, args.out, args.shard_size)
    print(f"ingest-folder: {res['images']} images in {res['shards']} shard(s) under {args.out}")
    if res["skipped_files"]:
        print(
            f"  {len(res['skipped_files'])} non-image file(s) skipped, listed in {Path(args.out) / MANIFEST}"
        )
    return 0
