"""Aggregators by name: ``make_aggregator("krum:3")``. A new rule is one import and one entry in
``AGGREGATORS``; the class parses its own ``ARGS`` in ``from_args``.

Specs: ``mean``, ``median``, ``trimmed-mean:F``, ``krum:F``, ``multi-krum:F,M``,
``centered-clip:TAU[,L]``, ``nna:F``, ``sybilwall``, ``bristle[:ALPHA[,RHO]]``.
"""

from __future__ import annotations

from defenses.base import Aggregator
from defenses.bristle import Bristle
from defenses.centered_clip import CenteredClip
from defenses.krum import Krum, MultiKrum
from defenses.mean import Mean
from defenses.median import Median
from defenses.nna import NNA
from defenses.sybilwall import SybilWall
from defenses.trimmed_mean import TrimmedMean
from defenses.variance import VarianceCorrected

AGGREGATORS: dict[str, type[Aggregator]] = {
    Mean.name: Mean,
    Median.name: Median,
    TrimmedMean.name: TrimmedMean,
    Krum.name: Krum,
    MultiKrum.name: MultiKrum,
    CenteredClip.name: CenteredClip,
    NNA.name: NNA,
    SybilWall.name: SybilWall,
    Bristle.name: Bristle,
}


def _valid_specs() -> str:
    """``NAME[:ARGS]`` of every rule; a rule with arguments states its form in a ``form`` attribute."""
    forms = (getattr(cls, "form", name).split(" with ")[0] for name, cls in sorted(AGGREGATORS.items()))
    return ", ".join(forms)


def make_aggregator(spec: str, *, variance_correction: bool = False) -> Aggregator:
    """Build the aggregator named by ``spec`` (``NAME`` or ``NAME:ARGS``).

    Parameters
    ----------
    spec:
        Rule name and its comma-separated arguments, e.g. ``"nna:4"`` or ``"multi-krum:3,10"``.
    variance_correction:
        Wrap the rule in :class:`~defenses.variance.VarianceCorrected` (Tian et al.), which then needs
        ``MergeContext.layers`` at every merge.

    Raises
    ------
    ValueError
        For an unknown name (the message lists the valid ones) or arguments the rule does not take
        (the message gives the expected form).
    """
    name, _, args = spec.strip().partition(":")
    cls = AGGREGATORS.get(name)
    if cls is None:
        raise ValueError(f"unknown aggregator {spec!r}; valid: {_valid_specs()}")
    aggregator = cls.from_args(args)
    return VarianceCorrected(aggregator) if variance_correction else aggregator
