"""Coordinate-wise median (Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates").

For each coordinate ``j``: ``θ_i[j] ← median_k x_k[j]`` over own and received models; for an even
number of inputs the median is the mean of the two middle values (numpy's convention, and byzfl's).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from defenses.base import Aggregator, MergeContext, stack_inputs
from defenses.sorting_network import reduce_order_statistics


def median_rule(stacked: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median of the rows of ``stacked``.

    Parameters
    ----------
    stacked:
        ``(n, d)`` tensor with ``n >= 1``; not modified.

    Returns
    -------
    torch.Tensor
        ``(d,)``: ``x_(k)`` for odd ``n = 2k + 1``, ``(x_(k-1) + x_(k)) / 2`` for even ``n = 2k``,
        where ``x_(p)`` is the ``p``-th smallest value (0-based) of each column.

    Raises
    ------
    ValueError
        If ``stacked`` is not 2-D with at least one row.
    """
    if stacked.dim() != 2 or stacked.shape[0] < 1:
        raise ValueError(f"median needs an (n, d) stack with n >= 1, got shape {tuple(stacked.shape)}")
    n = stacked.shape[0]
    k = n // 2
    if n % 2:
        return reduce_order_statistics(stacked, frozenset({k}), lambda wires: wires[k])
    return reduce_order_statistics(stacked, frozenset({k - 1, k}),
                                   lambda wires: torch.add(wires[k - 1], wires[k]).mul_(0.5))


@dataclass(frozen=True, slots=True)
class Median(Aggregator):
    """Coordinate-wise median of own and received models (see :func:`median_rule`)."""

    name = "median"

    def aggregate(self, own: torch.Tensor, received: Mapping[str, torch.Tensor],
                  context: MergeContext | None = None) -> torch.Tensor:
        if not received:
            return own.clone()
        return median_rule(stack_inputs(own, received))
