"""``bf16``: bfloat16 (the top 16 bits of fp32), round-to-nearest-even.

Encoding uses ``Tensor.to(torch.bfloat16)`` (RNE on the fp32 bits) and ships the 16-bit patterns;
decoding places them in the high half of each fp32 word (numpy has no bfloat16). Values that would
round past the largest bfloat16 are clamped to ±3.3895e38.

Wire: 16-byte header (param 0) + ``d`` little-endian uint16 bit patterns; ``wire_bytes = 16 + 2 d``.
Error bound: ``|x̂ - x| <= max(2**-8 |x|, 2**-134)`` (half an ulp with 8 significant bits).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from protocols.codecs import wire
from protocols.codecs.base import Codec, Layout
from protocols.codecs.dense import no_args

BF16_MAX = float(torch.finfo(torch.bfloat16).max)
BF16_EXPONENT = 0x7F80


class BFloat16Codec(Codec):
    """fp32 → bfloat16 by RNE; ``wire_bytes = 16 + 2 d``."""

    name: ClassVar[str] = "bf16"
    codec_id: ClassVar[int] = 3
    usage: ClassVar[str] = "bf16"

    def __init__(self) -> None:
        self.spec = "bf16"

    @classmethod
    def from_args(cls, args: list[str]) -> BFloat16Codec:
        no_args(cls.name, args)
        return cls()

    def encode(self, x: torch.Tensor, layout: Layout, state: Any = None) -> bytes:
        wire.check_input(x, layout)
        if wire.off_host(x):
            return self._encode_off_host(x.detach(), layout)
        x = wire.to_host(x)
        bits = x.detach().to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        if bool(((bits & BF16_EXPONENT) == BF16_EXPONENT).any()):
            wire.check_finite_input(x.detach().numpy())  # NaN/Inf in x: ValueError; else overflow
            bits = x.detach().clamp(-BF16_MAX, BF16_MAX).to(torch.bfloat16).view(torch.int16).numpy()
        return wire.join(wire.header(self.codec_id, 0, layout), wire.to_le_bytes(bits).data)

    def _encode_off_host(self, x: torch.Tensor, layout: Layout) -> bytes:
        """:meth:`encode` on the tensor's device: rounded and checked there; only the bits are copied."""
        bits = x.to(torch.bfloat16).view(torch.int16)
        if bool(((bits & BF16_EXPONENT) == BF16_EXPONENT).any()):
            wire.check_finite_tensor(x)  # NaN/Inf in x: ValueError; else overflow
            bits = x.clamp(-BF16_MAX, BF16_MAX).to(torch.bfloat16).view(torch.int16)
        return wire.pack(wire.header(self.codec_id, 0, layout), bits)

    def decode(self, data: bytes, layout: Layout, device: torch.device | str | None = None) -> torch.Tensor:
        view = wire.as_buffer(data)
        wire.check_length(view, self.wire_bytes(layout))
        wire.check_header(view, self.codec_id, 0, layout, wire.HEADER_BYTES)
        if device is not None:  # a bf16 NaN/Inf pattern is a NaN/Inf fp32 value: checked after widening
            bits_t = wire.to_device(view, torch.int16, wire.HEADER_BYTES, layout.numel, torch.device(device))
            widened = bits_t.view(torch.bfloat16).float()
            wire.check_finite_output(widened, "bf16 payload")
            return widened
        bits = wire.le_array(view, "u2", wire.HEADER_BYTES, layout.numel)
        wire.check_half_bits(bits, BF16_EXPONENT, "bf16 payload")
        if wire.LITTLE:
            out = np.zeros(layout.numel, dtype=np.float32)
            out.view(np.uint16)[1::2] = bits  # high half of each little-endian fp32 word
        else:
            out = (bits.astype(np.uint32) << 16).view(np.float32)
        return torch.from_numpy(out)

    def wire_bytes(self, layout: Layout) -> int:
        return wire.HEADER_BYTES + 2 * layout.numel
