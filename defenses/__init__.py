"""How received models are merged: pure functions on tensors, under thin aggregator classes.

This package never imports ``p2pnode`` or ``protocols``.
"""

from defenses.base import Aggregator, Layer, MergeContext
from defenses.registry import AGGREGATORS, make_aggregator

__all__ = ["AGGREGATORS", "Aggregator", "Layer", "MergeContext", "make_aggregator"]
