"""Folder ingest: a folder tree of local images -> image shards, in the URL ingest's format.

    unicap ingest-folder photos/ --out data/shards
    unicap ingest-folder photos/ --out s3://bucket/shards     # --out may be any URI unicap.storage opens

Keys are stable: the first 16 hex digits of sha1(relative path, as the file system's bytes), so the
same file gets the same key on every run. A `name.txt` beside `name.jpg` is taken as its original
caption. Every entry with an image extension comes out as an index row: decoded, or failed with a
reason (`undecodable_image: ...` from the decoder, `refused: ... resolves outside the folder` for a
symlink that leaves the folder, `dangling_symlink`, `not_a_regular_file: fifo`, `unreadable_file: ...`).
Nothing outside the folder is read: a symlink (image or caption sidecar) is followed only when it
resolves inside it, and symlinked sub-folders are not entered; to ingest several disks, ingest each.
Other entries (files without an image extension, folders not entered) are listed in `_ingest.json`
with the reason (not silently dropped); hidden names (".x") are left out. File names that are not
UTF-8 are kept (their `source` shows the bytes escaped). Re-running resumes by shard; if the folder's
file list changed since the first run, ingest refuses and asks for a new --out.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import stat
from pathlib import Path

from datagen.shards import ShardFolder, ShardItem, shard_name, write_shard
from datagen.url_guard import MAX_BYTES
from unicap import preflight, storage
from unicap.atomic import remove_stale_temporaries
from unicap.contract.shards import IMAGE_EXTENSIONS, STATS_SUFFIX
from unicap.decode import decode_image

MANIFEST = "_ingest.json"
MAX_SIDECAR_BYTES = 1 << 20  # a caption file larger than this is not read
MAX_IMAGE_BYTES = MAX_BYTES  # the URL ingest's limit: a larger file is a refused row, not read into memory
SPECIAL_FILES = {  # stat.S_IFMT of a file that is not regular -> its name in the error message
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFDIR: "folder",
}


def folder_key(relpath: str | bytes) -> str:
    return hashlib.sha1(os.fsencode(relpath)).hexdigest()[:16]


def _printable(path: str) -> str:
    """A path for the index and messages: non-UTF-8 bytes of a file name shown as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _sort_key(rel: str) -> list[bytes]:
    return [os.fsencode(part) for part in rel.split("/")]  # the order of the first releases (Path parts)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


class EntryError(Exception):
    """A folder entry that cannot be read as a file; str() is its index error_message."""


def read_inside(root_real: str, path: str, limit: int | None = None) -> bytes:
    """The bytes of the regular file at `path` if it (after symlinks) lies inside `root_real`; else EntryError.
    Never opens a FIFO, a device or anything outside the folder."""
    shown = _printable(path)
    if os.path.islink(path) and not os.path.exists(path):
        raise EntryError(f"dangling_symlink: {shown} -> {_printable(os.readlink(path))}")
    real = os.path.realpath(path)
    if not _inside(real, root_real):
        raise EntryError(f"refused: {shown} resolves outside the folder (to {_printable(real)})")
    try:
        st = os.stat(real, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            kind = SPECIAL_FILES.get(stat.S_IFMT(st.st_mode), "special file")
            raise EntryError(f"not_a_regular_file: {shown} is a {kind}")
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # swapped since the stat above
                raise EntryError(f"not_a_regular_file: {shown}")
            if limit is not None and os.fstat(f.fileno()).st_size > limit:
                raise EntryError(f"refused: {shown} is larger than {limit} bytes")
            return f.read()
    except OSError as e:
        raise EntryError(f"unreadable_file: {shown}: {type(e).__name__}: {e.strerror or e}") from None


def _scan(root: Path, exclude: set[str]) -> tuple[list[str], dict[str, str]]:
    """Image entries (relative paths, sorted) and the other entries with the reason each is skipped.
    Walks without following symlinked folders; `exclude`: real paths not to enter (the output)."""
    images, others = [], {}

    def walk(d: str, prefix: str) -> None:
        try:
            entries = sorted(os.scandir(d), key=lambda e: os.fsencode(e.name))
        except OSError as e:
            if not prefix:
                raise  # the folder itself: the user's error, not an entry's
            others[prefix.rstrip("/")] = f"unreadable folder: {type(e).__name__}: {e.strerror or e}"
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = prefix + entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
                is_link = entry.is_symlink()
            except OSError as e:
                others[rel] = f"unreadable: {type(e).__name__}"
                continue
            if is_dir:
                if os.path.realpath(entry.path) not in exclude:
                    walk(entry.path, rel + "/")
                continue
            ext = os.path.splitext(entry.name)[1].lower().lstrip(".")
            if ext in IMAGE_EXTENSIONS:
                images.append(rel)  # whatever it is (link, fifo, unreadable): a row with its outcome
            elif is_link and os.path.isdir(entry.path):
                others[rel] = "symlinked folder: not entered (only the folder itself is read)"
            elif ext == "txt" and any(
                os.path.lexists(os.path.join(d, entry.name[: -len(".txt")] + "." + e)) for e in IMAGE_EXTENSIONS
            ):
                continue  # a caption sidecar
            else:
                others[rel] = "not an image file name"

    walk(str(root), "")
    images.sort(key=_sort_key)
    return images, dict(sorted(others.items(), key=lambda kv: _sort_key(kv[0])))


def _item(root: Path, root_real: str, rel: str) -> ShardItem:
    """One image entry -> its shard item; every failure is the item's error, never an exception."""
    path = os.path.join(root, rel)
    item = ShardItem(key=folder_key(rel), source=_printable(os.path.realpath(path)))
    try:
        data = read_inside(root_real, path, MAX_IMAGE_BYTES)
    except EntryError as e:
        item.error = str(e)[:2000]
        return item
    try:
        side = os.path.splitext(path)[0] + ".txt"
        if os.path.lexists(side):
            try:
                text = read_inside(root_real, side, MAX_SIDECAR_BYTES)
                item.caption = text.decode("utf-8", "replace").strip()
            except EntryError as e:
                item.meta = {"caption_error": str(e)[:500]}
        d = decode_image(data)
        ext = os.path.splitext(rel)[1].lower().lstrip(".")
        item.ext = "jpg" if ext == "jpeg" else ext
        item.width, item.height = d.width, d.height
        item.sha256 = hashlib.sha256(data).hexdigest()
        item.image = data if d.ok else None
        item.error = None if d.ok else f"undecodable_image: {d.error}"
    except Exception as e:  # noqa: BLE001 - one file's failure is its row, not the shard's
        item.image, item.error = None, f"ingest_error: {type(e).__name__}: {e}"[:2000]
    return item


def _is_folder_output(rel: str, is_dir: bool) -> bool:
    if is_dir:
        return False
    if rel == MANIFEST:
        return True
    stem = rel[: -len(STATS_SUFFIX)] if rel.endswith(STATS_SUFFIX) else rel.rsplit(".", 1)[0]
    return stem.isdigit() and rel in (f"{stem}.tar", f"{stem}.parquet", f"{stem}{STATS_SUFFIX}")


def ingest_folder(root: str | Path, out: str | os.PathLike | storage.Location, shard_size: int = 10_000) -> dict:
    """Shard every image under the local folder `root` into `out` (a folder or a URI);
    returns {"images", "shards", "skipped_files"}."""
    root, out = storage.resolve(root).local_path, storage.resolve(out)
    preflight.at_least("shard_size", shard_size, 1)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder")
    if not out.is_local:
        storage.check_writable(out)  # one line for a missing bucket or refused credentials
    preflight.check_output_folder(out, _is_folder_output, "ingest-folder")
    root_real = os.path.realpath(root)
    images, others = _scan(root, exclude={os.path.realpath(out.path)} if out.is_local else set())
    if not images:
        raise preflight.UsageError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    listing = hashlib.sha256(b"\n".join(os.fsencode(r) for r in images)).hexdigest()
    manifest_path = out.join(MANIFEST)
    if manifest_path.exists():
        previous = manifest_path.read_json()
        if previous["listing_sha256"] != listing or previous["shard_size"] != shard_size:
            raise preflight.UsageError(
                f"{root} changed since {out} was first written (or --shard-size differs): "
                "resume would mix shard assignments; ingest into a new --out"
            )
    else:
        manifest = {
            "root": root_real,
            "listing_sha256": listing,
            "shard_size": shard_size,
            "images": len(images),
            "skipped_files": list(others),
            "skipped_reasons": others,
        }
        manifest_path.write_json(manifest)
    if out.is_local:  # a bucket has no temporaries: an upload is visible only once complete
        remove_stale_temporaries(out.path, lambda rel: _is_folder_output(rel, False))
    done = set(ShardFolder(out).list())  # one listing, not a request per shard
    shards = []
    for shard_id, start in enumerate(range(0, len(images), shard_size)):
        shard = shard_name(shard_id)
        shards.append(shard)
        if shard not in done:
            batch = images[start : start + shard_size]
            write_shard(out, shard, (_item(root, root_real, rel) for rel in batch))
    return {"images": len(images), "shards": len(shards), "skipped_files": list(others)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="output folder or URI for the shards")
    p.add_argument("--shard-size", type=int, default=10_000, help="images per shard (default 10000)")


def run(args: argparse.Namespace) -> int:
    res = ingest_folder(args.folder, args.out, args.shard_size)
    print(f"ingest-folder: {res['images']} images in {res['shards']} shard(s) under {args.out}")
    if res["skipped_files"]:
        listing = storage.resolve(args.out).join(MANIFEST)
        print(f"  {len(res['skipped_files'])} other file(s) skipped, listed with the reason in {listing}")
    return 0
