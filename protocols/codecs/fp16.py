"""``fp16``: IEEE half precision, round-to-nearest-even, saturating at ±65504.

Wire: 16-byte header (param 0) + ``d`` little-endian float16; ``wire_bytes = 16 + 2 d``.
Error bound: for ``|x| <= 65504``, ``|x̂ - x| <= max(2**-11 |x|, 2**-25)`` (half an ulp; the second
term is the subnormal range); larger magnitudes are clamped to ±65504.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import numpy as np
import torch

from protocols.codecs import wire
from protocols.codecs.base import Codec, CodecError, Layout
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
        """Two passes over ``x``: its range (one read), then the conversion written straight into the
        payload buffer; NaN/Inf (refused) and overflow (clamped) only cost more when present."""
        wire.check_input(x, layout)
        x = x.detach()
        if x.numel():
            lo, hi = torch.stack(torch.aminmax(x)).tolist()
            if not (lo >= -FP16_MAX and hi <= FP16_MAX):  # also false for NaN
                wire.check_finite_tensor(x)  # NaN/Inf in x: ValueError; else overflow
                x = x.clamp(-FP16_MAX, FP16_MAX)
        if wire.off_host(x):  # converted there; only the halves are copied
            return wire.pack(wire.header(self.codec_id, 0, layout), x.half())
        x = wire.to_host(x)
        if not wire.LITTLE:
            return wire.join(wire.header(self.codec_id, 0, layout), wire.to_le_bytes(x.half().numpy()).data)
        out = bytearray(wire.HEADER_BYTES + 2 * layout.numel)
        out[: wire.HEADER_BYTES] = wire.header(self.codec_id, 0, layout)
        if x.numel():
            torch.frombuffer(out, dtype=torch.float16, offset=wire.HEADER_BYTES, count=x.numel()).copy_(x)
        return out  # type: ignore[return-value]  # bytearray: bytes-like, one copy less than bytes(out)

    def decode(self, data: bytes, layout: Layout, device: torch.device | str | None = None) -> torch.Tensor:
        view = wire.as_buffer(data)
        wire.check_length(view, self.wire_bytes(layout))
        wire.check_header(view, self.codec_id, 0, layout, wire.HEADER_BYTES)
        if device is not None:
            half = wire.to_device(view, torch.float16, wire.HEADER_BYTES, layout.numel, torch.device(device))
            out = half.float()
            wire.check_finite_output(out, "fp16 payload")
            return out
        if not wire.LITTLE or not layout.numel:
            bits = wire.le_array(view, "u2", wire.HEADER_BYTES, layout.numel)
            wire.check_half_bits(bits, FP16_EXPONENT, "fp16 payload")
            return torch.from_numpy(bits.view(np.float16).astype(np.float32))
        with warnings.catch_warnings():  # a read-only buffer: only read here, into a new fp32 tensor
            warnings.simplefilter("ignore", UserWarning)
            half = torch.frombuffer(view, dtype=torch.float16, offset=wire.HEADER_BYTES, count=layout.numel)
        out = half.float()
        lo, hi = torch.aminmax(out)  # NaN propagates into both; faster than isfinite().all()
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
            raise CodecError("fp16 payload contains NaN or Inf")
        return out

    def wire_bytes(self, layout: Layout) -> int:
        return wire.HEADER_BYTES + 2 * layout.numel
