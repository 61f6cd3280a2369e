"""Sybil attack: one attacker runs many identities that send near-identical poisoned models.

``sybil[:SRC,DST[,NOISE]]`` (defaults 0, 1, 1e-3). Each identity trains on the targeted label flip
SRC → DST (:class:`~defenses.attacks.data_poisoning.TargetedLabelFlip`) and sends its own model plus
a tiny ``N(0, NOISE² I)``, so the identities are near-identical but not bit-identical (an exact-
duplicate filter must not be enough to stop them). This is the threat model of SybilWall
(Werthenbach & Pouwelse): more identities must not give the attacker more influence.

How the identities are run: ``p2pnode swarm --byzantine K --attack sybil --sybils M`` starts M node
processes for the attacker, each with its own key (so its own peer id) but the same attack, the same
data shard and the same seed; they therefore train the same poisoned model, and each adds its own
noise (the crafting generator is seeded from the peer id). This class is what one identity runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

import torch

from defenses.attacks.base import gaussian_like, parse_float, parse_int, split_args
from defenses.attacks.data_poisoning import TargetedLabelFlip
from defenses.base import Aggregator


class Sybil(TargetedLabelFlip):
    """Targeted label flip, sending own model + tiny noise."""

    name = "sybil"
    usage = "sybil[:SRC,DST[,NOISE]]  (classes, default 0,1; NOISE > 0, default 1e-3)"

    def __init__(self, source: int = 0, target: int = 1, noise: float = 1e-3) -> None:
        super().__init__(source, target)
        if not noise > 0:
            raise ValueError(f"{self.name}: noise must be > 0, got {noise}")
        self.noise = noise

    @classmethod
    def from_args(cls, args: str) -> Self:
        parts = split_args(cls.usage, args, 3)
        if len(parts) == 1:
            raise ValueError(f"bad attack arguments {args!r}: give both SRC and DST; usage: {cls.usage}")
        classes = [parse_int(cls.usage, p) for p in parts[:2]]
        noise = [parse_float(cls.usage, parts[2])] if len(parts) == 3 else []
        return cls(*classes, *noise)

    def craft(self, own: torch.Tensor, observed: Sequence[torch.Tensor], *, rng: torch.Generator,
              defense: Aggregator | None = None) -> torch.Tensor:
        return own + gaussian_like(own, self.noise, rng)
