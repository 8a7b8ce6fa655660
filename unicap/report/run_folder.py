"""The run folder the report reads, and the readers every section shares; nothing here writes or draws.

Every section's collect function returns a dict made by `empty_section`: `missing` (a list of (what is
missing, how to produce it)) and `notes` beside its data, so a folder that lacks a part yields a section
that says so, never an exception. Large tables are sampled (the first rows of every file, up to a bound),
and the page says so.

Every part is a unicap.storage Location, so a run folder in a bucket (s3://, gs://, ...) reads as the same
folder on a local disk does: the readers here take Locations and read through their filesystems.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import pandas as pd
import pyarrow.parquet as pq

from unicap import storage
from unicap.contract import caption as caption_record
from unicap.contract import manifest
from unicap.contract import shards as shard_contract
from unicap.storage import Location

SCORE_SAMPLE = 200_000  # score / manifest rows read for the distributions
THUMB_SIDE = 256  # px, the long side of a gallery thumbnail
CHARACTER_LANGUAGES = ("zh", "ja", "ko", "th")  # caption length counted in characters, others in words


@dataclass(frozen=True)
class RunFolder:
    """The conventional layout of a run folder (what `make demo` writes); a real run may lack parts.
    `root` is a local path or a URI (a str or Path is resolved to its Location)."""

    root: Location

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", storage.resolve(self.root))

    @functools.cached_property
    def data(self) -> Location:
        """The pool's image shards: DIR/data, or DIR/shards (the trainer accepts both)."""
        data, shards = self.root.join("data"), self.root.join("shards")
        return shards if not data.is_dir() and shards.is_dir() else data

    @property
    def truth(self) -> Location:  # the synthetic pool's answer key, as caption records
        return self.data.join("truth")

    @property
    def heldout(self) -> Location:
        return self.root.join("heldout")

    @property
    def heldout_truth(self) -> Location:
        return self.heldout.join("truth")

    @property
    def captions(self) -> Location:
        return self.root.join("captions")

    @property
    def heldout_captions(self) -> Location:
        return self.root.join("heldout_captions")

    @property
    def scores(self) -> Location:
        return self.root.join("scores")

    @property
    def stages(self) -> Location:
        return self.root.join("stages")

    @property
    def runs(self) -> Location:
        return self.root.join("runs")

    @property
    def adherence(self) -> Location:
        return self.root.join("adherence")

    def manifest(self, stage: str) -> Location:
        """stages/{stage}.parquet, the stage's manifest (unicap.contract.manifest names it)."""
        return self.stages.join(manifest.manifest_path("", stage).name)


def how_to(run: RunFolder) -> dict[str, str]:
    """The command that produces each part of a run folder."""
    d = run.root
    return {
        "data": f"`unicap ingest URLS --out {d}/data` (or `unicap ingest-folder IMAGES --out {d}/data`, "
        f"`unicap synth --out {d}/data --n 1000`)",
        "captions": f"`unicap caption --input {d}/data --output {d}/captions --model Qwen/Qwen2.5-VL-7B-Instruct`",
        "heldout": f"`unicap synth --out {d}/heldout --n 256 --seed 1` and `unicap caption --input {d}/heldout "
        f"--output {d}/heldout_captions --model M`: this report scores them against the answer key "
        f"(`unicap eval-captions --captions {d}/heldout_captions --truth {d}/heldout` "
        "writes the same table to _eval.json)",
        "scores": f"`unicap score --input {d}/data --captions {d}/captions --output {d}/scores --clip MODEL`",
        "stages": f"`unicap stages --scores {d}/scores --output {d}/stages --shards {d}/data "
        "--stage1 100M --stage2 10M --stage3 1M`",
        "runs": f"`make stage1 stage2 stage3 DATA={d}` (writes {d}/runs/stageN/)",
        "adherence": f"`unicap adherence --truth {d}/heldout --out {d}/adherence "
        f"--weights stage1={d}/runs/stage1/final "
        f"--weights stage3={d}/runs/stage3/final` (adherence.json and its images)",
    }


def empty_section(**data) -> dict:
    """A section with nothing missing and no notes yet, beside `data`."""
    return {"missing": [], "notes": [], **data}


def parquet_files(folder: Location) -> list[Location]:
    """The Parquet files a reader of `folder` sees (hidden "." and private "_" names left out), sorted;
    [] when there is no such folder."""
    try:
        files = folder.files(".parquet")
    except NotADirectoryError:  # a file where the folder should be: nothing to read there
        return []
    return [f for f in files if not f.name.startswith("_")]


def stem(loc: Location) -> str:
    """A file's name without its last suffix ("00001.parquet" -> "00001")."""
    return os.path.splitext(loc.name)[0]


def read_json(loc: Location) -> dict | None:
    """A JSON file's object, None when the file is absent; a broken file is a ValueError naming it."""
    if not loc.is_file():
        return None
    try:
        obj = json.loads(loc.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{loc}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{loc}: expected a JSON object, got {type(obj).__name__}")
    return obj


def parquet_file(loc: Location) -> pq.ParquetFile:
    """A ParquetFile read through the Location's filesystem (close it, or use it in a `with`)."""
    return pq.ParquetFile(loc.path, filesystem=loc.fs)


def read_sample(files: Iterable[Location], columns: Iterable[str], limit: int) -> tuple[pd.DataFrame, int]:
    """Up to `limit` rows of `columns` (those a file has), the first rows of every file in turn so that
    a sample of many files covers all of them, and the total number of rows of the files."""
    files, columns = list(files), list(columns)
    if not files:
        return pd.DataFrame(columns=columns), 0
    quota = max(1, -(-limit // len(files)))
    frames, total, taken = [], 0, 0
    for f in files:
        with parquet_file(f) as pf:
            total += pf.metadata.num_rows
            if taken >= limit or pf.metadata.num_rows == 0:
                continue
            cols = [c for c in columns if c in pf.schema_arrow.names]
            batch = next(pf.iter_batches(batch_size=min(quota, limit - taken), columns=cols), None)
        if batch is not None and batch.num_rows:
            frames.append(batch.to_pandas())
            taken += batch.num_rows
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    return df, total


def rows_for_keys(directory: Location, keys_by_shard: Mapping[str, Iterable[str]]) -> dict[str, dict]:
    """key -> row of the per-shard Parquet files `directory/{shard}.parquet` (captions, truth)."""
    out: dict[str, dict] = {}
    for shard, keys in keys_by_shard.items():
        if not shard_contract.shard_name_ok(shard):
            continue
        loc = directory.join(f"{shard}.parquet")
        if loc.is_file():
            table = pq.read_table(loc.path, filesystem=loc.fs, filters=[("key", "in", sorted(set(keys)))])
            out.update({r["key"]: r for r in table.to_pylist()})
    return out


def caption_levels_languages(files: list[Location]) -> tuple[list[str], list[str]]:
    """The levels and languages caption files declare (metadata), else read from their column names."""
    levels: list[str] = []
    languages: list[str] = []
    for f in files[:50]:
        schema = pq.read_schema(f.path, filesystem=f.fs)
        try:
            lv, lang = caption_record.levels_languages(schema)
        except caption_record.SchemaError:
            names = [c for c in schema.names if c.count("_") >= 2 and c.startswith("caption_")]
            pairs = [caption_record.parse_caption_column(c) for c in names]
            lv, lang = [p[0] for p in pairs], [p[1] for p in pairs]
        levels += [x for x in lv if x not in levels]
        languages += [x for x in lang if x not in languages]
    return levels, languages


def by_shard(pairs: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """(key, shard) pairs -> shard -> its keys; a pair without a shard name is left out."""
    out: dict[str, list[str]] = {}
    for key, shard in pairs:
        if isinstance(shard, str):
            out.setdefault(shard, []).append(key)
    return out


def caption_length(text: str, language: str) -> int:
    """A caption's length in words, or in characters (spaces left out) for CHARACTER_LANGUAGES."""
    if language in CHARACTER_LANGUAGES:
        return len(re.sub(r"\s+", "", text))
    return len(text.split())


def length_unit(language: str) -> str:
    return "characters" if language in CHARACTER_LANGUAGES else "words"
