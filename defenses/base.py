"""The aggregator contract: merge this node's model with the models its peers sent.

Models are flat 1-D float tensors of one length ``d`` (see ``p2pnode.trainer.flatten_state``).
An aggregator is a pure function of its inputs plus, for stateful rules, an explicit state object
that the caller owns; it never talks to the network.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import torch


class Aggregator(ABC):
    """Merge rule for one gossip round.

    Contract
    --------
    ``aggregate(own, received)`` takes ``own`` of shape ``(d,)`` and a mapping of peer id to
    tensors of shape ``(d,)`` (same dtype and device as ``own``; possibly empty) and returns a *new*
    ``(d,)`` tensor; inputs are never modified. It raises ``ValueError`` when a shape differs or an
    input is not finite.
    """

    name: ClassVar[str]

    @abstractmethod
    def aggregate(self, own: torch.Tensor, received: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Return the merged model, shape ``(d,)``."""


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
