"""``fp16``: IEEE half precision, round-to-nearest-even, saturating at ±65504.

Wire: 16-byte header (param 0) + ``d`` little-endian float16; ``wire_bytes = 16 + 2 d``.
Error bound: for ``|x| <= 65504``, ``|x̂ - x| <= max(2**-11 |x|, 2**-25)`` (half an ulp; the second
term is the subnormal range); larger magnitudes are clamped to ±65504.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from protocols.codecs import wire
from protocols.codecs.base import Codec, Layout
from protocols.codecs.dense import no_args

FP16_MAX = 65504.0
FP16_EXPONENT = 0x7C00


class Float16Codec(Codec):
    """fp32 → fp16 by ``Tensor.to`` (RNE); ``wire_bytes = 16 + 2 d``."""

    name: ClassVar[str] = "fp16"
    codec_id: ClassVar[int] = 2
    usage: ClassVar[str] = "fp16"

    def __init__(self) -> None:
        self.spec = "fp16"

    @classmethod
    def from_args(cls, args: list[str]) -> Float16Codec:
        no_args(cls.name, args)
        return cls()

    def encode(self, x: torch.Tensor, layout: Layout, state: Any = None) -> bytes:
        wire.check_input(x, layout)
        half = x.detach().to(torch.float16).numpy()
        if bool(((half.view(np.uint16) & FP16_EXPONENT) == FP16_EXPONENT).any()):
            wire.check_finite_input(x.detach().numpy())  # NaN/Inf in x: ValueError; else overflow
            half = x.detach().clamp(-FP16_MAX, FP16_MAX).to(torch.float16).numpy()
        return wire.join(wire.header(self.codec_id, 0, layout), wire.to_le_bytes(half).data)

    def decode(self, data: bytes, layout: Layout) -> torch.Tensor:
        view = wire.as_buffer(data)
        wire.check_length(view, self.wire_bytes(layout))
        wire.check_header(view, self.codec_id, 0, layout, wire.HEADER_BYTES)
        bits = wire.le_array(view, "u2", wire.HEADER_BYTES, layout.numel)
        wire.check_half_bits(bits, FP16_EXPONENT, "fp16 payload")
        return torch.from_numpy(bits.view(np.float16).astype(np.float32))

    def wire_bytes(self, layout: Layout) -> int:
        return wire.HEADER_BYTES + 2 * layout.numel
