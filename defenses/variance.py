"""Variance-corrected averaging (Tian, Chen, Gupta, Pouwelse, "Vanishing Variance Problem in Fully
Decentralized Neural-Network Systems").

Averaging uncorrelated models shrinks each layer's weight variance below what the initialisation
established. After any merge ``A`` of the models ``M_k`` (the ``(n, d)`` stack, own = row 0), rescale
each layer ``ℓ`` with more than one element that is not a buffer (BatchNorm statistics) around its
mean so that its variance matches the inputs' mean variance:

    σ²_t = mean_k Var(M_k[ℓ]),  μ = mean(A[ℓ]),  A[ℓ] ← μ + (A[ℓ] − μ) · sqrt(σ²_t / (Var(A[ℓ]) + ε)),

then mix with the uncorrected merge, ``A ← (1 − mix) · A + mix · A_corrected``. Variances are
population variances over the layer's elements. A layer whose merge is exactly constant
(``Var(A[ℓ]) = 0``) has no spread to rescale and is left as it is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from defenses.base import Aggregator, Layer, MergeContext, stack_inputs


def _check(merged: torch.Tensor, stack: torch.Tensor, layers: Sequence[Layer], mix: float,
           eps: float) -> None:
    if merged.dim() != 1 or stack.dim() != 2 or stack.shape[1] != merged.shape[0]:
        raise ValueError(f"variance correction needs merged (d,) and stack (n, d), got "
                         f"{tuple(merged.shape)} and {tuple(stack.shape)}")
    if not 0.0 <= mix <= 1.0 or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"variance correction needs 0 <= mix <= 1 and eps >= 0, got mix={mix}, eps={eps}")
    d = merged.shape[0]
    for layer in layers:
        if layer.offset < 0 or layer.offset + layer.numel > d:
            raise ValueError(f"layer {layer.name!r} [{layer.offset}, {layer.offset + layer.numel}) "
                             f"lies outside the model vector of length {d}")


def variance_correct(merged: torch.Tensor, stack: torch.Tensor, layers: Sequence[Layer], *,
                     include_self: bool = True, mix: float = 1.0, eps: float = 1e-12) -> torch.Tensor:
    """Rescale each weight layer of ``merged`` to the mean per-layer variance of the merged models.

    Parameters
    ----------
    merged:
        ``(d,)`` result of the merge; not modified.
    stack:
        ``(n, d)`` models that were merged, row 0 = own; not modified.
    layers:
        Layer layout of the flat vector; layers with ``numel <= 1`` or ``is_buffer`` are copied as
        they are.
    include_self:
        Whether own model (row 0) counts towards the target variance ``σ²_t``.
    mix:
        Weight of the corrected layer, ``0 <= mix <= 1`` (0: no correction, 1: full correction).
    eps:
        ``ε >= 0`` added to ``Var(A[ℓ])`` in the denominator.

    Returns
    -------
    torch.Tensor
        ``(d,)`` corrected copy of ``merged``.

    Raises
    ------
    ValueError
        On mismatched shapes, a layer outside the vector, ``mix`` or ``eps`` out of range, or no row
        left for the target (``include_self=False`` with a one-row stack).
    """
    _check(merged, stack, layers, mix, eps)
    rows = stack if include_self else stack[1:]  # (n or n − 1, d)
    if rows.shape[0] == 0:
        raise ValueError("variance correction needs at least one model for the target variance")
    out = merged.clone()  # (d,)
    if mix == 0:
        return out
    for layer in layers:
        if layer.numel <= 1 or layer.is_buffer:
            continue
        a = layer.view(out)  # (numel,), a view into out
        var_a = torch.var(a, correction=0)
        if var_a == 0:
            continue
        target = torch.var(layer.view(rows), dim=1, correction=0).mean()  # mean_k Var(M_k[ℓ])
        scale = torch.sqrt(target / (var_a + eps))
        mu = a.mean()
        # (1 − mix)·A + mix·(μ + (A − μ)·s) = μ + (A − μ)·(1 + mix·(s − 1))
        a.sub_(mu).mul_(1.0 + mix * (scale - 1.0)).add_(mu)
    return out


class VarianceCorrected(Aggregator):
    """Any aggregator followed by :func:`variance_correct` on its result.

    Needs ``context.layers`` (the model's layer layout) at every merge and raises ``ValueError``
    without it. With nothing received the inner result is returned unchanged (one model has nothing
    to correct). The state is the inner aggregator's.
    """

    name: ClassVar[str] = "variance-corrected"

    def __init__(self, inner: Aggregator, *, include_self: bool = True, mix: float = 1.0) -> None:
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"variance correction needs 0 <= mix <= 1, got {mix}")
        self.inner = inner
        self.include_self = include_self
        self.mix = mix

    def __repr__(self) -> str:
        return f"VarianceCorrected({self.inner!r}, include_self={self.include_self}, mix={self.mix})"

    def aggregate(self, own: torch.Tensor, received: Mapping[str, torch.Tensor],
                  context: MergeContext | None = None) -> torch.Tensor:
        if context is None or not context.layers:
            raise ValueError("variance correction needs the model's layer layout: pass a MergeContext "
                             "with layers (the node fills it from the model)")
        merged = self.inner.aggregate(own, received, context)
        if not received:
            return merged
        stack = stack_inputs(own, received)  # (n, d)
        return variance_correct(merged, stack, context.layers, include_self=self.include_self, mix=self.mix)

    def new_state(self) -> Any:
        return self.inner.new_state()
