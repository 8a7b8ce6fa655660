"""What every table contract shares: the error it raises, its fields' notation and the structural check of a schema.

Each contract module (caption, shards, scores, dedup, manifest) defines its Arrow schema once and a
`validate(table)` that raises `SchemaError` naming every problem it found, so a reader can check a
file before trusting it and a test can check every writer against the same definition.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa

MAX_PROBLEMS = 50


class SchemaError(ValueError):
    """A table does not follow its contract; the message lists every problem found."""


def nullable(**types: pa.DataType) -> list[pa.Field]:
    """Nullable Arrow fields, named and typed as written and in that order: `nullable(width=pa.int32())`."""
    return [pa.field(name, type_) for name, type_ in types.items()]


def required(**types: pa.DataType) -> list[pa.Field]:
    """Non-nullable Arrow fields (a value on every row), named and typed as written and in that order."""
    return [pa.field(name, type_, nullable=False) for name, type_ in types.items()]


def check_names(names: Iterable[str]) -> None:
    """Level / language names: simple identifiers without '_' (they are parts of column names)."""
    for name in names:
        if not isinstance(name, str) or not name.isidentifier() or "_" in name:
            raise ValueError(f"level/language names must be simple identifiers without '_': {name!r}")


def missing_or_mistyped(schema: pa.Schema, expected: pa.Schema) -> list[str]:
    """Every column of `expected` that `schema` lacks or holds with another type."""
    problems = []
    for f in expected:
        if f.name not in schema.names:
            problems.append(f"missing column {f.name}")
        elif not schema.field(f.name).type.equals(f.type):
            problems.append(f"column {f.name} has type {schema.field(f.name).type}, expected {f.type}")
    return problems


def key_problems(keys: list, what: str = "key") -> list[str]:
    """Keys must be non-empty and unique."""
    problems = []
    if any(not k for k in keys):
        problems.append(f"empty or null {what}")
    if len(set(keys)) != len(keys):
        seen, dup = set(), set()
        for k in keys:
            (dup if k in seen else seen).add(k)
        problems.append(f"duplicate {what}s, e.g. {sorted(map(str, dup))[:5]}")
    return problems


def raise_if(problems: list[str], what: str = "") -> None:
    if problems:
        if len(problems) > MAX_PROBLEMS:
            problems = [*problems[:MAX_PROBLEMS], f"... (stopped after {MAX_PROBLEMS} problems)"]
        raise SchemaError((f"{what}: " if what else "") + "; ".join(problems))
