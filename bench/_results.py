"""Where benchmark results go: bench/results/NAME.json, and stdout."""

import json
import statistics
from pathlib import Path


def spread(values, digits: int = 3) -> dict:
    """The median of a measurement's rounds with its min and max (how every bench reports a ratio)."""
    values = list(values)
    return {k: round(f(values), digits) for k, f in (("median", statistics.median), ("min", min), ("max", max))}


def save(results, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
