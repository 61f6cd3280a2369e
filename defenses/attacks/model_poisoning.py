"""Simple model-poisoning attacks in model space: sign flip, Gaussian noise, free-riding.

μ below is the mean of the models the attacker observed last round (:func:`observed_mean`); before
it has observed any, μ is its own model.

- ``sign-flip[:SCALE]``: send ``−SCALE · μ`` (default 1). In gradient space a sign flip sends ``−g``;
  in model space the analogue that hurts most simply is the negated honest model: averaged in, it
  cancels honest weights (``mean`` with one flipped input out of n shrinks the model by ``2/n``
  each round and pulls it towards the opposite of what the swarm learned).
- ``gaussian[:SIGMA]``: send ``μ + N(0, SIGMA² I)`` (default σ = 1) — the honest mean drowned in
  noise, so the attacker needs no training to look like a peer of the swarm.
- ``free-rider``: send back the most recently observed model (its own before it has observed any)
  and never train: it contributes nothing and takes the swarm's model for free.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

import torch

from defenses.attacks.base import Attack, gaussian_like, observed_mean, parse_float, split_args
from defenses.base import Aggregator


class SignFlip(Attack):
    """Send ``−scale · μ``."""

    name = "sign-flip"
    usage = "sign-flip[:SCALE]  (SCALE > 0, default 1)"

    def __init__(self, scale: float = 1.0) -> None:
        if not scale > 0:
            raise ValueError(f"sign-flip scale must be > 0, got {scale}")
        self.scale = scale

    @classmethod
    def from_args(cls, args: str) -> Self:
        parts = split_args(cls.usage, args, 1)
        return cls(*(parse_float(cls.usage, p) for p in parts))

    def craft(self, own: torch.Tensor, observed: Sequence[torch.Tensor], *, rng: torch.Generator,
              defense: Aggregator | None = None, start: torch.Tensor | None = None) -> torch.Tensor:
        return observed_mean(own, observed).mul_(-self.scale)


class GaussianNoise(Attack):
    """Send ``μ + N(0, σ² I)``."""

    name = "gaussian"
    usage = "gaussian[:SIGMA]  (SIGMA > 0, default 1)"

    def __init__(self, sigma: float = 1.0) -> None:
        if not sigma > 0:
            raise ValueError(f"gaussian sigma must be > 0, got {sigma}")
        self.sigma = sigma

    @classmethod
    def from_args(cls, args: str) -> Self:
        parts = split_args(cls.usage, args, 1)
        return cls(*(parse_float(cls.usage, p) for p in parts))

    def craft(self, own: torch.Tensor, observed: Sequence[torch.Tensor], *, rng: torch.Generator,
              defense: Aggregator | None = None, start: torch.Tensor | None = None) -> torch.Tensor:
        mu = observed_mean(own, observed)
        return mu.add_(gaussian_like(mu, self.sigma, rng))


class FreeRider(Attack):
    """Echo the most recently observed model; never train."""

    name = "free-rider"
    usage = "free-rider  (no arguments)"
    trains = False

    def craft(self, own: torch.Tensor, observed: Sequence[torch.Tensor], *, rng: torch.Generator,
              defense: Aggregator | None = None, start: torch.Tensor | None = None) -> torch.Tensor:
        return (observed[-1] if observed else own).clone()
