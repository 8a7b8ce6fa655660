"""Where benchmark results go: bench/results/NAME.json, and stdout."""

import json
from pathlib import Path


def save(results, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
