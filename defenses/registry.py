"""Aggregators by name: ``make_aggregator("mean")``. New rules register one entry in ``AGGREGATORS``."""

from __future__ import annotations

from defenses.base import Aggregator
from defenses.mean import Mean

AGGREGATORS: dict[str, type[Aggregator]] = {
    Mean.name: Mean,
}


def make_aggregator(spec: str) -> Aggregator:
    """Build the aggregator named by ``spec`` (``NAME`` or ``NAME:ARGS``).

    Raises
    ------
    ValueError
        For an unknown name (the message lists the valid ones) or arguments the rule does not take.
    """
    name, _, args = spec.partition(":")
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {spec!r}; valid: {', '.join(sorted(AGGREGATORS))}")
    if args:
        raise ValueError(f"aggregator {name!r} takes no arguments, got {args!r}")
    return AGGREGATORS[name]()
