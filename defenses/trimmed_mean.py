"""Coordinate-wise trimmed mean (Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates").

For each coordinate ``j``, sort the ``n`` values ``x_k[j]``, drop the ``F`` largest and the ``F``
smallest and average the rest: ``θ_i[j] ← 1/(n − 2F) · Σ_{p=F}^{n−F−1} x_(p)[j]``. Needs ``n > 2F``.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from defenses.frule import FRule
from defenses.sorting_network import reduce_order_statistics


def trimmed_mean_rule(stacked: torch.Tensor, f: int) -> torch.Tensor:
    """Mean of each column of ``stacked`` without its ``f`` largest and ``f`` smallest values.

    Parameters
    ----------
    stacked:
        ``(n, d)`` tensor; not modified.
    f:
        Values dropped at each end of every column, ``0 <= 2f < n``.

    Returns
    -------
    torch.Tensor
        ``(d,)`` trimmed mean.

    Raises
    ------
    ValueError
        If ``f < 0`` or ``2f >= n``.
    """
    n = stacked.shape[0]
    if f < 0 or 2 * f >= n:
        raise ValueError(f"trimmed-mean needs 0 <= F and 2F < n (inputs), got F={f}, n={n}")
    extremes = frozenset(range(f)) | frozenset(range(n - f, n))

    def middle_mean(wires: list[torch.Tensor]) -> torch.Tensor:
        total = wires[f].clone()  # (c,)
        for wire in wires[f + 1 : n - f]:
            total += wire
        return total.div_(n - 2 * f)

    return reduce_order_statistics(stacked, extremes, middle_mean)


class TrimmedMean(FRule):
    """Coordinate-wise trimmed mean dropping ``f`` values at each end (see :func:`trimmed_mean_rule`)."""

    name = "trimmed-mean"
    form: ClassVar[str] = "trimmed-mean:F with integer F >= 0"

    def rule(self, stacked: torch.Tensor, f: int) -> torch.Tensor:
        return trimmed_mean_rule(stacked, f)
