"""Files a node writes for whoever supervises it: metrics lines, the ready file, the result file.

This is the node side of the process contract that :mod:`p2pnode.swarm` reads:

- metrics file: one JSON object per line, ``{"event": "round" | "final", "t": unix time, "peer_id",
  "role", "round", "train_loss", "test_accuracy", "test_loss", "peers_in_view", "bytes_sent",
  "bytes_received", "messages_rejected"}``, flushed line by line;
- ready file: ``{"peer_id", "maddrs"}`` once the node has joined the DHT and published its record;
- result file: the final evaluation (same keys as a ``final`` event), written once after the last round.

JSON files are written atomically (temp file, fsync, rename) so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any


def write_json_atomic(path: str | Path, obj: dict[str, Any]) -> None:
    """Write ``obj`` as JSON to ``path`` via a temp file in the same directory, fsync and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class MetricsWriter:
    """Appends one JSON line per event to a file (if one is configured) and hands each row to listeners."""

    def __init__(self, path: str | None, *,
                 listeners: Sequence[Callable[[dict[str, Any]], None]] = ()) -> None:
        self._file: IO[str] | None = None
        self._listeners = tuple(listeners)
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        row = {"event": event, "t": time.time(), **fields}
        if self._file is not None:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        for listener in self._listeners:
            listener(row)
        return row

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
