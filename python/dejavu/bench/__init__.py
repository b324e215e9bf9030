"""`dejavu bench ...`: benchmarks that always measure a baseline in the same run."""
from __future__ import annotations

import json


def write_json(path: str | None, result: dict) -> None:
    """A bench's --json FILE: all its numbers, indented (nothing when no path was given)."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
