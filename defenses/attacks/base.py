"""The attack contract: what a Byzantine node sends, and how it poisons its own training data.

We gossip *models*, not gradients, so every model-poisoning attack here works in model space: it
crafts the flat vector (shape ``(d,)``) that the attacker sends instead of its own model, usually
from ``observed``, the honest models it received in the last round. Data-poisoning attacks rewrite
the attacker's training shard once, before training starts, and then gossip honestly.

This package never imports ``p2pnode`` or ``protocols``: an attack is a pure function of tensors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar, Self

import torch

from defenses.base import Aggregator


class Attack(ABC):
    """One Byzantine behaviour, configured by ``--attack NAME[:ARGS]``.

    Contract
    --------
    ``craft(own, observed, rng=..., defense=...)`` takes the attacker's own model ``own`` of shape
    ``(d,)`` and the models it observed (each ``(d,)``, same dtype and device; possibly empty) and
    returns a *new* ``(d,)`` tensor to send; inputs are never modified. ``defense`` is the merge
    rule the swarm runs (adaptive attacks tune themselves against it; others ignore it). ``start``
    is the attacker's model before this round's local training (``own`` is after it), so
    ``own - start`` is the attacker's own update; ``None`` when the caller does not track it.

    ``poison_data(x, y, num_classes, rng=...)`` returns the training set the attacker trains on,
    ``x`` of shape ``(n, *input_shape)`` and ``y`` of shape ``(n,)`` int64, with the same ``n``; the
    inputs are not modified. The default returns them unchanged.

    Construction (and :meth:`from_args`) raises ``ValueError`` for an invalid option.
    """

    name: ClassVar[str]
    usage: ClassVar[str]  # e.g. "sign-flip[:SCALE]", shown in error messages
    trains: ClassVar[bool] = True  # False: the attacker never runs local SGD (free-rider)
    # True: the attacker merges the models of honest peers (the plain mean, its allies left out) like an
    # honest node, so it stays aligned with the swarm and its crafted update lands where it hurts.
    # False: it never adopts honest models and keeps training on its own (poisoned) data.
    merges: ClassVar[bool] = False

    @classmethod
    def from_args(cls, args: str) -> Self:
        """Build from the ``ARGS`` part of ``NAME[:ARGS]`` (here: none allowed)."""
        split_args(cls.usage, args, 0)
        return cls()

    @abstractmethod
    def craft(self, own: torch.Tensor, observed: Sequence[torch.Tensor], *, rng: torch.Generator,
              defense: Aggregator | None = None, start: torch.Tensor | None = None) -> torch.Tensor:
        """Return the model to send, shape ``(d,)``."""

    def poison_data(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, *,
                    rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the (possibly poisoned) training set; the default leaves it unchanged."""
        return x, y

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def observed_mean(own: torch.Tensor, observed: Sequence[torch.Tensor]) -> torch.Tensor:
    """μ: the coordinate-wise mean of the observed models, or a copy of ``own`` if none were observed."""
    if not observed:
        return own.clone()
    return torch.stack(list(observed)).mean(dim=0)  # (m, d) -> (d,)


def gaussian_like(t: torch.Tensor, sigma: float, rng: torch.Generator) -> torch.Tensor:
    """``N(0, σ²)`` noise shaped like ``t``, drawn from ``rng`` (on its device) and moved to ``t``'s."""
    noise = torch.randn(t.shape, generator=rng, dtype=t.dtype, device=rng.device)
    return noise.to(t.device) * sigma


def split_args(usage: str, args: str, max_count: int) -> list[str]:
    """Split ``"A,B"`` into at most ``max_count`` non-empty strings; ValueError naming ``usage`` if not."""
    parts = [p.strip() for p in args.split(",")] if args else []
    if len(parts) > max_count or any(not p for p in parts):
        raise ValueError(f"bad attack arguments {args!r}; usage: {usage}")
    return parts


def parse_float(usage: str, text: str, *, minimum: float = 0.0, strict: bool = True) -> float:
    """A float ``> minimum`` (``>=`` if not ``strict``); ValueError naming ``usage`` otherwise."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"bad attack argument {text!r}: not a number; usage: {usage}") from None
    if value != value or value in (float("inf"), float("-inf")) or value < minimum or (
            strict and value == minimum):
        bound = ">" if strict else ">="
        raise ValueError(f"bad attack argument {text!r}: must be {bound} {minimum}; usage: {usage}")
    return value


def parse_int(usage: str, text: str, *, minimum: int = 0) -> int:
    """An integer ``>= minimum``; ValueError naming ``usage`` otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"bad attack argument {text!r}: not an integer; usage: {usage}") from None
    if value < minimum:
        raise ValueError(f"bad attack argument {text!r}: must be >= {minimum}; usage: {usage}")
    return value
