"""Churn of simulated nodes: a per-round rate, or a trace file of who leaves and comes back when.

``--churn RATE`` (a number in [0, 1]): before every round after the first, each live node leaves with
probability RATE and each node that has left comes back with probability RATE (seeded draws).

``--churn TRACE`` (a CSV file): lines ``round,node,down|up``; before round r the events of round r are
applied in file order. A header line, blank lines and ``#`` comments are skipped.

A node that has left runs no rounds and answers no exchange; no membership view offers it. When it comes
back it resumes with the model it had (as a restarted daemon resumes from its checkpoint).
"""

from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

CHURN_ALLOWED = "RATE (a number in [0, 1]) or a CSV file of round,node,down|up lines"


class ChurnError(ValueError):
    """A churn spec or trace that cannot be used; the message names the line."""


@dataclass(slots=True)
class Churn:
    """A churn process (module docstring): ``rate`` or ``trace`` (round -> [(node, up), ...])."""

    rate: float = 0.0
    trace: dict[int, list[tuple[int, bool]]] = field(default_factory=dict)
    source: str = ""

    @property
    def active(self) -> bool:
        return self.rate > 0 or bool(self.trace)

    def check_nodes(self, n: int) -> None:
        """Raise ChurnError if the trace names a node outside ``0..n-1``."""
        bad = sorted({i for events in self.trace.values() for i, _ in events if not 0 <= i < n})
        if bad:
            raise ChurnError(f"churn trace {self.source} names nodes outside 0..{n - 1}: {bad[:5]}")

    def events(self, round: int, alive: list[bool], rng: random.Random) -> list[tuple[int, bool]]:
        """The changes ``(node, up)`` to apply before ``round`` (only real changes are returned)."""
        if self.trace:
            state: dict[int, bool] = {}
            out = []
            for node, up in self.trace.get(round, []):
                if state.get(node, alive[node]) != up:
                    state[node] = up
                    out.append((node, up))
            return out
        if self.rate <= 0 or round <= 1:
            return []
        return [(i, not up) for i, up in enumerate(alive) if rng.random() < self.rate]


def parse_churn(spec: str | None) -> Churn:
    """``""``/None: no churn; a number: a rate; anything else: the path of a trace CSV."""
    if spec is None or not str(spec).strip():
        return Churn()
    text = str(spec).strip()
    try:
        rate = float(text)
    except ValueError:
        return read_trace(Path(text))
    if not (math.isfinite(rate) and 0.0 <= rate <= 1.0):
        raise ChurnError(f"churn rate must be in [0, 1], got {text!r}; allowed: {CHURN_ALLOWED}")
    return Churn(rate=rate, source=text)


def read_trace(path: Path) -> Churn:
    """Read a ``round,node,down|up`` CSV (module docstring); ChurnError naming the line if malformed."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ChurnError(f"cannot read churn trace {path}: {exc.strerror or exc}; allowed: {CHURN_ALLOWED}") \
            from None
    trace: dict[int, list[tuple[int, bool]]] = {}
    for lineno, row in enumerate(csv.reader(text.splitlines()), start=1):
        cells = [c.strip() for c in row]
        if not cells or not any(cells) or cells[0].startswith("#"):
            continue
        if lineno == 1 and not cells[0].lstrip("-").isdigit():
            continue  # header
        if len(cells) != 3:
            raise ChurnError(f"{path}:{lineno}: expected round,node,down|up, got {row!r}")
        try:
            rnd, node = int(cells[0]), int(cells[1])
        except ValueError:
            raise ChurnError(f"{path}:{lineno}: round and node must be integers, got {row!r}") from None
        state = cells[2].lower()
        if state not in ("down", "up") or rnd < 1 or node < 0:
            raise ChurnError(f"{path}:{lineno}: expected round >= 1, node >= 0 and down or up, got {row!r}")
        trace.setdefault(rnd, []).append((node, state == "up"))
    return Churn(trace=trace, source=str(path))
