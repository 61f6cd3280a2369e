"""Centered clipping (Karimireddy, He, Jaggi 2021, "Learning from History for Byzantine Robust
Optimization").

Start from own model, ``v_0 = x_0``, and iterate ``L`` times (``L = 3`` by default)

    v_{l+1} = v_l + 1/n · Σ_i clip_τ(x_i − v_l),   clip_τ(z) = z · min(1, τ / ‖z‖),

over all ``n`` inputs (own included). Each step moves ``v`` by at most ``τ``, so ``F`` Byzantine inputs
shift the result by at most ``L·τ·F/n``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from defenses.args import parse_int, parse_positive_float, split_args
from defenses.base import Aggregator, MergeContext, stack_inputs

DEFAULT_ITERATIONS = 3


def centered_clip_rule(stacked: torch.Tensor, tau: float,
                       iterations: int = DEFAULT_ITERATIONS) -> torch.Tensor:
    """Centered clipping of the rows of ``stacked`` around own (row 0).

    Parameters
    ----------
    stacked:
        ``(n, d)`` tensor, row 0 = own model; not modified.
    tau:
        Clipping radius ``τ > 0`` (L2, in model units).
    iterations:
        Number of clipping steps ``L >= 1``.

    Returns
    -------
    torch.Tensor
        ``(d,)``: ``v_L``.

    Raises
    ------
    ValueError
        If ``tau <= 0`` (or not finite) or ``iterations < 1``.
    """
    if not (math.isfinite(tau) and tau > 0) or iterations < 1:
        raise ValueError(f"centered-clip needs TAU > 0 finite and L >= 1, got TAU={tau}, L={iterations}")
    n = stacked.shape[0]
    v = stacked[0].clone()  # (d,)
    for _ in range(iterations):
        # ‖x_i − v‖ in one pass, without an (n, d) difference tensor
        norms = torch.cdist(stacked, v[None], compute_mode="donot_use_mm_for_euclid_dist")[:, 0]  # (n,)
        weights = torch.clamp(tau / norms, max=1.0).div_(n)  # (n,); norm 0 → inf → 1/n
        # v + Σ w_i (x_i − v) = Σ w_i x_i + (1 − Σ w_i) v
        v = (weights @ stacked).add_(v, alpha=float(1.0 - weights.sum()))  # (d,)
    return v


@dataclass(frozen=True, slots=True)
class CenteredClip(Aggregator):
    """Centered clipping around own model (see :func:`centered_clip_rule`); nothing received → own."""

    name = "centered-clip"
    form: ClassVar[str] = "centered-clip:TAU[,L] with float TAU > 0 and integer L >= 1 (default 3)"

    tau: float
    iterations: int = DEFAULT_ITERATIONS

    def __post_init__(self) -> None:
        if not (math.isfinite(self.tau) and self.tau > 0) or self.iterations < 1:
            raise ValueError(f"bad TAU={self.tau}, L={self.iterations}: expected {self.form}")

    @classmethod
    def from_args(cls, args: str) -> CenteredClip:
        fields = split_args(args, cls.form, least=1, most=2)
        tau = parse_positive_float(fields[0], cls.form)
        if len(fields) == 1:
            return cls(tau=tau)
        return cls(tau=tau, iterations=parse_int(fields[1], cls.form, minimum=1))

    def aggregate(self, own: torch.Tensor, received: Mapping[str, torch.Tensor],
                  context: MergeContext | None = None) -> torch.Tensor:
        if not received:
            return own.clone()
        return centered_clip_rule(stack_inputs(own, received), self.tau, self.iterations)
