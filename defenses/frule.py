"""Base class of the rules that take one argument: F, the number of Byzantine inputs they tolerate."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Self

import torch

from defenses.args import parse_int, split_args
from defenses.base import Aggregator, MergeContext, stack_inputs


@dataclass(frozen=True, slots=True)
class FRule(Aggregator):
    """``NAME:F`` with integer ``F >= 0``; nothing received → a copy of own; else ``rule(stack, F)``."""

    form: ClassVar[str]

    f: int

    def __post_init__(self) -> None:
        if self.f < 0:
            raise ValueError(f"bad F={self.f}: expected {self.form}")

    @classmethod
    def from_args(cls, args: str) -> Self:
        (f,) = split_args(args, cls.form, least=1, most=1)
        return cls(f=parse_int(f, cls.form, minimum=0))

    def aggregate(self, own: torch.Tensor, received: Mapping[str, torch.Tensor],
                  context: MergeContext | None = None) -> torch.Tensor:
        if not received:
            return own.clone()
        return self.rule(stack_inputs(own, received), self.f)

    @abstractmethod
    def rule(self, stacked: torch.Tensor, f: int) -> torch.Tensor:
        """The pure rule on an ``(n, d)`` stack (row 0 = own); returns ``(d,)``."""
