"""Attacks that hide inside the honest spread, tuned by a line search against the defense in use.

``alie[:F[,Z]]`` — "A Little Is Enough" (Baruch, Baruch & Goldberg, NeurIPS 2019). Send
``μ + z·σ``, with μ and σ the coordinate-wise mean and standard deviation (population, so one
observed model gives σ = 0) of the observed honest models: every coordinate stays within the honest
spread, so median, trimmed mean and Krum accept it, yet all Byzantine inputs push the same way.

``ipm[:F[,EPS]]`` — inner-product manipulation, "Fall of Empires" (Xie, Koyejo & Gupta, UAI 2019).
Send ``−ε·μ``, i.e. ``(1 − η)·μ`` with ``η = 1 + ε``: the merge's inner product with the honest
direction turns negative. In model space a small ε sends a model near zero that robust rules still
accept; a large ε overwhelms a plain mean.

``F`` (default 1) is how many Byzantine inputs the attacker assumes one victim merges. Unless the
coefficient (``Z`` or ``EPS``) is given, it is chosen per round by :func:`line_search` over a fixed
grid against the defense in use (the grid value that moves a simulated victim's merge furthest
from the honest mean). Without a defense to simulate, the papers' defaults apply: ALIE's
``z_max`` for ``n = 1 + m + F`` inputs (own, ``m`` observed, ``F`` Byzantine) and IPM's ``ε = 0.5``.
Before anything is observed, μ is the attacker's own model and σ is zero.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from statistics import NormalDist
from typing import ClassVar, Self

import torch

from defenses.attacks.base import Attack, observed_mean, parse_float, parse_int, split_args
from defenses.attacks.search import line_search
from defenses.base import Aggregator

ALIE_GRID = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
IPM_GRID = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
IPM_DEFAULT_EPS = 0.5


def alie_z_max(n: int, f: int) -> float:
    """Baruch et al.'s ``z_max``: ``s = ⌊n/2 + 1⌋ − f``, ``z_max = Φ⁻¹((n − s) / n)``.

    The probability is clamped to ``[0.5, 0.999]`` so the result is finite and never negative
    (small ``n`` gives ``0``: the attack then sends μ, as the paper's bound allows nothing more).
    """
    if n < 1 or f < 0:
        raise ValueError(f"need n >= 1 and f >= 0, got n={n}, f={f}")
    s = n // 2 + 1 - f
    p = min(max((n - s) / n, 0.5), 0.999)
    return NormalDist().inv_cdf(p)


class _LineSearchAttack(Attack):
    """Shared machinery: ``F`` copies, an optional fixed coefficient, else a line search."""

    grid: ClassVar[tuple[float, ...]]

    def __init__(self, copies: int = 1, coefficient: float | None = None) -> None:
        if copies < 1:
            raise ValueError(f"{self.name}: F (Byzantine inputs per victim) must be >= 1, got {copies}")
        if coefficient is not None and not coefficient > 0:
            raise ValueError(f"{self.name}: the coefficient must be > 0, got {coefficient}")
        self.copies = copies
        self.coefficient = coefficient
        self.last_coefficient: float | None = None  # what the last craft used (benchmarks report it)

    @classmethod
    def from_args(cls, args: str) -> Self:
        parts = split_args(cls.usage, args, 2)
        copies = parse_int(cls.usage, parts[0], minimum=1) if parts else 1
        coefficient = parse_float(cls.usage, parts[1]) if len(parts) > 1 else None
        return cls(copies, coefficient)

    def craft(self, own: torch.Tensor, observed: Sequence[torch.Tensor], *, rng: torch.Generator,
              defense: Aggregator | None = None, start: torch.Tensor | None = None) -> torch.Tensor:
        mu = observed_mean(own, observed)  # (d,)
        sigma = (torch.stack(list(observed)).std(dim=0, correction=0) if observed
                 else torch.zeros_like(own))  # (d,)
        coefficient = self.coefficient
        if coefficient is None and defense is not None:
            coefficient, _ = line_search(defense, own, observed, self.grid,
                                         lambda eta: self.candidate(mu, sigma, eta), self.copies)
        if coefficient is None:
            coefficient = self.default_coefficient(n=1 + len(observed) + self.copies, f=self.copies)
        self.last_coefficient = coefficient
        return self.candidate(mu, sigma, coefficient)

    @abstractmethod
    def candidate(self, mu: torch.Tensor, sigma: torch.Tensor, coefficient: float) -> torch.Tensor:
        """The crafted model for one coefficient (a new tensor)."""

    @abstractmethod
    def default_coefficient(self, *, n: int, f: int) -> float:
        """The paper's coefficient for ``n`` merged inputs of which ``f`` are Byzantine."""


class ALIE(_LineSearchAttack):
    """Send ``μ + z·σ``."""

    name = "alie"
    usage = "alie[:F[,Z]]  (F >= 1 Byzantine inputs per victim, default 1; Z > 0 fixes z, else line search)"
    grid = ALIE_GRID

    def candidate(self, mu: torch.Tensor, sigma: torch.Tensor, coefficient: float) -> torch.Tensor:
        return mu + coefficient * sigma

    def default_coefficient(self, *, n: int, f: int) -> float:
        return alie_z_max(n, f)


class IPM(_LineSearchAttack):
    """Send ``−ε·μ``."""

    name = "ipm"
    usage = ("ipm[:F[,EPS]]  (F >= 1 Byzantine inputs per victim, default 1; "
             "EPS > 0 fixes eps, else line search)")
    grid = IPM_GRID

    def candidate(self, mu: torch.Tensor, sigma: torch.Tensor, coefficient: float) -> torch.Tensor:
        return mu * -coefficient

    def default_coefficient(self, *, n: int, f: int) -> float:
        return IPM_DEFAULT_EPS
