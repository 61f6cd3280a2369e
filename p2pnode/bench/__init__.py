"""Benchmarks behind ``p2pnode bench …``; their figures go into BENCHMARKS.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load_results(path: Path, key: str) -> dict[str, Any]:
    """The results file of a resumable benchmark: a dict whose ``key`` is a list of finished entries.

    A missing, unreadable or malformed file gives ``{key: []}`` (start over). Saved with
    :func:`p2pnode.outputs.write_json_atomic`, so an interrupted run never leaves half a file.
    """
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {key: []}
    return data if isinstance(data, dict) and isinstance(data.get(key), list) else {key: []}
