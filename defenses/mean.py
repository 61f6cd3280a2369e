"""Plain averaging: ``θ_i ← (θ_i + Σ_p θ_p) / (1 + |R|)`` — gossip averaging with no defense."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from defenses.base import Aggregator, MergeContext, stack_inputs


def mean_rule(stacked: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise mean of an ``(n, d)`` stack; returns ``(d,)``."""
    return stacked.mean(dim=0)


class Mean(Aggregator):
    """Unweighted mean of own and received models (own weight 1, like every peer)."""

    name = "mean"

    def aggregate(self, own: torch.Tensor, received: Mapping[str, torch.Tensor],
                  context: MergeContext | None = None) -> torch.Tensor:
        if not received:
            return own.clone()
        return mean_rule(stack_inputs(own, received))
