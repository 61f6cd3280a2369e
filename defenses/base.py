"""The aggregator contract: merge this node's model with the models its peers sent.

Models are flat 1-D float tensors of one length ``d`` (see ``p2pnode.trainer.flatten_state``).
An aggregator is a pure function of its inputs plus, for stateful rules, an explicit state object
that the caller owns; it never talks to the network.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import torch


@dataclass(frozen=True, slots=True)
class Layer:
    """One tensor of the model inside the flat vector: ``flat[offset : offset + numel].view(shape)``."""

    name: str
    offset: int
    shape: tuple[int, ...]
    is_buffer: bool = False  # BatchNorm running statistics and other non-trainable floats

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        """The slice of ``flat`` (shape ``(d,)`` or ``(n, d)``) that holds this layer, flattened."""
        return flat[..., self.offset : self.offset + self.numel]


@dataclass(slots=True)
class MergeContext:
    """What a merge may need beyond the vectors; the node fills it, pure rules ignore it.

    Attributes
    ----------
    round:
        The merging node's round counter (learning-rate schedules, warm-ups).
    layers:
        The model's tensors inside the flat vector (per-layer rules such as variance correction).
    state:
        This aggregator's explicit state (from :meth:`Aggregator.new_state`), owned by the node so it
        can be checkpointed; ``None`` for stateless rules.
    class_f1:
        Per-class F1 of a flat model on the node's small local validation split, shape ``(C,)``
        (Bristle's integrator); ``None`` when the node has no validation split.
    extras:
        Per-peer side information received with the models this round (e.g. SybilWall records),
        keyed by peer id; opaque to the node.
    """

    round: int = 0
    layers: Sequence[Layer] = ()
    state: Any = None
    class_f1: Callable[[torch.Tensor], torch.Tensor] | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)


class Aggregator(ABC):
    """Merge rule for one gossip round.

    Contract
    --------
    ``aggregate(own, received)`` takes ``own`` of shape ``(d,)`` and a mapping of peer id to
    tensors of shape ``(d,)`` (same dtype and device as ``own``; possibly empty) and returns a *new*
    ``(d,)`` tensor; inputs are never modified. It raises ``ValueError`` when a shape differs or an
    input is not finite, or a precondition of the rule (such as ``2f < n``) does not hold.
    ``context`` carries the round, the layer layout and the rule's explicit state (see
    :class:`MergeContext`); stateless rules ignore it.
    """

    name: ClassVar[str]

    @abstractmethod
    def aggregate(self, own: torch.Tensor, received: Mapping[str, torch.Tensor],
                  context: MergeContext | None = None) -> torch.Tensor:
        """Return the merged model, shape ``(d,)``."""

    @classmethod
    def from_args(cls, args: str) -> Self:
        """Build the rule from the ``ARGS`` of a ``NAME:ARGS`` spec (``""`` when there are none).

        Rules with parameters override this; the default takes none.

        Raises
        ------
        ValueError
            If ``args`` is not what the rule takes; the message gives the expected form.
        """
        if args:
            raise ValueError(f"aggregator {cls.name!r} takes no arguments, got {args!r}")
        return cls()

    def new_state(self) -> Any:
        """A fresh state object for stateful rules (``None`` for stateless ones)."""
        return None


def stack_inputs(own: torch.Tensor, received: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Stack ``own`` (row 0) and the received vectors into an ``(n, d)`` tensor, checking them.

    Raises
    ------
    ValueError
        If ``own`` is not 1-D, a received vector has another shape, or any value is NaN/Inf.
    """
    if own.dim() != 1:
        raise ValueError(f"own model must be a 1-D tensor, got shape {tuple(own.shape)}")
    for peer, vec in received.items():
        if vec.shape != own.shape:
            raise ValueError(f"model from {peer} has shape {tuple(vec.shape)}, expected {tuple(own.shape)}")
    stacked = torch.stack([own, *received.values()])  # (n, d)
    if not torch.isfinite(stacked).all():
        raise ValueError("aggregator inputs must be finite (NaN or Inf found)")
    return stacked
