"""``dense``: the flat fp32 vector as is (lossless).

Wire: 16-byte header (param 0) + ``d`` little-endian float32; ``wire_bytes = 16 + 4 d``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from protocols.codecs import wire
from protocols.codecs.base import Codec, Layout


def no_args(name: str, args: list[str]) -> None:
    """Raise ``ValueError`` if a codec that takes no arguments got some."""
    if args:
        raise ValueError(f"codec {name!r} takes no arguments, got {':'.join(args)!r}")


class DenseCodec(Codec):
    """Lossless fp32. ``wire_bytes = 16 + 4 d``; decode refuses NaN/Inf."""

    name: ClassVar[str] = "dense"
    codec_id: ClassVar[int] = 1
    usage: ClassVar[str] = "dense"

    def __init__(self) -> None:
        self.spec = "dense"

    @classmethod
    def from_args(cls, args: list[str]) -> DenseCodec:
        no_args(cls.name, args)
        return cls()

    def encode(self, x: torch.Tensor, layout: Layout, state: Any = None) -> bytes:
        wire.check_input(x, layout)
        if wire.off_host(x):  # checked there, then copied once, straight into the payload
            wire.check_finite_tensor(x)
            return wire.pack(wire.header(self.codec_id, 0, layout), x.detach())
        array = wire.to_host(x).detach().contiguous().numpy()
        wire.check_finite_input(array)
        return wire.join(wire.header(self.codec_id, 0, layout), wire.to_le_bytes(array).data)

    def decode(self, data: bytes, layout: Layout, device: torch.device | str | None = None) -> torch.Tensor:
        view = wire.as_buffer(data)
        wire.check_length(view, self.wire_bytes(layout))
        wire.check_header(view, self.codec_id, 0, layout, wire.HEADER_BYTES)
        if device is not None:
            out = wire.to_device(view, torch.float32, wire.HEADER_BYTES, layout.numel, torch.device(device))
            wire.check_finite_output(out, "dense payload")
            return out
        array = wire.le_array(view, "f4", wire.HEADER_BYTES, layout.numel)
        wire.check_finite(array, "dense payload")
        return torch.from_numpy(array.copy())

    def wire_bytes(self, layout: Layout) -> int:
        return wire.HEADER_BYTES + 4 * layout.numel
