"""Images for the page: read from shard tars or files, decoded safely (unicap.decode), shrunk, inlined.

Every image reaches the page as a data URI (JPEG thumbnails; PNG where sharp edges matter), so the page
is one file that loads nothing from anywhere else. Every image is read as bytes through unicap.storage, so a
shard folder in a bucket gives the same page as on a local disk.
"""

from __future__ import annotations

import base64
import io
import tarfile
from collections.abc import Iterable, Mapping

from unicap import storage
from unicap.contract import shards as shard_contract
from unicap.decode import decode_image
from unicap.storage import Location

TAR_READ_BUFFER = 4 << 20  # bytes per read of a streamed tar: on a bucket one ranged GET each


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


PNG_MAX_PIXELS = 512 * 512  # larger images are inlined as JPEG, not PNG: a page of megabytes otherwise


def image_inline(data: bytes, side: int, *, keep_png: bool = False) -> tuple[str, int, int] | None:
    """An image's bytes -> (data URI of it shrunk to `side` on its long side, width, height); None when
    the bytes do not decode. JPEG; with keep_png, PNG while it is small (sample grids of a tiny model)."""
    decoded = decode_image(data, max_output_pixels=max(side * side * 4, 64 * 64), min_side=0)
    if not decoded.ok:
        return None
    im = decoded.image
    im.thumbnail((side, side))
    buf = io.BytesIO()
    if keep_png and im.width * im.height <= PNG_MAX_PIXELS:
        im.save(buf, format="PNG", optimize=True)
        return data_uri(buf.getvalue(), "image/png"), im.width, im.height
    im.save(buf, format="JPEG", quality=90 if keep_png else 85)
    return data_uri(buf.getvalue(), "image/jpeg"), im.width, im.height


def image_uri(data: bytes, side: int) -> str | None:
    inlined = image_inline(data, side)
    return inlined[0] if inlined else None


def read_tar_members(tar: Location, wanted: set[str], suffixes: tuple[str, ...]) -> dict[str, tuple[str, bytes]]:
    """key -> (suffix, bytes) of the members `{key}.{suffix}` of a shard tar, for the wanted keys.
    The tar is streamed from the start (on a bucket: a few large reads, not one per member) and left as
    soon as every wanted key is found. A truncated tar keeps what came before the cut."""
    out: dict[str, tuple[str, bytes]] = {}
    try:
        with tar.fs.open_input_stream(tar.path, compression=None, buffer_size=TAR_READ_BUFFER) as stream:
            with tarfile.open(fileobj=stream, mode="r|*") as tf:
                for m in tf:
                    key, _, suffix = m.name.rpartition(".")
                    wanted_name = key in wanted and key not in out and suffix.lower() in suffixes
                    if wanted_name and m.isfile() and m.size <= shard_contract.MAX_MEMBER_BYTES:
                        f = tf.extractfile(m)
                        out[key] = (suffix.lower(), f.read() if f else b"")
                        if len(out) == len(wanted):
                            break
    except (tarfile.TarError, OSError, EOFError):
        pass
    return out


def shard_tar(shard_dir: Location, shard: str, locations: Mapping[str, str] | None = None) -> Location | None:
    """The tar of `shard`: in shard_dir, else where a stage manifest recorded it (`locations`: shard -> a
    path or URI, which may name a place this machine cannot reach); None when neither is a file."""
    tar = shard_dir.join(shard_contract.tar_path("", shard).name)
    if tar.is_file():
        return tar
    recorded = (locations or {}).get(shard)
    try:
        tar = storage.resolve(recorded) if recorded else None
        return tar if tar is not None and tar.is_file() else None
    except (OSError, ValueError):  # an unknown scheme, an unreachable bucket: not found here
        return None


def thumbnails(
    shard_dir: Location,
    keys_by_shard: Mapping[str, Iterable[str]],
    side: int,
    locations: Mapping[str, str] | None = None,
) -> dict[str, str | None]:
    """key -> data URI of its image from the shard tars (None: not found or not decodable).
    `locations`: shard -> tar path recorded in a stage manifest, tried when shard_dir lacks the tar."""
    out: dict[str, str | None] = {}
    for shard, keys in keys_by_shard.items():
        keys = set(keys)
        tar = shard_tar(shard_dir, shard, locations) if shard_contract.shard_name_ok(shard) else None
        found = read_tar_members(tar, keys, shard_contract.IMAGE_EXTENSIONS) if tar is not None else {}
        for key in keys:
            out[key] = image_uri(found[key][1], side) if key in found else None
    return out
