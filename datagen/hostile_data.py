"""Hostile shards and score tables, generated from a seed, each with the outcome every job owes it.

Shards (`hostile_shards`): webdataset tars that disagree with their index, in the ways real ones do:
keys the index does not list, index rows the tar lacks, a tar cut off mid-way, invalid {key}.json,
zero-byte / non-image / bomb images, the same key in two shards, a key twice in one tar, empty shards.
Score tables (`hostile_score_tables`): score files in the score contract's schema with NaN / inf
scores, null sha256, the same key in two shards, empty files.

Used by the jobs' failure tests and the fuzz test (tests/pipelines/test_hostile_fuzz.py): every input
row must come out exactly once, ok or with its reason, and nothing may crash.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from datagen.hostile import short_stream_png
from datagen.shards import ShardItem, shard_name, write_shard
from unicap.atomic import atomic_path, write_parquet
from unicap.contract import scores
from unicap.contract.shards import MISSING_FROM_TAR, tar_path

SHARD_KINDS = (
    "unknown_key",
    "missing_key",
    "truncated_tar",
    "invalid_json",
    "zero_byte_image",
    "bomb_image",
    "not_an_image",
    "duplicate_key_across_shards",
    "duplicate_key_in_tar",
    "index_failure",
    "empty_shard",
)
SCORE_KINDS = ("nan_score", "inf_score", "nan_aesthetic", "null_sha256", "duplicate_key_across_shards", "empty_shard")


# ---------------------------------------------------------------- tars


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> list[tuple[str, int, int]]:
    """Write a tar of (name, data) members, atomically; returns (name, header offset, data end) per member."""
    spans = []
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            start = tar.offset
            tar.addfile(info, io.BytesIO(data))
            spans.append((name, start, start + tarfile.BLOCKSIZE + len(data)))
    return spans


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


def _image(rng: np.random.Generator, fmt: str = "PNG") -> bytes:
    colour = tuple(int(c) for c in rng.integers(20, 230, 3))
    im = Image.new("RGB", (72, 64), colour)
    im.paste(tuple(255 - c for c in colour), (0, 32, 72, 64))
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def samples_read(spans: list[tuple[str, int, int]], cut: int | None) -> list[tuple[str, set[str]]]:
    """What a tar reader gets from a tar of these member spans cut at byte `cut` (None: whole): the
    samples (key, extensions read) it delivers. A member is read when its padded data ends before the
    cut. A cut inside a header reads as the archive's end (tarfile's stream mode): the sample in progress
    stands with the members read; a cut inside a member's data loses that member's whole sample."""
    ends = [start for _, start, _ in spans[1:]] + [-(-spans[-1][2] // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE]
    out: list[tuple[str, set[str]]] = []
    for (name, start, _), end in zip(spans, ends, strict=True):
        key, ext = name.split(".", 1)
        if cut is not None and cut < end:
            if cut >= start + tarfile.BLOCKSIZE and out and out[-1][0] == key:
                out.pop()  # cut inside this member's data: its sample is dropped
            break
        if out and out[-1][0] == key:
            out[-1][1].add(ext)
        else:
            out.append((key, {ext}))
    return out


@dataclass
class HostileShards:
    """What was planted: expected[(shard, key)] is "ok" or the start of the error its row must carry;
    refused[shard] the tar samples that belong to no input row (to be refused and counted)."""

    expected: dict[tuple[str, str], str] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)
    planted: dict[str, int] = field(default_factory=dict)  # kind -> hostile inputs of that kind


def hostile_shards(directory: str | Path, seed: int, n_shards: int = 6, per_shard: int = 8) -> HostileShards:
    """Write `n_shards` shards under `directory`, each with a random mix of SHARD_KINDS (seeded)."""
    directory, rng, out = Path(directory), np.random.default_rng(seed), HostileShards()

    def plant(kind: str) -> None:
        out.planted[kind] = out.planted.get(kind, 0) + 1

    for i in range(n_shards):
        shard = shard_name(i)
        if i == n_shards - 1:  # the last shard is empty: no row in the index, nothing in the tar
            write_shard(directory, shard, [])
            out.refused[shard] = 0
            plant("empty_shard")
            continue
        # two kinds in turn (five shards cover all ten), one to three more at random; shards 0 and 1 share a key
        tar_kinds = SHARD_KINDS[:-1]
        kinds = {tar_kinds[2 * i % len(tar_kinds)], tar_kinds[(2 * i + 1) % len(tar_kinds)]}
        kinds |= set(rng.choice(tar_kinds, size=int(rng.integers(1, 4)), replace=False).tolist())
        kinds |= {"duplicate_key_across_shards"} if i < 2 else set()
        keys = [f"h{seed}_{i}_{j}" for j in range(per_shard)]
        if "duplicate_key_across_shards" in kinds:
            keys[0] = f"h{seed}_shared"
            plant("duplicate_key_across_shards")
        items, planted = [], {}  # planted: key -> the outcome its content asks for
        for j, key in enumerate(keys):
            fmt, ext = ("JPEG", "jpg") if j % 2 else ("PNG", "png")
            source, image = f"hostile://{shard}/{key}", _image(rng, fmt)
            items.append(ShardItem(key, source, f"item {key}", image, ext, width=72, height=64, sha256=f"sha-{key}"))
            planted[key] = "ok"
        hostile = keys[1:]
        rng.shuffle(hostile)
        failed = None
        if "index_failure" in kinds:
            failed = hostile.pop()
            items[keys.index(failed)] = ShardItem(failed, f"hostile://{failed}", error="download_failed: 404")
            plant("index_failure")
        for kind, image, reason in (
            ("zero_byte_image", b"", "undecodable_image: empty_file"),
            ("bomb_image", short_stream_png(), "undecodable_image: truncated"),
            ("not_an_image", b"<html>404</html>", "undecodable_image: not_an_image"),
        ):
            if kind in kinds:
                k = hostile.pop()
                items[keys.index(k)].image = image
                planted[k] = reason
                plant(kind)
        write_shard(directory, shard, items)
        members = tar_members(tar_path(directory, shard))
        if "invalid_json" in kinds:
            k = hostile.pop()
            bad = [b"{not json", b"\xff\xfe\x00", b"[1, 2, 3]"][int(rng.integers(3))]
            members = [(n, bad if n == f"{k}.json" else d) for n, d in members]
            planted[k] = "undecodable_image: invalid"
            plant("invalid_json")
        if "missing_key" in kinds:
            k = hostile.pop()
            members = [(n, d) for n, d in members if n.split(".")[0] != k]
            plant("missing_key")
        unknown = [f"h{seed}_{i}_ghost{u}" for u in range(int(rng.integers(1, 3)) if "unknown_key" in kinds else 0)]
        for ghost in unknown:  # between two samples
            stems = [name.split(".")[0] for name, _ in members]
            bounds = [x for x in range(len(members) + 1) if x in (0, len(members)) or stems[x] != stems[x - 1]]
            members.insert(int(rng.choice(bounds)), (f"{ghost}.png", _image(rng)))
            plant("unknown_key")
        if "duplicate_key_in_tar" in kinds:
            k = next(
                k for k in keys if planted[k] == "ok" and k != failed and any(n.startswith(k + ".") for n, _ in members)
            )
            members += [(f"{k}.png", _image(rng)), (f"{k}.json", b"{}")]  # a second sample, after the first
            plant("duplicate_key_in_tar")
        spans = write_tar(tar_path(directory, shard), members)
        cut = int(rng.integers(spans[0][1] + 1, spans[-1][2])) if "truncated_tar" in kinds else None
        if cut is not None:
            raw = tar_path(directory, shard).read_bytes()[:cut]
            with atomic_path(tar_path(directory, shard)) as tmp:
                tmp.write_bytes(raw)
            plant("truncated_tar")
        # what each index row must come out as, from what a reader gets out of the (cut) tar
        got, refused = {}, 0
        for key, exts in samples_read(spans, cut):
            if key not in planted or key == failed or key in got:
                refused += 1  # unknown, listed as failed, or a second sample
            elif not exts & {"png", "jpg"}:
                got[key] = "undecodable_image: no image member"
            elif "json" in exts and planted[key] == "undecodable_image: invalid":
                got[key] = planted[key]
            else:
                got[key] = "ok" if planted[key] == "undecodable_image: invalid" else planted[key]
        for key in keys:
            out.expected[(shard, key)] = "download_failed: 404" if key == failed else got.get(key, MISSING_FROM_TAR)
        out.refused[shard] = refused
    return out


# ---------------------------------------------------------------- score tables


def hostile_score_tables(directory: str | Path, seed: int, n_files: int = 4, rows: int = 60) -> dict[str, int]:
    """Score files (unicap.contract.scores schema, English long/medium/short) with NaN / inf scores,
    null sha256, keys repeated across files and an empty file; returns kind -> rows planted."""
    from datagen.score_tables import SCHEMA, score_chunk

    directory, rng, planted = Path(directory), np.random.default_rng(seed), {k: 0 for k in SCORE_KINDS}
    tables = []
    for f in range(n_files):
        t = score_chunk(f * rows, rows, seed=seed, dup_rate=0.0, bad_rate=0.0).to_pydict()
        t["min_side"] = [max(v, 300) for v in t["min_side"]]
        t["width"] = [max(w, 300) for w in t["width"]]
        t["height"] = [max(h, 300) for h in t["height"]]
        t["min_side"] = [min(w, h) for w, h in zip(t["width"], t["height"], strict=True)]
        t["aspect_ratio"] = [max(w, h) / min(w, h) for w, h in zip(t["width"], t["height"], strict=True)]
        t["shard"] = [shard_name(f)] * rows
        for col, kind, bad in (
            (scores.clip_column("long", "en"), "nan_score", float("nan")),
            (scores.clip_column("short", "en"), "inf_score", float("inf")),
            ("aesthetic", "nan_aesthetic", float("nan")),
        ):
            for i in rng.choice(rows, size=3, replace=False):
                t[col][i] = bad if kind != "inf_score" or i % 2 else -bad
                planted[kind] += 1
        for i in rng.choice(rows, size=rows // 4, replace=False):
            t["sha256"][i] = None
            planted["null_sha256"] += 1
        tables.append(t)
    for f in range(1, n_files):  # keys of the previous file again, with other scores
        for i in range(3):
            tables[f]["key"][i] = tables[f - 1]["key"][rows - 1 - i]
            planted["duplicate_key_across_shards"] += 1
    for f, t in enumerate(tables):
        write_parquet(pa.Table.from_pydict(t, schema=SCHEMA), directory / f"{shard_name(f)}.parquet")
    write_parquet(SCHEMA.empty_table(), directory / f"{shard_name(n_files)}.parquet")
    planted["empty_shard"] = 1
    return planted
