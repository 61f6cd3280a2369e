"""Model distances between nodes from the probe coordinates in their metrics lines.

A node started with ``--probe-coords N`` adds ``"probe"``, its model at N fixed coordinates (the same
on every node), to each round line of its metrics file. Nodes run their rounds freely, so node i's
round r and node j's round r may end seconds apart, on either side of a fault (on a busy machine one
half of a partitioned swarm ran 5 rounds ahead of the other). The distance between i and j at round r
therefore pairs i's model after its round r with the model j held at that moment (its latest probe
then), in both directions: ``‖probe_i(r) − probe_j(t_i(r))‖₂`` and ``‖probe_j(r) − probe_i(t_j(r))‖₂``.
Pure functions on parsed metrics events; the fault tests and ``p2pnode bench partition`` share them.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Probe:
    """A node's model at the probe coordinates when it finished a round."""

    t: float  # unix time of the round's metrics line
    round: int
    values: list[float]


class Probes:
    """Every node's probes, by round and by time."""

    def __init__(self, events: Iterable[Mapping[str, Any]]) -> None:
        by_node: dict[int, list[Probe]] = {}
        for ev in events:
            if ev.get("event") == "round" and isinstance(ev.get("probe"), list):
                probe = Probe(float(ev["t"]), int(ev["round"]), [float(v) for v in ev["probe"]])
                by_node.setdefault(int(ev["node"]), []).append(probe)
        self._by_time = {node: sorted(seq, key=lambda p: p.t) for node, seq in by_node.items()}
        self._times = {node: [p.t for p in seq] for node, seq in self._by_time.items()}
        self._by_round = {node: {p.round: p for p in seq} for node, seq in by_node.items()}

    def rounds(self) -> list[int]:
        """Every round some node reported."""
        return sorted({r for table in self._by_round.values() for r in table})

    def at_round(self, node: int, rnd: int) -> Probe | None:
        return self._by_round.get(node, {}).get(rnd)

    def at_time(self, node: int, t: float) -> Probe | None:
        """``node``'s latest probe at time ``t`` (None before its first round)."""
        k = bisect.bisect_right(self._times.get(node, []), t)
        return self._by_time[node][k - 1] if k else None


def probe_table(events: Iterable[Mapping[str, Any]]) -> Probes:
    """The probes of round events carrying ``"node"``, ``"t"``, ``"round"`` and ``"probe"``."""
    return Probes(events)


def distance(a: Sequence[float], b: Sequence[float]) -> float:
    """L2 distance of two probes of the same length (ValueError otherwise)."""
    if len(a) != len(b):
        raise ValueError(f"probes of different lengths: {len(a)} and {len(b)}")
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))


def pairs_within(group: Sequence[int]) -> list[tuple[int, int]]:
    """All unordered pairs of distinct nodes of ``group``."""
    return list(itertools.combinations(group, 2))


def pairs_across(group_a: Sequence[int], group_b: Sequence[int]) -> list[tuple[int, int]]:
    """All pairs with one node in each group."""
    return [(a, b) for a in group_a for b in group_b]


def _mean(probes: Probes, pairs: Sequence[tuple[int, int]], round_of: Callable[[int], int]) -> float | None:
    found = []
    for i, j in pairs:
        for x, y in ((i, j), (j, i)):
            mine = probes.at_round(x, round_of(x))
            theirs = probes.at_time(y, mine.t) if mine is not None else None
            if mine is not None and theirs is not None:
                found.append(distance(mine.values, theirs.values))
    return statistics.fmean(found) if found else None


def mean_distance(probes: Probes, pairs: Sequence[tuple[int, int]], rnd: int) -> float | None:
    """Mean distance at round ``rnd`` over ``pairs``, both directions (see the module docstring); None if
    no node of a pair reported round ``rnd`` while the other had a probe."""
    return _mean(probes, pairs, lambda node: rnd)


def _kinds(group_a: Sequence[int], group_b: Sequence[int]) -> dict[str, list[tuple[int, int]]]:
    return {"within_a": pairs_within(group_a), "within_b": pairs_within(group_b),
            "across": pairs_across(group_a, group_b), "all": pairs_within(sorted([*group_a, *group_b]))}


def distance_curve(probes: Probes, group_a: Sequence[int], group_b: Sequence[int]) -> list[dict[str, Any]]:
    """Per round: mean pairwise distance within each group, across the groups, and over all pairs."""
    kinds = _kinds(group_a, group_b)
    return [{"round": r, **{k: mean_distance(probes, pairs, r) for k, pairs in kinds.items()}}
            for r in probes.rounds()]


def relative_curve(probes: Probes, group_a: Sequence[int], group_b: Sequence[int], anchor: Sequence[int],
                   offsets: Iterable[int]) -> list[dict[str, Any]]:
    """Like :func:`distance_curve`, but row ``k`` takes each node's own round ``anchor[node] + k``.

    With ``anchor`` = the round each node had finished when a fault began or ended, rows k <= 0 are every
    node's last rounds before it and rows k >= 1 its first rounds after it, however far apart the nodes'
    round counters were (the row's ``"round"`` is k).
    """
    kinds = _kinds(group_a, group_b)
    rows = []
    for k in offsets:
        shifted = functools.partial(_shifted, anchor, k)
        rows.append({"round": k, **{name: _mean(probes, pairs, shifted) for name, pairs in kinds.items()}})
    return rows


def _shifted(anchor: Sequence[int], k: int, node: int) -> int:
    return anchor[node] + k


def window_before(curve: Sequence[Mapping[str, Any]], before: int, window: int,
                  key: str = "all") -> list[float]:
    """The values of ``key`` in the ``window`` rounds just before round ``before`` (ValueError if none)."""
    values = [row[key] for row in curve if before - window <= row["round"] < before and row[key] is not None]
    if not values:
        raise ValueError(f"no {key!r} distance in rounds {before - window} … {before - 1}")
    return values


def level_before(curve: Sequence[Mapping[str, Any]], before: int, window: int, key: str = "all") -> float:
    """Mean of ``key`` over the ``window`` rounds just before round ``before`` (ValueError if none)."""
    return statistics.fmean(window_before(curve, before, window, key))


def rounds_to_recover(curve: Sequence[Mapping[str, Any]], *, after: int, level: float, key: str = "all",
                      hold: int = 1) -> int | None:
    """Rounds from round ``after`` until ``key`` is back at or below ``level`` for ``hold`` rounds in a row.

    Returns ``r − after`` for the first round ``r > after`` that starts such a run, or None if it never
    comes back within the curve.
    """
    rows = [row for row in curve if row["round"] > after and row[key] is not None]
    for k, row in enumerate(rows):
        run = rows[k:k + hold]
        if len(run) == hold and all(x[key] <= level for x in run):
            return int(row["round"]) - after
    return None


def rounds_to_mix(curve: Sequence[Mapping[str, Any]], *, after: int) -> int | None:
    """Rounds from round ``after`` until the halves are mixed again: the first round ``r > after`` whose
    across-halves distance is at most the larger within-half distance (a node is then no farther from
    the other half than from its own). Returns ``r − after``, or None if that never happens."""
    for row in curve:
        within = [row[k] for k in ("within_a", "within_b") if row[k] is not None]
        if row["round"] > after and row["across"] is not None and within and row["across"] <= max(within):
            return int(row["round"]) - after
    return None


def accuracy_curve(events: Iterable[Mapping[str, Any]], groups: Mapping[str, Sequence[int]]
                   ) -> list[dict[str, Any]]:
    """Per round, the mean ``test_accuracy`` of each named group of nodes (None where none evaluated)."""
    acc: dict[int, dict[int, float]] = {}
    for ev in events:
        if ev.get("event") == "round" and ev.get("test_accuracy") is not None:
            acc.setdefault(int(ev["round"]), {})[int(ev["node"])] = float(ev["test_accuracy"])
    rows = []
    for rnd in sorted(acc):
        row: dict[str, Any] = {"round": rnd}
        for name, nodes in groups.items():
            vals = [acc[rnd][n] for n in nodes if n in acc[rnd]]
            row[name] = statistics.fmean(vals) if vals else None
        rows.append(row)
    return rows
