"""Sybil attack: one attacker runs many identities that send near-identical, boosted poisoned models.

``sybil[:SRC,DST[,BOOST[,NOISE]]]`` (defaults 0, 1, 1, 1e-3). Each identity trains on the targeted
label flip SRC → DST (:class:`~defenses.attacks.data_poisoning.TargetedLabelFlip`) and stays merged
with the honest swarm: it averages the honest models it receives (its fellow identities left out,
see ``merges``), so its poisoned update starts from the model the honest nodes hold. What it sends
is that starting point plus its update scaled by BOOST (the "boosting" of Bhagoji et al., 2019, and
model replacement of Bagdasaryan et al., 2020), plus a tiny ``N(0, NOISE² I)`` so the identities are
near-identical but not bit-identical (an exact-duplicate filter must not be enough to stop them):

    sent = start + BOOST · (own − start) + noise,   own = start after H poisoned local steps.

The attacker's shard is made SRC-rich before the flip: half of its samples are replaced by SRC
samples drawn (with replacement) from the shard's own SRC samples, so its update teaches SRC → DST
rather than being diluted by the other classes (an attacker chooses its data; shapes are kept).

With the default BOOST = 1 an identity simply sends its poison-trained model. Boosting makes every
Sybil update larger: measured on fashion-mnist (16 honest + 15 Sybils) BOOST = 4 drove the honest
models to chance under ``mean`` *and* under ``sybilwall`` (whose weights judge the direction of
updates, not their size), while BOOST = 1 is a pure targeted attack (44% of class 0 read as 1 under
``mean``). The benchmark uses the default.

This is the threat model of SybilWall (Werthenbach & Pouwelse): under a plain mean every extra
identity adds one more boosted copy of the targeted update, so more identities give the attacker
more influence; a Sybil-resilient rule must not let it.

How the identities are run: ``p2pnode swarm --attack sybil --sybils M`` starts M node processes for
the attacker, each with its own key (so its own peer id) but the same attack, the same data shard
and the same seed, and tells each the others' peer ids (``--allies``). This class is what one
identity runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

import torch

from defenses.attacks.base import gaussian_like, parse_float, parse_int, split_args
from defenses.attacks.data_poisoning import TargetedLabelFlip
from defenses.base import Aggregator


class Sybil(TargetedLabelFlip):
    """Targeted label flip from the honest consensus, update boosted, plus tiny per-identity noise."""

    name = "sybil"
    usage = ("sybil[:SRC,DST[,BOOST[,NOISE]]]  (classes, default 0,1; BOOST > 0, default 1; "
             "NOISE > 0, default 1e-3)")
    merges = True

    def __init__(self, source: int = 0, target: int = 1, boost: float = 1.0, noise: float = 1e-3) -> None:
        super().__init__(source, target)
        if not boost > 0:
            raise ValueError(f"{self.name}: boost must be > 0, got {boost}")
        if not noise > 0:
            raise ValueError(f"{self.name}: noise must be > 0, got {noise}")
        self.boost = boost
        self.noise = noise

    @classmethod
    def from_args(cls, args: str) -> Self:
        parts = split_args(cls.usage, args, 4)
        if len(parts) == 1:
            raise ValueError(f"bad attack arguments {args!r}: give both SRC and DST; usage: {cls.usage}")
        classes = [parse_int(cls.usage, p) for p in parts[:2]]
        scales = [parse_float(cls.usage, p) for p in parts[2:]]
        return cls(*classes, *scales)

    def poison_data(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, *,
                    rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Half the shard becomes resampled SRC samples, then every SRC sample is relabelled DST.

        A shard without any SRC sample is only relabelled (there is nothing to resample).
        """
        source = (y == self.source).nonzero().flatten().cpu()
        if len(source):
            x, y = x.clone(), y.clone()
            slots = torch.randperm(len(y), generator=rng, device=rng.device)[: len(y) // 2].cpu()
            picks = source[torch.randint(len(source), (len(slots),), generator=rng, device=rng.device).cpu()]
            x[slots.to(x.device)], y[slots.to(y.device)] = x[picks.to(x.device)], y[picks.to(y.device)]
        return super().poison_data(x, y, num_classes, rng=rng)

    def craft(self, own: torch.Tensor, observed: Sequence[torch.Tensor], *, rng: torch.Generator,
              defense: Aggregator | None = None, start: torch.Tensor | None = None) -> torch.Tensor:
        base = own if start is None else start
        return base + self.boost * (own - base) + gaussian_like(own, self.noise, rng)
