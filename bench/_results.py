"""Where benchmark results go: bench/results/NAME.json, and stdout; and a result from a bench's child process."""

import json
import statistics
import subprocess
import sys
from pathlib import Path


def spread(values, digits: int = 3) -> dict:
    """The median of a measurement's rounds with its min and max (how every bench reports a ratio)."""
    values = list(values)
    return {k: round(f(values), digits) for k, f in (("median", statistics.median), ("min", min), ("max", max))}


def save(results, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


def run_child(script: str, *args: str) -> dict:
    """SCRIPT (a bench) run with ARGS in a fresh Python process, so that its peak memory is its own; the result
    it prints as JSON on its last line of stdout. Raises CalledProcessError if it fails."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])
