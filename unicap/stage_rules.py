"""The stage rules and targets: what the stage selection (pipelines.stages) keeps, as a typed config.

    rules = load_rules("rules.yaml", ["stage1.min_side=512", "composite.clip=0.7"])

Defaults live in the dataclasses below; a YAML or JSON file changes some of them (sections merge with
the defaults), `section.key=value` overrides change them again (unicap.config). An unknown section or
key, a value of the wrong type, a clip column that is not a score column or a memory limit DuckDB would
not read is an error naming it, never a silent typo: these values end up in SQL.

Targets: a count ("5000", "10k", "10M", "1B") or a fraction of the previous stage ("0.1").
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from unicap import config
from unicap.contract.scores import CAPTION_STATUSES, parse_clip_column

SUFFIX = {"k": 10**3, "m": 10**6, "b": 10**9}
MEMORY_LIMIT = re.compile(r"(\d+(?:\.\d+)?)\s*(KB|MB|GB|TB|KiB|MiB|GiB|TiB)")
MEMORY_UNITS = {
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}
# DuckDB's buffer pool gets this share of memory_limit; the rest is for what the pool does not count: Python,
# pyarrow (a bucket's read-ahead), DuckDB's own allocations beside its pool. At 100M rows the process stayed
# ~560 MiB above DuckDB's cap (2GB cap: 2469 MiB peak), ~230 MiB at 20M rows with a 400MB cap
DUCKDB_SHARE = 0.7


@dataclass
class Stage1Rules:
    """The filters of the pool: every row that passes them is stage1-eligible."""

    min_side: int = 256  # pixels, short side
    max_aspect: float = 4.0  # long side / short side
    caption_status: list[str] = field(default_factory=lambda: ["ok"])  # caption record statuses kept
    drop_duplicates: bool = True  # exact (sha256) and near (the score job's clusters)

    def __post_init__(self) -> None:
        config.check_at_least(0, {"min_side": self.min_side})
        config.check_at_least(1.0, {"max_aspect": self.max_aspect})
        unknown = [s for s in self.caption_status if s not in CAPTION_STATUSES]
        if unknown or not self.caption_status:
            raise ValueError(f"caption_status {self.caption_status}: use some of {list(CAPTION_STATUSES)}")


@dataclass
class Stage2Rules:
    min_side: int = 1024  # stage2 = the best of stage1 among images at least this large

    def __post_init__(self) -> None:
        config.check_at_least(0, {"min_side": self.min_side})


@dataclass
class Stage3Rules:
    min_side: int | None = None  # None: no more than stage2 asks

    def __post_init__(self) -> None:
        if self.min_side is not None:
            config.check_at_least(0, {"min_side": self.min_side})


@dataclass
class CompositeRules:
    """composite = clip x z(mean of clip_columns) + aesthetic x z(aesthetic), z-scored over the pool."""

    clip: float = 0.5
    aesthetic: float = 0.5
    clip_columns: list[str] = field(default_factory=lambda: ["clip_long_en", "clip_medium_en", "clip_short_en"])

    def __post_init__(self) -> None:
        for name in ("clip", "aesthetic"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        for column in self.clip_columns:
            parse_clip_column(column)  # a score column name or a ValueError: it becomes an SQL identifier


@dataclass
class StageRules:
    stage1: Stage1Rules = field(default_factory=Stage1Rules)
    stage2: Stage2Rules = field(default_factory=Stage2Rules)
    stage3: Stage3Rules = field(default_factory=Stage3Rules)
    composite: CompositeRules = field(default_factory=CompositeRules)
    nested: bool = True  # stage3 from stage2 (else from stage1's stage2-eligible rows)
    memory_limit: str = "2GB"  # the selection's peak memory (the whole process); DuckDB spills to disk beyond its share

    def __post_init__(self) -> None:
        if not MEMORY_LIMIT.fullmatch(self.memory_limit.strip()):
            raise ValueError(f"memory_limit {self.memory_limit!r}: use a size such as 512MB, 2GB or 1.5GiB")

    def duckdb_memory_limit(self) -> str:
        """DuckDB's memory_limit setting: DUCKDB_SHARE of memory_limit ("2GB" -> "1400000000B")."""
        value, unit = MEMORY_LIMIT.fullmatch(self.memory_limit.strip()).groups()
        return f"{int(float(value) * MEMORY_UNITS[unit] * DUCKDB_SHARE)}B"


def load_rules(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> StageRules:
    """The default rules <- a YAML/JSON file (optional) <- `section.key=value` overrides, checked."""
    data = config.read_yaml(path) if path else {}
    known = [f.name for f in StageRules.__dataclass_fields__.values()]
    unknown = [k for k in data if k not in known]
    if unknown:
        raise config.ConfigError(f"unknown rule section {unknown[0]!r} in {path}; known: {sorted(known)}")
    return config.from_dict(StageRules, config.apply_overrides(data, overrides))


def parse_count(text: str | float | int) -> int:
    """ "10M" -> 10_000_000; "5000" -> 5000; "2.5k" -> 2500."""
    kind, value = parse_target(text)
    if kind != "count":
        raise ValueError(f"{text!r}: use a count (5000, 10k, 10M), not a fraction")
    return int(value)


def parse_target(text: str | float | int) -> tuple[str, float]:
    """ "10M" -> ("count", 1e7); "0.1" -> ("fraction", 0.1); "5000" -> ("count", 5000)."""
    s = str(text).strip().lower()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmb]?)", s)
    if not m:
        raise ValueError(f"stage target {text!r}: use a count (5000, 10k, 10M) or a fraction (0.1)")
    value, suffix = float(m.group(1)), m.group(2)
    if suffix:
        return "count", int(value * SUFFIX[suffix])
    if "." in m.group(1) and value <= 1.0:
        return "fraction", value
    return "count", int(value)


def requested(target: tuple[str, float], base: int) -> int:
    """Rows the target asks for: a count as given, a fraction of `base` (the previous stage)."""
    kind, v = target
    return int(round(v * base)) if kind == "fraction" else int(v)
