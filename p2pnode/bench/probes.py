"""Model distances between nodes from the probe coordinates in their metrics lines.

A node started with ``--probe-coords N`` adds ``"probe"``, its model at N fixed coordinates (the same
on every node), to each round line of its metrics file. The distance between nodes i and j at round r
is ``‖probe_i(r) − probe_j(r)‖₂``, each node's round r being its own r-th round (nodes run freely, so
their r-th rounds end at slightly different times). Pure functions on parsed metrics events; the
fault tests and ``p2pnode bench partition`` share them.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Probes = dict[int, dict[int, list[float]]]  # node -> round -> probe values


def probe_table(events: Iterable[Mapping[str, Any]]) -> Probes:
    """``{node: {round: probe}}`` from round events carrying ``"node"``, ``"round"`` and ``"probe"``."""
    table: Probes = {}
    for ev in events:
        if ev.get("event") == "round" and isinstance(ev.get("probe"), list):
            table.setdefault(int(ev["node"]), {})[int(ev["round"])] = [float(v) for v in ev["probe"]]
    return table


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


def mean_distance(probes: Probes, pairs: Sequence[tuple[int, int]], rnd: int) -> float | None:
    """Mean distance over the ``pairs`` whose two nodes both reported round ``rnd`` (None if no pair did)."""
    found = [distance(probes[i][rnd], probes[j][rnd]) for i, j in pairs
             if rnd in probes.get(i, {}) and rnd in probes.get(j, {})]
    return statistics.fmean(found) if found else None


def distance_curve(probes: Probes, group_a: Sequence[int], group_b: Sequence[int]) -> list[dict[str, Any]]:
    """Per round: mean pairwise distance within each group, across the groups, and over all pairs."""
    kinds = {"within_a": pairs_within(group_a), "within_b": pairs_within(group_b),
             "across": pairs_across(group_a, group_b),
             "all": pairs_within(sorted([*group_a, *group_b]))}
    rounds = sorted({r for table in probes.values() for r in table})
    return [{"round": r, **{k: mean_distance(probes, pairs, r) for k, pairs in kinds.items()}}
            for r in rounds]


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
