"""Checks a job makes before it starts anything (a cluster, an engine, a download): arguments and folders.

Each failure is a UsageError (a ValueError) whose one-line message says what was wrong and what to
do; `unicap` prints it as `error: ...` and exits with status 2.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import pyarrow.fs as pafs

from unicap import storage
from unicap.atomic import final_name
from unicap.storage import Location


class UsageError(ValueError):
    """A user's argument or folder that a job refuses before it starts."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def at_least(name: str, value, minimum, *, optional: bool = False) -> None:
    """`value` (an option named `name`) is a finite number >= minimum (or None when optional)."""
    _number(name, value, minimum, optional, strict=False)


def above(name: str, value, minimum, *, optional: bool = False) -> None:
    """`value` is a finite number > minimum (or None when optional)."""
    _number(name, value, minimum, optional, strict=True)


def _number(name: str, value, minimum, optional: bool, strict: bool) -> None:
    if value is None and optional:
        return
    number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not (number and (value > minimum if strict else value >= minimum)):
        raise UsageError(f"{_flag(name)} must be a number {'>' if strict else '>='} {minimum}, got {value!r}")


# (path relative to the output folder, is a folder) -> whether the job writes such an entry
IsOurs = Callable[[str, bool], bool]


def foreign_entries(directory: str | os.PathLike | Location, is_ours: IsOurs) -> list[str]:
    """Entries of `directory` (a local folder or a URI) that the job would not have written (temporaries of its
    files count as its own); folders it owns are searched too. Sorted, relative paths; one listing."""
    loc = storage.resolve(directory)
    base = loc.path.rstrip("/") + "/"
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True, allow_not_found=True))
    out: list[str] = []
    for info in sorted(infos, key=lambda i: i.path):
        rel = info.path[len(base) :] if info.path.startswith(base) else info.path
        if any(rel.startswith(f) for f in out if f.endswith("/")):
            continue  # inside a folder already named
        is_dir = info.type == pafs.FileType.Directory
        head, _, name = rel.rpartition("/")
        final = None if is_dir else final_name(name)
        if not is_ours(f"{head}/{final}".lstrip("/") if final else rel, is_dir):
            out.append(rel + ("/" if is_dir else ""))
    return out


def check_output_folder(directory: str | os.PathLike | Location, is_ours: IsOurs, job: str) -> None:
    """Refuse an output path that is a file, or a folder holding entries `job` does not write: the job
    resumes by the names it finds there, and cleans its own temporaries, so it must be alone in it."""
    loc = storage.resolve(directory)
    if loc.is_file():
        raise UsageError(f"output {loc} exists and is not a folder")
    foreign = foreign_entries(loc, is_ours)
    if foreign:
        shown = ", ".join(repr(f) for f in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise UsageError(
            f"output folder {loc} holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} that {job} does not "
            f"write ({shown}): give {job} an empty or new folder, or one that only {job} wrote"
        )
