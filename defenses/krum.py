"""Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui, Stainer 2017, "Machine Learning with
Adversaries: Byzantine Tolerant Gradient Descent").

For each input ``x_i`` (own model included, as row 0), the score is the sum of squared distances to
its ``n − F − 2`` nearest other inputs, ``s(i) = Σ_{j ∈ N_i} ‖x_i − x_j‖²``. Krum returns the input
with the smallest score; Multi-Krum averages the ``M`` inputs with the smallest scores. Needs
``n > 2F + 2`` (the paper's condition). Ties go to the lower row, so own wins a tie.

Pairwise distances come from the Gram matrix of the inputs centred on own:
``‖x_i − x_j‖² = G_ii + G_jj − 2 G_ij`` with ``G = (X − x_0)(X − x_0)ᵀ`` — one matrix product
instead of ``n²`` difference passes over ``d``, and centring on own keeps the cancellation error at
the scale of the models' spread around own rather than of their norms.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from defenses.args import parse_int, split_args
from defenses.base import Aggregator, MergeContext, stack_inputs
from defenses.frule import FRule


def _check_krum(n: int, f: int) -> None:
    if f < 0 or n <= 2 * f + 2:
        raise ValueError(f"krum needs 0 <= F and n > 2F + 2 inputs (Blanchard et al.), got F={f}, n={n}")


def squared_distances(stacked: torch.Tensor) -> torch.Tensor:
    """Pairwise squared L2 distances between the rows of ``stacked`` ``(n, d)``; returns ``(n, n)``."""
    centred = stacked - stacked[0]  # (n, d); row 0 becomes 0
    gram = centred @ centred.T  # (n, n)
    norms = gram.diagonal()  # (n,)
    dist = (norms[:, None] + norms[None, :] - 2 * gram).clamp_min_(0)  # (n, n)
    return dist.fill_diagonal_(0)


def krum_scores(stacked: torch.Tensor, f: int) -> torch.Tensor:
    """Krum score of every row: sum of squared distances to its ``n − f − 2`` nearest other rows.

    Parameters
    ----------
    stacked:
        ``(n, d)`` tensor, ``n > 2f + 2``; not modified.
    f:
        Assumed number of Byzantine inputs, ``f >= 0``.

    Returns
    -------
    torch.Tensor
        ``(n,)`` scores (lower is more central).

    Raises
    ------
    ValueError
        If ``f < 0`` or ``n <= 2f + 2``.
    """
    n = stacked.shape[0]
    _check_krum(n, f)
    dist = squared_distances(stacked)  # (n, n)
    dist.fill_diagonal_(float("inf"))  # a row is not its own neighbour
    nearest = torch.topk(dist, n - f - 2, dim=1, largest=False).values  # (n, n − f − 2)
    return nearest.sum(dim=1)


def krum_rule(stacked: torch.Tensor, f: int) -> torch.Tensor:
    """Krum: the row of ``stacked`` ``(n, d)`` with the lowest :func:`krum_scores`; returns a ``(d,)`` copy.

    Raises
    ------
    ValueError
        If ``f < 0`` or ``n <= 2f + 2``.
    """
    best = int(torch.argmin(krum_scores(stacked, f)))  # first minimum: own wins a tie
    return stacked[best].clone()


def multi_krum_rule(stacked: torch.Tensor, f: int, m: int) -> torch.Tensor:
    """Multi-Krum: mean of the ``m`` rows of ``stacked`` ``(n, d)`` with the lowest Krum scores.

    Parameters
    ----------
    stacked:
        ``(n, d)`` tensor, ``n > 2f + 2``; not modified.
    f:
        Assumed number of Byzantine inputs, ``f >= 0``.
    m:
        Rows averaged, ``1 <= m <= n − f``.

    Returns
    -------
    torch.Tensor
        ``(d,)`` mean of the selected rows.

    Raises
    ------
    ValueError
        If ``f`` or ``m`` is out of range for ``n``.
    """
    n = stacked.shape[0]
    _check_krum(n, f)
    if not 1 <= m <= n - f:
        raise ValueError(f"multi-krum needs 1 <= M <= n - F, got M={m}, n={n}, F={f}")
    scores = krum_scores(stacked, f)  # (n,)
    order = torch.sort(scores, stable=True).indices  # (n,), ties keep the lower row first
    weights = torch.zeros(n, dtype=stacked.dtype, device=stacked.device)  # (n,)
    weights[order[:m]] = 1.0 / m
    return weights @ stacked  # (d,)


class Krum(FRule):
    """Krum over own and received models (see :func:`krum_rule`); nothing received → a copy of own."""

    name = "krum"
    form: ClassVar[str] = "krum:F with integer F >= 0"

    def rule(self, stacked: torch.Tensor, f: int) -> torch.Tensor:
        return krum_rule(stacked, f)


@dataclass(frozen=True, slots=True)
class MultiKrum(Aggregator):
    """Multi-Krum over own and received models (see :func:`multi_krum_rule`); nothing received → own."""

    name = "multi-krum"
    form: ClassVar[str] = "multi-krum:F,M with integers F >= 0 and M >= 1"

    f: int
    m: int

    def __post_init__(self) -> None:
        if self.f < 0 or self.m < 1:
            raise ValueError(f"bad F={self.f}, M={self.m}: expected {self.form}")

    @classmethod
    def from_args(cls, args: str) -> MultiKrum:
        f, m = split_args(args, cls.form, least=2, most=2)
        return cls(f=parse_int(f, cls.form, minimum=0), m=parse_int(m, cls.form, minimum=1))

    def aggregate(self, own: torch.Tensor, received: Mapping[str, torch.Tensor],
                  context: MergeContext | None = None) -> torch.Tensor:
        if not received:
            return own.clone()
        return multi_krum_rule(stack_inputs(own, received), self.f, self.m)
