"""Data-poisoning attacks: the attacker trains on a poisoned copy of its shard and gossips honestly.

- ``label-flip``: every label ``l`` becomes ``C − 1 − l`` (Biggio et al.; the usual "all classes" flip).
- ``targeted-label-flip[:SRC,DST]``: every sample of class SRC is relabelled DST (default 0 → 1);
  the rest of the shard is untouched, so the model stays accurate elsewhere and is hard to spot.
- ``backdoor[:FRACTION[,TARGET]]``: a trigger (see :func:`apply_trigger`) is stamped on a random
  FRACTION of the training samples (default 0.5, drawn with the attack's generator) and those are
  relabelled TARGET (default 0) (Gu et al., "BadNets", 2017). Backdoor success is the share of
  triggered test samples whose true class is not TARGET that the model predicts as TARGET; the
  benchmark builds them with :func:`apply_trigger`.

Each returns new tensors; the inputs are not modified. Their ``craft`` sends the attacker's own
(poison-trained) model unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

import torch

from defenses.attacks.base import Attack, parse_float, parse_int, split_args
from defenses.base import Aggregator

TRIGGER_SIZE = 3  # a 3×3 patch for images, 3 features for vectors


def apply_trigger(x: torch.Tensor, value: float | None = None) -> torch.Tensor:
    """Return a copy of the batch ``x`` with the backdoor trigger stamped on every sample.

    Images, shape ``(N, H, W)`` or ``(N, C, H, W)``: the bottom-right 3×3 patch of every channel is
    set to ``value``. Vectors, shape ``(N, d)``: the last 3 features are set to ``value``. ``value``
    defaults to ``x.max()``, the brightest value in the batch, so the patch is "white" in whatever
    normalisation the task uses (the same for train and test splits that both hold a white pixel).
    Deterministic: the same ``x`` and ``value`` give the same result.

    Raises
    ------
    ValueError
        If ``x`` is not a batch (fewer than 2 dimensions) or too small for the trigger.
    """
    if x.dim() < 2:
        raise ValueError(f"expected a batch (N, d) or (N, [C,] H, W), got shape {tuple(x.shape)}")
    fill = float(x.max()) if value is None else value
    out = x.clone()
    if x.dim() == 2:  # (N, d)
        if x.shape[1] < TRIGGER_SIZE:
            raise ValueError(f"vectors need at least {TRIGGER_SIZE} features, got {x.shape[1]}")
        out[:, -TRIGGER_SIZE:] = fill
    else:  # (N, [C,] H, W)
        if min(x.shape[-2:]) < TRIGGER_SIZE:
            raise ValueError(f"images need at least {TRIGGER_SIZE}x{TRIGGER_SIZE} pixels, "
                             f"got shape {tuple(x.shape)}")
        out[..., -TRIGGER_SIZE:, -TRIGGER_SIZE:] = fill
    return out


def _check_class(name: str, label: int, num_classes: int) -> None:
    if not 0 <= label < num_classes:
        raise ValueError(f"{name}: class {label} does not exist (the task has {num_classes} classes)")


class _HonestSender(Attack):
    """Data poisoning only: send the own model as an honest node would."""

    def craft(self, own: torch.Tensor, observed: Sequence[torch.Tensor], *, rng: torch.Generator,
              defense: Aggregator | None = None, start: torch.Tensor | None = None) -> torch.Tensor:
        return own.clone()


class LabelFlip(_HonestSender):
    """Train on ``l → C − 1 − l``."""

    name = "label-flip"
    usage = "label-flip  (no arguments)"

    def poison_data(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, *,
                    rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return x, (num_classes - 1) - y


class TargetedLabelFlip(_HonestSender):
    """Train with class ``source`` relabelled ``target``."""

    name = "targeted-label-flip"
    usage = "targeted-label-flip[:SRC,DST]  (classes, default 0,1)"

    def __init__(self, source: int = 0, target: int = 1) -> None:
        if source < 0 or target < 0 or source == target:
            raise ValueError(f"{self.name}: need two different classes >= 0, got {source} -> {target}")
        self.source, self.target = source, target

    @classmethod
    def from_args(cls, args: str) -> Self:
        parts = split_args(cls.usage, args, 2)
        if len(parts) == 1:
            raise ValueError(f"bad attack arguments {args!r}: give both SRC and DST; usage: {cls.usage}")
        return cls(*(parse_int(cls.usage, p) for p in parts))

    def poison_data(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, *,
                    rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        _check_class(self.name, self.source, num_classes)
        _check_class(self.name, self.target, num_classes)
        return x, torch.where(y == self.source, torch.full_like(y, self.target), y)


class Backdoor(_HonestSender):
    """Stamp the trigger on a ``fraction`` of the shard and relabel those samples ``target``."""

    name = "backdoor"
    usage = "backdoor[:FRACTION[,TARGET]]  (0 < FRACTION <= 1, default 0.5; class, default 0)"

    def __init__(self, fraction: float = 0.5, target: int = 0) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"{self.name}: fraction must be in (0, 1], got {fraction}")
        if target < 0:
            raise ValueError(f"{self.name}: target class must be >= 0, got {target}")
        self.fraction, self.target = fraction, target

    @classmethod
    def from_args(cls, args: str) -> Self:
        parts = split_args(cls.usage, args, 2)
        fraction = parse_float(cls.usage, parts[0]) if parts else 0.5
        target = parse_int(cls.usage, parts[1]) if len(parts) > 1 else 0
        return cls(fraction, target)

    def poisoned_indices(self, n: int, rng: torch.Generator) -> torch.Tensor:
        """The ``round(fraction · n)`` sample indices to poison, drawn from ``rng`` (CPU int64)."""
        return torch.randperm(n, generator=rng, device=rng.device)[: round(self.fraction * n)].cpu()

    def poison_data(self, x: torch.Tensor, y: torch.Tensor, num_classes: int, *,
                    rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        _check_class(self.name, self.target, num_classes)
        idx = self.poisoned_indices(len(y), rng).to(y.device)
        x, y = x.clone(), y.clone()
        x[idx] = apply_trigger(x[idx], value=float(x.max()))  # brightest value of the whole shard
        y[idx] = self.target
        return x, y
