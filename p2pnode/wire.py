"""What a model message carries: the full fp32 model (``--codec dense``) or a compressed difference
against a per-edge reference (every other codec; :mod:`protocols.replicas`).

:class:`ModelWire` hides the difference from the round loop. With a compressed codec the receiver's
view of a peer ``j`` is the reference ``r_ji``, which lags ``θ_j`` by what the codec has not sent yet,
and our own reference ``r_ij`` (what ``j`` holds of us) lags ``θ_i`` the same way. The merge therefore
takes ``θ_i + (r_ji − r_ij)`` as ``j``'s input ("lag-compensated", as CHOCO-SGD gossips the difference of
public copies, Koloskova et al. 2019): for a lossless codec it is exactly ``θ_j``, and a lossy one
does not drag our model back towards the stale parts of both references. :meth:`ModelWire.inputs`
turns what was received into those inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from protocols.codecs import Layout
from protocols.model import decode_model, encode_model
from protocols.replicas import Outgoing, RefMismatch, ReplicaBook


@dataclass(frozen=True, slots=True)
class Received:
    """A decoded model message: ``view`` (the peer's model, or our reference of it; ``None`` when it
    could not be applied) and ``ack`` (compressed only: what the peer holds of our stream)."""

    view: torch.Tensor | None
    ack: bytes | None = None


class ModelWire:
    """Encodes and decodes the model part of exchange messages for one node."""

    def __init__(self, codec: str, *, layout: Layout, init: torch.Tensor, spec_fingerprint: bytes,
                 capacity: int = 32) -> None:
        self.codec = codec
        self.numel = layout.numel
        self.spec_fingerprint = spec_fingerprint
        self.book = None if codec == "dense" else ReplicaBook(
            codec, layout, init, spec_fingerprint=spec_fingerprint, capacity=capacity)
        self.resyncs = 0  # messages whose base we did not hold (the peer sends a snapshot next)

    @property
    def compressed(self) -> bool:
        return self.book is not None

    def encode(self, peer: str, model: torch.Tensor, *, round: int,
               peer_ack: bytes | None = None) -> tuple[bytes, Outgoing | None]:
        """The payload for ``peer`` and, when compressed, the pending reference change (see ReplicaBook)."""
        if self.book is None:
            return encode_model(model, fingerprint=self.spec_fingerprint, round=round), None
        out = self.book.encode(peer, model, round=round, peer_ack=peer_ack)
        return out.payload, out

    def decode(self, peer: str, payload: bytes) -> Received:
        """Decode ``peer``'s payload; ProtocolError if malformed. A reference mismatch is not an error:
        it returns no view (and the ack, still valid) and is counted in ``resyncs``."""
        if self.book is None:
            flat = decode_model(payload, expected_numel=self.numel, fingerprint=self.spec_fingerprint).flat
            return Received(flat)
        try:
            incoming = self.book.decode(peer, payload)
        except RefMismatch as exc:
            self.resyncs += 1
            return Received(None, exc.ack)
        return Received(incoming.view, incoming.ack)

    def keep(self, peer: str, view: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """What to keep until the merge for ``peer``'s ``view``: the view itself for dense messages; when
        compressed the offset ``r_ji − r_ij`` (lag-compensated, module docstring), or ``view − own``
        when we hold no reference of our own stream to the peer."""
        if self.book is None:
            return view
        _, ours = self.book.reference_of(peer)
        return view - (ours if ours is not None else own)

    def inputs(self, sent: torch.Tensor, kept: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The merge inputs from what :meth:`keep` returned: views, or ``sent + offset``."""
        if self.book is None:
            return kept
        return {peer: sent + offset for peer, offset in kept.items()}
