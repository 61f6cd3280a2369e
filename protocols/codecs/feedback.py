"""Error feedback with DGC momentum correction: turns any codec into a gradient/increment compressor.

Error feedback (Seide et al. 2014; Karimireddy et al. 2019) keeps what the codec did not send and
adds it to the next input, so nothing is lost, only delayed. With ``momentum = m > 0`` it applies Deep
Gradient Compression's momentum correction and momentum factor masking (Lin et al., ICLR 2018)::

    g ← g · min(1, clip / ||g||₂)          (local gradient clipping, if clip is set)
    u ← m u + g;  v ← v + u                 (momentum correction; with m = 0: v ← v + g)
    payload = codec.encode(v);  ŝ = codec.decode(payload)
    v ← v − ŝ                               (error feedback: the residual keeps what was not sent)
    u ← u · [ŝ = 0]                         (momentum factor masking, m > 0 only)

DGC zeroes ``v`` at the sent coordinates; ``v − ŝ`` is that up to the codec's rounding, which is
kept rather than dropped. Masking uses the coordinates the payload carries non-zero, which is the
sent set for sparse codecs (``topk``). Sparsity warm-up lives in the codec's stream state, which
this object owns and passes to every :meth:`ErrorFeedback.encode`.

With ``momentum = 0`` and no clipping, after any calls ``Σ decode(payloads) + residual == Σ increments``
(up to fp32 rounding of the running sums).
"""

from __future__ import annotations

from typing import Any

import torch

from protocols.codecs import wire
from protocols.codecs.base import Codec, Layout


class ErrorFeedback:
    """One outgoing stream: residual ``v``, momentum ``u`` and the codec's stream state.

    Parameters
    ----------
    codec
        Any :class:`~protocols.codecs.base.Codec`.
    layout
        The layout of every increment.
    momentum
        DGC momentum ``m`` in [0, 1); 0 disables momentum correction and masking.
    clip
        If set (> 0), each increment is scaled to L2 norm at most ``clip`` first.

    Raises
    ------
    ValueError
        ``momentum`` not in [0, 1) or ``clip`` not positive.
    """

    def __init__(self, codec: Codec, layout: Layout, momentum: float = 0.0,
                 clip: float | None = None) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if clip is not None and not clip > 0:
            raise ValueError(f"clip must be positive, got {clip!r}")
        self.codec, self.layout, self.momentum, self.clip = codec, layout, float(momentum), clip
        self.state = codec.new_state(layout)
        self.residual = torch.zeros(layout.numel)
        self.velocity: torch.Tensor | None = torch.zeros(layout.numel) if momentum > 0 else None

    def encode(self, increment: torch.Tensor) -> bytes:
        """Add ``increment`` to the stream and return the payload to send (see the module docstring).

        Raises
        ------
        ValueError
            ``increment`` is not a finite 1-D float32 CPU tensor of ``layout.numel`` elements.
        """
        wire.check_input(increment, self.layout)
        g = increment.detach()
        wire.check_finite_input(g.numpy())
        if self.clip is not None:
            norm = float(torch.linalg.vector_norm(g))
            if norm > self.clip:
                g = g * (self.clip / norm)
        if self.velocity is not None:
            self.velocity.mul_(self.momentum).add_(g)
            self.residual.add_(self.velocity)
        else:
            self.residual.add_(g)
        payload = self.codec.encode(self.residual, self.layout, self.state)
        sent = self.codec.decode(payload, self.layout)
        self.residual.sub_(sent)
        if self.velocity is not None:
            self.velocity.masked_fill_(sent != 0, 0.0)
        return payload

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint: spec, numel, momentum, clip, residual, velocity and the codec's stream state."""
        return {"spec": self.codec.spec, "numel": self.layout.numel, "momentum": self.momentum,
                "clip": self.clip, "residual": self.residual.clone(),
                "velocity": None if self.velocity is None else self.velocity.clone(),
                "codec_state": None if self.state is None else self.state.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` taken from a stream with the same codec spec and layout size.

        Raises
        ------
        ValueError
            The checkpoint is for another codec, size or momentum setting.
        """
        if state["spec"] != self.codec.spec or state["numel"] != self.layout.numel:
            raise ValueError(f"checkpoint is for {state['spec']!r} with {state['numel']} elements, "
                             f"this stream is {self.codec.spec!r} with {self.layout.numel}")
        if (state["velocity"] is None) != (self.velocity is None):
            raise ValueError("checkpoint momentum setting differs from this stream's")
        self.momentum, self.clip = float(state["momentum"]), state["clip"]
        self.residual = state["residual"].clone()
        self.velocity = None if state["velocity"] is None else state["velocity"].clone()
        if self.state is not None:
            self.state.load_state_dict(state["codec_state"])
