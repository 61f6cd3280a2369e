"""Nearest-neighbour averaging, NNA / MoNNA (Farhadkhani, Guerraoui, Gupta, Hoang, Pinot, Stephan
2023, "Robust Collaborative Learning with Linear Gradient Overhead").

Node ``i`` holds ``n`` vectors: its own half-step model ``θ½`` (row 0) and the ``n − 1`` it received.
It keeps own plus the ``n − F − 1`` received vectors nearest to own in L2 and averages them:

    θ_i ← 1/(n − F) · Σ_{j ∈ N_i} x_j,   N_i = {0} ∪ argmin-(n−F−1)_{j ≥ 1} ‖x_j − θ½‖.

Own is always kept (a received copy of own cannot push it out). When ``F`` is larger than the
round's received count allows (``n − F < 1``), only own is kept and the result is own: the rule
never fails for lack of inputs, it just stops trusting peers. Ties at the cut-off are broken by
``torch.topk``. Cost: ``n`` distances from own and one weighted sum, ``O(n d)`` — no pairwise matrix.

MoNNA's other two ingredients belong to local training, not to the merge: Polyak momentum
``m ← β m + (1 − β) g`` with half-step ``θ½ = θ − γ_t m`` (:func:`monna_momentum`), and the
learning-rate schedule ``γ_t = γ0 / (1 + t/τ)`` (:func:`monna_lr`).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from defenses.frule import FRule


def nna_rule(stacked: torch.Tensor, f: int) -> torch.Tensor:
    """Mean of own (row 0) and the received rows nearest to it, dropping the ``f`` farthest.

    Parameters
    ----------
    stacked:
        ``(n, d)`` tensor, row 0 = own model; not modified.
    f:
        Rows dropped, ``f >= 0``; ``max(1, n − f)`` rows are averaged (own always among them).

    Returns
    -------
    torch.Tensor
        ``(d,)`` mean of the kept rows.

    Raises
    ------
    ValueError
        If ``f < 0``.
    """
    if f < 0:
        raise ValueError(f"nna needs F >= 0, got F={f}")
    n = stacked.shape[0]
    keep_received = max(0, n - f - 1)
    if keep_received == 0:
        return stacked[0].clone()
    own = stacked[0]
    dist = torch.cdist(stacked[1:], own[None], compute_mode="donot_use_mm_for_euclid_dist")[:, 0]  # (n − 1,)
    nearest = torch.topk(dist, keep_received, largest=False, sorted=False).indices + 1  # (n − f − 1,)
    weights = torch.zeros(n, dtype=stacked.dtype, device=stacked.device)  # (n,)
    weights[0] = 1.0
    weights[nearest] = 1.0
    weights /= keep_received + 1
    return weights @ stacked  # (d,)


def monna_lr(gamma0: float, t: int, tau: float) -> float:
    """MoNNA's learning-rate schedule ``γ_t = γ0 / (1 + t/τ)``.

    Parameters
    ----------
    gamma0:
        Initial learning rate ``γ0 > 0``.
    t:
        Step counter ``t >= 0`` (local SGD steps taken so far).
    tau:
        Decay time ``τ > 0``, in steps: ``γ`` halves at ``t = τ``.

    Raises
    ------
    ValueError
        If an argument is out of range.
    """
    if not (math.isfinite(gamma0) and gamma0 > 0) or t < 0 or not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"monna_lr needs gamma0 > 0, t >= 0, tau > 0; got {gamma0}, {t}, {tau}")
    return gamma0 / (1.0 + t / tau)


def monna_momentum(m: torch.Tensor, g: torch.Tensor, beta: float) -> torch.Tensor:
    """MoNNA's Polyak momentum ``β m + (1 − β) g`` as a new tensor (``m`` and ``g`` untouched).

    Raises
    ------
    ValueError
        If ``beta`` is not in ``[0, 1)`` or the shapes differ.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"momentum beta must be in [0, 1), got {beta}")
    if m.shape != g.shape:
        raise ValueError(f"momentum shape {tuple(m.shape)} differs from gradient shape {tuple(g.shape)}")
    return torch.lerp(g, m, beta)  # g + β (m − g) = β m + (1 − β) g


class NNA(FRule):
    """Nearest-neighbour averaging around own model (see :func:`nna_rule`); nothing received → own."""

    name = "nna"
    form: ClassVar[str] = "nna:F with integer F >= 0"

    def rule(self, stacked: torch.Tensor, f: int) -> torch.Tensor:
        return nna_rule(stacked, f)
